"""REPA's samplers (github.com/sihyun-yu/REPA ``samplers.py``: ``euler_sampler``, ``euler_maruyama_sampler``), in
SiT's time t = 1 - tau (noise t = 0, data t = 1) on REPA's own float64 time grids.

REPA writes its time tau the other way (tau = 1 noise, tau = 0 data); these integrators build REPA's grid in tau
exactly as REPA does, decide guidance on it as REPA does, and step in SiT's time with t = 1 - tau, so they take the
same fields as ``diffusion.samplers.transport`` (velocity dx/dt in SiT's time, the score), built by the objective
from a SiT-time network (a REPA-trained one through ``diffusion.objectives.repa_time.ReversedTime``):

* ``field(x, t, guided) -> v`` (ODE) or ``pair(x, t, guided) -> (drift, score)`` (SDE) from **one** network
  evaluation, guided or plain as the sampler decides; ``x`` and ``t`` (shape (B,)) arrive in float64, the state's
  dtype, and the field casts what it hands the network (REPA calls its network in float32 and casts the output back);
* ``guide(tau) -> bool``: whether the step starting at REPA time tau is guided (REPA: ``cfg_scale > 1`` and
  ``guidance_low <= tau <= guidance_high``, inclusive, on the float64 grid value).

What differs from SiT's integrators (and why these exist beside them): the state is kept in float64; ``num_steps``
counts REPA's steps, not grid points; Heun's last step is a plain Euler step and its second evaluation is guided by
the decision of the step's start; the SDE evaluates the network once per step (drift and score from the same
velocity; SiT evaluates twice), draws its noise before that evaluation, and steps on the grid's own intervals.

* ``sample_repa_ode``: grid ``tau = linspace(1, 0, N + 1)``; Euler ``x + (t_next - t) v``; with ``heun`` a second
  evaluation at (x_next, t_next) on every step but the last, ``x + dt (v + v') / 2``: N, resp. 2N - 1 evaluations.
* ``sample_repa_sde``: grid ``tau = linspace(1, L, N)`` then 0 (L = ``last_step_size``, REPA's 0.04); on each of
  the first N - 1 intervals ``x + (drift + w score) dt + sqrt(2 w) xi sqrt(dt)`` with w = ``diffusion(x, t)``
  (REPA's ``compute_diffusion`` 2 tau is SiT's ``linear`` form w = 1 - t, written with SiT's sqrt(2 w)), then the
  last step from tau = L to 0 without noise: ``mean`` (REPA's) ``x + (drift + w score) L``, ``euler`` ``x + drift L``,
  ``tweedie`` ``x / alpha + sigma^2 / alpha score`` or ``none`` (L = 0: the grid ends at tau = 0, N - 1 steps): N
  evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.samplers.common import Randn

GuidedField = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
GuidedPair = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
Diffusion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AlphaSigma = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

REPA_LAST_STEPS = ("mean", "euler", "tweedie", "none")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer (REPA's --num-steps), got {num_steps!r}")


def repa_ode_times(num_steps: int) -> torch.Tensor:
    """REPA's ``euler_sampler`` grid in its own time: ``linspace(1, 0, num_steps + 1)``, float64 (1 = noise)."""
    _check_steps(num_steps)
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)


def repa_sde_times(num_steps: int, last_step_size: float = 0.04) -> torch.Tensor:
    """REPA's ``euler_maruyama_sampler`` grid in its own time: ``linspace(1, last_step_size, num_steps)`` and then
    0, float64; with ``last_step_size = 0`` (no last step) ``linspace(1, 0, num_steps)`` (needs num_steps >= 2)."""
    _check_steps(num_steps)
    if not 0 <= last_step_size < 1:
        raise ValueError(f"last_step_size must lie in [0, 1), got {last_step_size!r}")
    if last_step_size == 0:
        if num_steps < 2:
            raise ValueError("without a last step the SDE needs num_steps >= 2 grid points")
        return torch.linspace(1, 0, num_steps, dtype=torch.float64)
    grid = torch.linspace(1.0, last_step_size, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def _batch(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float64, device=x.device)


def sample_repa_ode(field: GuidedField, x: torch.Tensor, num_steps: int, heun: bool = False,
                    guide: Callable[[float], bool] = lambda tau: False,
                    trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """REPA's ``euler_sampler`` (``heun``: its Heun variant) from noise ``x``; returns the sample in x's dtype, or
    with ``trajectory`` ``(final, states)``, the float64 state at every grid time (``states[0] = x``)."""
    taus = repa_ode_times(num_steps).tolist()
    state = x.to(torch.float64)
    states = [state]
    for i, (tau, tau_next) in enumerate(zip(taus[:-1], taus[1:])):
        guided, dt = guide(tau), tau - tau_next  # dt > 0: SiT's time runs up
        v = field(state, _batch(1 - tau, state), guided)
        x_next = state + dt * v
        if heun and i < num_steps - 1:
            v_next = field(x_next, _batch(1 - tau_next, state), guided)  # REPA tests the interval on tau, not tau_next
            x_next = state + dt * (0.5 * v + 0.5 * v_next)
        state = x_next
        if trajectory:
            states.append(state)
    out = state.to(x.dtype)
    return (out, torch.stack(states)) if trajectory else out


def sample_repa_sde(pair: GuidedPair, diffusion: Diffusion, x: torch.Tensor, num_steps: int,
                    last_step: str = "mean", last_step_size: float = 0.04, randn: Randn = torch.randn_like,
                    guide: Callable[[float], bool] = lambda tau: False, alpha_sigma: AlphaSigma | None = None,
                    trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """REPA's ``euler_maruyama_sampler`` from noise ``x`` (see the module docstring); one ``randn(state)`` draw per
    SDE step (float64 state), before the step's network evaluation. Returns the sample in x's dtype, or with
    ``trajectory`` ``(final, states)``: the float64 state after every SDE step, then the last step's output."""
    if last_step not in REPA_LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {', '.join(REPA_LAST_STEPS)}")
    if last_step == "tweedie" and alpha_sigma is None:
        raise ValueError("last_step='tweedie' needs alpha_sigma(t) -> (alpha_t, sigma_t) of the path")
    size = 0.0 if last_step == "none" else last_step_size
    if last_step != "none" and size == 0:
        raise ValueError(f"last_step={last_step!r} needs last_step_size > 0 (or last_step='none')")
    taus = repa_sde_times(num_steps, size).tolist()
    sde_taus = taus if size == 0 else taus[:-1]
    state = x.to(torch.float64)
    states = []
    for tau, tau_next in zip(sde_taus[:-1], sde_taus[1:]):
        dt, t = tau - tau_next, _batch(1 - tau, state)
        w = diffusion(state, t)
        noise = randn(state) * dt**0.5
        drift, score = pair(state, t, guide(tau))
        state = state + (drift + w * score) * dt + torch.sqrt(2 * w) * noise
        if trajectory:
            states.append(state)
    if size:
        tau = taus[-2]
        t = _batch(1 - tau, state)
        drift, score = pair(state, t, guide(tau))
        if last_step == "mean":
            state = state + (drift + diffusion(state, t) * score) * size
        elif last_step == "euler":
            state = state + drift * size
        else:
            alpha, sigma = alpha_sigma(torch.tensor(1 - tau, dtype=torch.float64, device=state.device))
            state = state / alpha + sigma**2 / alpha * score
        if trajectory:
            states.append(state)
    out = state.to(x.dtype)
    return (out, torch.stack(states)) if trajectory else out
