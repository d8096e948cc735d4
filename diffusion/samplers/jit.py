"""JiT's sampler (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise", ``Denoiser.generate``),
``sampler = "jit_heun"`` of the transport objective.

Time as SiT's (t = 0 noise, t = 1 data). The grid is ``linspace(0, 1, steps + 1)``; ``steps - 1`` Heun steps, then one
Euler step from the last but one grid point to t = 1, so the network is never evaluated at t = 1 and ``steps`` steps
take 2 (steps - 1) + 1 evaluations (JiT's 50 steps: 99). Guidance is decided per evaluation by JiT's interval mask
``(t < t_hi) & ((t_lo == 0) | (t > t_lo))``: strict at both ends, except that t_lo = 0 also admits t = 0; outside it
the unguided (conditional) velocity is used, JiT's w = 1. The arithmetic follows JiT's order of operations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# velocity(z, t, guided) -> v: t a tensor of shape (B,), guided whether this evaluation is guided
Velocity = Callable[[Tensor, Tensor, bool], Tensor]


def jit_guided(t: Tensor, t_lo: float, t_hi: float) -> bool:
    """JiT's interval mask at grid time ``t`` (one value for the batch): t < t_hi and (t_lo == 0 or t > t_lo)."""
    return bool(((t < t_hi) & ((t_lo == 0) | (t > t_lo))).all())


def sample_jit_heun(velocity: Velocity, noise: Tensor, steps: int, t_lo: float = 0.0, t_hi: float = 1.0) -> Tensor:
    """Data from ``noise`` (already scaled by the objective's noise scale): JiT's Heun steps then its last Euler
    step on ``linspace(0, 1, steps + 1)`` (in ``noise``'s dtype), guided where ``jit_guided``."""
    grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device, dtype=noise.dtype)
    batch = noise.shape[0]

    def v(z: Tensor, t: Tensor) -> Tensor:
        return velocity(z, t.expand(batch), jit_guided(t, t_lo, t_hi))

    z = noise
    for i in range(steps - 1):
        t, t_next = grid[i], grid[i + 1]
        v_t = v(z, t)
        z_euler = z + (t_next - t) * v_t
        v_next = v(z_euler, t_next)
        z = z + (t_next - t) * (0.5 * (v_t + v_next))
    return z + (grid[-1] - grid[-2]) * v(z, grid[-2])
