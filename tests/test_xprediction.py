"""x-prediction in the transport objective (``diffusion.prediction = "x"``, JiT, Li & He 2025): parity of the loss
and of ``jit_heun`` with JiT's own code (tests/fixtures/jit_xpred.pt), the conversions, the Gaussian closed form for
every ODE sampler, the settings' checks, and a digits run trained and sampled through sample.py."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from diffusion.config.cli import parse_command_line
from diffusion.errors import ConfigError
from diffusion.objectives.guidance import guided_model
from diffusion.objectives.paths import LinearPath, velocity_from_x, x_from_velocity
from diffusion.objectives.transport import build_transport
from diffusion.registry import build_objective
from diffusion.samplers.jit import jit_guided
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_DIT, logged_losses

FIXTURES = REPO / "tests" / "fixtures"


def _generator_module():
    spec = importlib.util.spec_from_file_location("make_jit_xpred", FIXTURES / "make_jit_xpred.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jit():
    """(fixture, tiny network as this project calls it: model(x, t, y=...), counting its calls)."""
    data = torch.load(FIXTURES / "jit_xpred.pt")
    net = _generator_module().TinyJiT()
    net.load_state_dict(data["weights"])
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return net(x, t, y)

    model.calls = calls
    return data, model


def jit_objective(data, case=None):
    s = {**data["settings"], **({} if case is None else {k: case[k] for k in ("P_mean", "P_std")})}
    return build_transport(prediction="x", time_sampling="logit_normal", logit_mean=s["P_mean"],
                           logit_std=s["P_std"], noise_scale=s["noise_scale"], t_eps=s["t_eps"])


def test_loss_and_time_draws_match_jit(jit):
    """JiT's forward: the batch mean of this project's per-sample loss on JiT's draws, and the logit-normal times
    drawn from JiT's seed after its label-drop uniforms (``time_sampling = logit_normal`` is JiT's sample_t); the
    last case has most t inside the clamp 1 - t < t_eps."""
    data, model = jit
    assert (data["losses"][-1]["t"] > 1 - data["settings"]["t_eps"]).sum() >= 3
    for case in data["losses"]:
        objective = jit_objective(data, case)
        with torch.no_grad():
            loss = objective.training_losses(model, case["x"], {"y": case["y"]}, t=case["t"], noise=case["noise"])
        assert loss["loss"].shape == (case["x"].shape[0],)
        assert abs(loss["loss"].mean().item() - case["loss"].item()) <= 1e-5 * case["loss"].item()
        g = torch.Generator().manual_seed(case["seed"])
        torch.rand(case["x"].shape[0], generator=g)
        assert torch.allclose(objective.sample_time(case["x"].shape[0], "cpu", g), case["t"], atol=1e-7, rtol=0)


def test_jit_heun_matches_jits_generate(jit):
    """JiT's generate (noise_scale 2; Heun, a last Euler step; CFG in v-space with its interval): jit_heun from
    the unit noise within 1e-5, 2 (steps - 1) + 1 evaluations; reading the window inclusively instead (a lower edge
    just below the grid point 0.1) changes the samples."""
    data, model = jit
    objective = jit_objective(data)
    null = data["classes"]
    for case in data["samples"]:
        lo, hi = case["interval"]
        kwargs = dict(null_cond={"y": torch.full_like(case["y"], null)}, guidance_scale=case["cfg"],
                      sampler="jit_heun", steps=case["steps"], guidance_t_lo=lo, guidance_t_hi=hi)
        model.calls.clear()
        out = objective.sample(model, case["noise"], {"y": case["y"]}, **kwargs)
        assert len(model.calls) == 2 * (case["steps"] - 1) + 1
        assert (out - case["out"]).abs().max().item() <= 1e-5 * case["out"].abs().max().item()
        if lo == 0.1:
            moved = objective.sample(model, case["noise"], {"y": case["y"]}, **{**kwargs, "guidance_t_lo": 0.0999})
            assert (moved - case["out"]).abs().max().item() > 1e-2


def test_jit_interval_mask_inequalities():
    """JiT's mask: strict at both edges, except that a lower edge 0 admits t = 0."""
    t = torch.tensor
    assert jit_guided(t(0.0), 0.0, 1.0) and not jit_guided(t(1.0), 0.0, 1.0)
    assert not jit_guided(t(0.1), 0.1, 1.0) and jit_guided(t(0.2), 0.1, 1.0)
    assert not jit_guided(t(0.5), 0.1, 0.5) and jit_guided(t(0.4999), 0.1, 0.5)


def test_conversions_round_trip_and_guidance_commutes():
    """x <-> velocity <-> score <-> noise on random tensors away from the clamp; guiding x then converting is JiT's
    v-space guidance, inside the clamp as well (both branches share z and the clamp)."""
    g = torch.Generator().manual_seed(0)
    path, eps = LinearPath(), 0.05
    z, x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(6, generator=g, dtype=torch.float64)
    v = velocity_from_x(x, z, t, eps)
    assert torch.allclose(x_from_velocity(v, z, t, eps), x, atol=1e-12)
    score = path.score_from_velocity(v, z, t)
    assert torch.allclose(path.velocity_from_score(score, z, t), v, atol=1e-10)
    noise = path.noise_from_velocity(v, z, t)
    assert torch.allclose(path.score_from_noise(noise, z, t), score, atol=1e-10)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(tb * x + (1 - tb) * noise, z, atol=1e-10)  # x and noise rebuild z
    t_all = torch.tensor([0.0, 0.3, 0.96, 0.99, 0.5, 0.999], dtype=torch.float64)  # two inside the clamp
    x_c, x_u, w = x, torch.randn(x.shape, generator=g, dtype=torch.float64), 2.7
    v_c, v_u = velocity_from_x(x_c, z, t_all, eps), velocity_from_x(x_u, z, t_all, eps)
    assert torch.allclose(velocity_from_x(x_u + w * (x_c - x_u), z, t_all, eps), v_u + w * (v_c - v_u), atol=1e-9)
    guided = guided_model(lambda x_, t_, y: torch.where(y.view(-1, 1, 1, 1) == 1, x_c.repeat(2, 1, 1, 1)[: len(y)],
                                                        x_u.repeat(2, 1, 1, 1)[: len(y)]),
                          {"y": torch.ones(6)}, {"y": torch.zeros(6)}, w, 3)
    assert torch.allclose(guided(z, t_all), x_u + w * (x_c - x_u), atol=1e-12)


MU, S = 1.5, 0.5  # data x ~ N(MU, S^2) per dimension


def exact_x(noise_scale: float):
    """E[x | z_t = z] for z_t = t x + (1 - t) s e: Var z = t^2 S^2 + (1 - t)^2 s^2, Cov(x, z) = t S^2."""

    def model(z, t):
        t = t.reshape(-1, *([1] * (z.ndim - 1)))
        var = t**2 * S**2 + (1 - t) ** 2 * noise_scale**2
        return MU + t * S**2 / var * (z - t * MU)

    return model


def test_exact_conditional_mean_minimises_the_loss():
    """On the same draws, E[x | z_t] has a lower loss than a shifted or scaled prediction."""
    objective = build_transport(prediction="x", time_sampling="logit_normal", logit_mean=-0.8, logit_std=0.8,
                                noise_scale=2.0)
    g = torch.Generator().manual_seed(3)
    x1 = MU + S * torch.randn(8192, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    t = objective.sample_time(x1.shape[0], "cpu", g).double()
    exact = exact_x(2.0)

    def loss(model):
        return objective.training_losses(model, x1, {}, t=t, noise=noise)["loss"].mean().item()

    best = loss(exact)
    for wrong in (lambda z, t: exact(z, t) + 0.05, lambda z, t: 1.05 * exact(z, t), lambda z, t: 0.95 * exact(z, t)):
        assert loss(wrong) > best * 1.001


@pytest.mark.parametrize("sampler, steps", [("euler", 400), ("heun2", 100), ("dopri5", 50), ("jit_heun", 50)])
@pytest.mark.parametrize("noise_scale", [1.0, 2.0])
def test_every_ode_sampler_lands_on_the_data_gaussian(sampler, steps, noise_scale):
    """The exact x prediction sampled from unit noise: each sample near the exact flow's endpoint MU + S e (the
    monotone map of N(0, 1) onto the data), hence the data's mean and variance. With t_eps = 1e-3: JiT's 0.05 makes
    the velocity (1 - t) / t_eps of the exact one over the last 5% of the way, so about half of that last stretch
    is not travelled (0.087 at most off MU + S e here, measured with Euler, 400 steps)."""
    objective = build_transport(prediction="x", noise_scale=noise_scale, t_eps=1e-3)
    e = torch.randn(2048, 1, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = objective.sample(exact_x(noise_scale), e, {}, sampler=sampler, steps=steps)
    assert (out - (MU + S * e)).abs().max().item() < 0.02
    n = e.shape[0]
    assert abs(out.mean().item() - MU) < 4 * S / math.sqrt(n) + 0.01
    assert abs(out.var().item() - S**2) < 4 * S**2 * math.sqrt(2 / (n - 1)) + 0.01


def test_reverse_ode_encodes_to_unit_noise():
    """With noise_scale 2 the reverse ODE returns its endpoint over 2: the data MU + S e encodes to e, unit noise
    as ``sample`` takes it, and decodes back (t_eps 1e-5: the encoding starts at t = 1, inside the clamp, whose
    error grows with t_eps: 3e-3 at 1e-3, 6e-5 here, measured)."""
    objective = build_transport(prediction="x", noise_scale=2.0, t_eps=1e-5)
    e = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    code = objective.sample(exact_x(2.0), MU + S * e, {}, sampler="dopri5", steps=2, reverse=True, rtol=1e-6)
    assert (code - e).abs().max().item() < 1e-3
    back = objective.sample(exact_x(2.0), code, {}, sampler="dopri5", steps=2, rtol=1e-6)
    assert (back - (MU + S * e)).abs().max().item() < 1e-3


@pytest.mark.parametrize("sampler", ["sde_euler", "sde_heun"])
def test_sde_samplers_on_the_x_prediction_reproduce_the_data_gaussian(sampler):
    """SiT's SDEs on the x prediction's velocity and its score (score_from_velocity) turn N(0, 1) into N(MU, S^2)
    (mean and variance within 4 standard errors plus the discretisation), with fresh noise (not the ODE's map)."""
    objective = build_transport(prediction="x", t_eps=1e-3)
    e = torch.randn(2048, 1, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = objective.sample(exact_x(1.0), e, {}, sampler=sampler, steps=250,
                           generator=torch.Generator().manual_seed(6)).reshape(-1)
    n = e.shape[0]
    assert abs(out.mean().item() - MU) < 4 * S / math.sqrt(n) + 0.01
    assert abs(out.var().item() - S**2) < 4 * S**2 * math.sqrt(2 / (n - 1)) + 0.01
    assert (out - (MU + S * e.reshape(-1))).abs().mean().item() > 0.05


def test_settings_are_checked():
    """The new diffusion keys reach build_transport through the config; values it cannot honour are one
    ConfigError, and samplers that assume unit noise or another prediction refuse."""
    base = {"kind": "transport", "path": "linear", "prediction": "x"}
    objective = build_objective({**base, "noise_scale": 4.0, "t_eps": 0.1})
    assert (objective.prediction, objective.noise_scale, objective.t_eps) == ("x", 4.0, 0.1)
    assert (objective.t0, objective.t1, objective.sample_eps) == (0.0, 1.0, 0.0)
    for bad in ({"noise_scale": 0.0}, {"t_eps": 0.0}, {"path": "gvp"}, {"loss_weight": "velocity"},
                {"time_direction": "repa"}, {"prediction": "noise", "noise_scale": 2.0}):
        with pytest.raises(ConfigError):
            build_objective({**base, **bad})
    e = torch.zeros(2, 1, 1, 1)
    for sampler in ("sde_euler", "repa_sde"):
        with pytest.raises(ValueError, match="unit noise|REPA"):
            objective.sample(exact_x(4.0), e, {}, sampler=sampler, steps=4)
    with pytest.raises(ValueError, match="prior"):
        objective.likelihood(exact_x(4.0), e, {})
    with pytest.raises(ValueError, match="jit_heun samples"):
        build_transport(prediction="noise").sample(exact_x(1.0), e, {}, sampler="jit_heun", steps=4)


def test_digits_x_prediction_trains_and_samples_through_sample_py(tmp_path):
    """configs/digits_sit.py with prediction x and JiT's time distribution on the tiny DiT: the loss falls, and
    sample.py draws from the run with jit_heun."""
    import sample

    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_sit.py'}", *TINY_DIT, "--config.train.steps=60",
                                 "--config.train.log_every=10", "--config.train.ckpt_every=60",
                                 "--config.diffusion.prediction=x", "--config.diffusion.time_sampling=logit_normal",
                                 "--config.diffusion.logit_mean=-0.8", "--config.diffusion.logit_std=0.8",
                                 "--config.diffusion.t_eps=0.05", "--config.diffusion.noise_scale=1.0"])
    assert (cfg.diffusion.t_eps, cfg.diffusion.noise_scale) == (0.05, 1.0)  # settable though the config omits them
    train(cfg, tmp_path / "run")
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    out = tmp_path / "samples.npz"
    assert sample.main([f"--ckpt={tmp_path / 'run'}", f"--out={out}", "--n_samples=8", "--batch_size=8",
                        "--sampler=jit_heun", "--steps=5"]) == 0
    images = np.load(out)["arr_0"]
    assert images.shape[0] == 8 and images.std() > 0
