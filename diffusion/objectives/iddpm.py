"""Gaussian diffusion with a learned variance ("improved DDPM", Nichol & Dhariwal 2021), as DiT trains and samples.

Discrete process over T steps (linear betas 1e-4..0.02 for T = 1000). The network sees the integer step of the
original process and predicts eps in output channels [0, C) and, with ``learn_sigma``, a value v in channels
[C, 2C) that interpolates the reverse-step log variance between the two natural choices (the paper's Eq. 15):

    log sigma_t^2 = f log beta_t + (1 - f) log beta~_t,   f = (v + 1) / 2,   beta~_t = posterior variance.

Training minimises the hybrid loss ``mse(eps) + vb``: vb is the KL between the true posterior q(x_{t-1} | x_t, x_0)
and the model's p(x_{t-1} | x_t) in bits per dimension (at t = 0 the discretised Gaussian decoder NLL), computed
with eps detached so that it only trains v (Sec. 3.1 of the paper; DiT weighs it by 1 as "loss type MSE").

Respacing (Sec. 4 of the paper) keeps a subset S of the steps and recomputes betas so that the kept steps have the
same alpha-bar; ``timestep_map`` sends respaced indices back to the original ones before every network call.

Numerics follow the original implementation (github.com/openai/improved-diffusion, as vendored by DiT) to float32
rounding: every table is computed once in float64 and looked up as float32 (float64 for float64 inputs), then the
per-step arithmetic runs in that dtype. Tables are torch tensors cached per device, so nothing in the sampling
loop touches numpy or the host.

Interface as every objective of the project (see ``diffusion.objectives.vp``):
``training_losses(model, x0, cond) -> {"loss", "mse", "vb"}`` and ``sample(model, noise, cond, ...) -> x0``.
The lower-level pieces (``q_sample``, ``p_mean_variance``, ``p_sample_loop``, ``ddim_sample_loop``, ...) take a
``model_fn(x_t, t_model) -> output`` with the conditioning already bound, and accept injected Gaussian draws.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from diffusion.objectives.guidance import guided_model
from diffusion.samplers.common import Randn, check_options, own_options, standard_normal

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ----------------------------------------------------------------------------------------------------------
# Beta schedules and respacing
# ----------------------------------------------------------------------------------------------------------


def betas_for_schedule(name: str, num_steps: int) -> torch.Tensor:
    """float64 betas. ``"linear"``: 1e-4..0.02 rescaled by 1000 / T, so that any T matches the T = 1000 process
    (Ho et al. 2020). ``"cosine"`` (alias ``"squaredcos_cap_v2"``): alpha-bar = cos^2((t + 0.008) / 1.008 pi / 2),
    betas capped at 0.999 (Nichol & Dhariwal 2021)."""
    if name == "linear":
        scale = 1000 / num_steps
        start, end = scale * 0.0001, scale * 0.02
        # arange * step + start, as numpy's linspace (torch.linspace rounds differently in the last bit)
        betas = torch.arange(num_steps, dtype=torch.float64) * ((end - start) / (num_steps - 1)) + start
        betas[-1] = end
        return betas
    if name in ("cosine", "squaredcos_cap_v2"):
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                             for i in range(num_steps)], dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which original steps a respaced process keeps (sorted), exactly as the original ``space_timesteps``.

    * ``"ddimN"``: the integer stride s with ``len(range(0, T, s)) == N`` (``"ddim10"`` -> 0, 100, ..., 900).
    * ``"N"`` or ``"N1,N2,..."``: split [0, T) into equal sections and take N_i evenly spaced steps (rounded) from
      section i, both ends included (``"10"`` -> 0, 111, ..., 999; ``"250"`` -> 0, 4, 8, ..., 995, 999).
    * ``""`` keeps every step.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts == "":
            return list(range(num_timesteps))
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


# ----------------------------------------------------------------------------------------------------------
# Gaussian log-likelihood helpers (all elementwise)
# ----------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one the original uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats) of data in [-1, 1] discretised to 256 bins of width 2/255 under N(means, e^2log_scales);
    the outermost bins extend to -inf / +inf (Ho et al. 2020, Eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Discrete Gaussian diffusion over the steps ``use_timesteps`` of the process defined by ``base_betas``.

    ``learn_sigma``: the network also outputs v (learned-range variance, hybrid loss); otherwise the variance is
    fixed, ``beta_t`` ("large", the default) or ``beta~_t`` (``sigma_small``), and the loss is the eps MSE alone.
    ``clip_denoised``: clamp predicted x0 to [-1, 1] while sampling (pixel-space models only; never for latents).
    """

    def __init__(self, base_betas: torch.Tensor, *, use_timesteps: Iterable[int] | None = None,
                 learn_sigma: bool = True, sigma_small: bool = False, clip_denoised: bool = False):
        self.base_betas = base_betas.detach().to("cpu", torch.float64)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.clip_denoised = clip_denoised
        num_base = len(self.base_betas)
        keep = sorted(set(range(num_base) if use_timesteps is None else use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= num_base:
            raise ValueError(f"timesteps to keep must lie in [0, {num_base}), got {keep[:3]}...{keep[-3:]}")
        self.timestep_map = torch.tensor(keep, dtype=torch.long)  # respaced index -> original step
        self.num_timesteps = len(keep)
        self._respaced: dict[str, GaussianDiffusion] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

        # Respacing keeps alpha-bar at the kept steps: beta'_i = 1 - abar(s_i) / abar(s_{i-1}).
        base_abar = torch.cumprod(1.0 - self.base_betas, dim=0)
        abar = base_abar[self.timestep_map]
        betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])

        # Every table in float64 (T,), looked up per step by ``_extract``.
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)  # beta~_t; 0 at t = 0
        # log beta~ with beta~_0 = 0 replaced by beta~_1 (the "clipped" log variance)
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(betas) > 1 else betas
        fixed_large = torch.cat([posterior_variance[1:2], betas[1:]]) if len(betas) > 1 else betas
        self._tables: dict[str, torch.Tensor] = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": torch.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(clipped),
            "posterior_mean_coef1": betas * torch.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
            "fixed_large_variance": fixed_large,
            "fixed_large_log_variance": torch.log(fixed_large),
        }

    @property
    def betas(self) -> torch.Tensor:
        """float64 betas of this (possibly respaced) process."""
        return self._tables["betas"]

    def respaced(self, spacing: str | int | list[int]) -> GaussianDiffusion:
        """The same base process restricted to ``space_timesteps(T_base, spacing)`` (cached per spacing)."""
        key = str(spacing)
        if key not in self._respaced:
            keep = space_timesteps(len(self.base_betas), spacing)
            self._respaced[key] = GaussianDiffusion(self.base_betas, use_timesteps=keep, learn_sigma=self.learn_sigma,
                                                    sigma_small=self.sigma_small, clip_denoised=self.clip_denoised)
        return self._respaced[key]

    # -- table lookups -------------------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._cache:
            src = self.timestep_map if name == "timestep_map" else self._tables[name]
            self._cache[key] = src.to(device=device, dtype=dtype)
        return self._cache[key]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1) in x's float dtype (float32 unless x is float64), on t's device."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._table(name, t.device, dtype)[t].reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> the original steps the network was trained on (no rescaling)."""
        return self._table("timestep_map", t.device, torch.long)[t]

    @staticmethod
    def _work(x: torch.Tensor) -> torch.Tensor:
        """Diffusion arithmetic runs in float32 (float64 if given); half-precision inputs are upcast."""
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    # -- forward process -----------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._extract("posterior_variance", t, x_t),
                self._extract("posterior_log_variance_clipped", t, x_t))

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # -- reverse process -----------------------------------------------------------------------------------

    def p_mean_variance(self, model_output_or_fn: torch.Tensor | ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool | None = None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): ``{"mean", "variance", "log_variance", "pred_xstart"}``, each shaped like x_t.

        ``model_output_or_fn``: the network output for (x_t, t), or ``fn(x_t, t_model)`` to call with the original
        steps. ``t``: respaced indices (B,).
        """
        out = model_output_or_fn
        if callable(out):
            out = out(x_t, self.model_timesteps(t))
        out = out.to(x_t.dtype)
        c = x_t.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape[1] != expected:
            raise ValueError(f"the model output has {out.shape[1]} channels, expected {expected} for {c}-channel "
                             f"inputs with learn_sigma={self.learn_sigma}")
        if self.learn_sigma:
            eps, v = out[:, :c], out[:, c:]
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1) / 2  # v in [-1, 1] interpolates between beta~_t and beta_t in log space
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = out
            name = "posterior" if self.sigma_small else "fixed_large"
            log_name = "posterior_log_variance_clipped" if self.sigma_small else "fixed_large_log_variance"
            variance = self._extract(f"{name}_variance", t, x_t).expand_as(x_t)
            log_variance = self._extract(log_name, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if self.clip_denoised if clip_denoised is None else clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # -- training ------------------------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational bound term L_t in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for
        t > 0, the discretised decoder NLL -log p(x0 | x1) for t = 0. (B,)"""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def sample_time(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training steps: uniform indices of this (respaced) process, as the objectives' common ``sample_time``."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def training_losses(self, model, x0: torch.Tensor, cond: dict | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hybrid loss per sample: ``{"loss": mse + vb, "mse", "vb"}`` (B,) each; ``{"loss", "mse"}`` with a fixed
        variance. The network is called as ``model(x_t, t_model, **cond)``; ``t`` (respaced indices) is drawn
        uniformly from [0, T) unless given."""
        x0 = self._work(x0)
        if t is None:
            t = self.sample_time(x0.shape[0], x0.device)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t), **(cond or {})).to(x0.dtype)
        c = x0.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape != (x0.shape[0], expected, *x0.shape[2:]):
            raise ValueError(f"the model output has shape {tuple(out.shape)}, expected {expected} channels for "
                             f"{c}-channel inputs with learn_sigma={self.learn_sigma}")
        eps = out[:, :c]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:
            # eps detached: the bound only trains the variance channels, the MSE alone trains eps.
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- samplers ------------------------------------------------------------------------------------------

    @staticmethod
    def _gaussian(x: torch.Tensor, draws=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next injected draw if ``draws`` (an iterator) is given, else a fresh one, from ``generator`` on its
        own device (so a CPU generator gives the same samples on any device) or from the global RNG."""
        if draws is not None:
            return next(draws).to(x.device, x.dtype)
        return standard_normal(generator=generator)(x)

    @staticmethod
    def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, ..., 1) mask, 0 where t == 0: the last step adds no noise."""
        return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, clip_denoised: bool | None = None) -> dict:
        """One ancestral step x_t -> x_{t-1} ~ N(mean, exp(log_variance)); no noise is added at t = 0 (a draw is
        still made, as in the original, so replayed draw sequences line up)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        noise = self._gaussian(x, generator=generator) if noise is None else noise
        return {"sample": out["mean"] + self._nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, *, draws: Iterable[torch.Tensor] | None = None,
                      generator: torch.Generator | None = None, clip_denoised: bool | None = None,
                      progress: bool = False) -> torch.Tensor:
        """Ancestral sampling over all T steps of this process from x_T = ``noise``. ``draws``: one Gaussian
        tensor per step, highest t first (replaces fresh draws, e.g. to replay a reference run)."""
        draws = iter(draws) if draws is not None else None
        x = self._work(noise)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="ddpm", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = self._gaussian(x, draws, generator)
            x = self.p_sample(model_fn, x, t, z, clip_denoised=clip_denoised)["sample"]
        return x

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, eta: float = 0.0,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    clip_denoised: bool | None = None) -> dict:
        """One DDIM step (Song et al. 2021, Eq. 12) from t to the previous kept step; eta = 0 is deterministic."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])  # consistent with a clipped x0
        abar = self._extract("alphas_cumprod", t, x)
        abar_prev = self._extract("alphas_cumprod_prev", t, x)
        sample = out["pred_xstart"] * torch.sqrt(abar_prev)
        if eta == 0:
            sample = sample + torch.sqrt(1 - abar_prev) * eps
        else:
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            sample = sample + torch.sqrt(1 - abar_prev - sigma**2) * eps
            noise = self._gaussian(x, generator=generator) if noise is None else noise
            sample = sample + self._nonzero(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, *, eta: float = 0.0,
                         draws: Iterable[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                         clip_denoised: bool | None = None, progress: bool = False) -> torch.Tensor:
        """DDIM over all T steps of this (respaced) process; with eta > 0 one draw per step, as ``p_sample_loop``."""
        draws = iter(draws) if draws is not None else None
        x = self._work(noise)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = self._gaussian(x, draws, generator) if eta > 0 else None
            x = self.ddim_sample(model_fn, x, t, eta, z, clip_denoised=clip_denoised)["sample"]
        return x

    SAMPLERS = ("ddpm", "ddim")
    # Each sampler's own keywords of ``sample`` (None: this diffusion's own clip_denoised).
    SAMPLER_OPTIONS = {"ddpm": {"clip_denoised": None}, "ddim": {"eta": 0.0, "clip_denoised": None}}

    @classmethod
    def check_sampling(cls, sampler: str, steps: int, options: dict) -> dict:
        """``sampler``'s own options, defaults filled in; a ValueError for anything it cannot run with."""
        own = own_options(cls.SAMPLER_OPTIONS, sampler, steps, options)
        check_options(**own)
        return own

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, cond: dict, *, null_cond: dict | None = None,
               guidance_scale: float = 1.0, guidance_channels: str | int = "all", sampler: str = "ddpm",
               steps: int = 250, randn: Randn | None = None, generator: torch.Generator | None = None,
               progress: bool = False, guide=None, **options) -> torch.Tensor:
        """x0 from ``noise`` (B, C, H, W). ``"ddpm"``: ancestral sampling with the learned variance over the
        ``str(steps)`` respacing (DiT's paper setting: 250 steps), one draw per step (the last one unused, as in the
        original). ``"ddim"``: DDIM over ``f"ddim{steps}"``, one draw per step when ``eta > 0``.

        Guidance: one batched call on [cond; null_cond] per step, ``eps_u + w (eps_c - eps_u)`` on the first
        ``guidance_channels`` eps channels (``3`` reproduces DiT's released FID numbers), the variance channels
        from the conditional half. ``guide`` (a network called like ``model``): autoguidance ``eps_g + w (eps_m -
        eps_g)`` on the same channels instead, the guide its own call on ``cond``, the variance from the main
        model. Draws come from ``randn(x)`` in call order, else from ``generator`` (on its
        device). Own options (``SAMPLER_OPTIONS``): ``clip_denoised`` (None keeps this diffusion's own setting),
        ``eta`` (DDIM).
        """
        own = self.check_sampling(sampler, steps, options)
        net = guided_model(model, cond, null_cond, guidance_scale, eps_channels=noise.shape[1],
                           channels=guidance_channels, guide=guide)
        draw, like = standard_normal(randn, generator), self._work(noise)
        draws = (draw(like) for _ in itertools.count())  # endless, drawn lazily: one per request, in order
        if sampler == "ddpm":
            return self.respaced(str(steps)).p_sample_loop(net, noise, draws=draws, clip_denoised=own["clip_denoised"],
                                                           progress=progress)
        return self.respaced(f"ddim{steps}").ddim_sample_loop(net, noise, eta=own["eta"], draws=draws,
                                                              clip_denoised=own["clip_denoised"], progress=progress)


def build_iddpm(num_steps: int = 1000, beta_schedule: str = "linear", learn_sigma: bool = True,
                timestep_respacing: str = "", sigma_small: bool = False,
                clip_denoised: bool = False) -> GaussianDiffusion:
    """The DiT diffusion (``create_diffusion`` of the original with its defaults): ``timestep_respacing`` applies to
    training; ``sample`` respaces the full process by its own ``steps``."""
    return GaussianDiffusion(betas_for_schedule(beta_schedule, num_steps),
                             use_timesteps=space_timesteps(num_steps, timestep_respacing),
                             learn_sigma=learn_sigma, sigma_small=sigma_small, clip_denoised=clip_denoised)

