"""REPA's time direction (Yu et al. 2025, github.com/sihyun-yu/REPA), converted to SiT's at one place.

REPA trains SiT's network with time running the other way: tau = 0 is data and tau = 1 noise,
``x_tau = alpha_tau x + sigma_tau eps`` with (linear) alpha = 1 - tau, sigma = tau, (cosine) alpha = cos(pi tau / 2),
sigma = sin(pi tau / 2), and the network predicts ``v = dx/dtau`` (linear: eps - x). In SiT's time t = 1 - tau the same
interpolant is SiT's linear path (cosine: SiT's GVP path) and SiT's velocity is ``dx/dt = -v``. So

    v_sit(x, t) = -v_repa(x, 1 - t),

and a REPA-trained network wrapped in :class:`ReversedTime` is a SiT-time network: every SiT objective term (the
velocity loss, the likelihood) and every sampler of ``diffusion.samplers.transport`` applies to it unchanged. The
transport objective wraps the network once per call of ``training_losses`` / ``sample`` / ``likelihood`` when
``diffusion.time_direction = "repa"`` (``diffusion.objectives.transport``).

``repa_guidance_bounds`` converts the guidance interval in SiT's time (``sample.guidance_t_lo`` /
``guidance_t_hi``) into REPA's ``guidance_low`` / ``guidance_high`` values, decimal for decimal, so that REPA's
inclusive test on its own float64 grid (``guidance_low <= tau <= guidance_high``) is reproduced exactly, including at
grid points that fall on a bound (REPA's ODE grid at 50 steps has tau = 0.7 on its guidance bound).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TIME_DIRECTIONS = ("sit", "repa")


class ReversedTime:
    """``f(x, t, **cond) = -net(x, time_scale (1 - t), **cond)``: a network trained in REPA's time (t = 0 data) seen
    in SiT's (t = 0 noise). Only the first ``channels`` output channels (the velocity) change sign; any further ones
    (a DiT's learned variance) pass through. ``channels=None``: the input's channel count."""

    def __init__(self, net: Callable, time_scale: float = 1.0, channels: int | None = None):
        self.net, self.time_scale, self.channels = net, time_scale, channels

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        tau = 1 - t
        out = self.net(x, tau if self.time_scale == 1.0 else self.time_scale * tau, **cond)
        c = x.shape[1] if self.channels is None else self.channels
        if out.shape[1] == c:
            return -out
        return torch.cat([-out[:, :c], out[:, c:]], dim=1)


def repa_guidance_bounds(guidance_t_lo: float, guidance_t_hi: float) -> tuple[float, float]:
    """SiT-time guidance interval [t_lo, t_hi] -> REPA's (guidance_low, guidance_high) = (1 - t_hi, 1 - t_lo),
    rounded to 12 decimals so that a decimal bound comes back as the same double REPA's command line gives (1 - 0.3
    is 0.7 exactly; 1 - 0.9 would otherwise be 0.09999999999999998, not 0.1)."""
    return round(1.0 - guidance_t_hi, 12), round(1.0 - guidance_t_lo, 12)
