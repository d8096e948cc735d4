"""Classifier-free guidance (Ho & Salimans, 2021) as one batched network call, autoguidance (Karras et al., NeurIPS
2024: a smaller or shorter-trained ``guide`` network in place of the unconditional branch), and the label drop that
trains a model for CFG (:func:`drop_labels`).

Convention used everywhere in this project: ``eps = eps_u + w * (eps_c - eps_u)``, so ``w = 1`` is plain
conditional sampling. U-ViT's papers and configs write ``eps_c + s * (eps_c - eps_u)``, which is ``w = 1 + s``
(U-ViT ImageNet 256 uses s = 0.4, i.e. w = 1.4); DiT's ``cfg_scale`` is ``w`` already. Autoguidance is the same
formula with the guide's output in place of ``eps_u``: ``out = out_g + w (out_m - out_g)``, both networks on the same
input and the same conditioning, in whatever the network predicts (eps, velocity, x0 or score: the combination is
affine, so it is the same in denoiser space as EDM2 applies it whenever the conversion is affine in the output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def concat_cond(cond: dict, null_cond: dict) -> dict:
    """Stack conditioning dicts as [cond; uncond] along the batch dimension."""
    return {k: torch.cat([cond[k], null_cond[k]]) for k in cond}


def guided_model(model: Callable, cond: dict, null_cond: dict | None, scale: float, eps_channels: int,
                 channels: str | int = "all", interval: tuple[float, float] | None = None,
                 guide: Callable | None = None) -> Callable:
    """Return ``f(x, t) -> output`` that evaluates ``model(x, t, **cond)`` with guidance applied.

    ``eps_channels``: how many leading output channels are the noise prediction (the rest, e.g. DiT's learned
    variance, is taken from the conditional half unguided). ``channels``: ``"all"`` guides every noise channel
    (correct); an int ``k`` guides only the first ``k`` (DiT's released sampler guides 3 of 4 latent channels,
    needed to reproduce its FID 2.27). With ``scale == 1`` or no ``null_cond`` (and no ``guide``) this is one plain
    forward. ``interval = (t_lo, t_hi)``: guide only while t_lo <= t <= t_hi (inclusive; t as the network receives
    it, the first sample's value), else one plain conditional forward of the batch (guidance interval, Kynkaanniemi
    et al. 2024; REPA's ``guidance_low`` / ``guidance_high``).

    ``guide`` (a network with ``model``'s call signature): autoguidance instead of CFG, ``out_g + w (out_m - out_g)``
    on the same channels, the guide called with ``cond`` (``null_cond`` unused) and the variance channels from the
    main model. The guide is another network, so it is its own forward call per step (CFG's two halves share one).
    """
    guided = eps_channels if channels == "all" else int(channels)
    if guide is not None:
        return _autoguided(model, guide, cond, scale, guided, interval)
    if null_cond is None or scale == 1.0:
        return lambda x, t: model(x, t, **cond)
    both = concat_cond(cond, null_cond)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if interval is not None and not interval[0] <= float(t[0]) <= interval[1]:
            return model(x, t, **cond)
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        eps_c, eps_u = out_c[:, :guided], out_u[:, :guided]
        return torch.cat([eps_u + scale * (eps_c - eps_u), out_c[:, guided:]], dim=1)

    return forward


def _autoguided(model: Callable, guide: Callable, cond: dict, scale: float, guided: int,
                interval: tuple[float, float] | None) -> Callable:
    """``guided_model`` with a guide network: ``out_g + w (out_m - out_g)`` on the first ``guided`` channels."""
    if scale == 1.0:  # D_guide + 1 (D_main - D_guide) = D_main: the guide is not evaluated
        return lambda x, t: model(x, t, **cond)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        out_m = model(x, t, **cond)
        if interval is not None and not interval[0] <= float(t[0]) <= interval[1]:
            return out_m
        out_g = guide(x, t, **cond)
        main, weak = out_m[:, :guided], out_g[:, :guided].to(out_m.dtype)
        return torch.cat([weak + scale * (main - weak), out_m[:, guided:]], dim=1)

    return forward


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int | None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance training: replace each label by the null label with probability p_uncond
    (where the row's ``uniform`` draw, fresh ones if not given, is below it)."""
    if p_uncond <= 0:
        return y
    u = torch.rand(y.shape, device=y.device) if uniform is None else uniform.to(y.device)
    return torch.where(u < p_uncond, torch.full_like(y, null_label), y)
