"""The U-ViT objectives against the official losses, the preview sampler, and classifier-free guidance."""

import pytest
import torch

from diffusion.objectives.guidance import guided_model
from diffusion.objectives.vp import build_noise_prediction
from tests.helpers import load_fixture
from uvit import UViT


@pytest.fixture(scope="module")
def losses_fixture():
    return load_fixture("uvit_losses")


def _model(fx, which):
    model = UViT(**fx["config"][which]).eval()
    model.load_state_dict(fx["state_dict"][which])
    return model


def test_continuous_vp_loss_matches_official(losses_fixture):
    fx, out = losses_fixture, losses_fixture["output"]
    obj = build_noise_prediction("vp_sde")
    x0, t, eps = fx["inputs"]["pixel"]["x0"], out["pixel_t"], out["pixel_eps"]
    assert torch.allclose(obj.q_sample(x0, t, eps), out["pixel_x_t"], atol=1e-6)
    with torch.no_grad():
        loss = obj.training_losses(_model(fx, "pixel"), x0, {}, t=t, noise=eps)["loss"]
    assert torch.allclose(loss, out["pixel_loss"], rtol=1e-5, atol=1e-7)


def test_discrete_loss_matches_official(losses_fixture):
    fx, out = losses_fixture, losses_fixture["output"]
    obj = build_noise_prediction("sd_discrete")
    assert torch.allclose(obj.schedule.cum_alphas, out["latent_cum_alphas"], rtol=1e-12, atol=0)
    x0, n, eps, y = fx["inputs"]["latent"]["x0"], out["latent_n"], out["latent_eps"], fx["inputs"]["latent"]["y"]
    assert n.min() >= 1 and n.max() <= 1000
    assert torch.allclose(obj.q_sample(x0, n, eps), out["latent_x_t"], atol=1e-6)
    with torch.no_grad():
        loss = obj.training_losses(_model(fx, "latent"), x0, {"y": y}, t=n, noise=eps)["loss"]
    assert torch.allclose(loss, out["latent_loss"], rtol=1e-5, atol=1e-7)


def test_training_time_draws():
    g = torch.Generator().manual_seed(0)
    n = build_noise_prediction("sd_discrete").sample_time(10_000, "cpu", g)
    assert n.dtype == torch.int64 and n.min() == 1 and n.max() == 1000  # 1-based, 1000 included
    t = build_noise_prediction("vp_sde").sample_time(10_000, "cpu", g)
    assert 0 <= t.min() and t.max() < 1


def test_discrete_schedule_as_continuous_time():
    obj = build_noise_prediction("sd_discrete")
    n = torch.tensor([1, 250, 1000])
    log_alpha = obj.schedule.log_alpha(n / 1000)
    assert torch.allclose(log_alpha.double(), 0.5 * obj.schedule.cum_alphas[n].log(), atol=1e-6)


class PointMassDenoiser(torch.nn.Module):
    """The exact noise predictor when every image of class y is the point ``targets[y]``."""

    def __init__(self, obj, targets):
        super().__init__()
        self.obj, self.targets = obj, targets

    def forward(self, x, t_in, y):
        log_alpha = self.obj.schedule.log_alpha(t_in / self.obj.time_input_scale)
        alpha = log_alpha.exp().view(-1, 1, 1, 1)
        sigma = (1 - alpha**2).sqrt()
        return (x - alpha * self.targets[y]) / sigma


@pytest.mark.parametrize("kind", ["vp_sde", "sd_discrete"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++2m"])
def test_sampler_recovers_point_mass(kind, sampler):
    obj = build_noise_prediction(kind)
    targets = torch.stack([torch.full((1, 4, 4), -0.5), torch.full((1, 4, 4), 0.7)])
    model = PointMassDenoiser(obj, targets)
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    out = obj.sample(model, noise, {"y": y}, steps=20, sampler=sampler, t_end=1e-3)
    # Exact probability-flow ODE solution for a point mass: eps = (x_t - alpha_t x*) / sigma_t is constant.
    log_alpha = obj.schedule.log_alpha(torch.tensor([1.0, 1e-3]))
    alpha, sigma = log_alpha.exp(), (1 - (2 * log_alpha).exp()).sqrt()
    eps = (noise - alpha[0] * targets[y]) / sigma[0]
    assert (out - (alpha[1] * targets[y] + sigma[1] * eps)).abs().max() < 1e-4
    assert (out - targets[y]).abs().max() < 0.15


def test_guided_model_is_one_batched_call_with_the_cfg_formula():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return torch.stack([x[:, 0] * (y.view(-1, 1, 1) + 1.0), x[:, 1] + y.view(-1, 1, 1)], 1).repeat(1, 2, 1, 1)

    x, t = torch.randn(3, 2, 4, 4), torch.tensor(5.0)
    cond, null = {"y": torch.tensor([1, 2, 3])}, {"y": torch.tensor([9, 9, 9])}
    eps_c, eps_u = model(x, t, **cond), model(x, t, **null)
    calls.clear()
    out = guided_model(model, cond, null, 3.0, eps_channels=2)(x, t)
    assert calls == [6]
    assert torch.allclose(out[:, :2], eps_u[:, :2] + 3.0 * (eps_c[:, :2] - eps_u[:, :2]))
    assert torch.equal(out[:, 2:], eps_c[:, 2:])  # e.g. DiT's variance channels: conditional, unguided
    first = guided_model(model, cond, null, 3.0, eps_channels=2, channels=1)(x, t)
    assert torch.allclose(first[:, :1], out[:, :1]) and torch.equal(first[:, 1:2], eps_c[:, 1:2])
    assert torch.equal(guided_model(model, cond, null, 1.0, eps_channels=2)(x, t), eps_c)
