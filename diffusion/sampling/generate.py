"""Drawing samples: training previews, labelled PNG grids, and resumable many-process evaluation jobs.

Reproducibility: sample ``i`` of a run with seed ``s`` gets its own CPU ``torch.Generator`` seeded from (s, i). Its
initial noise and every random draw the sampler makes for it come from that generator (the samplers take a
``randn(x)`` callable; :class:`PerSampleNoise` stacks one draw per sample), and its evaluation label is a function of
(s, i) too. So sample ``i`` is the same whatever the batch size, the number of processes or the device it was drawn
on (up to the device's arithmetic), and a 50K-sample job can be split, killed and resumed without changing a pixel.

Evaluation jobs (:class:`SampleJob`) write fixed-size chunks ``OUT.parts/chunk_XXXXX.npz`` atomically, process ``r``
of ``w`` takes every ``w``-th unfinished chunk, and rank 0 streams the chunks into one ADM-style ``OUT.npz``
(``arr_0``: uint8 (N, H, W, 3); ``arr_1``: labels of class-conditional models) that the FID tools read.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.config.schema import base_config
from diffusion.errors import ConfigError
from diffusion.samplers.common import check_options
from diffusion.sampling.per_sample import LabelPlan, PerSampleNoise
from diffusion.sampling.pixels import quantize_setting, to_uint8
from diffusion.sampling.precision import (
    PRECISION_KEYS,
    AutocastNetwork,
    autocast_decode,
    precision_settings,
    tf32_matmuls,
)

# The ``sample`` config keys that are keyword arguments of ``objective.sample``: key -> (type, meaning). The one
# list of them: sample.py's flags and the job records derive from it.
SAMPLER_SETTINGS = {
    "sampler": (str, "one of the objective's samplers (diffusion.samplers; iddpm: ddpm, ddim)"),
    "steps": (int, "network evaluations"),
    "order": (int, "highest order of the singlestep DPM-Solvers (1-3)"),
    "t_end": (float, "last time of the continuous-time samplers (default: the sampler's)"),
    "skip_type": (str, "time grid of DPM-Solver and DDIM: logSNR | time_uniform"),
    "eta": (float, "DDIM stochasticity (0 = deterministic)"),
    "guidance_scale": (float, "guidance scale w in eps_u + w (eps_c - eps_u) (1 = none)"),
    "guidance_channels": (str, "all, or k: guide only the first k channels"),
    "clip_denoised": (bool, "clamp x0 predictions to [-1, 1] (default: the objective's setting)"),
    # The transport objective's (SiT's) knobs; the other objectives' samplers take none of them.
    "atol": (float, "absolute tolerance of the adaptive ODE solver (dopri5)"),
    "rtol": (float, "relative tolerance of the adaptive ODE solver (dopri5)"),
    "diffusion_form": (str, "diffusion coefficient of the transport SDE samplers: sigma | constant | SBDM | linear | "
                            "decreasing | increasing-decreasing"),
    "diffusion_norm": (float, "scale of the transport SDE's diffusion coefficient"),
    "last_step": (str, "last step of the transport SDE samplers: mean | tweedie | euler | none"),
    "last_step_size": (float, "time the transport SDE's last step covers"),
    "time_shift": (float, "timestep shift of the transport samplers' time grid (1 = none)"),
    "guidance_t_lo": (float, "transport: guide only from this time on (0 = noise, 1 = data)"),
    "guidance_t_hi": (float, "transport: guide only up to this time"),
    # How the network and the decoder compute (diffusion/sampling/precision.py); not keywords of objective.sample.
    "precision": (str, "autocast of the network and the decoder: fp32 | fp16 (U-ViT) | bf16"),
    "tf32": (bool, "TF32 matmuls while sampling on NVIDIA GPUs (DiT); no effect on CPU"),
}
SAMPLER_KEYS = tuple(SAMPLER_SETTINGS)
# Keys an objective's ``sample`` receives only if it takes them (by its signature): elsewhere they are left out at
# their defaults (so the other objectives' calls and job records stay as they were) and refused when set.
OPTIONAL_KEYS = ("atol", "rtol", "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "time_shift",
                 "guidance_t_lo", "guidance_t_hi")

_OPTIONAL_DEFAULTS = {key: base_config().sample[key] for key in OPTIONAL_KEYS}


def _takes(objective, key: str) -> bool:
    return objective is not None and key in inspect.signature(objective.sample).parameters


def sample_settings(sample_cfg, objective=None) -> dict:
    """The ``sample`` config section -> keyword arguments of ``objective.sample``: every key of
    ``SAMPLER_SETTINGS`` except the ``OPTIONAL_KEYS`` that hold their default and that ``objective`` does not take
    (with no objective: every optional key at its default is left out, and the sampler's own default applies), and
    except the ``PRECISION_KEYS`` (:func:`diffusion.sampling.precision.precision_settings` reads those)."""
    settings = {key: sample_cfg[key] for key in SAMPLER_KEYS if key not in (*OPTIONAL_KEYS, *PRECISION_KEYS)}
    for key in OPTIONAL_KEYS:
        value = sample_cfg.get(key, _OPTIONAL_DEFAULTS[key])
        if _takes(objective, key) or value != _OPTIONAL_DEFAULTS[key]:
            settings[key] = value
    return settings


def preview_settings(config):
    """``config.sample`` with the non-empty values of ``config.preview`` on top: the (cheaper) sampler the training
    previews use."""
    settings = copy.deepcopy(config.sample)
    for key, value in config.preview.items():
        if value not in ("", 0, None):
            settings[key] = value
    return settings


def check_settings(objective, settings: dict) -> None:
    """Refuse sampler settings the objective cannot run, with the valid choices in the message (a ConfigError:
    the settings come from the config and the command line)."""
    foreign = [key for key in OPTIONAL_KEYS if key in settings and not _takes(objective, key)]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)} belong to the transport samplers (diffusion.kind=transport); "
                          f"{type(objective).__name__} takes none of them: leave them at their defaults")
    if settings["sampler"] not in objective.SAMPLERS:
        raise ConfigError(f"unknown sampler {settings['sampler']!r} for {type(objective).__name__}; "
                          f"choose one of {', '.join(objective.SAMPLERS)}")
    if not isinstance(settings["steps"], int) or settings["steps"] < 1:
        raise ConfigError(f"steps must be a positive number of network evaluations, got {settings['steps']!r}")
    channels = str(settings["guidance_channels"])
    if channels != "all" and not (channels.isdigit() and int(channels) > 0):
        raise ConfigError(f"guidance_channels must be 'all' or a positive channel count, got {channels!r}")
    try:  # the samplers' own checks of the other options, before any network runs
        check_options(settings["sampler"], objective.SAMPLERS, steps=settings["steps"], order=settings["order"],
                      skip_type=settings["skip_type"], eta=settings["eta"], t_end=settings["t_end"])
        check = getattr(objective, "check_sample_options", None)
        if check is not None:  # the objective's own checks of its optional keys
            check(**{key: settings[key] for key in OPTIONAL_KEYS if key in settings})
    except ValueError as err:
        raise ConfigError(str(err)) from None


def num_real_classes(model) -> int:
    """Classes a user can ask for (the null label, if any, excluded); 0 for unconditional models."""
    null = getattr(model, "null_label", None)
    if null is not None:
        return null
    return max(getattr(model, "num_classes", 0), 0)


@torch.no_grad()
def generate(model, objective, sample_cfg, image_shape, *, labels: torch.Tensor | None = None, num: int = 0,
             contexts: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
             indices: Sequence[int] | None = None, seed: int = 0, decode: Callable | None = None, device="cpu",
             progress: bool = False) -> torch.Tensor:
    """Samples (float32, N x C x H x W) for ``labels`` (class-conditional), ``contexts`` (text, (N, tokens, dim)) or
    ``num`` unconditional ones; ``decode`` (latents -> images in [-1, 1]) is applied to latent samples.

    ``indices`` are the samples' global numbers (default 0..N-1): with ``seed`` they decide every random draw,
    so a sample does not depend on which batch it is drawn in. Guidance uses the model's null label or
    ``null_context`` (shape (tokens, dim)) as the unconditional input. The network and ``decode`` run in
    ``sample_cfg.precision`` (autocast; the sampler itself in float32), with ``sample_cfg.tf32`` on CUDA.
    """
    n = len(labels) if labels is not None else len(contexts) if contexts is not None else num
    indices = range(n) if indices is None else indices
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for {n} samples")
    randn = PerSampleNoise(seed, indices)
    noise = randn(torch.empty((n, *image_shape), device=device))
    cond, null_cond = {}, None
    if labels is not None:
        cond = {"y": labels.to(device)}
        if getattr(model, "null_label", None) is not None:
            null_cond = {"y": torch.full_like(cond["y"], model.null_label)}
    if contexts is not None:
        cond = {"context": contexts.to(device)}
        if null_context is not None:
            null_cond = {"context": null_context.to(device).expand(n, *null_context.shape)}
    arithmetic = precision_settings(sample_cfg)
    decode = autocast_decode(decode, arithmetic["precision"], device)
    was_training = model.training
    model.eval()
    try:
        with tf32_matmuls(arithmetic["tf32"], device):
            out = objective.sample(AutocastNetwork(model, arithmetic["precision"], device), noise, cond,
                                   null_cond=null_cond, randn=randn, progress=progress,
                                   **sample_settings(sample_cfg, objective)).float()
            return decode(out) if decode is not None else out
    finally:
        model.train(was_training)


@dataclass
class SampleSource:
    """Everything that decides sample ``i``: model, objective, sampler settings, seed and what sample ``i`` is
    conditioned on: a :class:`LabelPlan`, a prompt list with the text encoder, or text ``contexts`` (R, tokens,
    dim) with ``null_context`` (prompts and contexts are cycled by index), or nothing."""

    model: torch.nn.Module
    objective: object
    sample_cfg: object
    image_shape: tuple[int, ...]
    seed: int = 0
    labels: LabelPlan | None = None
    prompts: list[str] | None = None
    text_encoder: object = None
    contexts: torch.Tensor | None = None
    null_context: torch.Tensor | None = None
    decode: Callable | None = None
    device: str | torch.device = "cpu"

    def images(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (images in [-1, 1] (N, C, H, W), labels or None)."""
        labels = self.labels(indices) if self.labels is not None else None
        contexts, null_context = None, self.null_context
        if self.prompts is not None:
            contexts = self.text_encoder.encode([self.prompts[i % len(self.prompts)] for i in indices])
            null_context = self.text_encoder.null_context()
        elif self.contexts is not None:
            contexts = self.contexts[torch.as_tensor(list(indices)) % len(self.contexts)]
        images = generate(self.model, self.objective, self.sample_cfg, self.image_shape, labels=labels,
                          num=len(indices), contexts=contexts, null_context=null_context, indices=indices,
                          seed=self.seed, decode=self.decode, device=self.device)
        return images, labels

    def uint8(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (uint8 (N, H, W, 3) as the FID tools read them, quantised by ``sample.quantize``; grey images repeated
        to RGB, labels or None)."""
        images, labels = self.images(indices)
        pixels = to_uint8(images, quantize_setting(self.sample_cfg)).numpy()  # sample.quantize
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        return pixels, None if labels is None else labels.numpy().astype(np.int64)

