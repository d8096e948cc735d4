"""The reverse-time VP SDE and its probability-flow ODE, integrated by Euler(-Maruyama), as U-ViT samples its
CIFAR-10 and CelebA numbers (1000 steps).

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations", Eqs. (6) and (13):
the forward SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw has the reverse SDE dx = [-beta x / 2 - beta score] dt +
sqrt(beta) dw_bar and the probability-flow ODE dx = [-beta x / 2 - beta score / 2] dt, with score = -eps / sigma_t.
Time grid (U-ViT's ``sde.euler_maruyama``): [0] + linspace(t_end, 1, steps), walked from t = 1 down with the
coefficients taken at the step's start; the last step, t_end -> 0, adds no noise (so steps - 1 draws).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffusion.samplers.common import Randn
from diffusion.samplers.vp import EpsFn, Marginals


def euler_maruyama(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, t_end: float, randn: Randn | None,
                   progress: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE; with ``randn=None`` plain Euler on the probability-flow ODE."""
    grid = torch.cat([x.new_zeros(1), torch.linspace(t_end, 1.0, steps, device=x.device, dtype=x.dtype)])
    t, dt = grid[1:], grid[:-1] - grid[1:]  # step i goes from t[i] to grid[i], dt < 0
    beta, sigma = schedule.beta(t), Marginals.at(schedule, t).sigma
    eps_weight = (1.0 if randn is not None else 0.5) * beta / sigma  # -g^2 score = beta eps / sigma
    noise_scale = (beta * -dt).sqrt()
    for i in tqdm(range(steps - 1, -1, -1), desc="euler_maruyama" if randn else "euler_ode", disable=not progress,
                  leave=False):
        eps = eps_fn(x, t[i])
        x = x + (-0.5 * beta[i] * x + eps_weight[i] * eps) * dt[i]
        if randn is not None and i > 0:
            x = x + noise_scale[i] * randn(x)
    return x
