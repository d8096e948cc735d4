"""Improved-DDPM diffusion (DiT's objective and samplers): parity with the official code (fixtures), respacing,
the hybrid loss, and the project-wide ``sample`` interface."""

from __future__ import annotations

import functools

import pytest
import torch

from diffusion.objectives.guidance import guided_model
from diffusion.objectives.iddpm import GaussianDiffusion, betas_for_schedule, build_iddpm, space_timesteps
from dit import DiT
from tests.helpers import fixture_network, rel_err

TOL = 1e-5  # max|a - b| / max|b|, as the fixtures README suggests



@functools.cache
def fixture(name: str) -> tuple[DiT, dict]:
    return fixture_network(name, DiT)


class Recorder(torch.nn.Module):
    """Wraps a model and records the timesteps it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, **cond):
        self.calls.append(t.clone())
        return self.model(x, t, **cond)


# ----------------------------------------------------------------------------------------------------------
# Schedule and respacing
# ----------------------------------------------------------------------------------------------------------


def test_betas_equal_official():
    _, fx = fixture("iddpm_losses")
    diffusion = build_iddpm()
    assert diffusion.betas.dtype == torch.float64
    assert torch.equal(diffusion.betas, fx["output"]["betas"])  # respaced with all steps, as the original
    assert diffusion.num_timesteps == 1000 and torch.equal(diffusion.timestep_map, torch.arange(1000))
    assert torch.equal(betas_for_schedule("linear", 1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))


@pytest.mark.parametrize("respacing", ["10", "ddim10"])
def test_timestep_map_equals_official(respacing):
    _, fx = fixture("ddim_sample")
    diffusion = build_iddpm().respaced(respacing)
    assert torch.equal(diffusion.timestep_map, fx["output"][respacing]["timestep_map"])


def test_space_timesteps():
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[:4] == [0, 4, 8, 12] and s250[-2:] == [995, 999]
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "") == list(range(1000))
    # section form: [0, 500) gets 10 steps, [500, 1000) gets 20, both ends of each section included
    mixed = space_timesteps(1000, "10,20")
    assert len(mixed) == 30
    assert mixed[:10] == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499]
    assert mixed[10] == 500 and mixed[-1] == 999
    assert space_timesteps(1001, "2,2") == [0, 500, 501, 1000]  # the first section gets the extra step
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "11")


def test_respaced_betas_keep_alpha_bar():
    base = build_iddpm()
    spaced = base.respaced("250")
    abar_base = torch.cumprod(1 - base.betas, 0)[spaced.timestep_map]
    torch.testing.assert_close(torch.cumprod(1 - spaced.betas, 0), abar_base, rtol=1e-12, atol=0)
    assert base.respaced("250") is spaced  # cached
    assert spaced.respaced("10").timestep_map.tolist() == base.respaced("10").timestep_map.tolist()


# ----------------------------------------------------------------------------------------------------------
# Training losses
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1, 2])
def test_training_losses_parity(case):
    model, fx = fixture("iddpm_losses")
    inp, ref = fx["inputs"]["cases"][case], fx["output"]["cases"][case]
    diffusion = build_iddpm()
    with torch.no_grad():
        losses = diffusion.training_losses(model, inp["x_start"], {"y": inp["y"]}, t=inp["t"], noise=inp["noise"])
        x_t = diffusion.q_sample(inp["x_start"], inp["t"], inp["noise"])
        out = model(x_t, inp["t"], y=inp["y"])
        pmv = diffusion.p_mean_variance(out, x_t, inp["t"])
    assert set(losses) == {"loss", "mse", "vb"}
    for key in ("loss", "mse", "vb"):
        assert rel_err(losses[key], ref[key]) < TOL, key
    assert rel_err(x_t, ref["x_t"]) < TOL
    assert rel_err(out, ref["model_output"]) < TOL
    for key, value in ref["p_mean_variance"].items():
        assert rel_err(pmv[key], value) < TOL, key


@pytest.mark.parametrize("case", [0, 1, 2])
def test_diffusion_math_matches_given_the_reference_network_output(case):
    """With the official network output fed in, the diffusion arithmetic alone agrees to float32 rounding."""
    _, fx = fixture("iddpm_losses")
    inp, ref = fx["inputs"]["cases"][case], fx["output"]["cases"][case]
    diffusion = build_iddpm()
    pmv = diffusion.p_mean_variance(ref["model_output"], ref["x_t"], inp["t"])
    for key, value in ref["p_mean_variance"].items():
        assert rel_err(pmv[key], value) < 1e-6, key
    losses = diffusion.training_losses(lambda x, t, y: ref["model_output"], inp["x_start"], {"y": inp["y"]},
                                       t=inp["t"], noise=inp["noise"])
    for key in ("loss", "mse", "vb"):
        assert rel_err(losses[key], ref[key]) < 1e-6, key


def test_vb_trains_only_the_variance_channels():
    diffusion = build_iddpm()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 8, 8, 8, requires_grad=True)
    losses = diffusion.training_losses(lambda x, t: out, x0, {}, t=torch.tensor([0, 600]), noise=noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :4]) == 0 and torch.count_nonzero(grad_vb[:, 4:]) > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.count_nonzero(grad_mse[:, 4:]) == 0


def test_training_draws_t_and_calls_the_network_with_original_steps():
    model = Recorder(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=4))
    x0, y = torch.randn(64, 4, 8, 8), torch.randint(0, 5, (64,))
    losses = build_iddpm().training_losses(model, x0, {"y": y})
    assert all(v.shape == (64,) for v in losses.values())
    t = model.calls[-1]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000 and len(t.unique()) > 10
    spaced = build_iddpm(timestep_respacing="10")
    spaced.training_losses(model, x0, {"y": y})
    assert set(model.calls[-1].tolist()) <= set(range(0, 1000, 111))


def test_fixed_variance_mse_only():
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0, 500])
    eps_model = lambda x, t: 0.5 * x  # noqa: E731
    large, small = build_iddpm(learn_sigma=False), build_iddpm(learn_sigma=False, sigma_small=True)
    losses = large.training_losses(eps_model, x0, {}, t=t, noise=noise)
    assert set(losses) == {"loss", "mse"} and torch.equal(losses["loss"], losses["mse"])
    var_large = large.p_mean_variance(eps_model, x0, t)["variance"][:, 0, 0, 0]
    var_small = small.p_mean_variance(eps_model, x0, t)["variance"][:, 0, 0, 0]
    assert var_large[1] > var_small[1] > 0
    torch.testing.assert_close(var_large[1], large.betas[500].float())
    with pytest.raises(ValueError, match="learn_sigma=False"):
        large.training_losses(lambda x, t: torch.cat([x, x], 1), x0, {})
    out = small.sample(lambda x, t: 0.1 * x, torch.randn(2, 4, 8, 8), {}, steps=5,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_clip_denoised_option():
    diffusion = build_iddpm(clip_denoised=True)
    x, t = 3 * torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    model = lambda x, t: torch.cat([x, torch.zeros_like(x)], 1)  # noqa: E731
    assert diffusion.p_mean_variance(model, x, t)["pred_xstart"].abs().max() <= 1
    assert diffusion.p_mean_variance(model, x, t, clip_denoised=False)["pred_xstart"].abs().max() > 1
    assert build_iddpm().p_mean_variance(model, x, t)["pred_xstart"].abs().max() > 1  # off by default


def test_tables_are_device_tensors_in_the_input_dtype():
    diffusion = build_iddpm()
    t = torch.tensor([0, 999])
    assert diffusion._extract("betas", t, torch.zeros(2, 1)).dtype == torch.float32
    assert diffusion._extract("betas", t, torch.zeros(2, 1, dtype=torch.float64)).dtype == torch.float64
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in diffusion._tables.values())


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("respacing", ["10", "ddim10"])
def test_ddim_parity(respacing):
    model, fx = fixture("ddim_sample")
    inp, ref = fx["inputs"], fx["output"][respacing]
    diffusion = build_iddpm().respaced(respacing)
    with torch.no_grad():
        with_cfg = diffusion.ddim_sample_loop(
            lambda x, t: model.forward_with_cfg(x, t, ref["cfg_input_y"], inp["cfg_scale"]), ref["cfg_input_z"])
        without = diffusion.ddim_sample_loop(lambda x, t: model(x, t, y=inp["labels"]), inp["noise"])
    assert rel_err(with_cfg, ref["ddim_cfg"]) < TOL
    assert rel_err(without, ref["ddim_nocfg"]) < TOL


@pytest.mark.parametrize("respacing", ["10", "ddim10"])
def test_ancestral_sampling_parity_replaying_draws(respacing):
    model, fx = fixture("ddim_sample")
    inp, ref = fx["inputs"], fx["output"][respacing]
    diffusion = build_iddpm().respaced(respacing)
    with torch.no_grad():
        out = diffusion.p_sample_loop(lambda x, t: model.forward_with_cfg(x, t, ref["cfg_input_y"], inp["cfg_scale"]),
                                      ref["cfg_input_z"], draws=ref["p_sample_draws"])
        # the project's guidance (one batched call, no duplicated latents) gives the same guided half
        null = {"y": torch.full_like(inp["labels"], inp["null_label"])}
        net = guided_model(model, {"y": inp["labels"]}, null, inp["cfg_scale"], eps_channels=4, channels=3)
        half = diffusion.p_sample_loop(net, inp["noise"], draws=ref["p_sample_draws"][:, :2])
    assert rel_err(out, ref["p_sample_cfg"]) < TOL
    assert rel_err(half, ref["p_sample_cfg"][:2]) < TOL


@pytest.mark.parametrize("respacing", ["10", "ddim10"])
def test_sample_api_ddim_reproduces_the_official_guided_sample(respacing):
    model, fx = fixture("ddim_sample")
    inp, ref = fx["inputs"], fx["output"][respacing]
    base = build_iddpm()
    null = {"y": torch.full_like(inp["labels"], inp["null_label"])}
    if respacing == "ddim10":
        out = base.sample(model, inp["noise"], {"y": inp["labels"]}, null_cond=null, guidance_scale=inp["cfg_scale"],
                          guidance_channels=3, steps=10, sampler="ddim")
        assert rel_err(out, ref["ddim_cfg"][:2]) < TOL
        plain = base.sample(model, inp["noise"], {"y": inp["labels"]}, steps=10, sampler="ddim")
        assert rel_err(plain, ref["ddim_nocfg"]) < TOL
    else:  # the "ddpm" sampler walks the plain "10" respacing, seeing the original steps
        rec = Recorder(model)
        base.sample(rec, inp["noise"], {"y": inp["labels"]}, null_cond=null, guidance_scale=1.5, steps=10,
                    generator=torch.Generator().manual_seed(0))
        seen = [t[0].item() for t in rec.calls]
        assert seen == ref["timestep_map"].flip(0).tolist()
        assert all(len(t) == 4 for t in rec.calls)  # one batched call for [cond; uncond]


def test_sample_api_is_deterministic_for_a_seed():
    model, fx = fixture("ddim_sample")
    inp = fx["inputs"]
    diffusion = build_iddpm()
    null = {"y": torch.full_like(inp["labels"], inp["null_label"])}

    def run(seed: int) -> torch.Tensor:
        return diffusion.sample(model, inp["noise"], {"y": inp["labels"]}, null_cond=null, guidance_scale=1.5,
                                guidance_channels="all", steps=10, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == inp["noise"].shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.sample(model, inp["noise"], {"y": inp["labels"]}, sampler="euler")


def test_ddim_eta_uses_the_generator():
    diffusion = build_iddpm().respaced("ddim10")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    noise = torch.randn(2, 4, 8, 8)
    a = diffusion.ddim_sample_loop(model, noise, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = diffusion.ddim_sample_loop(model, noise, eta=1.0, generator=torch.Generator().manual_seed(0))
    det = diffusion.ddim_sample_loop(model, noise, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, det)
    assert isinstance(diffusion, GaussianDiffusion)
