"""[-1, 1] images -> uint8 pixels: the one quantisation of samples, grids, dataset references and REPA's encoder
inputs (:func:`to_uint8`), and the ``sample.quantize`` setting that picks it for samples.

    round     ``round((x + 1) * 127.5)`` of x clamped to [-1, 1] (half to even): the exact inverse of the datasets'
              ``u / 127.5 - 1`` for all 256 grey levels u. DiT's and SiT's ``sample_ddp.py`` write
              ``clamp(127.5 * x + 128, 0, 255).to(uint8)``, which is ``floor(127.5 x + 128)``: round half up,
              computed in another order. The two agree except where ``127.5 (x + 1)`` lies within float32 rounding
              of a half-integer: 44 of 10^7 uniform float32 x differ, by one level (U-ViT's torchvision
              ``save_image``, ``255 v + 0.5`` truncated with v = (x + 1) / 2, rounds half up too).
    truncate  ``floor(255 * ((x + 1) / 2))`` clamped to [0, 255]: REPA's ``generate.py``
              (``clamp(255 * (x + 1) / 2, 0, 255).to(uint8)``, a cast that truncates), operation for operation.
              On uniformly distributed x it is darker than ``round`` by 0.49998 grey levels on average (measured on
              10^7 float32 x: round - truncate is 1 on half the pixels, 0 on the rest). It is no inverse of the
              datasets' scaling (63 of the 256 levels come back one lower), so only REPA's samples use it.

The uint8 samples are what every FID tool reads, so the choice moves a score: half a grey level is a small, uniform
brightness shift of every sample.
"""

from __future__ import annotations

import torch

from diffusion.config.schema import SAMPLE_QUANTIZE
from diffusion.errors import ConfigError


def quantize_setting(sample_cfg) -> str:
    """``sample.quantize`` of a ``sample`` section ("round" where an older config lacks it), checked."""
    mode = sample_cfg.get("quantize", "round")
    if mode not in SAMPLE_QUANTIZE:
        raise ConfigError(f"unknown sample.quantize {mode!r}; use one of {', '.join(SAMPLE_QUANTIZE)} "
                          f"(--quantize round)")
    return mode


def to_uint8(images: torch.Tensor, quantize: str = "round", *, channels_last: bool = True) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8, quantised by ``quantize`` (module docstring): (N, H, W, C) on the CPU,
    as the FID tools store samples, or with ``channels_last=False`` (N, C, H, W) on the images' device."""
    if quantize not in SAMPLE_QUANTIZE:
        raise ConfigError(f"unknown quantisation {quantize!r}; use one of {', '.join(SAMPLE_QUANTIZE)}")
    x = images.float()  # half-precision arithmetic would move levels
    if quantize == "round":
        levels = ((x.clamp(-1, 1) + 1) * 127.5).round()
    else:  # REPA's order of operations, so that its float32 rounding is the same too
        levels = (255.0 * ((x + 1) / 2)).clamp(0, 255).floor()
    pixels = levels.to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu() if channels_last else pixels
