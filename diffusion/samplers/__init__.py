"""Every sampler behind the papers' numbers, behind one interface: ``objective.sample(model, noise, cond, ...)``.

Noise-prediction VP objectives (U-ViT; ``diffusion.objectives.vp``) run ``sample_vp``; ``steps`` counts network
evaluations (twice the batch with guidance, in one call). Defaults (``None``) are U-ViT's settings:

| sampler        | method                                         | grid (default)                    | t_end |
|----------------|------------------------------------------------|-----------------------------------|-------|
| dpm_solver     | singlestep DPM-Solver, eps prediction, "fast"  | logSNR, K = steps // 3 + 1 steps  | 1e-4  |
| dpm_solver++   | singlestep DPM-Solver++, x0 prediction, "fast" | time_uniform, steps + 1 points    | 1e-3  |
| dpm_solver++2m | multistep DPM-Solver++(2M)                     | time_uniform, steps + 1 points    | 1e-3  |
| ddim           | DDIM, ``eta`` (one draw per step when > 0)     | time_uniform, steps + 1 points    | 1e-3  |
| euler_maruyama | reverse SDE, Euler-Maruyama (steps - 1 draws)  | [0] + linspace(t_end, 1, steps)   | 1e-3  |
| euler_ode      | probability-flow ODE, Euler                    | as euler_maruyama                 | 1e-3  |

(U-ViT: ``dpm_solver`` with 50 steps for the continuous-time models, ``dpm_solver++`` with 50 steps for the discrete
ones, ``euler_maruyama`` with 1000 steps for CIFAR-10 and CelebA.) On a discrete schedule no sampler goes below the
first trained step, t = 1/N, unless asked. Each sampler takes its own options (``VP_OPTIONS``) and refuses others:
``order`` (1-3, the singlestep solvers' highest order), ``skip_type`` ("logSNR" | "time_uniform", the grid of every
DPM-Solver/DDIM sampler), ``t_end``, ``eta`` (DDIM) and ``clip_denoised``.

The other families live beside their objectives' samplers: iDDPM's discrete ancestral and DDIM loops
(``diffusion.objectives.iddpm``), SiT's ODE/SDE integrators (``diffusion.samplers.transport``) and REPA's
(``diffusion.samplers.repa``); ``diffusion.samplers.common`` holds what they share (draws, option tables).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from diffusion.samplers.common import SKIP_TYPES, Randn, check_options, own_options, standard_normal
from diffusion.samplers.dpm_solver import ddim, dpm_solver_2m, dpm_solver_singlestep, fast_orders, singlestep_times
from diffusion.samplers.sde import euler_maruyama
from diffusion.samplers.vp import EpsFn, Marginals, clip_x0, time_grid

__all__ = ["SKIP_TYPES", "VP_OPTIONS", "VP_SAMPLERS", "Marginals", "check_options", "check_vp_options",
           "default_skip_type", "default_t_end", "fast_orders", "sample_vp", "singlestep_times", "standard_normal",
           "time_grid"]


def default_t_end(sampler: str, schedule) -> float:
    """U-ViT's last time: 1e-4 for DPM-Solver on continuous time, else 1e-3; never below ``schedule.t_min``."""
    return max(1e-4 if sampler == "dpm_solver" else 1e-3, schedule.t_min)


def default_skip_type(sampler: str) -> str:
    return "logSNR" if sampler == "dpm_solver" else "time_uniform"


# Each sampler as a function of (eps_fn, schedule, x), its steps, draws and its own options (VP_OPTIONS).


def _singlestep(eps_fn: EpsFn, schedule, x: torch.Tensor, *, data_prediction: bool, steps: int, order: int,
                t_end: float, skip_type: str, progress: bool, randn: Randn) -> torch.Tensor:
    return dpm_solver_singlestep(eps_fn, schedule, x, steps=steps, order=order, t_end=t_end, skip_type=skip_type,
                                 data_prediction=data_prediction, progress=progress)


def _multistep(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, t_end: float, skip_type: str,
               progress: bool, randn: Randn) -> torch.Tensor:
    return dpm_solver_2m(eps_fn, schedule, x, steps=steps, t_end=t_end, skip_type=skip_type, progress=progress)


def _ddim(eps_fn: EpsFn, schedule, x: torch.Tensor, *, steps: int, t_end: float, skip_type: str, eta: float,
          randn: Randn, progress: bool) -> torch.Tensor:
    return ddim(eps_fn, schedule, x, steps=steps, t_end=t_end, skip_type=skip_type, eta=eta, randn=randn,
                progress=progress)


def _euler(eps_fn: EpsFn, schedule, x: torch.Tensor, *, stochastic: bool, steps: int, t_end: float, randn: Randn,
           progress: bool) -> torch.Tensor:
    if steps < 2:
        raise ValueError(f"{'euler_maruyama' if stochastic else 'euler_ode'} needs steps >= 2 (its grid is [0] + "
                         f"linspace(t_end, 1, steps))")
    return euler_maruyama(eps_fn, schedule, x, steps=steps, t_end=t_end, randn=randn if stochastic else None,
                          progress=progress)


_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpm_solver": partial(_singlestep, data_prediction=False),
    "dpm_solver++": partial(_singlestep, data_prediction=True),
    "dpm_solver++2m": _multistep,
    "ddim": _ddim,
    "euler_maruyama": partial(_euler, stochastic=True),
    "euler_ode": partial(_euler, stochastic=False),
}
VP_SAMPLERS = tuple(_SAMPLERS)
# Each sampler's own options and their defaults (None: the sampler's paper default, see the table above).
_GRID = {"t_end": None, "skip_type": None, "clip_denoised": None}
VP_OPTIONS: dict[str, dict] = {
    "dpm_solver": {"order": 3, **_GRID}, "dpm_solver++": {"order": 3, **_GRID}, "dpm_solver++2m": dict(_GRID),
    "ddim": {**_GRID, "eta": 0.0},
    "euler_maruyama": {"t_end": None, "clip_denoised": None}, "euler_ode": {"t_end": None, "clip_denoised": None},
}


def check_vp_options(sampler: str, steps: int, options: dict) -> dict:
    """``sampler``'s options with its defaults filled in; one ValueError for anything it cannot run with."""
    own = own_options(VP_OPTIONS, sampler, steps, options)
    check_options(**own)
    return own


def sample_vp(eps_fn: EpsFn, schedule, noise: torch.Tensor, *, sampler: str, steps: int,
              randn: Randn = torch.randn_like, progress: bool = False, **options) -> torch.Tensor:
    """Integrate from x_1 = ``noise`` to t_end (t = 0 for the Euler samplers) with ``sampler`` and its own
    ``options`` (``VP_OPTIONS``); returns x0.

    ``eps_fn(x, t)``: the (guided) noise prediction at continuous time t (a 0-dim device tensor). The arithmetic runs
    in float32 (float64 for float64 noise); every table is a device tensor built before the loop.
    """
    own = check_vp_options(sampler, steps, options)
    x = noise if noise.dtype == torch.float64 else noise.float()
    own["t_end"] = default_t_end(sampler, schedule) if own["t_end"] is None else own["t_end"]
    if "skip_type" in own and own["skip_type"] is None:
        own["skip_type"] = default_skip_type(sampler)
    if own.pop("clip_denoised"):
        eps_fn = clip_x0(eps_fn, schedule)
    return _SAMPLERS[sampler](eps_fn, schedule, x, steps=steps, randn=randn, progress=progress, **own)
