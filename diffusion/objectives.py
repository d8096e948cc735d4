"""Noise schedules and the noise-prediction objective of the released U-ViT models.

Two formulations, chosen by ``config.diffusion.kind`` (SPEC.md section 1):

* ``"vp_sde"`` (CIFAR-10, CelebA, ImageNet 64, the U-ViT-L latent models): continuous-time VP SDE with
  beta(t) = beta_min + t (beta_max - beta_min), t ~ U[0, 1) in training, the network sees ``999 t``.
* ``"sd_discrete"`` (U-ViT-H latent models, MS-COCO): the "stable diffusion" schedule,
  betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2; training draws n in {1..1000} and the network sees n;
  samplers treat it as continuous time t = n / 1000 and feed ``1000 t``.

Both are VP processes x_t = alpha_t x_0 + sigma_t eps, described here by ``log alpha_t`` on t in [0, 1] so that
one sampler serves both. Every objective in the project (also ``diffusion.iddpm``) offers the same two calls:
``training_losses(model, x0, cond) -> {"loss": (B,), ...}`` and ``sample(model, noise, cond, ...) -> x0``.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from diffusion.guidance import guided_model

# ----------------------------------------------------------------------------------------------------------
# Schedules: log alpha_t as a function of continuous time t in [0, 1]
# ----------------------------------------------------------------------------------------------------------


class LinearVPSchedule:
    """Continuous VP SDE: log alpha_t = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)


class DiscreteVPSchedule:
    """Discrete betas viewed as continuous time: t_n = n / N and log alpha interpolated piecewise-linearly
    between the grid points (as DPM-Solver's ``NoiseScheduleVP('discrete')``)."""

    def __init__(self, betas: torch.Tensor):
        self.num_steps = len(betas)
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
        grid_t, grid_la = tables["t"], tables["log_alpha"]
        # piecewise-linear interpolation, extrapolating the end segments
        idx = torch.searchsorted(grid_t, t.clamp(grid_t[0], grid_t[-1])).clamp(1, len(grid_t) - 1)
        t0, t1 = grid_t[idx - 1], grid_t[idx]
        la0, la1 = grid_la[idx - 1], grid_la[idx]
        return la0 + (t - t0) * (la1 - la0) / (t1 - t0)


def stable_diffusion_betas(num_steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    return torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_steps, dtype=torch.float64) ** 2


# ----------------------------------------------------------------------------------------------------------
# Noise-prediction objective (plain MSE on eps) and its sampler
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

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, cond: dict, *, null_cond: dict | None = None,
               guidance_scale: float = 1.0, guidance_channels: str | int = "all", steps: int = 50,
               sampler: str = "dpm_solver++2m", t_end: float = 1e-3, clip_denoised: bool = False,
               progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic sampler over a time-uniform grid from t = 1 to ``t_end``; ``steps`` network evaluations
        (twice the batch with guidance). ``"ddim"`` is first order; ``"dpm_solver++2m"`` (Lu et al. 2022,
        multistep, data prediction) second order. ``clip_denoised`` clamps each x0 prediction to [-1, 1].
        Deterministic: ``generator`` is accepted for a uniform interface and unused."""
        if sampler not in ("ddim", "dpm_solver++2m"):
            raise ValueError(f"unknown sampler {sampler!r} for this objective; use 'ddim' or 'dpm_solver++2m'")
        net = guided_model(model, cond, null_cond, guidance_scale, noise.shape[1], guidance_channels)
        ts = torch.linspace(1.0, t_end, steps + 1, device=noise.device)
        log_alpha = self.schedule.log_alpha(ts)
        alpha, sigma = log_alpha.exp(), (1 - (2 * log_alpha).exp()).sqrt()
        lam = log_alpha - sigma.log()
        x, x0_prev, h_prev = noise, None, None
        for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            t_in = (self.time_input_scale * ts[i]).expand(x.shape[0])
            eps = net(x, t_in)[:, : x.shape[1]].float()
            x0 = (x - sigma[i] * eps) / alpha[i]
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            h = lam[i + 1] - lam[i]
            d = x0
            if sampler == "dpm_solver++2m" and x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        return x


def build_noise_prediction(kind: str, **kwargs) -> NoisePredictionObjective:
    if kind == "vp_sde":
        schedule = LinearVPSchedule(kwargs.pop("beta_min", 0.1), kwargs.pop("beta_max", 20.0))
        obj = NoisePredictionObjective(schedule, time_input_scale=999.0, discrete_training=False)
    elif kind == "sd_discrete":
        betas = stable_diffusion_betas(kwargs.pop("num_steps", 1000), kwargs.pop("linear_start", 0.00085),
                                       kwargs.pop("linear_end", 0.012))
        obj = NoisePredictionObjective(DiscreteVPSchedule(betas), time_input_scale=float(len(betas)),
                                       discrete_training=True)
    else:
        raise ValueError(f"unknown noise-prediction diffusion kind {kind!r}")
    if kwargs:
        raise ValueError(f"unknown diffusion settings for {kind!r}: {sorted(kwargs)}")
    return obj
