"""The sampler settings of a config's ``sample`` section: which keys exist, laying one section over another (the one
overlay), and the validated keyword arguments of ``objective.sample`` built once from them.

The ``sample`` section holds the keys every sampler shares (``SHARED_KEYS``: sampler, steps, guidance; and the
autoguidance guide, ``GUIDE_KEYS``, which the loader turns into a network) and, flat
beside them, every sampler's own options (``OPTION_KEYS``). Each objective declares which options each of its
samplers takes (``objective.SAMPLER_OPTIONS``: sampler -> {option: default}); :func:`sampler_settings` hands a sampler
only its own and refuses an option it does not take that is set away from its default.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass

from diffusion.config.schema import base_config
from diffusion.errors import ConfigError
from diffusion.sampling.precision import precision_settings

# Every ``sample`` key that decides how a sampler runs: key -> (type, meaning). sample.py's flags, the job records and
# the overlay derive from it.
SHARED_SETTINGS = {
    "sampler": (str, "one of the objective's samplers (diffusion.samplers; iddpm: ddpm, ddim; transport: SiT's ODE "
                     "methods, sde_euler, sde_heun, repa_*, jit_heun)"),
    "steps": (int, "network evaluations"),
    "guidance_scale": (float, "guidance scale w in eps_u + w (eps_c - eps_u) (1 = none)"),
    "guidance_channels": (str, "all, or k: guide only the first k channels"),
    "guide": (str, "autoguidance: the guide network (checkpoint dir, run dir, released name, or weights file with "
                   "guide_config) in place of CFG's unconditional branch; '' = CFG"),
    "guide_config": (str, "the config file of a guide weights file (sample.guide)"),
}
# Shared keys the loader resolves to a network (the guide) rather than keywords of objective.sample: flags and job
# records (the guide's resolved path), never passed as strings to a sampler.
GUIDE_KEYS = ("guide", "guide_config")
OPTION_SETTINGS = {  # each taken only by the samplers that declare it (objective.SAMPLER_OPTIONS)
    "order": (int, "VP singlestep DPM-Solver: highest order (1-3)"),
    "t_end": (float, "VP: last time of the continuous-time samplers (default: the sampler's)"),
    "skip_type": (str, "VP DPM-Solver and DDIM: time grid, logSNR | time_uniform"),
    "eta": (float, "DDIM stochasticity (0 = deterministic)"),
    "clip_denoised": (bool, "VP / iddpm: clamp x0 predictions to [-1, 1] (default: the objective's setting)"),
    "atol": (float, "transport, adaptive ODE methods (dopri5): absolute tolerance"),
    "rtol": (float, "transport, adaptive ODE methods (dopri5): relative tolerance"),
    "diffusion_form": (str, "transport SDE samplers: diffusion coefficient, sigma | constant | SBDM | linear | "
                            "decreasing | increasing-decreasing"),
    "diffusion_norm": (float, "transport SDE samplers: scale of the diffusion coefficient"),
    "last_step": (str, "transport SDE samplers: last step, mean | tweedie | euler | none"),
    "last_step_size": (float, "transport SDE samplers: time the last step covers"),
    "time_shift": (float, "transport ODE/SDE: timestep shift of the grid, SD3's convention (> 1: more steps near "
                          "noise; 1 = none)"),
    "timestep_shift": (float, "transport ODE/SDE: the same shift in LightningDiT's convention (its 0.3 = "
                              "time_shift 1/0.3; 0 = none)"),
    "guidance_t_lo": (float, "transport: guide only from this time on (0 = noise, 1 = data)"),
    "guidance_t_hi": (float, "transport: guide only up to this time"),
}
PRECISION_SETTINGS = {  # how the network and the decoder compute (diffusion/sampling/precision.py): PRECISION_KEYS
    "precision": (str, "autocast of the network and the decoder: fp32 | fp16 (U-ViT) | bf16"),
    "tf32": (bool, "TF32 matmuls while sampling on NVIDIA GPUs (DiT); no effect on CPU"),
}
SAMPLER_SETTINGS = {**SHARED_SETTINGS, **OPTION_SETTINGS, **PRECISION_SETTINGS}
SHARED_KEYS = tuple(k for k in SHARED_SETTINGS if k not in GUIDE_KEYS)  # every sampler's keywords
OPTION_KEYS = tuple(OPTION_SETTINGS)
EMPTY = ("", 0, None)  # an overlay value that means "not set here"


@functools.cache
def _option_defaults() -> dict:
    sample = base_config().sample  # built once: the overlay and the checks ask for every option's default
    return {key: sample[key] for key in OPTION_KEYS}


def option_default(key: str):
    """The ``sample`` section's default of option ``key`` (base_config's)."""
    return _option_defaults()[key]


def overlay(sample_cfg, changes: Mapping, *, skip_empty: bool = True):
    """``sample_cfg`` (a ``sample`` section) with ``changes`` on top: a copy; "" / 0 / None values in ``changes`` are
    not set there (unless ``skip_empty`` is False). When ``changes`` names another sampler, the options of the base
    section belong to the base's sampler: every option ``changes`` does not set returns to its default (the new
    sampler's own), so U-ViT's Euler-Maruyama ``t_end`` 1e-3 does not follow a DPM-Solver preview (whose own is
    1e-4). The one way a section is laid over ``sample``: previews, checkpoint selection, sample.py's flags, the
    benchmark."""
    given = {k: v for k, v in changes.items() if not (skip_empty and v in EMPTY and not isinstance(v, bool))}
    out = copy.deepcopy(sample_cfg)
    if "sampler" in given and given["sampler"] != sample_cfg.sampler:
        for key in OPTION_KEYS:
            if key in out:
                out[key] = option_default(key)
    for key, value in given.items():
        out[key] = value
    return out


def preview_settings(config):
    """The training previews' ``sample`` section: ``config.preview`` laid over ``config.sample``."""
    return overlay(config.sample, config.preview.to_dict())


@dataclass(frozen=True)
class SamplerSettings:
    """Validated settings of one sampler: ``kwargs`` for ``objective.sample`` (the shared keys and the sampler's own
    options the section sets), and how the network computes (``precision``, ``tf32``)."""

    kwargs: dict
    precision: str = "fp32"
    tf32: bool = False

    def __getitem__(self, key: str):
        return self.kwargs[key]

    @property
    def record(self) -> dict:
        """What a job record stores of them."""
        return {**self.kwargs, "precision": self.precision, "tf32": self.tf32}


def sampler_settings(objective, sample_cfg) -> SamplerSettings:
    """The ``sample`` section -> :class:`SamplerSettings` for ``objective``, validated once: the sampler must be one of
    the objective's, its options valid, and no other sampler's option may be set away from its default (a
    ConfigError naming it and the sampler's own)."""
    if isinstance(sample_cfg, SamplerSettings):
        return sample_cfg
    sampler, table = sample_cfg.sampler, objective.SAMPLER_OPTIONS
    if sampler not in table:
        raise ConfigError(f"unknown sampler {sampler!r} for {type(objective).__name__}; choose one of "
                          f"{', '.join(table)}")
    own = table[sampler]
    foreign = [k for k in OPTION_KEYS if k not in own and k in sample_cfg and sample_cfg[k] != option_default(k)]
    if foreign:
        raise ConfigError(f"sample.{foreign[0]}={sample_cfg[foreign[0]]!r} does not apply to sampler {sampler!r} of "
                          f"{type(objective).__name__} (its own options: {', '.join(own) or 'none'}): leave it at "
                          f"{option_default(foreign[0])!r}")
    channels = str(sample_cfg.guidance_channels)
    if channels != "all" and not (channels.isdigit() and int(channels) > 0):
        raise ConfigError(f"guidance_channels must be 'all' or a positive channel count, got {channels!r}")
    kwargs = {k: sample_cfg[k] for k in SHARED_KEYS}
    kwargs.update({k: sample_cfg[k] for k in own if k in sample_cfg})
    try:  # the objective's own checks of the sampler's options, before any network runs
        objective.check_sampling(sampler, kwargs["steps"], {k: v for k, v in kwargs.items() if k in own})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    arithmetic = precision_settings(sample_cfg)
    return SamplerSettings(kwargs, arithmetic["precision"], arithmetic["tf32"])
