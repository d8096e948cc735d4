"""The arithmetic of sampling: ``sample.precision`` (fp32 | fp16 | bf16) and ``sample.tf32``.

U-ViT sampled and decoded under fp16 autocast (``accelerate launch --mixed_precision fp16 eval*.py``); DiT sampled in
fp32 with TF32 matmuls. Here only the network's forward and the autoencoder's decode run under autocast: the sampler's
state, its updates, the guidance combination and every random draw stay float32 (each network output is cast back to
the dtype of the state it was called on), so the precision changes the network's rounding and nothing else.

``tf32`` switches TF32 matmuls and cuDNN convolutions on for the duration of the sampling on a CUDA device, and off
(matmuls; cuDNN keeps torch's default) when False, so a trainer's ``train.tf32`` does not leak into its previews and
FID samples; torch's settings are restored afterwards. It has no effect on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from diffusion.config.schema import SAMPLE_PRECISIONS
from diffusion.errors import ConfigError

PRECISION_KEYS = ("precision", "tf32")  # the sample-section keys of this module (not keywords of objective.sample)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision_settings(sample_cfg) -> dict:
    """``{"precision", "tf32"}`` of a ``sample`` section (fp32 / False where an older config lacks them), checked."""
    precision, tf32 = sample_cfg.get("precision", "fp32"), sample_cfg.get("tf32", False)
    if precision not in SAMPLE_PRECISIONS:
        raise ConfigError(f"unknown sample.precision {precision!r}; use one of {', '.join(SAMPLE_PRECISIONS)} "
                          f"(--precision fp32)")
    if not isinstance(tf32, bool):
        raise ConfigError(f"sample.tf32 must be true or false, got {tf32!r}")
    return {"precision": precision, "tf32": tf32}


def check_device(precision: str, device) -> None:
    """Refuse a precision torch cannot autocast to on ``device`` (fp16 and bf16 autocast work on CPU and CUDA)."""
    kind = torch.device(device).type
    if precision != "fp32" and not torch.amp.is_autocast_available(kind):
        raise ConfigError(f"sample.precision={precision} needs autocast, which torch does not offer on {kind}: "
                          f"use --precision fp32")


def autocast(precision: str, device):
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    check_device(precision, device)
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class AutocastNetwork:
    """``model`` called under autocast, its tensor outputs cast to the dtype of its first argument (the sampler's
    state), so that everything outside the forward stays in the state's precision. Other attributes are the
    model's."""

    def __init__(self, model: Callable, precision: str, device):
        self.model, self.precision, self.device = model, precision, device

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        with autocast(self.precision, self.device):
            out = self.model(x, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.to(x.dtype)
        return type(out)(o.to(x.dtype) if isinstance(o, torch.Tensor) else o for o in out)

    def __getattr__(self, name: str):
        if name == "model":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def autocast_decode(decode: Callable | None, precision: str, device) -> Callable | None:
    """``decode`` (latents -> images) run under autocast; float32 images."""
    if decode is None or precision == "fp32":
        return decode

    def run(latents: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return decode(latents).float()

    return run


@contextmanager
def tf32_matmuls(enabled: bool, device) -> Iterator[None]:
    """TF32 matmuls (and cuDNN convolutions) on or off while sampling on a CUDA device; restored afterwards."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled or saved[1]
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
