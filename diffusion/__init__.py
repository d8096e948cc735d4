"""U-ViT and DiT diffusion in layers: objectives and samplers, data, training, sampling and evaluation.

The public API, for a script of your own, is the names below; they keep working when the modules behind them move:

    from diffusion import load_config, build_model, build_objective, load_for_sampling, generate

Each is imported on first use, so ``import diffusion`` stays cheap.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_PUBLIC = {
    "load_config": "diffusion.config.loading",  # config file -> ml_collections.ConfigDict
    "apply_override": "diffusion.config.loading",  # one --config.a.b=value on a ConfigDict
    "build_model": "diffusion.registry",  # config.model -> backbone (uvit/ or dit/)
    "build_objective": "diffusion.registry",  # config.diffusion -> objective (training_losses, sample)
    "train": "diffusion.training.loop",  # config, workdir -> final checkpoint (resumes)
    "load_for_sampling": "diffusion.sampling.loader",  # checkpoint (own, released, weights file) -> ready sampler
    "generate": "diffusion.sampling.generate",  # model, objective, sample settings -> images in [-1, 1]
    "UserError": "diffusion.errors",  # every error a user fixes (entry points: one line, exit status 2)
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
