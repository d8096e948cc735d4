"""From config sections to objects: backbones by ``model.name``, objectives by ``diffusion.kind``. The one place
the shared package reaches the backbones (uvit/, dit/) and the one table of diffusion kinds."""

from __future__ import annotations

import importlib
import inspect

import ml_collections
from torch import nn

from diffusion.errors import ConfigError

BACKBONES = {"uvit": ("uvit", "UViT"), "dit": ("dit", "DiT")}
# The repeated transformer block of each backbone: the unit train.fsdp shards and gathers one at a time.
BLOCK_CLASSES = {"uvit": "Block", "dit": "DiTBlock"}
# diffusion.kind -> (module, builder): the builder's keyword arguments are the settings of that kind.
OBJECTIVES = {"vp_sde": ("diffusion.objectives.vp", "build_vp_sde"),
              "sd_discrete": ("diffusion.objectives.vp", "build_sd_discrete"),
              "iddpm": ("diffusion.objectives.iddpm", "build_iddpm"),
              "transport": ("diffusion.objectives.transport", "build_transport")}


def _backbone_module(name: str):
    if name not in BACKBONES:
        raise ConfigError(f"unknown model.name {name!r}; known: {', '.join(BACKBONES)}")
    module_name, class_name = BACKBONES[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module.PRESETS


def block_class(name: str) -> str:
    """Class name of backbone ``name``'s transformer block (what FSDP wraps as one unit)."""
    _backbone_module(name)  # an unknown name is a ConfigError
    return BLOCK_CLASSES[name]


def constructor_keywords(name: str) -> set[str]:
    """Keyword arguments the backbone ``name`` accepts (empty for an unknown name)."""
    if name not in BACKBONES:
        return set()
    cls, _ = _backbone_module(name)
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def constructor_defaults(name: str) -> dict:
    """The default of every keyword argument of backbone ``name`` that has one."""
    cls, _ = _backbone_module(name)
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def resolve_model_kwargs(model_cfg) -> tuple[str, dict]:
    """``{name, preset, **kwargs}`` -> (name, full constructor kwargs): the preset's, then the config's own."""
    cfg = dict(model_cfg.to_dict() if isinstance(model_cfg, ml_collections.ConfigDict) else model_cfg)
    name, preset = cfg.pop("name"), cfg.pop("preset", None)
    _, presets = _backbone_module(name)
    kwargs = {}
    if preset:
        if preset not in presets:
            raise ConfigError(f"unknown {name} preset {preset!r}; known: {', '.join(presets)}")
        kwargs.update(presets[preset])
    kwargs.update({k: v for k, v in cfg.items() if v is not None})
    return name, kwargs


def build_model(model_cfg) -> nn.Module:
    name, kwargs = resolve_model_kwargs(model_cfg)
    cls, _ = _backbone_module(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model section does not fit {cls.__name__}: {err}") from None
    except ValueError as err:  # the backbone refuses a value (a size, a mode): the user's to fix
        raise ConfigError(str(err)) from None


def label_dropout(config, model_name: str, model_kwargs: dict) -> float:
    """The one label-dropout rate: ``cond.p_uncond``, or DiT's ``class_dropout_prob`` (which also sizes its label
    table); a DiT config that sets both to different values is refused rather than silently using one."""
    p = config.cond.p_uncond
    if model_name != "dit":
        return float(p or 0.0)
    cls, _ = _backbone_module(model_name)
    model_p = model_kwargs.get("class_dropout_prob", inspect.signature(cls).parameters["class_dropout_prob"].default)
    if p is not None and float(p) != float(model_p):
        raise ConfigError(f"cond.p_uncond={p} disagrees with model.class_dropout_prob={model_p}; DiT's rate is "
                          f"model.class_dropout_prob (it also adds the null row): set that one, leave cond.p_uncond "
                          f"unset (None)")
    return float(model_p)


def _objective_builder(kind: str):
    if kind not in OBJECTIVES:
        raise ConfigError(f"unknown diffusion.kind {kind!r}; known: {', '.join(OBJECTIVES)}")
    module_name, function = OBJECTIVES[kind]
    return getattr(importlib.import_module(module_name), function)


def diffusion_keywords(kind: str) -> tuple[str, ...]:
    """The settings of diffusion ``kind`` besides ``kind`` itself: its builder's keyword arguments (empty for an
    unknown kind)."""
    if kind not in OBJECTIVES:
        return ()
    return tuple(inspect.signature(_objective_builder(kind)).parameters)


def build_objective(diffusion_cfg):
    """The objective of a ``diffusion`` section: ``kind`` picks the builder, the other keys are its arguments."""
    cfg = dict(diffusion_cfg.to_dict() if isinstance(diffusion_cfg, ml_collections.ConfigDict) else diffusion_cfg)
    kind = cfg.pop("kind")
    builder = _objective_builder(kind)
    unknown = sorted(set(cfg) - set(diffusion_keywords(kind)))
    if unknown:
        raise ConfigError(f"unknown diffusion settings for {kind!r}: {unknown}")
    try:
        return builder(**cfg)
    except ValueError as err:  # a value the builder refuses (a schedule name, a respacing): the user's to fix
        raise ConfigError(str(err)) from None


def attention_paths() -> tuple[str, ...]:
    """The attention paths every backbone offers (each backbone's ``ATTENTION_PATHS``: auto | sdpa | math)."""
    offered = [importlib.import_module(_backbone_module(name)[0].__module__).ATTENTION_PATHS for name in BACKBONES]
    return tuple(path for path in offered[0] if all(path in paths for paths in offered))


def set_attention(net: nn.Module, path: str) -> nn.Module:
    """Route every attention layer of ``net`` through ``path`` (one of :func:`attention_paths`). A speed choice
    only: the paths compute the same function, and no weight or checkpoint key depends on it."""
    layers = [m for m in net.modules() if hasattr(m, "attention_path")]
    known = importlib.import_module(type(net).__module__).ATTENTION_PATHS
    if path not in known:
        raise ConfigError(f"unknown attention path {path!r}; known: {', '.join(known)}")
    for layer in layers:
        layer.attention_path = path
    return net
