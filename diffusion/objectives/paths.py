"""Interpolant paths of stochastic interpolants / flow matching, in SiT's conventions (Ma et al. 2024, "SiT").

Time runs from t = 0 (noise) to t = 1 (data): ``x_t = alpha_t x1 + sigma_t x0`` with x1 the data and x0 ~ N(0, I),
and the target velocity is ``u_t = d_alpha_t x1 + d_sigma_t x0``. Three paths (tests/fixtures/README.md, SiT):

* ``LinearPath`` (SiT's ICPlan): alpha = t, sigma = 1 - t;
* ``GVPPath``: alpha = sin(pi t / 2), sigma = cos(pi t / 2) (variance preserving, alpha^2 + sigma^2 = 1);
* ``VPPath``: the VP SDE of score-based models read with time reversed, alpha = exp(m(t)),
  sigma = sqrt(1 - exp(2 m(t))), m(t) = -(1 - t)^2 (beta_max - beta_min) / 4 - (1 - t) beta_min / 2.

Each path also gives the drift of the forward SDE (``drift``: mean part f(x, t) with the sign SiT uses, and the
"drift variance" that turns a score into a velocity), the diffusion coefficient w(t) of the sampling SDE, and the
conversions between velocity, score and noise predictions; ``velocity_from_x`` / ``x_from_velocity`` convert a
clean-data (x) prediction of the linear path, JiT's (Li & He 2025), with its clamp of 1 - t at ``t_eps``. ``t`` is a
tensor of shape (B,) (or a scalar tensor), broadcast against x of shape (B, ...) inside.

``resolve_eps`` and ``interval`` are SiT's rules for the time interval a transport trains and samples on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTIONS = ("velocity", "score", "noise", "x")
VELOCITY_LIKE = ("velocity", "x")  # predictions SiT's eps rules treat as velocity: no eps, the ODE on [0, 1]
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """t of shape (B,) (or a scalar tensor) -> (B, 1, ..., 1) with x's number of dimensions."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Path:
    """An interpolant x_t = alpha_t x1 + sigma_t x0. Subclasses give ``coefficients`` and
    ``d_alpha_alpha_ratio``; ``drift`` is the Linear/GVP form (the VP path overrides it)."""

    name = ""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), each of t's shape."""
        raise NotImplementedError

    def d_alpha_alpha_ratio(self, t: Tensor) -> Tensor:
        """r_t = d_alpha_t / alpha_t, by its own formula (not the ratio of ``coefficients``)."""
        raise NotImplementedError

    # -- interpolation ---------------------------------------------------------------------------------------

    def plan(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) = (alpha x1 + sigma x0, d_alpha x1 + d_sigma x0)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    # -- the forward SDE -------------------------------------------------------------------------------------

    def drift(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SiT's ``compute_drift``: (drift_mean like x, drift_var broadcastable to x), here
        (-r_t x, r_t sigma_t^2 - sigma_t d_sigma_t); velocity = drift_var * score - drift_mean."""
        t = _expand(t, x)
        ratio = self.d_alpha_alpha_ratio(t)
        _, sigma, _, d_sigma = self.coefficients(t)
        return -(ratio * x), ratio * sigma**2 - sigma * d_sigma

    def diffusion(self, x: Tensor, t: Tensor, form: str = "constant", norm: float = 1.0) -> Tensor:
        """w(t) of the sampling SDE, broadcastable to x. ``form``: ``constant`` (norm), ``SBDM`` (norm drift_var),
        ``sigma`` (norm sigma_t), ``linear`` (norm (1 - t)), ``decreasing`` ((norm cos(pi t) + 1)^2 / 4),
        ``increasing-decreasing`` (norm sin^2(pi t)). SiT's code spells the last one ``inccreasing-decreasing``
        (its command line's ``increasing-decreasing`` then fails); both spellings are accepted here."""
        t = _expand(t, x)
        if form == "constant":
            return torch.full_like(torch.as_tensor(t, dtype=x.dtype), norm)
        if form == "SBDM":
            return norm * self.drift(x, t)[1]
        if form == "sigma":
            return norm * self.coefficients(t)[1]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; known: {', '.join(DIFFUSION_FORMS)}")

    # -- conversions between predictions --------------------------------------------------------------------

    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """(a v - x) / (sigma^2 - a d_sigma sigma), a = alpha / d_alpha."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        a = alpha / d_alpha
        return (a * v - x) / (sigma**2 - a * d_sigma * sigma)

    def noise_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """(a v - x) / (a d_sigma - sigma), a = alpha / d_alpha."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        a = alpha / d_alpha
        return (a * v - x) / (a * d_sigma - sigma)

    def velocity_from_score(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """drift_var s - drift_mean."""
        drift_mean, drift_var = self.drift(x, t)
        return drift_var * s - drift_mean

    def score_from_noise(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """eps / (-sigma_t)."""
        return eps / -self.coefficients(_expand(t, x))[1]


def velocity_from_x(x_pred: Tensor, z: Tensor, t: Tensor, t_eps: float) -> Tensor:
    """JiT's velocity of the linear path from a clean-data prediction: (x_pred - z) / clamp_min(1 - t, t_eps)."""
    return (x_pred - z) / (1 - _expand(t, z)).clamp_min(t_eps)


def x_from_velocity(v: Tensor, z: Tensor, t: Tensor, t_eps: float) -> Tensor:
    """The inverse of ``velocity_from_x``: z + clamp_min(1 - t, t_eps) v."""
    return z + (1 - _expand(t, z)).clamp_min(t_eps) * v


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (SiT's ``Linear``, the rectified-flow / flow-matching path)."""

    name = "linear"

    def coefficients(self, t):
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    def d_alpha_alpha_ratio(self, t):
        return 1 / t


class GVPPath(Path):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2) (SiT's ``GVP``)."""

    name = "gvp"

    def coefficients(self, t):
        half = t * math.pi / 2
        return (torch.sin(half), torch.cos(half), math.pi / 2 * torch.cos(half), -math.pi / 2 * torch.sin(half))

    def d_alpha_alpha_ratio(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(Path):
    """The VP SDE with time reversed (SiT's ``VP``; SiT calls beta_min / beta_max ``sigma_min`` / ``sigma_max``).
    alpha_0 is not exactly 0 (the path does not start at pure noise) and sigma_1 = 0 (d_sigma_1 infinite)."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """m(t) = log alpha_t."""
        return -0.25 * ((1 - t) ** 2) * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def d_log_mean_coeff(self, t: Tensor) -> Tensor:
        """m'(t) = d_alpha / alpha."""
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def coefficients(self, t):
        m, dm = self.log_mean_coeff(t), self.d_log_mean_coeff(t)
        alpha = torch.exp(m)
        e2m = torch.exp(2 * m)
        sigma = torch.sqrt(1 - e2m)
        return alpha, sigma, alpha * dm, e2m * (2 * dm) / (-2 * sigma)

    def d_alpha_alpha_ratio(self, t):
        return self.d_log_mean_coeff(t)

    def drift(self, x, t):
        """(-beta_t x / 2, beta_t / 2), beta_t = beta_min + (1 - t)(beta_max - beta_min)."""
        t = _expand(t, x)
        beta = self.beta_min + (1 - t) * (self.beta_max - self.beta_min)
        return -0.5 * beta * x, beta / 2


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}


def _path_name(path) -> str:
    """A path's key in PATHS from its name (any case: SiT writes ``Linear``, ``GVP``, ``VP``) or instance."""
    name = path.name if isinstance(path, Path) else str(path).lower()
    if name not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")
    return name


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")
    return prediction


def resolve_eps(path, prediction: str, train_eps, sample_eps) -> tuple[float, float | None]:
    """SiT's ``create_transport`` rules for (train_eps, sample_eps):

    * linear / gvp with velocity (or x) prediction: (0, 0) whatever was passed;
    * linear / gvp with score or noise prediction: (1e-3, 1e-3) when train_eps is None, else both as passed;
    * vp (any prediction): (1e-5, 1e-3) when train_eps is None, else both as passed.

    When train_eps is None a passed sample_eps is ignored; passing train_eps without sample_eps leaves
    sample_eps None (as SiT, whose sampling then fails)."""
    name, prediction = _path_name(path), _check_prediction(prediction)
    if name in ("linear", "gvp") and prediction in VELOCITY_LIKE:
        return 0.0, 0.0
    if train_eps is None:
        return (1e-5, 1e-3) if name == "vp" else (1e-3, 1e-3)
    return float(train_eps), None if sample_eps is None else float(sample_eps)


def interval(path, prediction: str, eps: float, *, sde: bool = False, diffusion_form: str = "",
             last_step_size: float = 0.0, reverse: bool = False) -> tuple[float, float]:
    """SiT's ``check_interval``: the (t0, t1) a transport trains on (eps = train_eps) or samples on (eps =
    sample_eps; ``last_step_size`` only for an SDE, whose last step then covers [1 - last_step_size, 1]).

    * vp: t0 = 0; t1 = 1 - eps, or 1 - last_step_size for an SDE with last_step_size > 0;
    * linear / gvp, velocity (or x), ODE or training: (0, 1);
    * linear / gvp otherwise: t0 = eps for score / noise prediction or an SBDM SDE, else 0; t1 as for vp.
    * ``reverse``: (1 - t0, 1 - t1)."""
    name, prediction = _path_name(path), _check_prediction(prediction)
    t0, t1 = 0.0, 1.0
    end = 1 - last_step_size if (sde and last_step_size > 0) else 1 - eps
    if name == "vp":
        t1 = end
    elif prediction not in VELOCITY_LIKE or sde:
        t0 = eps if (sde and diffusion_form == "SBDM") or prediction not in VELOCITY_LIKE else 0.0
        t1 = end
    if reverse:
        t0, t1 = 1 - t0, 1 - t1
    return float(t0), float(t1)
