"""The interpolant paths and the transport objective against SiT (tests/fixtures/sit_transport.pt, made with the
official code; see tests/fixtures/README.md) and against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.objectives.paths import PATHS, interval, resolve_eps
from diffusion.objectives.transport import Transport, build_transport
from diffusion.registry import build_objective
from dit import DiT
from tests.helpers import fixture_network, load_fixture


@pytest.fixture(scope="module")
def sit():
    return load_fixture("sit_transport")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _none(value):
    return None if value == "None" else value


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Linear", "GVP", "VP"])
def test_path_tables_match_sit(sit, name):
    table = sit["output"]["path_tables"][name]
    path, t = PATHS[name.lower()](), table["t"]
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    drift_mean, drift_var = path.drift(torch.ones_like(t), t)
    ours = {"alpha": alpha, "sigma": sigma, "d_alpha": d_alpha, "d_sigma": d_sigma,
            "d_alpha_alpha_ratio": path.d_alpha_alpha_ratio(t), "drift_mean_at_x1": drift_mean, "drift_var": drift_var}
    for key, value in ours.items():
        assert value.shape == t.shape, key
        torch.testing.assert_close(value, table[key], rtol=1e-6, atol=0, msg=key)
    for form, expected in table["diffusion_norm1"].items():
        torch.testing.assert_close(path.diffusion(torch.ones_like(t), t, form, 1.0), expected, rtol=1e-6, atol=0)


def test_increasing_decreasing_spellings_agree():
    path, t = PATHS["linear"](), torch.linspace(0.1, 0.9, 5)
    x = torch.ones(5, 2)
    torch.testing.assert_close(path.diffusion(x, t, "increasing-decreasing", 0.5),
                               path.diffusion(x, t, "inccreasing-decreasing", 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown diffusion form"):
        path.diffusion(x, t, "cosine", 1.0)


@pytest.mark.parametrize("name", ["Linear", "GVP", "VP"])
def test_conversions_match_sit(sit, name):
    conv = sit["output"]["conversions"]
    path = PATHS[name.lower()]()
    for key in ("score_from_velocity", "noise_from_velocity", "velocity_from_score"):
        ours = getattr(path, key)(conv["model_out"], conv["x"], conv["t"])
        assert _rel(ours, conv[name][key]) < 1e-6, key


@pytest.mark.parametrize("name", ["linear", "gvp", "vp"])
def test_conversions_are_consistent(name):
    """On x_t built from (x0, x1), the true velocity u_t maps to the true noise x0 and score -x0 / sigma_t, and the
    score maps back to u_t."""
    g = torch.Generator().manual_seed(0)
    path = PATHS[name]()
    x0, x1 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g,
                                                                                   dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    x_t, u_t = path.plan(t, x0, x1)
    sigma = path.coefficients(t)[1].view(-1, 1, 1, 1)
    torch.testing.assert_close(path.noise_from_velocity(u_t, x_t, t), x0)
    torch.testing.assert_close(path.score_from_velocity(u_t, x_t, t), -x0 / sigma)
    torch.testing.assert_close(path.velocity_from_score(-x0 / sigma, x_t, t), u_t)
    torch.testing.assert_close(path.score_from_noise(x0, x_t, t), -x0 / sigma)


def test_eps_resolution_matches_sit(sit):
    rows = sit["output"]["eps_resolution"]
    assert len(rows) == 24
    for row in rows:
        got = resolve_eps(row["path_type"], row["prediction"], _none(row["train_eps_arg"]),
                          _none(row["sample_eps_arg"]))
        assert got == (_none(row["train_eps"]), _none(row["sample_eps"])), row


INTERVAL_CALLS = {  # fixture key -> (which eps, keyword arguments of interval)
    "train": ("train_eps", {}),
    "ode": ("sample_eps", {}),
    "ode_reverse": ("sample_eps", {"reverse": True}),
    "sde_sigma_last0.04": ("sample_eps", {"sde": True, "diffusion_form": "sigma", "last_step_size": 0.04}),
    "sde_sigma_last0.0": ("sample_eps", {"sde": True, "diffusion_form": "sigma", "last_step_size": 0.0}),
    "sde_SBDM_last0.04": ("sample_eps", {"sde": True, "diffusion_form": "SBDM", "last_step_size": 0.04}),
    "sde_SBDM_last0.0": ("sample_eps", {"sde": True, "diffusion_form": "SBDM", "last_step_size": 0.0}),
}


def test_intervals_match_sit(sit):
    for spec, case in zip(sit["inputs"]["cases"], sit["output"]["cases"]):
        train_eps, sample_eps = resolve_eps(spec["path_type"], spec["prediction"], None, None)
        assert (train_eps, sample_eps) == (case["train_eps"], case["sample_eps"])
        eps = {"train_eps": train_eps, "sample_eps": sample_eps}
        for key, (which, kwargs) in INTERVAL_CALLS.items():
            got = interval(spec["path_type"], spec["prediction"], eps[which], **kwargs)
            assert got == pytest.approx(tuple(case["check_interval"][key]), abs=1e-12), (spec, key)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown path"):
        resolve_eps("cosine", "velocity", None, None)
    with pytest.raises(ValueError, match="unknown prediction"):
        interval("linear", "x0", 0.0)


def test_vp_path_does_not_start_at_pure_noise():
    alpha, sigma, _, _ = PATHS["vp"]().coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha[0].item() == pytest.approx(math.exp(-5.025))
    assert sigma[1].item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The transport objective
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sit_model():
    """SiT's network is this repository's DiT (learn_sigma: 2C output channels, the objective keeps the first C)."""
    return fixture_network("sit_transport", DiT)[0]


def _case_transport(spec) -> Transport:
    return build_transport(spec["path_type"], spec["prediction"], _none(spec["loss_weight"]))


def test_training_losses_match_sit(sit, sit_model):
    """Every case replayed from the recorded draws (x0, t; in train mode the labels the model saw after SiT's own
    label dropout, which our training loop does outside the network)."""
    x1 = sit["inputs"]["x1"]
    assert len(sit["inputs"]["cases"]) == 14
    for spec, case in zip(sit["inputs"]["cases"], sit["output"]["cases"]):
        tr = _case_transport(spec)
        assert (tr.train_eps, tr.sample_eps) == (case["train_eps"], case["sample_eps"])
        torch.testing.assert_close(tr.to_interval(case["uniform_draw"]), case["t"], rtol=1e-7, atol=0)
        x_t, u_t = tr.path.plan(case["t"], case["x0"], x1)
        assert _rel(x_t, case["x_t"]) < 1e-6 and _rel(u_t, case["u_t"]) < 1e-6, spec
        with torch.no_grad():
            out = tr.training_losses(sit_model, x1, {"y": case["labels_seen_by_model"]}, t=case["t"],
                                     noise=case["x0"])
        assert out["pred"].shape == x1.shape and out["loss"].shape == (3,)
        assert _rel(out["pred"], case["model_output"]) < 1e-5, spec
        torch.testing.assert_close(out["loss"], case["loss"], rtol=1e-5, atol=0, msg=str(spec))


def test_the_network_sees_scaled_time_and_draws_come_noise_first():
    seen = {}

    def model(x, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x)

    tr = build_transport(time_scale=1000.0)
    x1, t = torch.randn(2, 3, 4, 4), torch.tensor([0.25, 0.5])
    tr.training_losses(model, x1, {"y": torch.tensor([1, 2])}, t=t)
    torch.testing.assert_close(seen["t"], 1000 * t)
    torch.manual_seed(5)
    loss = tr.training_losses(model, x1, {"y": torch.tensor([1, 2])})["loss"]
    torch.manual_seed(5)
    x0, t = torch.randn_like(x1), torch.rand(2)
    torch.testing.assert_close(seen["t"], 1000 * t)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean((1, 2, 3)))


def test_loss_weight_is_ignored_for_velocity_and_cos_loss_adds_the_direction_term():
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.8])
    v_hat = torch.randn(3, 2, 4, 4, generator=g)

    def model(x, t, y=None):
        return torch.cat([v_hat, torch.full_like(v_hat, 7.0)], 1)  # a learn_sigma output: the second half is unused

    plain = build_transport(loss_weight="likelihood").training_losses(model, x1, {}, t=t, noise=x0)["loss"]
    u_t = x1 - x0
    torch.testing.assert_close(plain, (v_hat - u_t).pow(2).mean((1, 2, 3)))
    with_cos = build_transport(cos_loss=0.5).training_losses(model, x1, {}, t=t, noise=x0)["loss"]
    cos = (v_hat * u_t).sum(1) / (v_hat.norm(dim=1) * u_t.norm(dim=1))  # over the channels at each pixel
    torch.testing.assert_close(with_cos, plain + 0.5 * (1 - cos).mean((1, 2)))


def test_velocity_loss_at_the_exact_field_is_the_irreducible_loss():
    """Data x1 ~ N(mu, s^2) per dimension on the linear path. (x_t, u_t) = (t x1 + (1 - t) x0, x1 - x0) are jointly
    Gaussian, with V = Var x_t = t^2 s^2 + (1 - t)^2 and Cov(u_t, x_t) = t s^2 - (1 - t), so the exact velocity
    field is E[u_t | x_t = x] = mu + (t s^2 - (1 - t)) (x - t mu) / V, and its loss is the conditional variance
    Var(u_t) - Cov^2 / V = s^2 / V per dimension (the minimum of the velocity loss over all fields)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    s = torch.tensor([0.3, 1.0, 2.0, 0.05], dtype=torch.float64).view(1, 4, 1, 1)

    def exact(x, t, **cond):
        t = t.view(-1, 1, 1, 1)
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) * (x - t * mu) / var

    def irreducible(t):
        t = t.view(-1, 1, 1, 1)
        return (s**2 / (t**2 * s**2 + (1 - t) ** 2)).mean((1, 2, 3))

    tr = build_transport()
    n = 20000
    x1 = mu + s * torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64)
    t = tr.sample_time(n, "cpu", g).double()
    loss = tr.training_losses(exact, x1, {}, t=t, noise=x0)["loss"]
    excess = loss - irreducible(t)  # conditional on t: its mean is 0, only the data's noise is left
    assert abs(excess.mean().item()) < 3 * excess.std().item() / math.sqrt(n)
    grid = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000  # midpoint rule for E_t over U[0, 1]
    expected = irreducible(grid).mean().item()
    assert abs(loss.mean().item() - expected) < 3 * loss.std().item() / math.sqrt(n)
    # any other field does worse
    worse = tr.training_losses(lambda x, t: exact(x, t) + 0.1, x1, {}, t=t, noise=x0)["loss"]
    assert worse.mean() > loss.mean() + 0.005


def test_sample_time_uniform_is_the_generators_rand_scaled_into_the_interval():
    tr = build_transport("linear", "noise")  # [1e-3, 1 - 1e-3]
    got = tr.sample_time(8, "cpu", torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, 1e-3 + u * (1 - 2e-3))
    assert got.dtype == torch.float32 and got.shape == (8,)
    plain = build_transport().sample_time(8, "cpu", torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, u, rtol=0, atol=0)


def test_logit_normal_and_mode_sampling():
    n = 200000
    g = torch.Generator().manual_seed(0)
    logit = build_transport(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_time(n, "cpu", g)
    z = torch.logit(logit.double())
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.8) < 0.01
    mode = build_transport(time_sampling="mode", mode_scale=1.29).sample_time(n, "cpu", g)
    assert 0 <= mode.min() and mode.max() <= 1
    middle = ((mode > 0.25) & (mode < 0.75)).float().mean().item()
    assert middle > 0.6  # positive scales favour the middle (SD3); uniform would give 0.5
    assert abs(mode.mean().item() - 0.5) < 0.01  # symmetric about 1/2
    flat = build_transport(time_sampling="mode", mode_scale=0.0).sample_time(8, "cpu", torch.Generator().manual_seed(1))
    torch.testing.assert_close(flat, torch.rand(8, generator=torch.Generator().manual_seed(1)))


def test_time_shift_spends_more_time_near_noise():
    u = torch.rand(8, generator=torch.Generator().manual_seed(2))
    shifted = build_transport(time_shift=3.0).sample_time(8, "cpu", torch.Generator().manual_seed(2))
    s = 1 - u
    torch.testing.assert_close(shifted, 1 - 3 * s / (1 + 2 * s))
    assert (shifted <= u).all()  # closer to t = 0, the noise end


def test_build_transport_refuses_bad_settings_and_is_a_diffusion_kind():
    for kwargs, match in [({"path": "cosine"}, "unknown path"), ({"prediction": "x0"}, "unknown prediction"),
                          ({"loss_weight": "snr"}, "unknown loss_weight"),
                          ({"time_sampling": "beta"}, "unknown time_sampling"), ({"time_shift": 0.0}, "time_shift"),
                          ({"mode_scale": 3.0, "time_sampling": "mode"}, "mode_scale"),
                          ({"prediction": "noise", "cos_loss": 0.1}, "velocity prediction only"),
                          ({"logit_std": 0.0}, "logit_std"), ({"time_scale": -1.0}, "time_scale")]:
        with pytest.raises(ValueError, match=match):
            build_transport(**kwargs)
    tr = build_objective({"kind": "transport", "path": "GVP", "prediction": "score", "loss_weight": "velocity"})
    assert isinstance(tr, Transport) and tr.path.name == "gvp" and (tr.t0, tr.t1) == (1e-3, 1 - 1e-3)
    with pytest.raises(ConfigError, match="unknown path"):
        build_objective({"kind": "transport", "path": "cosine"})
    with pytest.raises(ConfigError, match="unknown diffusion settings"):
        build_objective({"kind": "transport", "beta_min": 0.1})


def test_fields_match_sits_sampler_at_the_training_points(sit, sit_model):
    """SiT's ``Sampler.drift``, ``Sampler.score`` and SDE drift (w = sigma_t) at each eval case's (x_t, t)."""
    for spec, case in zip(sit["inputs"]["cases"], sit["output"]["cases"]):
        if spec["mode"] != "eval":  # SiT's network drew new label dropouts for these
            continue
        tr = _case_transport(spec)
        y = case["labels_seen_by_model"]
        drift, score = tr.fields(lambda x, t, y=y: sit_model(x, t, y)[:, :4])
        w = tr.diffusion_field("sigma", 1.0)
        x_t, t = case["x_t"], case["t"]
        with torch.no_grad():
            d, s = drift(x_t, t), score(x_t, t)
        assert _rel(d, case["drift"]) < 1e-5 and _rel(s, case["score"]) < 1e-5, spec
        assert _rel(d + w(x_t, t) * s, case["sde_drift_sigma"]) < 1e-5, spec
        torch.testing.assert_close(w(x_t, t).flatten(), case["sde_diffusion_sigma"], rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def sit_sampling():
    return fixture_network("sit_samplers", DiT)


SAMPLER_RUNS = range(17)


@pytest.mark.parametrize("i", SAMPLER_RUNS)
def test_sample_matches_sit(sit_sampling, i):
    """``Transport.sample`` end to end (guidance on [cond; null] in one call, channels 0-2 as SiT guides) against
    every run of sit_samplers.pt; SDE runs replay SiT's draws (rows of the conditional half)."""
    net, fx = sit_sampling
    inputs = fx["inputs"]
    run, out = inputs["runs"][i], fx["output"]["runs"][i]
    calls = []

    def model(x, t, y):
        calls.append(t.reshape(-1)[0].item())
        return net(x, t, y)

    labels = inputs["labels"]
    kwargs = {"steps": run["num_steps"], "guidance_channels": 3, "guidance_scale": 1.0, "null_cond": None}
    if run["cfg"]:
        kwargs.update(guidance_scale=run["cfg_scale"], null_cond={"y": torch.full_like(labels, inputs["null_label"])})
    if run["kind"] == "ode":
        kwargs.update(sampler=run["sampling_method"])
        if "atol" in Transport.SAMPLER_OPTIONS[run["sampling_method"]]:  # the adaptive methods' own
            kwargs.update(atol=run["atol"], rtol=run["rtol"])
    else:
        draws = iter(out["draws"][:, :2])
        kwargs.update(sampler="sde_" + run["sampling_method"].lower(), diffusion_form=run["diffusion_form"],
                      diffusion_norm=run["diffusion_norm"], last_step=run["last_step"],
                      last_step_size=run["last_step_size"], randn=lambda x: next(draws))
    tr = build_transport(run["path_type"], run["prediction"])
    final = tr.sample(model, inputs["noise"], {"y": labels}, **kwargs)
    # guided dopri5 on the B samples: SiT's error norm also sees the unguided channel of its doubled batch
    tol = 1e-4 if run["cfg"] and run["sampling_method"] == "dopri5" else 1e-5
    assert _rel(final, out["final"][:2]) < tol
    assert len(calls) == out["nfe"]


def test_sample_refuses_settings_it_does_not_have():
    tr, noise = build_transport(), torch.zeros(1, 2, 4, 4)

    def model(x, t):
        return x

    with pytest.raises(ValueError, match="unknown sampler 'ddim'.*dopri5"):
        tr.sample(model, noise, {}, sampler="ddim")
    for bad in ({"t_end": 0.5}, {"skip_type": "logSNR"}, {"eta": 1.0}, {"clip_denoised": True}):
        with pytest.raises(ValueError, match="does not apply"):
            tr.sample(model, noise, {}, sampler="euler", steps=3, **bad)
    with pytest.raises(ValueError, match="sample_eps is unset"):
        build_transport("linear", "noise", train_eps=1e-4).sample(model, noise, {}, sampler="euler", steps=3)
    # a velocity field x -> x from t = 0 to 1 with 2 Euler steps of 1/2: x (3/2)^2
    out = tr.sample(model, torch.ones(1, 2, 4, 4), {}, sampler="euler", steps=3)
    torch.testing.assert_close(out, torch.full((1, 2, 4, 4), 2.25))


def test_generate_runs_a_transport_end_to_end():
    """The sampling front end (diffusion.sampling.generate) drives Transport.sample with a config's settings."""
    from diffusion.sampling.generate import generate
    from diffusion.sampling.settings import SamplerSettings

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    settings = SamplerSettings({"sampler": "heun2", "steps": 4, "guidance_scale": 2.0, "guidance_channels": "all"})
    tr = build_transport()
    out = generate(model, tr, settings, (4, 8, 8), labels=torch.tensor([0, 2]), seed=1)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    again = generate(model, tr, settings, (4, 8, 8), labels=torch.tensor([0, 2]), seed=1)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_a_dit_trains_and_previews_with_the_transport_objective(tmp_path):
    """diffusion.kind = "transport" through the shared trainer (its seeded time draws, label dropout, previews)."""
    import ml_collections

    from diffusion.training.loop import train
    from tests.helpers import logged_losses, tiny_config

    cfg = tiny_config("--config.train.steps=60", "--config.train.log_every=10", "--config.train.ckpt_every=60",
                      config="configs/digits_dit.py")
    cfg.diffusion = ml_collections.ConfigDict({"kind": "transport", "path": "linear", "prediction": "velocity"})
    cfg.sample.update(sampler="euler", steps=5, clip_denoised=None)
    train(cfg, tmp_path)
    losses = logged_losses(tmp_path)
    assert len(losses) == 6 and sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses
    assert (tmp_path / "samples" / "step_00000060.png").is_file()
