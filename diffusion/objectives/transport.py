"""The transport objective of SiT (flow matching / stochastic interpolants), ``diffusion.kind = "transport"``.

Time runs from t = 0 (noise) to t = 1 (data), SiT's convention: ``x_t = alpha_t x1 + sigma_t x0`` with x1 the data
and x0 ~ N(0, I) on one of the paths of ``diffusion.objectives.paths``. The network, called as
``model(x_t, time_scale * t, **cond)`` (SiT and DiT-style backbones see t in [0, 1] itself: ``time_scale = 1``),
predicts one of

* ``velocity``: u_t = d_alpha_t x1 + d_sigma_t x0, loss mean((v - u_t)^2) (``loss_weight`` ignored, as SiT);
* ``noise``: x0, loss mean(w (eps - x0)^2);
* ``score``: -x0 / sigma_t, loss mean(w (s sigma_t + x0)^2);
* ``x`` (JiT, Li & He 2025; linear path only): the clean data x1, loss mean((v - v_pred)^2) in velocity space with
  v = (x1 - x_t) / c, v_pred = (x_pred - x_t) / c, c = clamp_min(1 - t, t_eps) (``paths.velocity_from_x``; JiT's
  ``t_eps`` 0.05); its samplers use that velocity and the score ``score_from_velocity`` of it;

per sample, the mean over every non-batch dimension. ``loss_weight``: ``none`` (w = 1), ``velocity``
(w = (drift_var / sigma_t)^2) or ``likelihood`` (w = drift_var / sigma_t^2), drift_var from the path's ``drift``.
``cos_loss`` adds ``cos_loss * mean(1 - cos(v, u_t))`` per sample, LightningDiT's velocity-direction loss (velocity
prediction only): the cosine over the channels at every position (``F.cosine_similarity(dim=1)``, eps 1e-8), then
the mean over the positions; LightningDiT's train.py adds it with weight 1 (``cos_loss = 1``). A network with
twice the data's channels (DiT with ``learn_sigma``) contributes its first half only, as SiT. ``noise_scale`` (JiT's:
1, 2, 4 at 256, 512, 1024 pixels; velocity or x prediction) scales the noise: x0 = noise_scale * randn in training
and as the samplers' start (``sample`` scales the unit noise it is given), so the prior is N(0, noise_scale^2 I).

Training times (``sample_time``): a base draw u in [0, 1) (``uniform``; ``logit_normal``: sigmoid(N(logit_mean,
logit_std^2)), in SiT's time, so logit_mean > 0 favours the data side; ``mode``: SD3's mode sampling with scale
``mode_scale``, f(u) = u + mode_scale (cos^2(pi u / 2) - 1 + u) in SiT's time, which is SD3's
1 - u - s (cos^2(pi u / 2) - 1 + u) read with t -> 1 - t: positive scales favour the middle), then the timestep shift
of SD3 / LightningDiT (``diffusion.samplers.transport.shift_time``: with s = 1 - t, s' = shift s / (1 + (shift - 1)
s), t' = 1 - s'; shift > 1 spends more time near noise), then scaled into the training interval [t0, t1] of
``paths.interval``: t0 + t' (t1 - t0).

Sampling (``sample``, ``SAMPLERS``) runs SiT's probability-flow ODE and SDE integrators of
``diffusion.samplers.transport`` on the fields ``fields`` builds from the (guided) network, or REPA's
(``repa_euler``, ``repa_heun``, ``repa_sde``: ``diffusion.samplers.repa``, REPA's grids, guidance interval and
one-evaluation SDE step) or JiT's (``jit_heun``: ``diffusion.samplers.jit``); ``likelihood`` runs the ODE from
data to noise for the log-likelihood and bits per dimension of data (SiT's ``sample_ode_likelihood``).

``time_direction``: ``sit`` (the network is called with SiT's t) or ``repa`` (a network trained in REPA's time, t = 0
data: called with 1 - t, its velocity negated, ``diffusion.objectives.repa_time.ReversedTime``), so the same loss,
likelihood and samplers apply to REPA's checkpoints; everything else here stays in SiT's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.objectives.guidance import guided_model
from diffusion.objectives.paths import (
    DIFFUSION_FORMS,
    PATHS,
    PREDICTIONS,
    VELOCITY_LIKE,
    Path,
    _expand,
    interval,
    resolve_eps,
    velocity_from_x,
)
from diffusion.objectives.repa_time import TIME_DIRECTIONS, ReversedTime, repa_guidance_bounds
from diffusion.samplers.common import Randn, own_options, standard_normal
from diffusion.samplers.jit import sample_jit_heun
from diffusion.samplers.repa import sample_repa_ode, sample_repa_sde
from diffusion.samplers.transport import (
    LAST_STEPS,
    ODE_METHODS,
    Field,
    bits_per_dim,
    likelihood_ode,
    ode_grid,
    sample_ode,
    sample_sde,
    shift_time,
)

LOSS_WEIGHTS = ("none", "velocity", "likelihood")
TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")

# Each sampler's own keywords of Transport.sample and their defaults (SiT's sample.py defaults): the ODE methods
# (fixed-step ones on the grid, adaptive ones with tolerances), SiT's SDEs, REPA's samplers (no shift, no reverse).
_WINDOW = {"guidance_t_lo": 0.0, "guidance_t_hi": 1.0}
_SHIFT = {"time_shift": 1.0, "timestep_shift": 0.0}
_ODE = {**_SHIFT, "reverse": False, **_WINDOW}
_SDE_END = {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean", "last_step_size": 0.04}
SAMPLER_OPTIONS: dict[str, dict] = {
    **{m: ({"atol": 1e-6, "rtol": 1e-3, **_ODE} if adaptive else dict(_ODE)) for m, adaptive in ODE_METHODS.items()},
    "sde_euler": {**_SDE_END, **_SHIFT, **_WINDOW},
    "sde_heun": {**_SDE_END, **_SHIFT, **_WINDOW},
    "repa_euler": dict(_WINDOW), "repa_heun": dict(_WINDOW), "repa_sde": {**_SDE_END, **_WINDOW},
    # JiT's sampler: the window read with JiT's inequalities (diffusion.samplers.jit), no shift, no reverse
    "jit_heun": dict(_WINDOW),
}


def from_lightningdit_shift(timestep_shift: float, time_shift: float = 1.0) -> float:
    """LightningDiT's ``timestep_shift`` (its sample config; 0.3 in its released ones) as this project's
    ``time_shift``: LightningDiT maps its grid (SiT's time, t = 1 data) by t' = s t / (1 + (s - 1) t), which is
    ``shift_time`` with shift = 1 / s; s <= 0 means no shift, as there. Setting both is refused."""
    if timestep_shift <= 0:
        return time_shift
    if time_shift != 1.0:
        raise ValueError(f"timestep_shift={timestep_shift} (LightningDiT's convention) and time_shift={time_shift} "
                         f"(this project's, its reciprocal) both set: keep one")
    return 1.0 / timestep_shift


class Transport:
    """A path, what the network predicts, and how training weighs and draws times (see the module docstring)."""

    def __init__(self, path: Path, prediction: str = "velocity", loss_weight: str = "none",
                 train_eps: float = 0.0, sample_eps: float | None = 0.0, time_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 time_shift: float = 1.0, cos_loss: float = 0.0, time_scale: float = 1.0,
                 time_direction: str = "sit", noise_scale: float = 1.0, t_eps: float = 0.05):
        if time_direction not in TIME_DIRECTIONS:
            raise ValueError(f"unknown time_direction {time_direction!r}; known: {', '.join(TIME_DIRECTIONS)}")
        self.path, self.prediction, self.loss_weight = path, prediction, loss_weight
        self.time_direction = time_direction
        self.train_eps, self.sample_eps = train_eps, sample_eps
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.mode_scale, self.time_shift = mode_scale, time_shift
        self.cos_loss, self.time_scale = cos_loss, time_scale
        self.noise_scale, self.t_eps = noise_scale, t_eps
        self.t0, self.t1 = interval(path, prediction, train_eps)

    # -- training times --------------------------------------------------------------------------------------

    def base_time(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """The draw before shift and scaling: u in [0, 1) of ``time_sampling``'s distribution."""
        if self.time_sampling == "logit_normal":
            z = torch.randn(n, generator=generator, device=device)
            return torch.sigmoid(self.logit_mean + self.logit_std * z)
        u = torch.rand(n, generator=generator, device=device)
        if self.time_sampling == "mode":
            return u + self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def to_interval(self, u: Tensor) -> Tensor:
        """A base draw in [0, 1] -> a training time: the timestep shift, then t0 + u (t1 - t0)."""
        u = shift_time(u, self.time_shift)
        return self.t0 + u * (self.t1 - self.t0)

    def sample_time(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """n training times (float32, shape (n,)) from ``generator`` on ``device`` (the trainer's contract, as
        ``vp.NoisePredictionObjective.sample_time``)."""
        return self.to_interval(self.base_time(n, device, generator))

    # -- the loss --------------------------------------------------------------------------------------------

    def network_output(self, model, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """model(x_t, time_scale t, **cond) (REPA's time direction: -model(x_t, time_scale (1 - t), **cond)),
        keeping the first C channels of a 2C-channel output."""
        channels = x_t.shape[1]
        if self.time_direction == "repa":
            out = ReversedTime(model, self.time_scale, channels)(x_t, t, **cond)
        else:
            out = model(x_t, t if self.time_scale == 1.0 else self.time_scale * t, **cond)
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        if out.shape != x_t.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}")
        return out

    def weight(self, x_t: Tensor, t: Tensor) -> Tensor | float:
        """The loss weight w(t) of a noise or score prediction, broadcastable to x_t."""
        if self.loss_weight == "none":
            return 1.0
        _, drift_var = self.path.drift(x_t, t)
        sigma = self.path.coefficients(_expand(t, x_t))[1]
        if self.loss_weight == "velocity":
            return (drift_var / sigma) ** 2
        return drift_var / sigma**2

    def training_losses(self, model, x1: Tensor, cond: dict, t: Tensor | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": per-sample loss (B,), "pred": the network's prediction}. Without ``noise`` / ``t`` they are
        drawn here, noise first (SiT's order); ``noise`` is the unit draw, scaled here by ``noise_scale``."""
        x0 = torch.randn_like(x1) if noise is None else noise
        x0 = x0 if self.noise_scale == 1.0 else self.noise_scale * x0
        t = self.sample_time(x1.shape[0], x1.device) if t is None else t
        x_t, u_t = self.path.plan(t, x0, x1)
        pred = self.network_output(model, x_t, t, cond)
        out, dims = pred.float(), tuple(range(1, x1.ndim))
        if self.prediction == "velocity":
            loss = (out - u_t.float()).pow(2).mean(dims)
            if self.cos_loss:
                # per position over the channels, as LightningDiT (not one cosine of the flattened sample)
                cos = F.cosine_similarity(out, u_t.float(), dim=1)
                loss = loss + self.cos_loss * (1 - cos).reshape(cos.shape[0], -1).mean(1)
        elif self.prediction == "x":  # JiT: both velocities through the same clamp, the MSE between them
            v = velocity_from_x(x1.float(), x_t.float(), t, self.t_eps)
            loss = (v - velocity_from_x(out, x_t.float(), t, self.t_eps)).pow(2).mean(dims)
        else:
            w = self.weight(x_t, t)
            if self.prediction == "noise":
                loss = (w * (out - x0.float()) ** 2).mean(dims)
            else:
                sigma = self.path.coefficients(_expand(t, x_t))[1]
                loss = (w * (out * sigma + x0.float()) ** 2).mean(dims)
        return {"loss": loss, "pred": pred}

    # -- sampling --------------------------------------------------------------------------------------------

    SAMPLER_OPTIONS = SAMPLER_OPTIONS  # each sampler's own keywords of ``sample`` and their defaults
    SAMPLERS = tuple(SAMPLER_OPTIONS)
    REPA_SAMPLERS = ("repa_euler", "repa_heun", "repa_sde")

    def fields(self, net: Callable[[Tensor, Tensor], Tensor]) -> tuple[Field, Field]:
        """(ODE drift, score) of a network ``net(x, t) -> prediction`` (SiT's ``Sampler.drift`` and
        ``Sampler.score``): velocity -> (v, score_from_velocity); score -> (-drift_mean + drift_var s, s);
        noise -> the same with s = eps / (-sigma_t); x -> (``velocity_from_x``, score_from_velocity of it). Each call
        is one network evaluation."""
        path, prediction = self.path, self.prediction

        def score(x: Tensor, t: Tensor) -> Tensor:
            if prediction in VELOCITY_LIKE:
                return path.score_from_velocity(drift(x, t), x, t)
            out = net(x, t)
            return out if prediction == "score" else path.score_from_noise(out, x, t)

        def drift(x: Tensor, t: Tensor) -> Tensor:
            if prediction == "velocity":
                return net(x, t)
            if prediction == "x":
                return velocity_from_x(net(x, t), x, t, self.t_eps)
            drift_mean, drift_var = path.drift(x, t)
            return -drift_mean + drift_var * score(x, t)

        return drift, score

    def diffusion_field(self, form: str = "sigma", norm: float = 1.0) -> Field:
        """w(x, t) of the sampling SDE (``paths.Path.diffusion``)."""
        return lambda x, t: self.path.diffusion(x, t, form, norm)

    @torch.no_grad()
    def likelihood(self, model, x1: Tensor, cond: dict, *, sampler: str = "dopri5", steps: int = 50,
                   atol: float = 1e-6, rtol: float = 1e-3, divergence: str = "hutchinson", probes: int = 1,
                   probe: str = "rademacher", resample_probes: bool = False, levels: int | None = None,
                   data_range: float = 2.0, randn: Randn | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(log-likelihood per sample in nats, bits per dimension) of data ``x1`` (SiT's ``sample_ode_likelihood``):
        the probability-flow ODE of the unguided network, ``sampler`` one of ``ODE_METHODS``, run from data to
        noise on the reverse of SiT's sampling interval (``linspace(1 - t0, 1 - t1, steps)``) jointly with the
        log-density change, then the N(0, I) prior of the endpoint (``diffusion.samplers.transport.likelihood_ode``).
        ``divergence``: ``hutchinson`` (``probes`` probes of ``probe``, drawn once per call from ``randn(x)``, else
        ``generator``; afresh at every evaluation with ``resample_probes``, as SiT) or ``exact`` (one backward
        pass per dimension: small data only). ``levels`` / ``data_range``: bits per dimension on the data's integer
        grid (``bits_per_dim``). Unguided, as SiT's (which asserts cfg_scale == 1)."""
        if self.sample_eps is None:
            raise ValueError("sample_eps is unset (train_eps was given without it, as SiT would): set sample_eps")
        if self.noise_scale != 1.0:
            raise ValueError(f"the likelihood's prior is N(0, I); noise_scale={self.noise_scale:g} is not supported")
        t_data, t_noise = interval(self.path, self.prediction, self.sample_eps, reverse=True)
        drift, _ = self.fields(lambda x, t: self.network_output(model, x, t, cond).to(x.dtype))
        log_likelihood, _, _ = likelihood_ode(drift, x1, ode_grid(t_data, t_noise, steps), method=sampler, atol=atol,
                                              rtol=rtol, divergence=divergence, probes=probes, probe=probe,
                                              resample_probes=resample_probes, randn=standard_normal(randn, generator))
        return log_likelihood, bits_per_dim(log_likelihood, x1[0].numel(), levels, data_range)

    @classmethod
    def check_sampling(cls, sampler: str, steps: int, options: dict) -> dict:
        """``sampler``'s own options (``SAMPLER_OPTIONS``), defaults filled in and LightningDiT's
        ``timestep_shift`` converted to ``time_shift``; one ValueError for anything it cannot run with, before any
        network evaluation."""
        own = own_options(cls.SAMPLER_OPTIONS, sampler, steps, options)
        if "timestep_shift" in own:
            own["time_shift"] = from_lightningdit_shift(own.pop("timestep_shift"), own["time_shift"])
        if not (own.get("atol", 1) > 0 and own.get("rtol", 1) > 0):
            raise ValueError(f"atol and rtol must be > 0, got {own['atol']!r} and {own['rtol']!r}")
        if own.get("diffusion_form", "sigma") not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion_form {own['diffusion_form']!r}; choose one of "
                             f"{', '.join(DIFFUSION_FORMS)}")
        if own.get("diffusion_norm", 1.0) < 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {own['diffusion_norm']!r}")
        if str(own.get("last_step", "mean")).lower() not in LAST_STEPS:
            raise ValueError(f"unknown last_step {own['last_step']!r}; choose one of {', '.join(LAST_STEPS)}")
        if not 0 <= own.get("last_step_size", 0.0) < 1:
            raise ValueError(f"last_step_size must lie in [0, 1), got {own['last_step_size']!r}")
        if own.get("time_shift", 1.0) <= 0:
            raise ValueError(f"time_shift must be > 0, got {own['time_shift']!r}")
        lo, hi = own["guidance_t_lo"], own["guidance_t_hi"]
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"the guidance interval needs 0 <= guidance_t_lo <= guidance_t_hi <= 1, got "
                             f"({lo!r}, {hi!r})")
        return own

    @torch.no_grad()
    def sample(self, model, noise: Tensor, cond: dict, *, null_cond: dict | None = None,
               guidance_scale: float = 1.0, guidance_channels: str | int = "all", sampler: str = "dopri5",
               steps: int = 50, randn: Randn | None = None, generator: torch.Generator | None = None,
               progress: bool = False, guide=None, **options) -> Tensor:
        """Data (t = 1) from ``noise`` (t = 0) with SiT's samplers (``diffusion.samplers.transport``) and the
        sampler's own ``options`` (``SAMPLER_OPTIONS``; others are refused): the ODE methods integrate the
        probability-flow ODE on ``linspace(t0, t1, steps)`` (SiT's ``num_steps``: grid points, so a fixed-step method
        takes steps - 1 steps; the adaptive ones take ``atol`` / ``rtol``), ``sde_euler`` / ``sde_heun`` the SDE with
        diffusion w(t) = ``diffusion_form`` x ``diffusion_norm``, ending with ``last_step`` (mean | euler | tweedie |
        none) over ``last_step_size``. The interval is SiT's ``check_interval`` for ``sample_eps``; ``time_shift``
        shifts the grid (``shift_time``; ``timestep_shift``: the same in LightningDiT's convention, see
        ``from_lightningdit_shift``). Guidance: ``guided_model`` ([cond; null_cond] in one call, ``uncond + w (cond -
        uncond)``), only while ``guidance_t_lo <= t <= guidance_t_hi`` (SiT's time; the default (0, 1):
        everywhere). ``guide`` (a network called like ``model``, in the same time convention): autoguidance
        ``out_g + w (out_m - out_g)`` instead of CFG, the guide its own call on ``cond``, under the same interval.
        SDE draws come from ``randn(x)`` (one per step), else ``generator``. ``reverse`` (ODE samplers
        only, SiT's ``reverse=True``): ``noise`` holds data and the ODE runs from data to noise on SiT's reversed
        interval (the same shifted times, in the other order): the deterministic encoding whose forward solve
        returns the data up to the solver's error. ``repa_euler`` / ``repa_heun`` / ``repa_sde``: REPA's
        ``euler_sampler`` (plain, ``--heun``) and ``euler_maruyama_sampler`` on REPA's grids with ``steps`` = REPA's
        ``--num-steps`` (``_sample_repa``). ``jit_heun``: JiT's sampler (``diffusion.samplers.jit``, ``steps`` its
        ``num_sampling_steps``), the guidance window read with JiT's strict inequalities. ``noise`` is the unit draw:
        the samplers start from ``noise_scale * noise`` (a reverse ODE returns its endpoint divided by it). An x
        prediction is guided on x before the velocity is formed: v = (x - z) / c is affine in x with the same z and c
        for both branches, so this is JiT's v_u + w (v_c - v_u) exactly."""
        own = self.check_sampling(sampler, steps, options)
        if self.sample_eps is None:
            raise ValueError("sample_eps is unset (train_eps was given without it, as SiT would): set sample_eps")
        if self.noise_scale != 1.0 and (sampler.startswith("sde_") or sampler == "repa_sde"):
            raise ValueError(f"{sampler}: the SDE samplers assume unit noise; noise_scale={self.noise_scale:g} "
                             f"samples with the ODE methods or jit_heun")
        reverse = own.get("reverse", False)
        noise = noise if reverse or self.noise_scale == 1.0 else self.noise_scale * noise
        channels = noise.shape[1]
        if self.time_direction == "repa":  # the network seen in SiT's time, once for every sampler
            model, scale = ReversedTime(model, self.time_scale, channels), 1.0
            guide = None if guide is None else ReversedTime(guide, self.time_scale, channels)
        else:
            scale = self.time_scale
        lo, hi = own.pop("guidance_t_lo"), own.pop("guidance_t_hi")
        if sampler in self.REPA_SAMPLERS:
            return self._sample_repa(model, scale, noise, cond, null_cond, guidance_scale, guidance_channels,
                                     sampler, steps, (lo, hi), standard_normal(randn, generator), guide=guide, **own)
        if sampler == "jit_heun":
            return self._sample_jit(model, scale, noise, cond, null_cond, guidance_scale, guidance_channels, steps,
                                    (lo, hi), guide)
        window = None if (lo, hi) == (0.0, 1.0) else (lo * scale, hi * scale)  # in the network's time
        guided = guided_model(model, cond, null_cond, guidance_scale, channels, guidance_channels, interval=window,
                              guide=guide)

        def net(x: Tensor, t: Tensor) -> Tensor:
            t_net = t if scale == 1.0 else scale * t
            return guided(x, t_net)[:, :channels].to(x.dtype)

        drift, score = self.fields(net)
        if not sampler.startswith("sde_"):
            t0, t1 = interval(self.path, self.prediction, self.sample_eps, reverse=own["reverse"])
            out = sample_ode(drift, noise, ode_grid(t0, t1, steps, own["time_shift"]), method=sampler,
                             atol=own.get("atol", 1e-6), rtol=own.get("rtol", 1e-3))
            return out / self.noise_scale if reverse and self.noise_scale != 1.0 else out
        last_step = str(own["last_step"]).lower()
        last_step_size = 0.0 if last_step == "none" else own["last_step_size"]
        form, norm = own["diffusion_form"], own["diffusion_norm"]
        t0, t1 = interval(self.path, self.prediction, self.sample_eps, sde=True, diffusion_form=form,
                          last_step_size=last_step_size)
        self._check_diffusion_at(t0, noise, form, norm)
        return sample_sde(drift, self.diffusion_field(form, norm), score, noise,
                          ode_grid(t0, t1, steps, own["time_shift"]), method=sampler[len("sde_"):],
                          last_step=last_step, last_step_size=last_step_size, randn=standard_normal(randn, generator),
                          alpha_sigma=lambda t: self.path.coefficients(t)[:2])

    def _check_diffusion_at(self, t0: float, noise: Tensor, form: str, norm: float) -> None:
        w0 = self.path.diffusion(noise[:1], torch.tensor([t0], dtype=noise.dtype), form, norm)
        if not torch.isfinite(w0).all():
            raise ValueError(f"diffusion_form={form!r} is infinite at t = {t0:g}, where this SDE starts "
                             f"({type(self.path).__name__}, {self.prediction} prediction, sample_eps="
                             f"{self.sample_eps:g}, as SiT): choose another diffusion_form")

    def _sample_jit(self, model, scale: float, noise: Tensor, cond: dict, null_cond: dict | None,
                    guidance_scale: float, guidance_channels: str | int, steps: int, window: tuple[float, float],
                    guide=None) -> Tensor:
        """JiT's sampler (``sample_jit_heun``) on ``model`` in SiT's time (``scale`` x t), velocity or x prediction:
        the guided network (CFG or autoguidance) on the evaluations inside JiT's window, else the conditional one."""
        if self.prediction not in VELOCITY_LIKE:
            raise ValueError(f"jit_heun samples a velocity or x prediction; this objective predicts the "
                             f"{self.prediction}: use an ODE method or sde_*")
        channels = noise.shape[1]
        guided = guided_model(model, cond, null_cond, guidance_scale, channels, guidance_channels, guide=guide)

        def velocity(x: Tensor, t: Tensor, guide_now: bool) -> Tensor:
            t_net = t if scale == 1.0 else scale * t
            out = guided(x, t_net) if guide_now else model(x, t_net, **cond)
            out = out[:, :channels].to(x.dtype)
            return out if self.prediction == "velocity" else velocity_from_x(out, x, t, self.t_eps)

        return sample_jit_heun(velocity, noise, steps, *window)

    def _sample_repa(self, model, scale: float, noise: Tensor, cond: dict, null_cond: dict | None,
                     guidance_scale: float, guidance_channels: str | int, sampler: str, steps: int,
                     window: tuple[float, float], randn: Randn, diffusion_form: str = "sigma",
                     diffusion_norm: float = 1.0, last_step: str = "mean", last_step_size: float = 0.04,
                     guide=None) -> Tensor:
        """REPA's samplers (``diffusion.samplers.repa``) on ``model``, a network in SiT's time (``scale`` x t):
        ``steps`` is REPA's ``--num-steps``; guidance (all ``guidance_channels`` of the velocity, one batched
        [cond; null] call) on the steps whose REPA time tau = 1 - t lies in REPA's inclusive [guidance_low,
        guidance_high] = [1 - guidance_t_hi, 1 - guidance_t_lo] (``window`` in SiT's time, ``repa_guidance_bounds``),
        with ``guide``: autoguidance on those steps instead (the guide its own call, in SiT's time as ``model``);
        one network evaluation per step (Heun: two but on the last step); float64 state, the network called in the
        noise's dtype. REPA's grids are uniform and run one way: no ``time_shift``, no ``reverse``."""
        if self.prediction != "velocity":
            raise ValueError(f"{sampler} is REPA's sampler of a velocity network (REPA trains velocity only); this "
                             f"objective predicts the {self.prediction}: use an ODE method or sde_*")
        guidance_t_lo, guidance_t_hi = window
        channels, dtype = noise.shape[1], noise.dtype
        guided = guided_model(model, cond, null_cond, guidance_scale, channels, guidance_channels, guide=guide)
        guiding = (guide is not None or null_cond is not None) and guidance_scale != 1.0
        low, high = repa_guidance_bounds(guidance_t_lo, guidance_t_hi)

        def velocity(x: Tensor, t: Tensor, guide: bool) -> Tensor:
            t_net = t.to(dtype) if scale == 1.0 else scale * t.to(dtype)
            out = guided(x.to(dtype), t_net) if guide else model(x.to(dtype), t_net, **cond)
            return out[:, :channels].to(x.dtype)

        def guide_step(tau: float) -> bool:  # the step's guidance decision (CFG or autoguidance alike)
            return guiding and low <= tau <= high

        if sampler != "repa_sde":
            return sample_repa_ode(velocity, noise, steps, heun=sampler == "repa_heun", guide=guide_step)

        def pair(x: Tensor, t: Tensor, guide: bool) -> tuple[Tensor, Tensor]:
            v = velocity(x, t, guide)
            return v, self.path.score_from_velocity(v, x, t)

        self._check_diffusion_at(0.0, noise, diffusion_form, diffusion_norm)
        return sample_repa_sde(pair, self.diffusion_field(diffusion_form, diffusion_norm), noise, steps,
                               last_step=str(last_step).lower(), last_step_size=last_step_size, randn=randn,
                               guide=guide_step, alpha_sigma=lambda t: self.path.coefficients(t)[:2])


def build_transport(path: str = "linear", prediction: str = "velocity", loss_weight: str = "none",
                    train_eps: float | None = None, sample_eps: float | None = None, time_sampling: str = "uniform",
                    logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                    time_shift: float = 1.0, cos_loss: float = 0.0, time_scale: float = 1.0,
                    time_direction: str = "sit", noise_scale: float = 1.0, t_eps: float = 0.05) -> Transport:
    """``diffusion.kind = "transport"``: SiT's ``create_transport`` (eps resolved by ``paths.resolve_eps``) plus
    the training-time distribution, the velocity cosine loss, the network's time scale and the time direction it
    was trained in (``sit``; ``repa``: t = 0 data, ``diffusion.objectives.repa_time``), JiT's noise scale and, for
    x prediction, its clamp ``t_eps`` of 1 - t."""
    path_name = str(path).lower()
    if path_name not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")
    loss_weight = "none" if loss_weight is None else str(loss_weight).lower()
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss_weight {loss_weight!r}; known: {', '.join(LOSS_WEIGHTS)}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; known: {', '.join(TIME_SAMPLINGS)}")
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
    if time_sampling == "mode" and not -1.0 <= mode_scale <= 2 / (math.pi - 2):
        raise ValueError(f"mode_scale must lie in [-1, 2 / (pi - 2)] (a monotone map of [0, 1]), got {mode_scale!r}")
    if time_shift <= 0:
        raise ValueError(f"time_shift must be > 0, got {time_shift!r}")
    if cos_loss < 0:
        raise ValueError(f"cos_loss must be >= 0, got {cos_loss!r}")
    if cos_loss and prediction != "velocity":
        raise ValueError("cos_loss applies to velocity prediction only")
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    if time_direction not in TIME_DIRECTIONS:
        raise ValueError(f"unknown time_direction {time_direction!r}; known: {', '.join(TIME_DIRECTIONS)}")
    _check_jit_settings(path_name, prediction, loss_weight, time_direction, noise_scale, t_eps)
    train_eps, sample_eps = resolve_eps(path_name, prediction, train_eps, sample_eps)
    return Transport(PATHS[path_name](), prediction, loss_weight, train_eps, sample_eps, time_sampling, logit_mean,
                     logit_std, mode_scale, time_shift, cos_loss, time_scale, time_direction, float(noise_scale),
                     float(t_eps))


def _check_jit_settings(path: str, prediction: str, loss_weight: str, time_direction: str, noise_scale: float,
                        t_eps: float) -> None:
    """One ValueError for a noise scale or an x prediction this objective cannot train or sample."""
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
    if noise_scale != 1.0 and prediction not in VELOCITY_LIKE:
        raise ValueError(f"noise_scale={noise_scale!r} applies to velocity or x prediction (a {prediction} "
                         f"prediction's target is the unit noise)")
    if not 0 < t_eps < 1:
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps!r}")
    if prediction != "x":
        return
    if path != "linear":
        raise ValueError(f"x prediction is JiT's, on the linear path; got path {path!r}")
    if loss_weight != "none":
        raise ValueError(f"x prediction has JiT's velocity-space loss; loss_weight must be none, got {loss_weight!r}")
    if time_direction != "sit":
        raise ValueError("x prediction runs in SiT's time (t = 1 data); time_direction must be sit")
