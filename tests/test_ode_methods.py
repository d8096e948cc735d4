"""torchdiffeq's other ODE methods as transport samplers (``diffusion.samplers.transport.ODE_METHODS``): each one on
the closed-form Gaussian problem of tests/test_transport_samplers.py (data N(MU, S^2) per dimension on the linear
path, whose exact flow maps x0 to MU + S x0), through ``sample_ode`` and through the objective."""

from __future__ import annotations

import pytest
import torch

from diffusion.objectives.transport import Transport, build_transport
from diffusion.samplers.transport import ODE_METHODS, ode_grid, sample_ode

MU, S = 1.5, 0.5  # as tests/test_transport_samplers.py
NEW_FIXED = {"midpoint": 2, "heun3": 3, "rk4": 4}  # network evaluations per step
NEW_ADAPTIVE = ("adaptive_heun", "fehlberg2", "bosh3", "dopri8")


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t = x] for x_t = t x1 + (1 - t) x0 (tests/test_transport_samplers.py's)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


def noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Logged:
    def __init__(self):
        self.t = []

    def __call__(self, x, t):
        self.t.append(t[0].item())
        return exact_velocity(x, t)


def test_the_table_says_which_methods_adapt():
    assert {m for m, adaptive in ODE_METHODS.items() if not adaptive} == {"euler", "heun2", *NEW_FIXED}
    assert {m for m, adaptive in ODE_METHODS.items() if adaptive} == {"dopri5", *NEW_ADAPTIVE}
    assert set(ODE_METHODS) <= set(Transport.SAMPLERS)
    with pytest.raises(ValueError, match="rk4"):  # the message lists the methods
        sample_ode(exact_velocity, noise(2), ode_grid(0.0, 1.0, 3).double(), method="rk45")


@pytest.mark.parametrize("method", NEW_FIXED)
def test_fixed_step_methods_step_on_the_grid(method):
    """N grid points: N - 1 steps of ``NEW_FIXED[method]`` evaluations each, all at times inside the grid; the error
    at 33 points is small and shrinks by more than 4 when the steps halve; the trajectory holds every grid state."""
    x0, errors = noise(), []
    for points in (33, 65):
        net = Logged()
        final, states = sample_ode(net, x0, torch.linspace(0, 1, points, dtype=torch.float64), method=method,
                                   trajectory=True)
        assert len(net.t) == NEW_FIXED[method] * (points - 1) and 0 <= min(net.t) and max(net.t) <= 1
        assert states.shape == (points, *x0.shape) and torch.equal(states[0], x0) and torch.equal(states[-1], final)
        errors.append((final - (MU + S * x0)).abs().max().item())
    assert errors[0] < {"midpoint": 3e-5, "heun3": 1e-5, "rk4": 1e-7}[method]
    assert errors[1] < errors[0] / 4


@pytest.mark.parametrize("method", NEW_ADAPTIVE)
def test_adaptive_methods_follow_their_tolerances(method):
    """SiT-like loose tolerances land near the exact endpoint; tight ones much nearer, with more evaluations."""
    x0, results = noise(seed=1), []
    for rtol in (1e-3, 1e-6):
        net = Logged()
        final = sample_ode(net, x0, ode_grid(0.0, 1.0, 2).double(), method=method, atol=rtol * 1e-2, rtol=rtol)
        results.append(((final - (MU + S * x0)).abs().max().item(), len(net.t)))
    (loose, loose_nfe), (tight, tight_nfe) = results
    assert loose < 5e-2 and tight < 3e-4 and tight < loose / 40 and tight_nfe > loose_nfe


@pytest.mark.parametrize("method", [*NEW_FIXED, *NEW_ADAPTIVE])
def test_new_methods_run_backwards_and_through_the_objective(method):
    """A decreasing grid runs data to noise (the reverse ODE / likelihood direction): there and back returns the
    noise. Transport.sample with the method on the exact velocity network lands on MU + S x0."""
    adaptive = ODE_METHODS[method]
    tol = {"atol": 1e-8, "rtol": 1e-6} if adaptive else {}
    x0 = noise(8, seed=3)
    grid = torch.linspace(0.0, 0.9, 41, dtype=torch.float64)
    there = sample_ode(exact_velocity, x0, grid, method=method, **tol)
    back = sample_ode(exact_velocity, there, grid.flip(0), method=method, **tol)
    bound = 1e-3 if adaptive else 1e-4  # fehlberg2, order 2, is the least accurate at these tolerances
    assert (back - x0).abs().max().item() < bound
    out = build_transport("linear", "velocity").sample(lambda x, t: exact_velocity(x, t), x0, {}, sampler=method,
                                                       steps=41, **tol)
    assert (out - (MU + S * x0)).abs().max().item() < bound
