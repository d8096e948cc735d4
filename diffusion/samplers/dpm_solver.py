"""Exponential-integrator samplers of the probability-flow ODE for noise-prediction VP models.

* singlestep DPM-Solver (Lu et al. 2022a, "DPM-Solver", NeurIPS) and DPM-Solver++ (Lu et al. 2022b,
  "DPM-Solver++", arXiv:2211.01095) with the "fast" order schedule: U-ViT's samplers for its paper numbers;
* multistep DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2);
* DDIM (Song et al. 2021a, "Denoising Diffusion Implicit Models"), also with eta > 0.

Each is a Taylor expansion of the model in lambda inside the exact solution (Lu et al. 2022a, Eq. (3.4)): the
first-order update x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s, h = lambda_t - lambda_s, plus
corrections from extra evaluations; data prediction runs the same lines in ``Marginals.dual()``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffusion.samplers.common import Randn
from diffusion.samplers.vp import EpsFn, Marginals, lambda_grid, pin_ends, t_from_lambda, time_grid

# ----------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------


def fast_orders(steps: int, order: int = 3) -> list[int]:
    """Orders of the singlestep steps for ``steps`` evaluations: as many order-``order`` steps as fit, the rest in
    one or two lower-order steps (DPM-Solver-fast, Lu et al. 2022a, Sec. 3.4; for order 3, K = steps // 3 + 1 steps:
    [3, ..., 3, 2, 1], [3, ..., 3, 1] or [3, ..., 3, 2] as steps % 3 is 0, 1 or 2)."""
    if order == 3:
        head = [3] * (steps // 3 + 1 - (2 if steps % 3 == 0 else 1))
        return head + {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
    return [order] * (steps // order) + [1] * (steps % order)


def singlestep_times(schedule, orders: list[int], t_end: float, skip_type: str, like: torch.Tensor) -> torch.Tensor:
    """The sum(orders) + 1 evaluation times from 1 to ``t_end``: step j of order k spans k consecutive entries, the
    ones in between being its inner stages.

    * ``"logSNR"``: step boundaries uniform in lambda (len(orders) intervals), inner stages uniform in lambda within
      their step (r = 1/2, or 1/3 and 2/3: DPM-Solver's defaults). U-ViT's continuous-time models.
    * ``"time_uniform"``: all entries uniform in t, so an order-k step spans k grid intervals and takes the grid
      points in between as its stages (U-ViT's ``dpm_solver_pp.py`` for the discrete models, and DPM-Solver v2).
    """
    if skip_type == "time_uniform":
        return time_grid(schedule, sum(orders), t_end, skip_type, like)
    bounds = lambda_grid(schedule, len(orders), t_end, like)
    stages = [bounds[j] + (bounds[j + 1] - bounds[j]) * torch.arange(k, device=like.device, dtype=like.dtype) / k
              for j, k in enumerate(orders)]
    return pin_ends(t_from_lambda(schedule, torch.cat(stages + [bounds[-1:]])), t_end)


# ----------------------------------------------------------------------------------------------------------
# Updates (eps form; pass Marginals.dual() and x0 values for data prediction)
# ----------------------------------------------------------------------------------------------------------


def _first_order(m: Marginals, x: torch.Tensor, s: int, t: int, value: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-1 (= DDIM) from grid point s to t: alpha_t / alpha_s x - sigma_t (e^h - 1) value."""
    return m.alpha[t] / m.alpha[s] * x - m.sigma[t] * torch.expm1(m.lam[t] - m.lam[s]) * value


def _phi2(h: torch.Tensor) -> torch.Tensor:
    """(e^h - 1) / h - 1: the weight of a first-order (linear in lambda) term of the model's Taylor expansion."""
    return torch.expm1(h) / h - 1


def singlestep_update(model, m: Marginals, x: torch.Tensor, s: int, k: int) -> torch.Tensor:
    """One DPM-Solver-k step from grid point s to s + k, evaluating ``model(x, j)`` at s and the inner points.

    DPM-Solver-2 and -3 (Lu et al. 2022a, Algorithms 1 and 2; r1, r2 read off the inner points' lambdas):
      u_j = first-order step s -> j;  D1 = model(u_1) - model_s
      k = 2: x_t = first_order(t) - sigma_t (e^h - 1) D1 / (2 r1)
      k = 3: u_2 -= (r2 / r1) sigma_2 phi2(r2 h) D1;  D2 = model(u_2) - model_s;  x_t = first_order(t) - sigma_t
             phi2(h) D2 / r2
    """
    t = s + k
    model_s = model(x, s)
    if k == 1:
        return _first_order(m, x, s, t, model_s)
    h = m.lam[t] - m.lam[s]
    r1 = (m.lam[s + 1] - m.lam[s]) / h
    d1 = model(_first_order(m, x, s, s + 1, model_s), s + 1) - model_s
    if k == 2:
        return _first_order(m, x, s, t, model_s) - 0.5 / r1 * m.sigma[t] * torch.expm1(h) * d1
    r2 = (m.lam[s + 2] - m.lam[s]) / h
    u2 = _first_order(m, x, s, s + 2, model_s) - r2 / r1 * m.sigma[s + 2] * _phi2(r2 * h) * d1
    d2 = model(u2, s + 2) - model_s
    return _first_order(m, x, s, t, model_s) - m.sigma[t] / r2 * _phi2(h) * d2


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------


def dpm_solver_singlestep(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, order: int, t_end: float,
                          skip_type: str, data_prediction: bool, progress: bool = False) -> torch.Tensor:
    """Singlestep DPM-Solver ("dpm_solver", eps prediction) or DPM-Solver++ (``data_prediction``) with the fast
    order schedule over ``singlestep_times``; exactly ``steps`` network evaluations."""
    orders = fast_orders(steps, order)
    m = Marginals.at(schedule, singlestep_times(schedule, orders, t_end, skip_type, x))
    if data_prediction:
        view = m.dual()

        def model(x: torch.Tensor, j: int) -> torch.Tensor:
            return (x - m.sigma[j] * eps_fn(x, m.t[j])) / m.alpha[j]
    else:
        view = m

        def model(x: torch.Tensor, j: int) -> torch.Tensor:
            return eps_fn(x, m.t[j])

    s = 0
    for k in tqdm(orders, desc="dpm_solver++" if data_prediction else "dpm_solver", disable=not progress,
                  leave=False):
        x = singlestep_update(model, view, x, s, k)
        s += k
    return x


def dpm_solver_2m(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, t_end: float, skip_type: str,
                  progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): one evaluation per step; the x0 prediction is extrapolated
    with the previous one, D = (1 + 1/(2r)) x0_i - x0_{i-1} / (2r), r = h_{i-1} / h_i; the first step is first
    order."""
    m = Marginals.at(schedule, time_grid(schedule, steps, t_end, skip_type, x))
    dual = m.dual()
    x0_prev = None
    for i in tqdm(range(steps), desc="dpm_solver++2m", disable=not progress, leave=False):
        x0 = (x - m.sigma[i] * eps_fn(x, m.t[i])) / m.alpha[i]
        d = x0
        if x0_prev is not None:
            r = (m.lam[i] - m.lam[i - 1]) / (m.lam[i + 1] - m.lam[i])
            d = (1 + 0.5 / r) * x0 - 0.5 / r * x0_prev
        x = _first_order(dual, x, i, i + 1, d)
        x0_prev = x0
    return x


def ddim(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, t_end: float, skip_type: str, eta: float = 0.0,
         randn: Randn = torch.randn_like, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021a, Eq. (12)): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c = eta sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2) (their Eq. (16)); one draw per step when eta > 0.
    eta = 0 is DPM-Solver-1."""
    m = Marginals.at(schedule, time_grid(schedule, steps, t_end, skip_type, x))
    noise_scale = eta * m.sigma[1:] / m.sigma[:-1] * (1 - (m.alpha[:-1] / m.alpha[1:]) ** 2).sqrt()
    eps_scale = (m.sigma[1:] ** 2 - noise_scale**2).sqrt()
    for i in tqdm(range(steps), desc="ddim", disable=not progress, leave=False):
        eps = eps_fn(x, m.t[i])
        x = m.alpha[i + 1] * (x - m.sigma[i] * eps) / m.alpha[i] + eps_scale[i] * eps
        if eta > 0:
            x = x + noise_scale[i] * randn(x)
    return x
