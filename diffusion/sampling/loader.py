"""From a checkpoint to a ready-to-sample model: the one loader behind sample.py and anything else that samples a
saved model.

A checkpoint is a trainer checkpoint directory (or a run directory: its newest checkpoint), a released file known
by name (:mod:`diffusion.released` names its config), or any other weights file in the original formats together
with a config file. :func:`load_for_sampling` reads it, builds the backbone and loads the weights strictly, builds
the objective, applies and checks the sampler settings, and (unless told not to) loads the autoencoder and text
encoder the model needs around it. ``sample.guide`` names an autoguidance guide: loaded the same way
(:func:`load_guide`), checked to live in the model's space (:func:`check_guide_space`), and handed to the sampler
as a network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import torch

from diffusion.checkpoint import load_checkpoint_dir, resolve_checkpoint_dir
from diffusion.config.loading import apply_override, load_config
from diffusion.errors import ConfigError
from diffusion.pretrained.autoencoder import Autoencoder
from diffusion.pretrained.text_encoder import TextEncoder
from diffusion.registry import BackboneInfo, build_model, build_objective, describe, resolve_model_kwargs
from diffusion.registry import input_shape as backbone_input_shape
from diffusion.released import RELEASED, missing_checkpoint, released_config, sampling_state_dict
from diffusion.sampling.pixels import quantize_setting
from diffusion.sampling.precision import check_device
from diffusion.sampling.settings import SamplerSettings, overlay, sampler_settings
from diffusion.weights import load_state_strict, read_weights_file


@dataclass
class ReadyModel:
    """A network with its weights loaded (eval mode), its objective and config, the checkpoint it came from, the
    (C, H, W) it samples in, and the autoencoder / text encoder it needs (None where it needs none)."""

    model: torch.nn.Module
    objective: object
    config: ml_collections.ConfigDict
    meta: dict  # the trainer checkpoint's meta.json; {} for a weights file
    source: Path  # the checkpoint directory or weights file, resolved
    weights: str  # "ema" | "model"
    image_shape: tuple[int, ...]
    autoencoder: Autoencoder | None = None
    text_encoder: TextEncoder | None = None
    guide: torch.nn.Module | None = None  # sample.guide's network (autoguidance), eval mode; None: CFG
    guide_source: Path | None = None  # its checkpoint directory or weights file, resolved

    @property
    def info(self) -> BackboneInfo:
        """The backbone's declared contract (conditioning, labels, shapes)."""
        return describe(self.model)

    @property
    def conditioning(self) -> str:
        """'text' | 'class' | 'none'."""
        return self.info.conditioning

    @property
    def decode(self):
        """latents -> images in [-1, 1] for latent models; None for pixel models."""
        return self.autoencoder.decode if self.autoencoder is not None else None

    @property
    def settings(self) -> SamplerSettings:
        """The sampler's validated settings (the config's ``sample`` section)."""
        return sampler_settings(self.objective, self.config.sample)

    @property
    def arithmetic(self) -> dict:
        """``{"precision", "tf32"}``: how the network and the decoder compute while sampling."""
        settings = self.settings
        return {"precision": settings.precision, "tf32": settings.tf32}

    def with_codecs(self, device) -> ReadyModel:
        """Move the network to ``device`` and load the autoencoder and text encoder it needs there (refusing a
        ``sample.precision`` that ``device`` cannot autocast to)."""
        check_device(self.arithmetic["precision"], device)
        self.model.to(device)
        if self.guide is not None:
            self.guide.to(device)
        self.autoencoder, self.text_encoder = load_codecs(self.config, self.model, device)
        return self


# ----------------------------------------------------------------------------------------------------------
# Checkpoint -> state dict, config, meta
# ----------------------------------------------------------------------------------------------------------


def read_checkpoint(ckpt: str | Path, config_path: str | Path | None = None, weights: str = "ema"):
    """-> (state_dict, config, meta, resolved path) of a checkpoint or run directory, a released file or a weights
    file with ``config_path``."""
    path = Path(ckpt)
    if path.is_dir():
        if config_path:
            raise ConfigError("--config is only for weights files: a checkpoint directory carries its own config "
                              "(use --config.key=value to override parts of it)")
        resolved = resolve_checkpoint_dir(path)
        state, config, meta = load_checkpoint_dir(resolved, weights=weights)
        return state, config, meta, resolved.resolve()
    if not path.is_file():
        raise missing_checkpoint(path)  # a released name: where it was looked for and how to download it
    config_path = config_path or released_config(path.name)
    if config_path is None:
        raise ConfigError(f"{path} is a weights file: add --config=configs/<name>.py describing its model "
                          f"(released files known by name need none: {', '.join(RELEASED)})")
    config = load_config(config_path)
    # a released file's training-only keys (REPA's projectors) are dropped; the rest must load strictly
    return sampling_state_dict(path.name, read_weights_file(path, prefer=weights)), config, {}, path.resolve()


def input_shape(config, meta: dict | None = None) -> tuple[int, int, int]:
    """(C, H, W) the network of ``config`` takes: the trainer's record in ``meta``, else the backbone's declared
    ``input_shape``."""
    if meta and meta.get("image_shape"):
        return tuple(meta["image_shape"])
    return backbone_input_shape(config.model)


def load_codecs(config, model, device) -> tuple[Autoencoder | None, TextEncoder | None]:
    """-> (autoencoder or None, text encoder or None): what latent and text-to-image models need around them."""
    autoencoder = text_encoder = None
    if config.autoencoder.pretrained:
        autoencoder = Autoencoder.from_config(config.autoencoder, device)
    context_shape = describe(model).context_shape
    if context_shape is not None:
        if not config.text_encoder.pretrained:
            raise ConfigError("a text-to-image model needs --config.text_encoder.pretrained (a CLIP folder or hub id)")
        text_encoder = TextEncoder.from_config(config.text_encoder, device)
        width = text_encoder.null_context().shape[-1]
        if width != context_shape[1]:
            raise ConfigError(f"the text encoder gives {width}-d tokens; the model expects {context_shape[1]}-d "
                              f"(model.clip_dim)")
    return autoencoder, text_encoder


# ----------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------


def load_for_sampling(ckpt: str | Path, *, config_path: str | Path | None = None,
                      overrides: Sequence[tuple[str, str]] = (), sample: dict | None = None, ema: bool = True,
                      device="cpu", codecs: bool = True, check_sampler: bool = True,
                      with_guide: bool = True) -> ReadyModel:
    """A checkpoint, ready to sample: ``overrides`` (dotted key, value text) apply to its config, then ``sample``
    (sample-section key -> value, e.g. from command-line flags) to ``config.sample``; the sampler settings are
    checked against the objective. ``codecs=False`` leaves the network on the CPU without autoencoder and text
    encoder (call :meth:`ReadyModel.with_codecs` later). EMA weights unless ``ema=False``. ``check_sampler=False``
    leaves the ``sample`` section unchecked, for uses that do not sample (the likelihood). ``sample.guide``, when
    set, is loaded too (same weights kind, checked against the model's space; ``with_guide=False`` skips it, for
    callers that hold the guide already or do not guide)."""
    weights = "ema" if ema else "model"
    state, config, meta, source = read_checkpoint(ckpt, config_path, weights)
    for key, value in overrides:  # a checkpoint's own config (read_checkpoint), then the overrides
        apply_override(config, key, value)
    model = build_model(config.model)
    what = f"{type(model).__name__} ({config.model.get('preset') or 'no preset'})"
    load_state_strict(model, state, source, what, hint=" (check --config and the --config.model.* overrides)")
    model.eval()
    objective = build_objective(config.diffusion)
    config.sample = overlay(config.sample, sample or {}, skip_empty=False)
    if check_sampler:
        sampler_settings(objective, config.sample)  # refused here, before any codec loads
    ready = ReadyModel(model, objective, config, meta, source, weights, input_shape(config, meta))
    if with_guide and check_sampler:
        loaded = load_guide(config, ready.image_shape, ready.info, ema=ema)
        if loaded is not None:
            ready.guide, ready.guide_source = loaded
    return ready.with_codecs(device) if codecs else ready


def job_settings(ready: ReadyModel, labels, prompts: list[str] | None) -> dict:
    """Everything that decides the samples of an .npz job (recorded; a resume must match it)."""
    config = ready.config
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16] if prompts else None
    return {
        "checkpoint": str(ready.source), "weights": "EMA" if ready.weights == "ema" else "raw",
        "model": resolve_model_kwargs(config.model)[1], "diffusion": config.diffusion.to_dict(),
        "image_shape": list(ready.image_shape),
        "sampler": {**ready.settings.record, "quantize": quantize_setting(config.sample)},
        "seed": config.sample.seed,
        "labels": labels.describe() if labels else None,
        "prompts": {"count": len(prompts), "sha256": digest} if prompts else None,
        "autoencoder": {k: config.autoencoder[k] for k in ("pretrained", "single_file_config", "scale_factor",
                                                           "dtype")} if ready.autoencoder else None,
        "text_encoder": config.text_encoder.to_dict() if ready.text_encoder else None,
        # autoguidance: the guide's resolved checkpoint and weights ("": CFG; jobs.ADDED_SETTINGS reads older
        # records so)
        "guide": {"checkpoint": str(ready.guide_source), "weights": "EMA" if ready.weights == "ema" else "raw"}
        if ready.guide is not None else "",
    }


# ----------------------------------------------------------------------------------------------------------
# Autoguidance: the guide network of sample.guide
# ----------------------------------------------------------------------------------------------------------


def load_guide(config, image_shape, info: BackboneInfo, *, ema: bool = True,
               device="cpu") -> tuple[torch.nn.Module, Path] | None:
    """-> (guide network in eval mode on ``device``, its resolved source) for ``config.sample.guide`` (a checkpoint
    or run directory, a released name, or a weights file with ``sample.guide_config``), or None when it is ""; read
    and loaded strictly as the model is (EMA weights unless ``ema=False``) and refused unless it lives in the space
    of the model (``image_shape``, ``info``, ``config``): :func:`check_guide_space`."""
    sc = config.sample
    name, guide_config = sc.get("guide", ""), sc.get("guide_config", "")
    if not name:
        if guide_config:
            raise ConfigError(f"sample.guide_config={guide_config!r} describes a guide weights file: set "
                              f"sample.guide (--guide=PATH) too, or drop it")
        return None
    path = Path(name)
    if path.is_dir() and guide_config:
        raise ConfigError(f"sample.guide_config is only for a guide weights file: the guide {path} is a checkpoint "
                          f"directory and carries its own config")
    if path.is_file() and not guide_config and released_config(path.name) is None:
        raise ConfigError(f"the guide {path} is a weights file: add --guide_config=configs/<name>.py describing its "
                          f"model (released files known by name need none: {', '.join(RELEASED)})")
    state, gconfig, meta, source = read_checkpoint(path, guide_config or None, "ema" if ema else "model")
    guide = build_model(gconfig.model)
    what = f"guide {type(guide).__name__} ({gconfig.model.get('preset') or 'no preset'})"
    load_state_strict(guide, state, source, what, hint=" (check sample.guide_config)")
    check_guide_space(config, image_shape, info, gconfig, input_shape(gconfig, meta), describe(guide), source)
    return guide.eval().requires_grad_(False).to(device), source


def check_guide_space(config, image_shape, info: BackboneInfo, guide_config, guide_shape, guide_info: BackboneInfo,
                      source) -> None:
    """A ConfigError (one line, naming the mismatch) unless the guide samples what the model samples: the same input
    shape, the same autoencoder (by name and scale, else by the encoder weights' sha256 the latent caches record),
    the same conditioning and label count, and an equal ``diffusion`` section (time convention and prediction). A
    different backbone or size is the point of a guide, and allowed."""
    where = f"the guide {source} does not live in the model's space:"
    if tuple(guide_shape) != tuple(image_shape):
        raise ConfigError(f"{where} it takes inputs of shape {tuple(guide_shape)}, the model {tuple(image_shape)}")
    problem = _autoencoder_mismatch(config.autoencoder, guide_config.autoencoder)
    if problem:
        raise ConfigError(f"{where} {problem}")
    mine = (info.conditioning, info.num_labels, info.context_shape)
    theirs = (guide_info.conditioning, guide_info.num_labels, guide_info.context_shape)
    if mine != theirs:
        raise ConfigError(f"{where} it is conditioned on {_conditioning(guide_info)}, the model on "
                          f"{_conditioning(info)}")
    main_d, guide_d = config.diffusion.to_dict(), guide_config.diffusion.to_dict()
    differing = sorted(k for k in set(main_d) | set(guide_d) if main_d.get(k) != guide_d.get(k))
    if differing:
        shown = ", ".join(f"diffusion.{k} {guide_d.get(k)!r} there, {main_d.get(k)!r} here" for k in differing)
        raise ConfigError(f"{where} another objective ({shown})")


def _conditioning(info: BackboneInfo) -> str:
    if info.conditioning == "class":
        return f"{info.num_labels} class labels"
    return f"text contexts {tuple(info.context_shape)}" if info.conditioning == "text" else "nothing"


def _autoencoder_mismatch(main, guide) -> str:
    """Why two ``autoencoder`` sections do not share a latent space ("" when they do): pixels against latents, the
    scale factor, and for other names the encoders' weights (``Autoencoder.encoder_digest``, as the latent caches
    compare them: only the decoder may differ)."""
    if bool(main.pretrained) != bool(guide.pretrained):
        side = "latents" if guide.pretrained else "pixels"
        return f"it samples {side}, the model {'pixels' if side == 'latents' else 'latents'}"
    if not main.pretrained:
        return ""
    if float(main.scale_factor) != float(guide.scale_factor):
        return f"autoencoder.scale_factor {guide.scale_factor!r} there, {main.scale_factor!r} here"
    same_file = (main.pretrained, main.get("single_file_config", "")) == (guide.pretrained,
                                                                         guide.get("single_file_config", ""))
    if same_file:
        return ""
    digests = [Autoencoder.from_config(section).encoder_digest("fp32") for section in (main, guide)]
    if digests[0] != digests[1]:
        return (f"autoencoder {guide.pretrained!r} there, {main.pretrained!r} here, with other encoder weights "
                f"(sha256 {digests[1][:12]} there, {digests[0][:12]} here)")
    return ""
