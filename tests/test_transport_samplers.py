"""SiT's ODE / SDE samplers (diffusion.samplers.transport): parity with the official code (tests/fixtures/
sit_samplers.pt, see its README), and convergence orders on a closed-form Gaussian problem."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from diffusion.objectives.guidance import guided_model
from diffusion.objectives.paths import PATHS, Path, interval, resolve_eps
from diffusion.samplers.transport import ode_grid, sample_ode, sample_sde, shift_time
from dit import DiT
from tests.helpers import fixture_network, rel_err

C = 4  # latent channels; SiT's learn_sigma network emits 2C and keeps the first C


@functools.cache
def fixture() -> tuple[DiT, dict]:
    return fixture_network("sit_samplers", DiT)


class Counted:
    """A network f(x, t) -> C channels that logs every call's time (float32 value) and batch size."""

    def __init__(self, fn):
        self.fn, self.t, self.batch = fn, [], []

    def __call__(self, x, t):
        self.t.append(t.reshape(-1)[0].item())
        self.batch.append(x.shape[0])
        return self.fn(x, t)


def network(run: dict, doubled: bool = False) -> Counted:
    """The SiT network of a fixture run: plain conditional, or guided (cfg 4 on channels 0-2). ``doubled``: SiT's
    own forward_with_cfg on the [z; z] batch (needed where the solver sees the whole doubled state)."""
    model, fx = fixture()
    inputs = fx["inputs"]
    if not run["cfg"]:
        return Counted(lambda x, t: model(x, t, inputs["labels"])[:, :C])
    if doubled:
        return Counted(lambda x, t: model.forward_with_cfg(x, t, inputs["cfg_input_y"], run["cfg_scale"], 3)[:, :C])

    def base(x, t, y):
        return model(x, t, y)[:, :C]

    null = torch.full_like(inputs["labels"], inputs["null_label"])
    return Counted(guided_model(base, {"y": inputs["labels"]}, {"y": null}, run["cfg_scale"], eps_channels=C,
                                channels=3))


def fields(path: Path, prediction: str, net):
    """(ODE drift, score) of SiT's Sampler for a velocity / score / noise network on ``path``."""

    def score(x, t):
        out = net(x, t)
        if prediction == "velocity":
            return path.score_from_velocity(out, x, t)
        return out if prediction == "score" else path.score_from_noise(out, x, t)

    def drift(x, t):
        if prediction == "velocity":
            return net(x, t)
        drift_mean, drift_var = path.drift(x, t)
        return -drift_mean + drift_var * score(x, t)

    return drift, score


def runs(kind: str) -> list[int]:
    _, fx = fixture()
    return [i for i, r in enumerate(fx["inputs"]["runs"]) if r["kind"] == kind]


def run_id(i: int) -> str:
    r = fixture()[1]["inputs"]["runs"][i]
    return f"{i}-{r['path_type']}-{r['prediction']}-{r['sampling_method']}-{'cfg' if r['cfg'] else 'cond'}"


ODE_RUNS = runs("ode")
SDE_RUNS = runs("sde")
# Guided dopri5 runs twice: with guided_model on the B samples, and on SiT's doubled [z; z] state, whose second half
# (channel 3 unconditional) enters the solver's error norm and so its step sizes.
ODE_CASES = [(i, False) for i in ODE_RUNS] + [
    (i, True) for i in ODE_RUNS if fixture()[1]["inputs"]["runs"][i]["cfg"]
    and fixture()[1]["inputs"]["runs"][i]["sampling_method"] == "dopri5"]


# ----------------------------------------------------------------------------------------------------------
# Parity with SiT
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i, doubled", ODE_CASES, ids=[run_id(i) + ("-doubled" if d else "") for i, d in ODE_CASES])
def test_ode_parity(i, doubled):
    _, fx = fixture()
    run, out = fx["inputs"]["runs"][i], fx["output"]["runs"][i]
    path = PATHS[run["path_type"].lower()]()
    grid = out["output_times"]
    assert torch.equal(ode_grid(grid[0].item(), grid[-1].item(), run["num_steps"]), grid)
    eps = resolve_eps(run["path_type"], run["prediction"], None, None)[1]
    assert (grid[0].item(), grid[-1].item()) == pytest.approx(interval(run["path_type"], run["prediction"], eps))
    net = network(run, doubled=doubled)
    drift, _ = fields(path, run["prediction"], net)
    x = fx["inputs"]["cfg_input_z"] if doubled else fx["inputs"]["noise"]
    with torch.no_grad():
        final, states = sample_ode(drift, x, grid, method=run["sampling_method"], atol=run["atol"],
                                   rtol=run["rtol"], trajectory=True)
    assert states.shape == (run["num_steps"], *x.shape)
    assert torch.equal(states[-1], final) and torch.equal(states[0], x)
    adaptive = run["sampling_method"] == "dopri5"
    assert rel_err(final, out["final"][: len(x)]) < (1e-3 if adaptive else 1e-5)
    if "trajectory" in out:
        assert rel_err(states, out["trajectory"]) < (1e-3 if adaptive else 1e-5)
    assert len(net.t) == out["nfe"]
    assert set(net.batch) == {len(x)}
    # Fixed steps: the same float32 times; dopri5: the same step sequence up to the accumulated rounding -- except
    # guided on B samples, where the error norm sees a different state than SiT's doubled one.
    if not (adaptive and run["cfg"] and not doubled):
        assert net.t == pytest.approx(out["model_call_t"].tolist(), rel=1e-2 if adaptive else 0, abs=1e-7)


@pytest.mark.parametrize("i", SDE_RUNS, ids=[run_id(i) for i in SDE_RUNS])
def test_sde_parity(i):
    _, fx = fixture()
    run, out = fx["inputs"]["runs"][i], fx["output"]["runs"][i]
    path = PATHS[run["path_type"].lower()]()
    grid = out["time_grid"]
    eps = resolve_eps(run["path_type"], run["prediction"], None, None)[1]
    t0, t1 = interval(run["path_type"], run["prediction"], eps, sde=True, diffusion_form=run["diffusion_form"],
                      last_step_size=run["last_step_size"])
    assert (out["t0"], out["t1"]) == pytest.approx((t0, t1))
    assert torch.equal(ode_grid(t0, t1, run["num_steps"]), grid)
    net = network(run)
    drift, score = fields(path, run["prediction"], net)
    draws = iter(out["draws"][:, :2])  # with cfg SiT draws for the doubled batch; rows 0-1 drive the samples

    def diffusion(x, t):
        return path.diffusion(x, t, run["diffusion_form"], run["diffusion_norm"])

    with torch.no_grad():
        final, states = sample_sde(drift, diffusion, score, fx["inputs"]["noise"], grid,
                                   method=run["sampling_method"].lower(), last_step=run["last_step"].lower(),
                                   last_step_size=run["last_step_size"], randn=lambda x: next(draws),
                                   trajectory=True)
    assert next(draws, None) is None  # one draw per SDE step, none for the last step
    assert rel_err(final, out["final"][:2]) < 1e-5
    assert rel_err(states, out["xs"][:, :2]) < 1e-5
    assert len(net.t) == out["nfe"]  # one per guided call, as SiT counts forward_with_cfg
    assert net.t == pytest.approx(out["model_call_t"].tolist(), abs=1e-7)


def test_guided_model_matches_forward_with_cfg_probe():
    _, fx = fixture()
    probe = fx["inputs"]["forward_with_cfg_probe"]
    with torch.no_grad():
        ours = network({"cfg": True, "cfg_scale": probe["cfg_scale"]})(probe["x"][:2], probe["t"][:2])
    assert rel_err(ours, fx["output"]["forward_with_cfg_probe"][:2]) < 1e-5


def test_guidance_interval():
    """Guidance only while t_lo <= t <= t_hi (inclusive), else one conditional forward of the batch."""
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * y.reshape(-1, 1) + t.reshape(-1, 1)

    x, y, null = torch.ones(2, 3), torch.tensor([2.0, 3.0]), torch.zeros(2)
    net = guided_model(model, {"y": y}, {"y": null}, 4.0, eps_channels=3, interval=(0.2, 0.7))
    plain = guided_model(model, {"y": y}, {"y": null}, 4.0, eps_channels=3)
    for t, inside in [(0.1, False), (0.2, True), (0.5, True), (0.7, True), (0.9, False)]:
        t = torch.full((2,), t)
        calls.clear()
        out = net(x, t)
        assert calls == ([4] if inside else [2])
        assert torch.equal(out, plain(x, t) if inside else model(x, t, y))


# ----------------------------------------------------------------------------------------------------------
# Closed form: Gaussian data, exact velocity of the linear path
# ----------------------------------------------------------------------------------------------------------
MU, S = 1.5, 0.5  # data x1 ~ N(MU, S^2) per dimension


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t = x] for x_t = t x1 + (1 - t) x0: x_t is Gaussian with mean t MU, variance
    v = t^2 S^2 + (1 - t)^2; Cov(x1 - x0, x_t) = t S^2 - (1 - t)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


def exact_endpoint(x0: torch.Tensor) -> torch.Tensor:
    """The flow of the exact velocity is the affine map x0 -> MU + S x0 (monotone transport of N(0,1) to the
    data Gaussian)."""
    return MU + S * x0


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun2", 2)])
def test_fixed_step_convergence_order(method, order):
    x0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    steps = [32, 64, 128, 256]
    for n in steps:
        grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        final = sample_ode(exact_velocity, x0, grid, method=method)
        errors.append((final - exact_endpoint(x0)).abs().max().item())
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / (math.log(steps[-1]) - math.log(steps[0]))
    assert slope == pytest.approx(order, abs=0.05)


def test_dopri5_error_follows_tolerance():
    """SiT's tolerances (atol 1e-6, rtol 1e-3) bound the local error; the global endpoint error shrinks with them,
    and tight tolerances in float64 recover the exact flow. NFE = 2 (initial step) + 6 per attempted step."""
    x0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    errors = []
    for rtol in [1e-3, 1e-4, 1e-5]:
        net = Counted(exact_velocity)
        final = sample_ode(net, x0, ode_grid(0.0, 1.0, 2), method="dopri5", atol=rtol * 1e-3, rtol=rtol)
        errors.append((final - exact_endpoint(x0)).abs().max().item())
        assert (len(net.t) - 2) % 6 == 0
        assert max(net.t) > 1  # torchdiffeq steps past the last output time and interpolates back
    assert errors[0] < 5e-2 and errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5
    x0 = x0.double()
    tight = sample_ode(exact_velocity, x0, ode_grid(0.0, 1.0, 2).double(), atol=1e-10, rtol=1e-10)
    assert (tight - exact_endpoint(x0)).abs().max().item() < 1e-8


def test_ode_grid_and_shift():
    assert torch.equal(ode_grid(0.0, 1.0, 5), torch.linspace(0, 1, 5))
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = ode_grid(0.0, 1.0, 11, shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] < t[1:-1]).all()  # more steps near noise
    s = 1 - t  # the SD3 form on the noise-side time
    assert torch.allclose(1 - 3.0 * s / (1 + 2.0 * s), shifted, atol=1e-6)
    with pytest.raises(ValueError):
        ode_grid(0.0, 1.0, 1)


def test_sde_last_steps_and_errors():
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    one = lambda x, t: torch.ones_like(x)  # noqa: E731
    grid = torch.linspace(0.0, 0.9, 4)
    # No diffusion, unit drift: the SDE steps cover 0.9, the last step 0.1 (mean / euler) or nothing (none).
    for last_step, total in [("mean", 1.0), ("euler", 1.0), ("none", 0.9)]:
        out = sample_sde(one, zero, zero, x, grid, last_step=last_step, last_step_size=0.1, randn=torch.zeros_like)
        assert torch.allclose(out, x + total, atol=1e-6)
    out = sample_sde(zero, zero, one, x, grid, method="heun", last_step="tweedie",
                     alpha_sigma=lambda t: (torch.tensor(0.5), torch.tensor(0.5)), randn=torch.zeros_like)
    assert torch.allclose(out, x / 0.5 + 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        sample_sde(one, zero, zero, x, grid, last_step="tweedie")
    with pytest.raises(ValueError):
        sample_sde(one, zero, zero, x, grid, method="rk4")
    with pytest.raises(ValueError):
        sample_sde(one, zero, zero, x, grid.flip(0))
    # A shifted (non-uniform) grid: each step spans its own interval, so the SDE steps still end at t1.
    shifted = ode_grid(0.0, 0.9, 4, shift=3.0)
    out = sample_sde(one, zero, zero, x, shifted, last_step="none", randn=torch.zeros_like)
    assert torch.allclose(out, x + shifted[-1], atol=1e-6)  # the shift moves every grid time, t1 included
    with pytest.raises(ValueError):
        sample_ode(one, x, grid, method="rk45")  # not a torchdiffeq method


@pytest.mark.parametrize("method, tol", [("euler", 5e-2), ("heun2", 1e-5), ("dopri5", 1e-3)])
def test_ode_runs_backwards_on_a_decreasing_grid(method, tol):
    """SiT's reverse=True (data to noise) is the same integrator on a decreasing grid."""
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = torch.linspace(0.0, 0.9, 200, dtype=torch.float64)
    there = sample_ode(exact_velocity, x, grid, method=method)
    back = sample_ode(exact_velocity, there, grid.flip(0), method=method)
    assert (back - x).abs().max().item() < tol  # round trip noise -> t = 0.9 -> noise


# ----------------------------------------------------------------------------------------------------------
# Closed form through the objective: every shift, the SDE's statistics, the reverse ODE
# ----------------------------------------------------------------------------------------------------------


def exact_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A 'network' predicting the exact velocity (backbone signature model(x, t, **cond))."""
    return exact_velocity(x, t)


def gaussian_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0, 6.0])
def test_every_time_shift_reaches_the_same_endpoint(shift):
    """The shifted grid keeps its endpoints (ODE [0, 1]; the SDE's [0, 0.96], so the last step still ends at
    t = 1): every shift integrates the exact flow to the same endpoint MU + S x0, within the solver's error."""
    from diffusion.objectives.transport import build_transport

    objective = build_transport()
    x0 = gaussian_noise(256, 4)
    out = objective.sample(exact_model, x0, {}, sampler="heun2", steps=101, time_shift=shift)
    assert (out - exact_endpoint(x0)).abs().max().item() < 1e-3  # 2.6e-4 / 6.9e-4 measured at shift 0.3 / 6
    for t0, t1 in [(0.0, 1.0), (0.0, 0.96), (1e-3, 0.999), (1.0, 0.0)]:
        grid = ode_grid(t0, t1, 17, shift)
        assert (grid[0].item(), grid[-1].item()) == (pytest.approx(t0), pytest.approx(t1))
        assert ((grid.diff() > 0) if t1 > t0 else (grid.diff() < 0)).all()
    forward, backward = ode_grid(0.0, 1.0, 17, shift), ode_grid(1.0, 0.0, 17, shift)
    assert torch.allclose(forward.flip(0), backward, atol=1e-6)  # the same times in either direction


@pytest.mark.parametrize("sampler, form, last_step", [
    ("sde_euler", "sigma", "mean"), ("sde_heun", "sigma", "mean"), ("sde_euler", "linear", "tweedie"),
    ("sde_euler", "decreasing", "mean"), ("sde_euler", "increasing-decreasing", "mean"),
    ("sde_euler", "constant", "euler"), ("sde_heun", "constant", "none")])
def test_sde_with_the_exact_score_reproduces_the_data_gaussian(sampler, form, last_step):
    """SiT's SDE on the exact fields turns N(0, 1) into the data's N(MU, S^2): the sample mean and variance within
    4 standard errors plus the 250-step discretisation. (With a large w near the data, e.g. ``constant``, the
    ``mean`` last step -- the SDE's drift without its noise over 0.04 -- removes variance: 0.075 of 0.25 here.)"""
    from diffusion.objectives.transport import build_transport

    objective = build_transport()
    n = 2048
    x0 = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = objective.sample(exact_model, x0, {}, sampler=sampler, steps=250, diffusion_form=form,
                           last_step=last_step, generator=torch.Generator().manual_seed(6)).reshape(-1)
    assert torch.isfinite(out).all()
    mean_se, var_se = S / math.sqrt(n), S**2 * math.sqrt(2 / (n - 1))
    assert abs(out.mean().item() - MU) < 4 * mean_se + 0.01
    assert abs(out.var().item() - S**2) < 4 * var_se + 0.01
    # and not the ODE's answer: the noise is a fresh draw, so samples decorrelate from their starting noise
    ode = exact_endpoint(x0).reshape(-1)
    assert (out - ode).abs().mean().item() > 0.05


def test_sde_refuses_a_diffusion_infinite_at_its_start():
    """SBDM's w(t) = drift_var is 1/t-like on the linear path, whose velocity model samples from t0 = 0 (sample_eps
    is 0 there, as SiT, whose samples then come out NaN): refused before any network call."""
    from diffusion.objectives.transport import build_transport

    with pytest.raises(ValueError, match="SBDM.*infinite at t = 0"):
        build_transport().sample(exact_model, gaussian_noise(2, 0), {}, sampler="sde_euler", steps=10,
                                 diffusion_form="SBDM")
    out = build_transport(prediction="noise").sample(lambda x, t: torch.zeros_like(x), gaussian_noise(2, 0), {},
                                                     sampler="sde_euler", steps=10, diffusion_form="SBDM")
    assert torch.isfinite(out).all()  # t0 = sample_eps = 1e-3 for a noise model


@pytest.mark.parametrize("sampler, tol", [("heun2", 5e-4), ("dopri5", 1e-4)])
def test_reverse_ode_encodes_data_to_its_noise(sampler, tol):
    """reverse=True (SiT's) runs data -> noise: under the exact flow data MU + S z encodes back to z, and the
    forward solve of the encoding returns the data."""
    from diffusion.objectives.transport import build_transport

    objective = build_transport()
    z = gaussian_noise(64, 7)
    data = exact_endpoint(z)
    solver = dict(sampler=sampler, steps=101)
    if "atol" in objective.SAMPLER_OPTIONS[sampler]:  # tolerances: the adaptive methods' own
        solver.update(atol=1e-9, rtol=1e-7)
    encoded = objective.sample(exact_model, data, {}, reverse=True, **solver)
    assert (encoded - z).abs().max().item() < tol
    decoded = objective.sample(exact_model, encoded, {}, **solver)
    assert (decoded - data).abs().max().item() < tol
    with pytest.raises(ValueError, match="reverse does not apply to sampler 'sde_euler'"):
        objective.sample(exact_model, data, {}, sampler="sde_euler", steps=10, reverse=True)


def test_lightningdit_timestep_shift_reproduces_its_grid():
    """LightningDiT's timestep_shift 0.3 (its released sample configs) under its own name gives its grid exactly:
    transport/integrators.py (ode.__init__) maps linspace(0, 1, N) by t' = s t / (1 + (s - 1) t); here that is
    time_shift 1 / s. The Euler sampler evaluates the network on exactly those times; both names at once is refused."""
    from diffusion.objectives.transport import build_transport, from_lightningdit_shift

    s, n = 0.3, 250
    t = torch.linspace(0, 1, n)
    lightningdit = torch.tensor([float(s * t_n / (1 + (s - 1) * t_n)) for t_n in t])  # its float32 arithmetic
    objective = build_transport()
    own = objective.check_sampling("euler", n, {"timestep_shift": s})
    assert own["time_shift"] == pytest.approx(1 / 0.3) and "timestep_shift" not in own
    torch.testing.assert_close(ode_grid(0.0, 1.0, n, own["time_shift"]), lightningdit, rtol=0, atol=2e-7)
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    objective.sample(model, torch.zeros(1, 1, 2, 2), {}, sampler="euler", steps=n, timestep_shift=s)
    torch.testing.assert_close(torch.tensor(seen), lightningdit[:-1], rtol=0, atol=2e-7)
    assert from_lightningdit_shift(0.0) == 1.0 and from_lightningdit_shift(0.0, 2.0) == 2.0  # 0: off, as there
    with pytest.raises(ValueError, match="both set"):
        objective.check_sampling("euler", n, {"timestep_shift": s, "time_shift": 2.0})
    mid = lightningdit[n // 2].item()
    assert mid < 0.5  # 0.3 puts the grid's middle on the noise side (t = 0 noise), the shift direction SD3's > 1 has
