"""SiT's samplers for flow-matching / stochastic-interpolant objectives: probability-flow ODE and SDE.

Time runs from t0 (near noise, t = 0) up to t1 (near data, t = 1), SiT's convention. The integrators know nothing
of paths or predictions: they take callables built by the objective (``diffusion.objectives.transport``) from a
path and a (guided) network:

* ``drift(x, t)``: the ODE velocity dx/dt (SiT's ``Sampler.drift``); ``t`` is ``t * ones(B)`` in x's dtype;
* ``diffusion(x, t)``: the SDE's diffusion coefficient w(t), broadcastable against x;
* ``score(x, t)``: the score of the marginal at t.

The SDE drift is ``F = drift + w * score``, two separate network evaluations per call, as in SiT.

The ODE methods are SiT's, which hands ``sampling_method`` to ``torchdiffeq.odeint`` as it is, so any torchdiffeq
method; ``ODE_METHODS`` lists the ones offered here and whether each is adaptive. Fixed-step methods step on the
output grid itself: ``num_steps = N`` grid points mean N - 1 steps (``euler`` and ``heun2`` are written out here,
``midpoint``, ``heun3`` and ``rk4`` (torchdiffeq's, the 3/8 rule) run through torchdiffeq on that grid); adaptive
ones (``dopri5``, SiT's default, ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``) are torchdiffeq's with
SiT's ``atol=[atol]``, ``rtol=[rtol]``: their step sequence ignores the grid (which only fixes the times returned)
and may evaluate the network beyond t1.

``likelihood_ode`` runs the probability-flow ODE the other way, data to noise, jointly with the log-density change
(the divergence of the drift, exact or by Hutchinson's estimator), SiT's ``sample_ode_likelihood``; ``bits_per_dim``
converts its nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchdiffeq import odeint

from diffusion.samplers.common import Randn

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t of shape (B,)) -> tensor like x
AlphaSigma = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # t -> (alpha_t, sigma_t)

# name -> adaptive? (the others take the grid's steps and no tolerances; sample, likelihood and their option tables
# read it). Orders: euler 1, heun2 2, midpoint 2, heun3 3, rk4 4; adaptive: adaptive_heun 2(1), fehlberg2 2(1),
# bosh3 3(2), dopri5 5(4), dopri8 8(7).
ODE_METHODS = {"euler": False, "heun2": False, "dopri5": True, "midpoint": False, "heun3": False, "rk4": False,
               "adaptive_heun": True, "fehlberg2": True, "bosh3": True, "dopri8": True}
OWN_STEPPERS = ("euler", "heun2")  # written out here (SiT's torchdiffeq results, sit_samplers.pt); the rest: odeint
SDE_METHODS = ("euler", "heun")
LAST_STEPS = ("none", "mean", "tweedie", "euler")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent timestep shift (SD3 / LightningDiT) in SiT's time (t = 1 data).

    With s = 1 - t the noise-side time, s' = shift * s / (1 + (shift - 1) * s) and t' = 1 - s', i.e.
    ``t' = t / (t + shift * (1 - t))``: shift > 1 spends more of the grid near noise; shift = 1 is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


def ode_grid(t0: float, t1: float, num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """SiT's output grid ``linspace(t0, t1, num_steps)`` in float32 (either direction: t1 < t0 runs data to noise),
    optionally timestep-shifted: every time is read as its position u in the interval [min, max], shifted
    (``shift_time``, LightningDiT's rule on the [0, 1] ODE grid) and mapped back, so **the endpoints stay where they
    are** for every shift (an SDE's t1 = 1 - last_step_size, whose last step still ends at t = 1; the VP path's
    1 - eps) and the same shift gives the same times in both directions."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (grid points, num_steps - 1 steps), got {num_steps!r}")
    grid = torch.linspace(t0, t1, num_steps, dtype=torch.float32)
    if shift == 1.0 or t0 == t1:
        return grid  # bitwise SiT's
    lo, hi = min(t0, t1), max(t0, t1)
    shifted = lo + shift_time((grid - lo) / (hi - lo), shift) * (hi - lo)
    shifted[0], shifted[-1] = t0, t1
    return shifted


def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t * ones(B)`` in x's dtype and device, as SiT hands time to the network."""
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device) * torch.as_tensor(t).to(x)


def _tolerances(method: str, atol: float, rtol: float, parts: int) -> dict:
    """odeint's tolerance keywords: one per state tensor for an adaptive method (SiT's lists), none otherwise."""
    return {"atol": [atol] * parts, "rtol": [rtol] * parts} if ODE_METHODS[method] else {}


def _check_grid(grid: torch.Tensor) -> None:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")


def sample_ode(drift: Field, x: torch.Tensor, grid: torch.Tensor, method: str = "dopri5", atol: float = 1e-6,
               rtol: float = 1e-3, trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrate dx/dt = drift(x, t) from grid[0] to grid[-1]; returns the final state, or with ``trajectory``
    ``(final, states)`` where ``states`` holds the state at every grid time (``states[0] = x``).

    ``euler``: x + dt * f(t, x) per grid interval. ``heun2``: k1 = f(t, x), k2 = f(t + dt, x + dt * k1),
    x + dt * (k1 + k2) / 2. Every other method of ``ODE_METHODS``: ``torchdiffeq.odeint(..., method=method)`` on the
    grid: an adaptive one with ``atol=[atol], rtol=[rtol]`` (SiT's call), whose error norm spans the whole batch
    tensor (all samples share one step size); a fixed-step one on the grid's steps, without tolerances.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")
    _check_grid(grid)
    if method not in OWN_STEPPERS:
        states = odeint(lambda t, y: drift(y, _batch_time(t, y)), x, grid.to(x.device), method=method,
                        **_tolerances(method, atol, rtol, 1))
        return (states[-1], states) if trajectory else states[-1]

    times = grid.to(device=x.device, dtype=x.dtype)
    states = [x]
    for i in range(len(times) - 1):
        t, dt = times[i], times[i + 1] - times[i]
        k1 = drift(x, _batch_time(t, x))
        if method == "euler":
            x = x + dt * k1
        else:
            k2 = drift(x + dt * k1, _batch_time(t + dt, x))
            x = x + dt * (k1 + k2) / 2
        if trajectory:
            states.append(x)
    return (x, torch.stack(states)) if trajectory else x


def sde_drift(drift: Field, diffusion: Field, score: Field) -> Field:
    """SiT's SDE drift ``F(x, t) = drift(x, t) + w(t) * score(x, t)`` (two network evaluations, drift first)."""

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return drift(x, t) + diffusion(x, t) * score(x, t)

    return forward


def sample_sde(drift: Field, diffusion: Field, score: Field, x: torch.Tensor, grid: torch.Tensor,
               method: str = "euler", last_step: str = "mean", last_step_size: float = 0.04,
               randn: Randn = torch.randn_like, alpha_sigma: AlphaSigma | None = None,
               trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SiT's SDE sampler: one step from each of the first N - 1 grid points (on a uniform grid dt = grid[1] -
    grid[0] for every step, as SiT; on a shifted grid each step spans its own interval), then the last step at
    t1 = grid[-1]. Returns the final state, or with ``trajectory`` ``(final, states)`` where
    ``states`` holds the N - 1 SDE states and then the last-step output (SiT's returned list).

    Each step draws one standard normal ``xi = randn(x)`` for the whole batch, first. ``euler``:
    ``x + F(x, t) dt + sqrt(2 w(t)) xi sqrt(dt)``. ``heun``: ``x^ = x + sqrt(2 w(t)) xi sqrt(dt)``,
    K1 = F(x^, t), K2 = F(x^ + dt K1, t + dt), ``x^ + dt (K1 + K2) / 2``.
    ``last_step``: ``none`` (identity), ``mean`` (``x + F(x, t1) * last_step_size``, no noise), ``euler``
    (``x + drift(x, t1) * last_step_size``) or ``tweedie`` (``x / alpha + sigma^2 / alpha * score(x, t1)``, with
    ``alpha_sigma(t) -> (alpha_t, sigma_t)`` of the path). The caller puts t1 at 1 - last_step_size.
    """
    if method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; choose one of {', '.join(SDE_METHODS)}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {', '.join(LAST_STEPS)}")
    if last_step == "tweedie" and alpha_sigma is None:
        raise ValueError("last_step='tweedie' needs alpha_sigma(t) -> (alpha_t, sigma_t) of the path")
    _check_grid(grid)
    f = sde_drift(drift, diffusion, score)
    times = grid.to(device=x.device, dtype=x.dtype)
    steps = times.diff()
    if not (steps > 0).all():
        raise ValueError("the SDE samplers integrate forward in time (noise to data): grid must increase")
    if torch.allclose(steps, steps[0], rtol=1e-4, atol=0):
        steps = steps[:1].expand(len(steps))  # uniform: SiT's one dt = grid[1] - grid[0] for every step
    states = []
    for i in range(len(times) - 1):
        t, dt = _batch_time(times[i], x), steps[i]
        dw = randn(x) * torch.sqrt(dt)
        if method == "euler":
            w = diffusion(x, t)
            x = (x + f(x, t) * dt) + torch.sqrt(2 * w) * dw
        else:
            x_hat = x + torch.sqrt(2 * diffusion(x, t)) * dw
            k1 = f(x_hat, t)
            k2 = f(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)
        if trajectory:
            states.append(x)

    t1 = _batch_time(times[-1], x)
    if last_step == "mean":
        x = x + f(x, t1) * last_step_size
    elif last_step == "euler":
        x = x + drift(x, t1) * last_step_size
    elif last_step == "tweedie":
        alpha, sigma = alpha_sigma(times[-1])
        x = x / alpha + sigma**2 / alpha * score(x, t1)
    if trajectory:
        states.append(x)
        return x, torch.stack(states)
    return x


# ------------------------------------------------------------------------------------------------------------------
# The likelihood through the probability-flow ODE (SiT's sample_ode_likelihood)
# ------------------------------------------------------------------------------------------------------------------
DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")


def _sum_dims(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=tuple(range(1, x.ndim)))


def draw_probes(x: torch.Tensor, probes: int = 1, probe: str = "rademacher",
                randn: Randn = torch.randn_like) -> torch.Tensor:
    """``probes`` Hutchinson probes shaped like x, stacked on a new first dimension: one ``randn(x)`` draw each, in
    order, used as it is (``gaussian``) or as its sign (``rademacher``, +-1 with probability 1/2 each)."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    draws = torch.stack([randn(x) for _ in range(probes)])
    return torch.where(draws >= 0, 1.0, -1.0).to(draws) if probe == "rademacher" else draws


def drift_divergence(drift: Field, x: torch.Tensor, t: torch.Tensor,
                     probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drift(x, t), its divergence per sample, shape (B,)), both detached; one network evaluation.

    With ``probes`` (K, *x.shape) the Hutchinson estimate ``mean_k sum(eps_k * J^T eps_k)`` (one vector-Jacobian
    product per probe); without, the exact trace by one vector-Jacobian product per dimension of a sample (for
    small dimensions)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = drift(x, t)
        if probes is not None:
            div = sum(_sum_dims(torch.autograd.grad(v, x, eps, retain_graph=True)[0] * eps) for eps in probes)
            div = div / len(probes)
        else:
            flat_v = v.reshape(v.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for d in range(flat_v.shape[1]):
                grad = torch.autograd.grad(flat_v[:, d].sum(), x, retain_graph=True)[0]
                div = div + grad.reshape(grad.shape[0], -1)[:, d]
    return v.detach(), div.detach()


def prior_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (SiT's ``prior_logp``): -D/2 log(2 pi) - |z|^2 / 2, D the dimensions of a sample."""
    dims = z[0].numel()
    return -dims / 2 * math.log(2 * math.pi) - _sum_dims(z.pow(2)) / 2


def bits_per_dim(log_likelihood: torch.Tensor, dims: int, levels: int | None = None,
                 data_range: float = 2.0) -> torch.Tensor:
    """Nats per sample -> bits per dimension, ``-log p / (D ln 2)``. With ``levels`` (e.g. 256 for 8-bit images)
    the density is read on the integer grid of the data: data spanning ``data_range`` (2 for [-1, 1]) made of
    ``levels`` values adds ``log2(levels / data_range)`` (7 bits for 8-bit images in [-1, 1]); the uniform
    dequantization of the data before the likelihood is the caller's."""
    bpd = -log_likelihood / (dims * math.log(2))
    return bpd if levels is None else bpd + math.log2(levels / data_range)


def likelihood_ode(drift: Field, x: torch.Tensor, grid: torch.Tensor, method: str = "dopri5", atol: float = 1e-6,
                   rtol: float = 1e-3, divergence: str = "hutchinson", probes: int = 1, probe: str = "rademacher",
                   resample_probes: bool = False,
                   randn: Randn = torch.randn_like) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-likelihood of data ``x`` under the probability flow of ``drift``: integrate the augmented ODE
    (dx/dt = drift(x, t), d delta/dt = -div drift(x, t)) along ``grid`` from the data time grid[0] to the noise
    time grid[-1] (a decreasing grid, e.g. ``ode_grid(1, 0, n)``), then ``log p(x) = prior_logp(z) - delta`` with
    z the endpoint. Returns ``(log_likelihood (B,), z, delta (B,))``.

    ``divergence``: ``hutchinson`` (``probes`` probes of distribution ``probe``, drawn once from ``randn(x)``
    before the solve and kept for the whole trajectory, so sample i's estimate depends only on its own draws;
    ``resample_probes``: fresh probes at every network evaluation instead, SiT's way (one Rademacher probe per
    evaluation): a smaller variance, but with ``dopri5`` the draws, and so each sample's result, depend on the
    step sequence the whole batch shares) or ``exact`` (small dimensions).
    Any method of ``ODE_METHODS``, as ``sample_ode``: an adaptive one is torchdiffeq's on the state (x, delta) with
    ``atol=[atol] * 2``, ``rtol=[rtol] * 2``, as SiT; ``euler`` / ``heun2`` step on the grid here, the other
    fixed-step methods through torchdiffeq on the grid."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    _check_grid(grid)
    hutchinson = divergence == "hutchinson"
    eps = draw_probes(x, probes, probe, randn) if hutchinson and not resample_probes else None

    def f(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        probe_now = draw_probes(state[0], probes, probe, randn) if hutchinson and resample_probes else eps
        v, div = drift_divergence(drift, state[0], _batch_time(t, state[0]), probe_now)
        return v, -div.to(state[1])

    state = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    if method not in OWN_STEPPERS:
        z, delta = (s[-1] for s in odeint(f, state, grid.to(x.device), method=method,
                                          **_tolerances(method, atol, rtol, 2)))
    else:
        times = grid.to(device=x.device, dtype=x.dtype)
        for i in range(len(times) - 1):
            t, dt = times[i], times[i + 1] - times[i]
            k1 = f(t, state)
            if method == "euler":
                state = tuple(s + dt * k for s, k in zip(state, k1))
            else:
                k2 = f(t + dt, tuple(s + dt * k for s, k in zip(state, k1)))
                state = tuple(s + dt * (a + b) / 2 for s, a, b in zip(state, k1, k2))
        z, delta = state
    return prior_logp(z) - delta, z, delta
