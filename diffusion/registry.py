"""From config sections to objects: backbones by ``model.name``, objectives by ``diffusion.kind``. The one place
the shared package reaches the backbones (uvit/, dit/ and any registered one), through the contract they declare
(:class:`Backbone`), and the one table of diffusion kinds.

A new backbone is a package of its own whose network class satisfies :class:`Backbone` and whose module has a
``PRESETS`` dict, plus one line in ``BACKBONES`` (or a :func:`register_backbone` call, as a test's toy backbone does).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import ml_collections
import torch
from torch import nn

from diffusion.errors import ConfigError

# model.name -> (module, class name): imported on first use.
BACKBONES: dict[str, tuple[str, str]] = {"uvit": ("uvit", "UViT"), "dit": ("dit", "DiT")}
_REGISTERED: dict[str, tuple[type[nn.Module], dict[str, dict]]] = {}  # register_backbone's: name -> (class, presets)
# diffusion.kind -> (module, builder): the builder's keyword arguments are the settings of that kind.
OBJECTIVES = {"vp_sde": ("diffusion.objectives.vp", "build_vp_sde"),
              "sd_discrete": ("diffusion.objectives.vp", "build_sd_discrete"),
              "iddpm": ("diffusion.objectives.iddpm", "build_iddpm"),
              "transport": ("diffusion.objectives.transport", "build_transport")}
CONDITIONINGS = ("none", "class", "text")


@runtime_checkable
class Backbone(Protocol):
    """What every backbone class declares, and all the package may read of a backbone (besides ``forward(x, t,
    **cond)``, ``state_dict`` and nn.Module's own API). Class attributes: ``BLOCK_CLASS`` (the repeated transformer
    block: FSDP's and activation checkpointing's unit), ``ATTENTION_PATHS`` (the values of every attention layer's
    ``attention_path``; ``auto`` | ``sdpa`` | ``math`` at least). Per instance:"""

    BLOCK_CLASS: type[nn.Module]
    ATTENTION_PATHS: tuple[str, ...]
    conditioning: str  # "none" | "class" (forward takes y) | "text" (forward takes context)
    num_labels: int  # classes a user may ask for (the null label excluded); 0 unless class-conditional
    null_label: int | None  # the label meaning "no class" (classifier-free guidance), else None
    label_dropout: float | None  # a label-dropout rate the network was built for (DiT's class_dropout_prob), or None
    context_shape: tuple[int, int] | None  # (tokens, width) of the text context; None unless text-conditioned
    input_shape: tuple[int, int, int]  # (C, H, W) of x
    hidden_size: int  # token width
    token_grid: int  # patches per side

    def tap_blocks(self) -> tuple[list[nn.Module], int, int | None]:
        """(the blocks in forward order, where the patch tokens start in a block's output, how many: None = rest)."""


_CONTRACT_FIELDS = ("conditioning", "num_labels", "null_label", "label_dropout", "context_shape", "input_shape",
                    "hidden_size", "token_grid")


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone's declared contract, read once (:func:`describe`)."""

    conditioning: str
    num_labels: int
    null_label: int | None
    label_dropout: float | None
    context_shape: tuple[int, int] | None
    input_shape: tuple[int, int, int]
    hidden_size: int
    token_grid: int
    block_class: type[nn.Module]
    attention_paths: tuple[str, ...]


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside DDP (``module``), ``torch.compile`` (``_orig_mod``) and the sampling wrappers
    (``model``)."""
    while not isinstance(model, Backbone):
        inner = next((m for name in ("module", "_orig_mod", "model")
                      if isinstance(m := getattr(model, name, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner
    return model


def describe(net: nn.Module) -> BackboneInfo:
    """The contract of the backbone ``net`` (or of the one it wraps); a TypeError names what it does not declare."""
    net = unwrap(net)
    missing = [f for f in (*_CONTRACT_FIELDS, "tap_blocks", "BLOCK_CLASS", "ATTENTION_PATHS") if not hasattr(net, f)]
    if missing:
        raise TypeError(f"{type(net).__name__} does not satisfy the backbone contract (diffusion.registry.Backbone): "
                        f"it lacks {', '.join(missing)}")
    info = BackboneInfo(**{f: getattr(net, f) for f in _CONTRACT_FIELDS}, block_class=net.BLOCK_CLASS,
                        attention_paths=tuple(net.ATTENTION_PATHS))
    if info.conditioning not in CONDITIONINGS:
        raise TypeError(f"{type(net).__name__}.conditioning is {info.conditioning!r}; one of {CONDITIONINGS}")
    return info


def tap_blocks(net: nn.Module) -> tuple[list[nn.Module], int, int | None]:
    """The contract's ``tap_blocks`` of the backbone ``net`` wraps (REPA's forward hooks go on these)."""
    describe(net)
    return unwrap(net).tap_blocks()


def register_backbone(name: str, cls: type[nn.Module], presets: dict[str, dict] | None = None) -> None:
    """Make ``cls`` buildable as ``model.name = name`` (a backbone outside this repository, or a test's)."""
    missing = [f for f in ("BLOCK_CLASS", "ATTENTION_PATHS", "tap_blocks") if not hasattr(cls, f)]
    if missing:
        raise TypeError(f"{cls.__name__} does not satisfy the backbone contract: it lacks {', '.join(missing)}")
    _REGISTERED[name] = (cls, dict(presets or {}))


def backbone_names() -> tuple[str, ...]:
    return (*BACKBONES, *(n for n in _REGISTERED if n not in BACKBONES))


def _backbone_module(name: str):
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BACKBONES:
        raise ConfigError(f"unknown model.name {name!r}; known: {', '.join(backbone_names())}")
    module_name, class_name = BACKBONES[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module.PRESETS


def block_class(name: str) -> str:
    """Class name of backbone ``name``'s transformer block (what FSDP wraps as one unit)."""
    return _backbone_module(name)[0].BLOCK_CLASS.__name__


def constructor_keywords(name: str) -> set[str]:
    """Keyword arguments the backbone ``name`` accepts (empty for an unknown name)."""
    if name not in backbone_names():
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


def label_dropout(config, net: nn.Module) -> float:
    """The one label-dropout rate: ``cond.p_uncond``, or the rate the backbone was built for (its contract's
    ``label_dropout``: DiT's ``class_dropout_prob``, which also sizes its label table); a config that sets both to
    different values is refused rather than silently using one."""
    p, built = config.cond.p_uncond, describe(net).label_dropout
    if built is None:
        return float(p or 0.0)
    if p is not None and float(p) != float(built):
        raise ConfigError(f"cond.p_uncond={p} disagrees with the backbone's own rate {built} (DiT: "
                          f"model.class_dropout_prob, which also adds the null row): set that one, leave "
                          f"cond.p_uncond unset (None)")
    return float(built)


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
    """The attention paths every backbone offers (each backbone class's ``ATTENTION_PATHS``: auto | sdpa | math)."""
    offered = [_backbone_module(name)[0].ATTENTION_PATHS for name in backbone_names()]
    return tuple(path for path in offered[0] if all(path in paths for paths in offered))


def set_attention(net: nn.Module, path: str) -> nn.Module:
    """Route every attention layer of ``net`` through ``path`` (one of its ``ATTENTION_PATHS``). A speed choice
    only: the paths compute the same function, and no weight or checkpoint key depends on it."""
    known = describe(net).attention_paths
    if path not in known:
        raise ConfigError(f"unknown attention path {path!r}; known: {', '.join(known)}")
    for layer in (m for m in net.modules() if hasattr(m, "attention_path")):
        layer.attention_path = path
    return net


def input_shape(model_cfg) -> tuple[int, int, int]:
    """(C, H, W) the backbone of a ``model`` section takes, from its contract (built on the meta device: nothing
    is allocated)."""
    with torch.device("meta"):
        return tuple(describe(build_model(model_cfg)).input_shape)
