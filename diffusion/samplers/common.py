"""What every sampler shares: the source of its random draws, and the validation of its options."""

from __future__ import annotations

from collections.abc import Callable

import torch

Randn = Callable[[torch.Tensor], torch.Tensor]  # randn(x) -> standard normal shaped like x, on x.device

SKIP_TYPES = ("logSNR", "time_uniform")  # how a DPM-Solver time grid is spaced between t = 1 and t_end
ORDERS = (1, 2, 3)


def standard_normal(randn: Randn | None = None, generator: torch.Generator | None = None) -> Randn:
    """The one source of a sampler's stochastic draws, called once per draw in call order.

    ``randn`` wins when given (the caller owns the stream, e.g. to make sample i depend only on (seed, i)); else
    draws come from ``generator`` on its own device and are moved to x's (a CPU generator gives the same samples on
    any device); else from the global RNG.
    """
    if randn is not None:
        return randn
    if generator is None:
        return torch.randn_like
    return lambda x: torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def check_options(sampler: str, valid: tuple[str, ...], *, steps: int, order: int, skip_type: str | None,
                  eta: float, t_end: float | None) -> None:
    """One ValueError naming the valid choices for anything a sampler cannot run with."""
    if sampler not in valid:
        raise ValueError(f"unknown sampler {sampler!r} for this objective; choose one of {', '.join(valid)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer (network evaluations), got {steps!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if skip_type is not None and skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)} (or None for the "
                         f"sampler's default)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    if t_end is not None and not 0 < t_end < 1:
        raise ValueError(f"t_end must lie in (0, 1) (None = the sampler's default), got {t_end!r}")
