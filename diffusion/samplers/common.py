"""What every sampler shares: the source of its random draws, each sampler's own options (a table per objective:
sampler -> {option: default}) and the validation of their values."""

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


def own_options(table: dict[str, dict], sampler: str, steps: int, options: dict) -> dict:
    """``sampler``'s own options: its ``table`` entry's defaults with ``options`` on top. One ValueError for an
    unknown sampler, a keyword the sampler does not take (naming the ones it does) or ``steps`` that is not a positive
    number of evaluations."""
    if sampler not in table:
        raise ValueError(f"unknown sampler {sampler!r} for this objective; choose one of {', '.join(table)}")
    foreign = sorted(set(options) - set(table[sampler]))
    if foreign:
        own = ", ".join(table[sampler]) or "none besides sampler, steps and guidance"
        raise ValueError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to sampler "
                         f"{sampler!r} (its own options: {own})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer (network evaluations), got {steps!r}")
    return {**table[sampler], **options}


def check_options(*, order: int = 3, skip_type: str | None = None, eta: float = 0.0, t_end: float | None = None,
                  clip_denoised: bool | None = None) -> None:
    """One ValueError naming the valid choices for a value the VP and iDDPM samplers cannot run with."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if skip_type is not None and skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)} (or None for the "
                         f"sampler's default)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    if t_end is not None and not 0 < t_end < 1:
        raise ValueError(f"t_end must lie in (0, 1) (None = the sampler's default), got {t_end!r}")
