"""Noise schedules and the noise-prediction objective of the released U-ViT models.

Two formulations, chosen by ``config.diffusion.kind`` (docs/originals.md#u-vit-diffusion-formulations):

* ``"vp_sde"`` (CIFAR-10, CelebA, ImageNet 64, the U-ViT-L latent models): continuous-time VP SDE with
  beta(t) = beta_min + t (beta_max - beta_min), t ~ U[0, 1) in training, the network sees ``999 t``.
* ``"sd_discrete"`` (U-ViT-H latent models, MS-COCO): the "stable diffusion" schedule,
  betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2; training draws n in {1..1000} and the network sees n;
  samplers treat it as continuous time t = n / 1000 and feed ``1000 t``.

Both are VP processes x_t = alpha_t x_0 + sigma_t eps, described here by ``log alpha_t`` on t in [0, 1] so that
every sampler of ``diffusion.samplers`` serves both. Every objective in the project (also
``diffusion.objectives.iddpm``) offers the same calls: ``training_losses(model, x0, cond) -> {"loss": (B,), ...}``,
``sample(model, noise, cond, ...) -> x0`` and the tuple ``SAMPLERS`` of its sampler names.
"""

from __future__ import annotations

import inspect
import math

import torch

from diffusion.objectives.guidance import guided_model
from diffusion.samplers import VP_OPTIONS, VP_SAMPLERS, check_vp_options, sample_vp, standard_normal
from diffusion.samplers.common import Randn

# ----------------------------------------------------------------------------------------------------------
# Schedules: log alpha_t as a function of continuous time t in [0, 1]
# ----------------------------------------------------------------------------------------------------------


class LinearVPSchedule:
    """Continuous VP SDE: log alpha_t = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2."""

    t_min = 0.0  # trained on t ~ U[0, 1)

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Inverse of ``log_alpha``: the positive root of the quadratic, in the cancellation-free form."""
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return -2 * log_alpha / (0.5 * b0 + torch.sqrt(0.25 * b0**2 - db * log_alpha))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = -2 d log alpha_t / dt, the squared diffusion coefficient of the forward SDE."""
        return self.beta_min + t * (self.beta_max - self.beta_min)


class DiscreteVPSchedule:
    """Discrete betas viewed as continuous time: t_n = n / N and log alpha interpolated piecewise-linearly
    between the grid points (as DPM-Solver's ``NoiseScheduleVP('discrete')``)."""

    def __init__(self, betas: torch.Tensor):
        self.num_steps = len(betas)
        self.t_min = 1.0 / self.num_steps  # the first trained step; samplers stop there by default
        # cum_alphas[n] = prod_{i<=n} (1 - beta_i), cum_alphas[0] = 1 (float64, then kept on the device)
        self.cum_alphas = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas.double(), 0)])
        self._t = torch.linspace(0.0, 1.0, self.num_steps + 1, dtype=torch.float64)[1:]
        self._log_alpha = 0.5 * torch.log(self.cum_alphas[1:])
        self._on_device: dict = {}

    def tables(self, device) -> dict[str, torch.Tensor]:
        """float32 copies on ``device``, made once: no host-to-device copy in the training or sampling loop."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = {
                "t": self._t.to(device, torch.float32), "log_alpha": self._log_alpha.to(device, torch.float32),
                "sqrt_cum": self.cum_alphas.sqrt().to(device, torch.float32),
                "sqrt_one_minus_cum": (1 - self.cum_alphas).sqrt().to(device, torch.float32)}
        return self._on_device[device]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        tables = self.tables(t.device)
        return _interpolate(t, tables["t"], tables["log_alpha"])

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Inverse of ``log_alpha`` (the same piecewise-linear curve, read the other way)."""
        tables = self.tables(log_alpha.device)
        return _interpolate(log_alpha, tables["log_alpha"].flip(0), tables["t"].flip(0))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = -2 d log alpha_t / dt: constant on each segment of the interpolation."""
        tables = self.tables(t.device)
        grid_t, grid_la = tables["t"], tables["log_alpha"]
        idx = _segment(t, grid_t)
        return -2 * (grid_la[idx] - grid_la[idx - 1]) / (grid_t[idx] - grid_t[idx - 1])


def _segment(x: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """Index i of the segment [xp[i-1], xp[i]] holding x (xp increasing); the end segments extend outwards."""
    return torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).to(xp.dtype)).clamp(1, len(xp) - 1)


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), extrapolating the end segments (DPM-Solver's ``interpolate_fn``)."""
    idx = _segment(x, xp)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def stable_diffusion_betas(num_steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    return torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_steps, dtype=torch.float64) ** 2


# ----------------------------------------------------------------------------------------------------------
# Noise-prediction objective (plain MSE on eps) and its samplers
# ----------------------------------------------------------------------------------------------------------


class NoisePredictionObjective:
    """eps-prediction MSE with a VP schedule. ``time_input_scale``: the network sees ``scale * t``."""

    def __init__(self, schedule, time_input_scale: float, discrete_training: bool):
        self.schedule = schedule
        self.time_input_scale = time_input_scale
        self.discrete_training = discrete_training

    # -- training ------------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps; ``t`` is continuous time, or the integer n for discrete training."""
        if self.discrete_training:
            tables = self.schedule.tables(x0.device)
            alpha, sigma = tables["sqrt_cum"][t], tables["sqrt_one_minus_cum"][t]
        else:
            log_alpha = self.schedule.log_alpha(t.float())
            alpha, sigma = log_alpha.exp(), (1 - (2 * log_alpha).exp()).sqrt()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return alpha.view(shape) * x0 + sigma.view(shape) * noise

    def sample_time(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.discrete_training:
            n = self.schedule.num_steps
            return torch.randint(1, n + 1, (batch,), device=device, generator=generator)
        return torch.rand(batch, device=device, generator=generator)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """Training time -> the value the network is called with (n itself, or 999 t)."""
        return t if self.discrete_training else self.time_input_scale * t

    def training_losses(self, model, x0: torch.Tensor, cond: dict, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t = self.sample_time(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        eps_pred = model(self.q_sample(x0, t, noise), self.network_time(t), **cond)
        return {"loss": (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)}

    # -- sampling ------------------------------------------------------------------------------------------

    SAMPLERS = VP_SAMPLERS
    SAMPLER_OPTIONS = VP_OPTIONS  # each sampler's own keywords of ``sample`` and their defaults

    @staticmethod
    def check_sampling(sampler: str, steps: int, options: dict) -> dict:
        """``sampler``'s own options, defaults filled in; a ValueError for anything it cannot run with."""
        return check_vp_options(sampler, steps, options)

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, cond: dict, *, null_cond: dict | None = None,
               guidance_scale: float = 1.0, guidance_channels: str | int = "all", sampler: str = "dpm_solver++2m",
               steps: int = 50, randn: Randn | None = None, generator: torch.Generator | None = None,
               progress: bool = False, guide=None, **options) -> torch.Tensor:
        """x0 from ``noise`` = x_1 with one of ``SAMPLERS`` and its own ``options`` (``SAMPLER_OPTIONS``; see
        ``diffusion.samplers`` for each one's grid and defaults); ``steps`` network evaluations, each one batched
        call on [cond; null_cond] when guided (``eps_u + w (eps_c - eps_u)``). ``guide`` (a network called like
        ``model``): autoguidance ``eps_g + w (eps_m - eps_g)`` instead, the guide its own call on ``cond``.
        Stochastic draws (``euler_maruyama``, ``ddim`` with eta > 0) come from ``randn(x)`` in call order, else from
        ``generator``. ``clip_denoised`` clamps x0 predictions to [-1, 1]."""
        channels = noise.shape[1]
        net = guided_model(model, cond, null_cond, guidance_scale, channels, guidance_channels, guide=guide)

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, (self.time_input_scale * t).expand(x.shape[0]))[:, :channels].to(x.dtype)

        return sample_vp(eps_fn, self.schedule, noise, sampler=sampler, steps=steps,
                         randn=standard_normal(randn, generator), progress=progress, **options)


def build_vp_sde(beta_min: float = 0.1, beta_max: float = 20.0) -> NoisePredictionObjective:
    """``diffusion.kind = "vp_sde"``: the continuous-time VP SDE; the network sees ``999 t``."""
    return NoisePredictionObjective(LinearVPSchedule(beta_min, beta_max), time_input_scale=999.0,
                                    discrete_training=False)


def build_sd_discrete(num_steps: int = 1000, linear_start: float = 0.00085,
                      linear_end: float = 0.012) -> NoisePredictionObjective:
    """``diffusion.kind = "sd_discrete"``: the discrete "stable diffusion" schedule; the network sees the step."""
    betas = stable_diffusion_betas(num_steps, linear_start, linear_end)
    return NoisePredictionObjective(DiscreteVPSchedule(betas), time_input_scale=float(len(betas)),
                                    discrete_training=True)


def build_noise_prediction(kind: str, **kwargs) -> NoisePredictionObjective:
    """``build_vp_sde`` or ``build_sd_discrete`` by ``kind``, refusing settings that kind does not have."""
    builders = {"vp_sde": build_vp_sde, "sd_discrete": build_sd_discrete}
    if kind not in builders:
        raise ValueError(f"unknown noise-prediction diffusion kind {kind!r}")
    unknown = sorted(set(kwargs) - set(inspect.signature(builders[kind]).parameters))
    if unknown:
        raise ValueError(f"unknown diffusion settings for {kind!r}: {unknown}")
    return builders[kind](**kwargs)
