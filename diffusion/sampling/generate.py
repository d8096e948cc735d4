"""Drawing samples: :func:`generate` (a batch of samples of a model with validated sampler settings) and
:class:`SampleSource` (everything that decides sample ``i``, drawn by index), which the training previews, the PNG
grids (``grids.py``), the resumable evaluation jobs (``jobs.py``) and in-training FID share.

Reproducibility: sample ``i`` of a run with seed ``s`` gets its own CPU ``torch.Generator`` seeded from (s, i). Its
initial noise and every random draw the sampler makes for it come from that generator (the samplers take a
``randn(x)`` callable; :class:`PerSampleNoise` stacks one draw per sample), and its evaluation label is a function of
(s, i) too. So sample ``i`` is the same whatever the batch size, the number of processes or the device it was drawn
on (up to the device's arithmetic), and a 50K-sample job can be split, killed and resumed without changing a pixel.

Sampler settings come from a config's ``sample`` section through ``diffusion.sampling.settings`` (the overlay and
the per-sampler options), validated once per source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffusion.registry import describe
from diffusion.sampling.per_sample import LabelPlan, PerSampleNoise
from diffusion.sampling.pixels import quantize_setting, to_uint8
from diffusion.sampling.precision import AutocastNetwork, autocast_decode, tf32_matmuls
from diffusion.sampling.settings import SamplerSettings, sampler_settings


@torch.no_grad()
def generate(model, objective, settings, image_shape, *, labels: torch.Tensor | None = None, num: int = 0,
             contexts: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
             indices: Sequence[int] | None = None, seed: int = 0, decode: Callable | None = None, device="cpu",
             progress: bool = False, guide: torch.nn.Module | None = None) -> torch.Tensor:
    """Samples (float32, N x C x H x W) for ``labels`` (class-conditional), ``contexts`` (text, (N, tokens, dim)) or
    ``num`` unconditional ones; ``decode`` (latents -> images in [-1, 1]) is applied to latent samples.

    ``settings``: a ``sample`` section or the :class:`SamplerSettings` built from one. ``indices`` are the samples'
    global numbers (default 0..N-1): with ``seed`` they decide every random draw, so a sample does not depend on
    which batch it is drawn in. Guidance uses the model's null label or ``null_context`` (shape (tokens, dim)) as the
    unconditional input; with ``guide`` (a network in the model's space) autoguidance replaces it, the guide called
    with the same conditioning (``objective.sample``'s ``guide``). The networks and ``decode`` run in
    ``settings.precision`` (autocast; the sampler itself in float32), with ``settings.tf32`` on CUDA.
    """
    settings = sampler_settings(objective, settings)
    n = len(labels) if labels is not None else len(contexts) if contexts is not None else num
    indices = range(n) if indices is None else indices
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for {n} samples")
    randn = PerSampleNoise(seed, indices)
    noise = randn(torch.empty((n, *image_shape), device=device))
    cond, null_cond = {}, None
    if labels is not None:
        cond = {"y": labels.to(device)}
        if (null_label := describe(model).null_label) is not None:
            null_cond = {"y": torch.full_like(cond["y"], null_label)}
    if contexts is not None:
        cond = {"context": contexts.to(device)}
        if null_context is not None:
            null_cond = {"context": null_context.to(device).expand(n, *null_context.shape)}
    decode = autocast_decode(decode, settings.precision, device)
    was_training = model.training
    model.eval()
    if guide is not None:  # its own module: eval mode for good (a frozen network only ever sampled)
        guide.eval()
        guide = AutocastNetwork(guide, settings.precision, device)
    try:
        with tf32_matmuls(settings.tf32, device):
            out = objective.sample(AutocastNetwork(model, settings.precision, device), noise, cond,
                                   null_cond=null_cond, randn=randn, progress=progress, guide=guide,
                                   **settings.kwargs).float()
            return decode(out) if decode is not None else out
    finally:
        model.train(was_training)


@dataclass
class SampleSource:
    """Everything that decides sample ``i``: model, objective, sampler settings, seed and what sample ``i`` is
    conditioned on: a :class:`LabelPlan`, a prompt list with the text encoder, or text ``contexts`` (R, tokens,
    dim) with ``null_context`` (prompts and contexts are cycled by index), or nothing; ``guide``: the autoguidance
    guide network (None: CFG)."""

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
    guide: torch.nn.Module | None = None
    settings: SamplerSettings = field(init=False)  # built once from ``sample_cfg``

    def __post_init__(self) -> None:
        self.settings = sampler_settings(self.objective, self.sample_cfg)
        kind = describe(self.model).conditioning
        given = ("class" if self.labels is not None else
                 "text" if self.prompts is not None or self.contexts is not None else "none")
        if given != kind:
            raise ValueError(f"a {kind}-conditioned model cannot be sampled with {given} conditioning")
        if self.prompts is not None and self.text_encoder is None:
            raise ValueError("prompts need the text encoder")

    def images(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (images in [-1, 1] (N, C, H, W), labels or None)."""
        labels = self.labels(indices) if self.labels is not None else None
        contexts, null_context = None, self.null_context
        if self.prompts is not None:
            contexts = self.text_encoder.encode([self.prompts[i % len(self.prompts)] for i in indices])
            null_context = self.text_encoder.null_context()
        elif self.contexts is not None:
            contexts = self.contexts[torch.as_tensor(list(indices)) % len(self.contexts)]
        images = generate(self.model, self.objective, self.settings, self.image_shape, labels=labels,
                          num=len(indices), contexts=contexts, null_context=null_context, indices=indices,
                          seed=self.seed, decode=self.decode, device=self.device, guide=self.guide)
        return images, labels

    def uint8(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (uint8 (N, H, W, 3) as the FID tools read them, quantised by ``sample.quantize``; grey images repeated
        to RGB, labels or None)."""
        images, labels = self.images(indices)
        pixels = to_uint8(images, quantize_setting(self.sample_cfg)).numpy()  # sample.quantize
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        return pixels, None if labels is None else labels.numpy().astype(np.int64)
