"""The samplers behind ``objective.sample``: accuracy on a closed-form model, parity with the official U-ViT and DiT
samplers (fixtures) and with diffusers' schedulers, the ``randn`` contract, guidance, validation and overhead."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusion.objectives.iddpm import build_iddpm
from diffusion.objectives.vp import build_noise_prediction
from diffusion.samplers import Marginals, default_t_end, fast_orders, singlestep_times
from dit import DiT
from tests.helpers import fixture_network, load_fixture, rel_err
from uvit import UViT

KINDS = ("vp_sde", "sd_discrete")  # continuous linear VP; discrete "stable diffusion" betas seen as continuous time
PARITY = 1e-4  # max|a - b| / max|b| against the official samplers (measured: <= 7e-6)


@functools.cache
def objective(kind: str):
    return build_noise_prediction(kind)


# ----------------------------------------------------------------------------------------------------------
# A closed-form model: data N(mean, std^2) independently per dimension
# ----------------------------------------------------------------------------------------------------------


class GaussianData(torch.nn.Module):
    """The exact noise predictor of a VP process on N(mean, std^2) data: x_t ~ N(alpha m, alpha^2 s^2 + sigma^2), so
    eps(x_t, t) = -sigma score = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2). Per-class means for ``y``."""

    def __init__(self, obj, mean, std):
        super().__init__()
        self.obj, self.mean, self.std = obj, torch.as_tensor(mean), torch.as_tensor(std)

    def forward(self, x, t_in, y=None):
        m = Marginals.at(self.obj.schedule, (t_in / self.obj.time_input_scale).to(x.dtype))
        alpha, sigma = m.alpha.view(-1, 1, 1, 1), m.sigma.view(-1, 1, 1, 1)
        mean = self.mean.to(x.dtype) if y is None else self.mean.to(x.dtype)[y]
        return sigma * (x - alpha * mean) / (alpha**2 * self.std.to(x.dtype) ** 2 + sigma**2)


def exact_solution(obj, noise, mean, std, t_end: float) -> torch.Tensor:
    """The probability-flow ODE keeps z = (x - alpha m) / sqrt(alpha^2 s^2 + sigma^2) constant (each marginal is
    Gaussian and the flow is affine), so x(t_end) = alpha m + sqrt(alpha^2 s^2 + sigma^2) z(1). t_end = 0: the data."""
    times = torch.tensor([1.0, max(t_end, 1e-12)], dtype=torch.float64)
    m = Marginals.at(obj.schedule, times)
    alpha, sigma = m.alpha.tolist(), m.sigma.tolist()
    if t_end == 0:
        alpha[1], sigma[1] = 1.0, 0.0
    z = (noise - alpha[0] * mean) / (alpha[0] ** 2 * std**2 + sigma[0] ** 2) ** 0.5
    return alpha[1] * mean + (alpha[1] ** 2 * std**2 + sigma[1] ** 2) ** 0.5 * z


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loglog_slope(nfes, errors) -> float:
    return float(np.polyfit(np.log(nfes), np.log(errors), 1)[0])


NOISE = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
DATA = {  # one N(0.3, 0.5^2) for every dimension; a different mean and std per dimension
    "scalar": (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)),
    "vector": (torch.linspace(-0.8, 0.8, 48, dtype=torch.float64).view(3, 4, 4),
               torch.linspace(0.05, 1.0, 48, dtype=torch.float64).view(3, 4, 4)),
}


def errors_vs_nfe(kind: str, sampler: str, nfes, **options) -> dict[str, list[float]]:
    """Relative L2 error against the exact ODE solution (float64), per data set, for each evaluation budget."""
    obj, out = objective(kind), {}
    t_end = 0.0 if sampler == "euler_ode" else options.get("t_end", default_t_end(sampler, obj.schedule))
    for name, (mean, std) in DATA.items():
        ref = exact_solution(obj, NOISE, mean, std, t_end)
        out[name] = [rel_l2(obj.sample(GaussianData(obj, mean, std), NOISE, {}, sampler=sampler, steps=n, **options),
                            ref) for n in nfes]
    return out


def test_dpm_solver_is_at_least_as_accurate_as_the_original():
    """U-ViT's own DPM-Solver-fast (dpm_solver_pytorch.py: continuous VP, t = 1 -> 1e-4), measured on exactly these
    inputs (N(0.3, 0.5^2) data, this noise, float64): relative L2 errors 1.01203e-2, 1.83710e-3, 4.08195e-4 at 20,
    30, 50 evaluations."""
    obj = objective("vp_sde")
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    ref = exact_solution(obj, noise, 0.3, 0.5, 1e-4)
    for nfe, original in [(20, 1.01203e-2), (30, 1.83710e-3), (50, 4.08195e-4)]:
        ours = rel_l2(obj.sample(GaussianData(obj, 0.3, 0.5), noise, {}, sampler="dpm_solver", steps=nfe), ref)
        assert ours <= original, (nfe, ours, original)


# On log-SNR grids each method shows its order from moderate budgets on. Order-3 budgets are 2 mod 3, so that the
# fast schedule is 3, ..., 3, 2 (a final first-order step would cap the rate at 2).
ORDER3, ORDER2, ORDER1 = [110, 170, 260, 401, 620], [40, 80, 160, 320], [40, 80, 160, 320]
CONVERGENCE = [  # sampler, options, budgets, order
    ("dpm_solver", dict(order=3), ORDER3, 3),
    ("dpm_solver", dict(order=2), ORDER2, 2),
    ("dpm_solver", dict(order=1), ORDER1, 1),
    ("dpm_solver++", dict(order=3, skip_type="logSNR"), ORDER3, 3),
    ("dpm_solver++", dict(order=2, skip_type="logSNR"), ORDER2, 2),
    ("dpm_solver++", dict(order=1, skip_type="logSNR"), ORDER1, 1),
    ("dpm_solver++2m", dict(skip_type="logSNR"), ORDER2, 2),
    ("ddim", dict(skip_type="logSNR"), ORDER1, 1),
    ("euler_ode", {}, [100, 200, 400, 800], 1),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("sampler", "options", "nfes", "order"), CONVERGENCE,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CONVERGENCE])
def test_error_falls_at_the_method_order(kind, sampler, options, nfes, order):
    for name, errors in errors_vs_nfe(kind, sampler, nfes, **options).items():
        assert all(b < a for a, b in zip(errors, errors[1:])), (name, errors)
        slope = loglog_slope(nfes, errors)
        assert slope < -(order - 0.4), (name, slope, errors)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", ["dpm_solver++", "dpm_solver++2m", "ddim"])
def test_uvit_time_uniform_defaults_converge(kind, sampler):
    """U-ViT's time-uniform grid down to t = 1e-3 puts few points where lambda moves fastest, so the asymptotic rate
    only shows at budgets beyond ~1000; the error still falls steadily, by >= 10x from 20 to 500 evaluations."""
    nfes = [20, 50, 110, 200, 500]
    for name, errors in errors_vs_nfe(kind, sampler, nfes).items():
        assert all(b < a for a, b in zip(errors, errors[1:])), (name, errors)
        assert errors[-1] < errors[0] / 10, (name, errors)


# ----------------------------------------------------------------------------------------------------------
# Equal to diffusers' schedulers where they implement the same method (discrete "stable diffusion" betas)
# ----------------------------------------------------------------------------------------------------------
# Our continuous t = (k + 1) / 1000 is diffusers' timestep k. With 9 steps our time-uniform grid 1, 0.889, ..., 0.001
# is exactly k = 999, 888, ..., 111 followed by the last step to alphas_cumprod[0] (t = 1e-3).

DIFFUSERS_STEPS = 9
DIFFUSERS_TIMESTEPS = [999 - 111 * i for i in range(DIFFUSERS_STEPS)]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def diffusers_eps(x, k, alphas_cumprod, mean=0.3, std=0.5):
    abar = alphas_cumprod[k]
    return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(eta):
    obj = objective("sd_discrete")
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = torch.randn(DIFFUSERS_STEPS, *noise.shape, generator=torch.Generator().manual_seed(1))
    scheduler = DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(DIFFUSERS_STEPS)  # sets the stride 1000 // 9 = 111 between consecutive timesteps
    x = noise
    for i, k in enumerate(DIFFUSERS_TIMESTEPS):
        x = scheduler.step(diffusers_eps(x, k, scheduler.alphas_cumprod), k, x, eta=eta,
                           variance_noise=draws[i] if eta else None).prev_sample
    replay = iter(draws)
    ours = obj.sample(GaussianData(obj, 0.3, 0.5), noise, {}, sampler="ddim", steps=DIFFUSERS_STEPS, eta=eta,
                      randn=lambda _: next(replay))
    assert rel_err(ours, x) < 1e-5


def test_dpm_solver_2m_equals_diffusers_multistep_scheduler():
    obj = objective("sd_discrete")
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", lower_order_final=False,
                                            final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=DIFFUSERS_TIMESTEPS)
    x = noise
    for k in scheduler.timesteps:
        x = scheduler.step(diffusers_eps(x, k, scheduler.alphas_cumprod), k, x).prev_sample
    ours = obj.sample(GaussianData(obj, 0.3, 0.5), noise, {}, sampler="dpm_solver++2m", steps=DIFFUSERS_STEPS)
    assert rel_err(ours, x) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# The improved-DDPM objective on the closed-form model
# ----------------------------------------------------------------------------------------------------------


class DiscreteGaussianData(torch.nn.Module):
    """The exact eps of the discrete process (original step t) on N(mean, std^2) data; v = 0 for the variance."""

    def __init__(self, diffusion, mean, std):
        super().__init__()
        self.abar = torch.cumprod(1 - diffusion.base_betas, 0)
        self.mean, self.std = mean, std

    def forward(self, x, t):
        abar = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / (abar * self.std**2 + 1 - abar)
        return torch.cat([eps, torch.zeros_like(eps)], 1)


def test_iddpm_ddim_converges_to_the_ode_solution():
    diffusion = build_iddpm()
    mean, std = DATA["vector"]
    model, nfes, errors = DiscreteGaussianData(diffusion, mean, std), [10, 20, 40, 100, 200], []
    for n in nfes:
        abar_start = model.abar[diffusion.respaced(f"ddim{n}").timestep_map[-1]]  # "ddimN" starts below t = 999
        ref = mean + std * (NOISE - abar_start.sqrt() * mean) / (abar_start * std**2 + 1 - abar_start).sqrt()
        errors.append(rel_l2(diffusion.sample(model, NOISE, {}, sampler="ddim", steps=n), ref))
    assert errors[-1] < 0.015 and loglog_slope(nfes, errors) < -0.85, errors


def test_iddpm_ddpm_samples_the_data_distribution():
    diffusion = build_iddpm()
    model = DiscreteGaussianData(diffusion, 0.3, 0.5)
    noise = torch.randn(1000, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stds = []
    for steps in (25, 250):
        x = diffusion.sample(model, noise, {}, sampler="ddpm", steps=steps, generator=torch.Generator().manual_seed(2))
        assert abs(x.mean().item() - 0.3) < 0.005  # 48000 draws: standard error 0.0023
        stds.append(x.std().item())
    assert abs(stds[1] - 0.5) < 0.01 < abs(stds[0] - 0.5)  # the discretisation bias shrinks with more steps


# ----------------------------------------------------------------------------------------------------------
# Parity with the official samplers (fixtures)
# ----------------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Wraps a model and records the first timestep value of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.times = model, []

    def forward(self, x, t, **cond):
        self.times.append(t[0].item())
        return self.model(x, t, **cond)


@functools.cache
def fixture_model(name: str):
    return fixture_network(name, DiT if load_fixture(name)["model"]["family"] == "dit" else UViT)


@pytest.mark.parametrize("run", range(4))
def test_dpm_solver_plus_plus_parity_discrete_latent_model(run):
    """U-ViT's dpm_solver_pp.py as its discrete latent models use it (time-uniform grid of steps + 1 points, 1 ->
    1e-3); cfg s = 0.4 is our w = 1.4."""
    model, fx = fixture_model("dpm_solver")
    inp, ref = fx["inputs"], fx["output"]["runs"][run]
    steps, s = inp["runs"][run]["steps"], inp["runs"][run]["cfg_scale"]
    null = {"y": torch.full_like(inp["labels"], inp["null_label"])} if s is not None else None
    obj, rec = objective("sd_discrete"), Recorder(model)
    out = obj.sample(rec, inp["noise"], {"y": inp["labels"]}, null_cond=null,
                     guidance_scale=1.0 + (s or 0.0), sampler="dpm_solver++", steps=steps)
    assert rel_err(out, ref["output"]) < PARITY
    assert fast_orders(steps, 3) == ref["orders"].tolist()
    assert torch.allclose(singlestep_times(obj.schedule, fast_orders(steps), 1e-3, "time_uniform", out),
                          ref["time_grid"], rtol=1e-6, atol=0)
    official = ref["nnet_call_timesteps"][::2] if s is not None else ref["nnet_call_timesteps"]  # 2 passes each
    assert torch.allclose(torch.tensor(rec.times, dtype=torch.float64), official, rtol=1e-6, atol=0)


@pytest.mark.parametrize("run", range(2))
def test_dpm_solver_parity_continuous_pixel_model(run):
    """U-ViT's dpm_solver_pytorch.py, DPM-Solver-fast (logSNR, 1 -> 1e-4) as its continuous-time models use it.
    The original's last grid point is 9.974e-5, not 1e-4: it computes sigma^2 = 1 - alpha^2 in float32, which loses
    0.26% at t = 1e-4; ours uses expm1, so the few smallest times agree to 3e-3 and the samples to 1e-5."""
    model, fx = fixture_model("dpm_solver_pixel")
    steps, ref = fx["inputs"]["runs"][run]["steps"], fx["output"]["runs"][run]
    obj, rec = objective("vp_sde"), Recorder(model)
    out = obj.sample(rec, fx["inputs"]["noise"], {}, sampler="dpm_solver", steps=steps)
    assert rel_err(out, ref["output"]) < PARITY
    orders = fast_orders(steps)
    assert orders == ref["orders"].tolist()
    boundaries = singlestep_times(obj.schedule, orders, 1e-4, "logSNR", out)[np.cumsum([0] + orders)]
    assert torch.allclose(boundaries, ref["time_grid"], rtol=3e-3, atol=0)
    assert torch.allclose(torch.tensor(rec.times, dtype=torch.float64), ref["nnet_call_timesteps"], rtol=3e-3, atol=0)


def test_euler_maruyama_and_ode_parity_pixel_model():
    """U-ViT's sde.euler_maruyama (CIFAR-10 / CelebA): the ODE, and the SDE replaying its draws through ``randn``."""
    model, fx = fixture_model("euler_maruyama_pixel")
    inp, ref = fx["inputs"], fx["output"]
    obj = objective("vp_sde")
    ode = obj.sample(model, inp["noise"], {}, sampler="euler_ode", steps=inp["sample_steps"])
    assert rel_err(ode, ref["ode"]) < PARITY
    replay = iter(ref["sde_draws"])
    sde = obj.sample(model, inp["noise"], {}, sampler="euler_maruyama", steps=inp["sample_steps"],
                     randn=lambda _: next(replay))
    assert rel_err(sde, ref["sde"]) < PARITY
    assert next(replay, None) is None  # all 9 draws used, none more (the last step adds no noise)


def test_iddpm_parity_through_the_unified_interface():
    """DiT's samplers: DDIM ("ddim10") with the released 3-channel guidance and without guidance, and ancestral
    sampling ("10") with its draws replayed through ``randn``."""
    model, fx = fixture_model("ddim_sample")
    inp = fx["inputs"]
    diffusion, cond = build_iddpm(), {"y": inp["labels"]}
    null = {"y": torch.full_like(inp["labels"], inp["null_label"])}
    guided = dict(null_cond=null, guidance_scale=inp["cfg_scale"], guidance_channels=3)
    ddim = diffusion.sample(model, inp["noise"], cond, **guided, sampler="ddim", steps=10)
    assert rel_err(ddim, fx["output"]["ddim10"]["ddim_cfg"][:2]) < PARITY
    plain = diffusion.sample(model, inp["noise"], cond, sampler="ddim", steps=10)
    assert rel_err(plain, fx["output"]["ddim10"]["ddim_nocfg"]) < PARITY
    replay = iter(fx["output"]["10"]["p_sample_draws"][:, :2])  # the draws of the guided (first) half
    ddpm = diffusion.sample(model, inp["noise"], cond, **guided, sampler="ddpm", steps=10, randn=lambda _: next(replay))
    assert rel_err(ddpm, fx["output"]["10"]["p_sample_cfg"][:2]) < PARITY
    assert next(replay, None) is None  # one draw per step, the last (t = 0) one included, as the original


# ----------------------------------------------------------------------------------------------------------
# The randn contract, guidance, options, overhead
# ----------------------------------------------------------------------------------------------------------


class CountingRandn:
    def __init__(self, seed: int = 0):
        self.generator, self.calls = torch.Generator().manual_seed(seed), 0

    def __call__(self, x):
        self.calls += 1
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


RANDN_CASES = [  # kind, sampler, options, expected draws for 8 steps
    ("vp_sde", "euler_maruyama", {}, 7),
    ("vp_sde", "ddim", dict(eta=0.5), 8),
    ("sd_discrete", "ddim", dict(eta=1.0), 8),
    ("vp_sde", "dpm_solver", {}, 0),
    ("sd_discrete", "dpm_solver++", {}, 0),
    ("vp_sde", "dpm_solver++2m", {}, 0),
    ("vp_sde", "euler_ode", {}, 0),
    ("iddpm", "ddpm", {}, 8),
    ("iddpm", "ddim", dict(eta=1.0), 8),
    ("iddpm", "ddim", {}, 0),
]


@pytest.mark.parametrize(("kind", "sampler", "options", "draws"), RANDN_CASES)
def test_every_draw_comes_from_randn(kind, sampler, options, draws):
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "iddpm":
        obj = build_iddpm()
        model = DiscreteGaussianData(obj, 0.3, 0.5)
    else:
        obj = objective(kind)
        model = GaussianData(obj, 0.3, 0.5)
    a, b, c = CountingRandn(0), CountingRandn(0), CountingRandn(1)
    torch.manual_seed(0)
    out_a = obj.sample(model, noise, {}, sampler=sampler, steps=8, randn=a, **options)
    torch.manual_seed(1)  # the global RNG must not matter
    out_b = obj.sample(model, noise, {}, sampler=sampler, steps=8, randn=b, **options)
    out_c = obj.sample(model, noise, {}, sampler=sampler, steps=8, randn=c, **options)
    assert a.calls == b.calls == c.calls == draws
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, out_c) == (draws == 0)


@pytest.mark.parametrize("kind", ["vp_sde", "iddpm"])
def test_per_sample_streams_make_sample_i_independent_of_the_batch(kind):
    """A ``randn`` drawing row i from its own generator (seed, i) gives sample i the same value in any batch."""
    if kind == "iddpm":
        obj, sampler = build_iddpm(), "ddpm"
        model = DiscreteGaussianData(obj, 0.3, 0.5)
    else:
        obj, sampler = objective(kind), "euler_maruyama"
        model = GaussianData(obj, 0.3, 0.5)

    def per_sample(indices):
        gens = [torch.Generator().manual_seed(1000 + i) for i in indices]
        return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = obj.sample(model, noise, {}, sampler=sampler, steps=6, randn=per_sample([0, 1, 2]))
    alone = obj.sample(model, noise[2:], {}, sampler=sampler, steps=6, randn=per_sample([2]))
    torch.testing.assert_close(batch[2:], alone, rtol=1e-5, atol=1e-6)


def test_generator_draws_are_reproducible():
    obj, noise = objective("vp_sde"), torch.randn(2, 3, 4, 4)
    model = GaussianData(obj, 0.3, 0.5)

    def run(seed):
        return obj.sample(model, noise, {}, sampler="euler_maruyama", steps=5,
                          generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


class TwoPassGuided(torch.nn.Module):
    """Classifier-free guidance written out: two separate passes, eps_u + w (eps_c - eps_u)."""

    def __init__(self, model, y, null, scale):
        super().__init__()
        self.model, self.y, self.null, self.scale = model, y, null, scale

    def forward(self, x, t):
        eps_c, eps_u = self.model(x, t, y=self.y), self.model(x, t, y=self.null)
        return eps_u + self.scale * (eps_c - eps_u)


class CallCounter(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x, t, **cond):
        self.batches.append(len(x))
        return self.model(x, t, **cond)


@pytest.mark.parametrize(("kind", "sampler"), [("vp_sde", "dpm_solver"), ("sd_discrete", "dpm_solver++"),
                                               ("vp_sde", "euler_maruyama")])
def test_guided_sampling_equals_the_two_pass_formula(kind, sampler):
    obj = objective(kind)
    model = CallCounter(GaussianData(obj, torch.tensor([-0.5, 0.2, 0.6]).view(3, 1, 1, 1), 0.4))
    y, null = torch.tensor([0, 1]), torch.tensor([2, 2])
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    guided = obj.sample(model, noise, {"y": y}, null_cond={"y": null}, guidance_scale=2.5, sampler=sampler,
                        steps=10, randn=CountingRandn(0))
    assert model.batches == [4] * 10  # one batched [cond; uncond] call per evaluation
    two_pass = obj.sample(TwoPassGuided(model.model, y, null, 2.5), noise, {}, sampler=sampler, steps=10,
                          randn=CountingRandn(0))
    torch.testing.assert_close(guided, two_pass, rtol=1e-5, atol=1e-5)


def test_fast_order_schedule():
    assert fast_orders(50) == [3] * 16 + [2]  # U-ViT's paper setting: 17 steps
    assert fast_orders(30) == [3] * 9 + [2, 1]
    assert fast_orders(10) == [3, 3, 3, 1]
    assert fast_orders(7, 2) == [2, 2, 2, 1] and fast_orders(4, 1) == [1] * 4
    for order in (1, 2, 3):
        for steps in range(1, 40):
            orders = fast_orders(steps, order)
            assert sum(orders) == steps and max(orders) <= order
            assert orders[:-2] == [order] * len(orders[:-2])


def test_default_grids_are_the_uvit_settings():
    continuous, discrete = objective("vp_sde").schedule, objective("sd_discrete").schedule
    x = torch.zeros(1)
    assert default_t_end("dpm_solver", continuous) == 1e-4 and default_t_end("dpm_solver++", discrete) == 1e-3
    assert default_t_end("dpm_solver", discrete) == 1e-3  # never below the first trained step
    times = singlestep_times(continuous, fast_orders(50), 1e-4, "logSNR", x)
    lam = Marginals.at(continuous, times[np.cumsum([0] + fast_orders(50))]).lam
    assert len(times) == 51 and times[0] == 1 and times[-1] == 1e-4
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(17))  # 17 intervals uniform in log-SNR


@pytest.mark.parametrize("kind", ["vp_sde", "iddpm"])
def test_invalid_options_name_the_choices(kind):
    obj = build_iddpm() if kind == "iddpm" else objective(kind)
    model, noise = (lambda x, t: torch.cat([x, x], 1)), torch.zeros(1, 2, 4, 4)
    assert isinstance(obj.SAMPLERS, tuple) and len(obj.SAMPLERS) >= 2
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*" + re.escape(obj.SAMPLERS[1])):
        obj.sample(model, noise, {}, sampler="heun")
    for sampler in obj.SAMPLERS:  # each sampler checks its own options and refuses the others
        own = obj.SAMPLER_OPTIONS[sampler]
        for bad, match in [(dict(steps=0), "steps"), (dict(order=4), r"order must be one of \(1, 2, 3\)"),
                           (dict(skip_type="quadratic"), "logSNR, time_uniform"), (dict(eta=-1.0), "eta must be"),
                           (dict(t_end=1.5), "t_end must lie")]:
            key = next(iter(bad))
            if key != "steps" and key not in own:
                match = f"{key} does not apply to sampler '{re.escape(sampler)}'"
            with pytest.raises(ValueError, match=match):
                obj.sample(model, noise, {}, sampler=sampler, **bad)
    if kind == "vp_sde":
        with pytest.raises(ValueError, match="steps >= 2"):
            obj.sample(model, noise, {}, sampler="euler_maruyama", steps=1)


class HostTraffic(TorchDispatchMode):
    """Counts operations that read a device value on the host (``.item()``) or take a CPU tensor as input."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default or any(
                isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in leaves):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", [*KINDS, "iddpm"])
def test_no_host_device_traffic_inside_the_step_loop(kind):
    """On the meta device any host read raises and any CPU input is counted: per-step traffic would grow with the
    number of steps, the one-off building of the tables before the loop does not."""
    obj = build_iddpm() if kind == "iddpm" else objective(kind)
    noise = torch.empty(2, 3, 4, 4, device="meta")
    model = (lambda x, t: torch.cat([x, x], 1) * 0.1) if kind == "iddpm" else (lambda x, t: x * 0.1)
    for sampler in obj.SAMPLERS:
        counts = []
        for steps in (6, 12, 6, 12):  # first round: also builds and caches tables (iddpm: per respacing)
            with HostTraffic() as traffic:
                eta = {"eta": 0.5} if "eta" in obj.SAMPLER_OPTIONS[sampler] else {}
                obj.sample(model, noise, {}, sampler=sampler, steps=steps, randn=torch.randn_like, **eta)
            counts.append(traffic.count)
        assert counts[2] == counts[3], (sampler, counts)


def test_progress_bar(capsys):
    obj = objective("vp_sde")
    obj.sample(GaussianData(obj, 0.3, 0.5), torch.zeros(1, 1, 2, 2), {}, sampler="dpm_solver", steps=6,
               progress=True)
    assert "dpm_solver" in capsys.readouterr().err
