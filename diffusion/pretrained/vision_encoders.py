"""REPA's frozen pretrained vision encoders: DINOv2 (timm or transformers) and CLIP ViT-L/14 (transformers).

Names as REPA's ``--enc-type`` spells them, comma-separated for several: ``dinov2-vit-s|b|l|g`` (patch 14), the
register variants ``dinov2-vit-b-reg`` (REPA's parser also accepts ``dinov2reg-vit-b``) and ``clip-vit-L``.

Weights are only read from disk, never downloaded: ``weights`` is a local file (``.pth``/``.pt``/``.bin``/
``.safetensors``, in torch.hub's facebookresearch/dinov2 layout or timm's), a folder (a transformers
``save_pretrained`` folder, or a timm hub folder holding ``model.safetensors``), or a Hugging Face hub id already in
the local cache. Empty ``weights`` looks in the caches the usual tools fill: torch.hub's ``checkpoints/`` (where
REPA's ``torch.hub.load`` puts ``dinov2_vitb14_pretrain.pth``), then the Hugging Face cache (timm's
``timm/vit_base_patch14_dinov2.lvd142m``, transformers' ``facebook/dinov2-base``, ``openai/clip-vit-large-patch14``).
Anything missing is one :class:`WeightsNotFoundError` saying where to put the weights and how to get them.

As REPA (``train.py``): an encoder sees ``224 * resolution / 256`` px inputs, so its token grid is
``resolution / 16`` per side (256 tokens at 256 px, 1024 at 512 px: one per SiT-2 latent patch), the DINOv2
position embedding is resampled to that grid once at load, and :meth:`VisionEncoder.preprocess` is REPA's
``preprocess_raw_image``. Features are DINOv2's ``x_norm_patchtokens`` and, for CLIP, the last transformer layer's
patch tokens before ``ln_post`` (REPA's ``UpdatedVisionTransformer``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.errors import ConfigError, InputError, WeightsNotFoundError
from diffusion.pretrained import dinov2
from diffusion.weights import read_weights_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINOV2_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
CLIP_WIDTH = 1024  # ViT-L/14
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
NAMES = [f"dinov2-vit-{s}{r}" for r in ("", "-reg") for s in DINOV2_SIZES] + ["clip-vit-L"]


class EncoderSizeWarning(UserWarning):
    """The weights' width differs from the size the encoder's name says (e.g. ViT-L weights for dinov2-vit-b)."""


@dataclass(frozen=True)
class EncoderSpec:
    """One parsed name: ``family`` 'dinov2' or 'clip', ``size`` s|b|l|g (DINOv2) or 'L' (CLIP), registers."""

    name: str
    family: str
    size: str
    registers: bool = False

    @property
    def expected_width(self) -> int:
        return CLIP_WIDTH if self.family == "clip" else DINOV2_SIZES[self.size][1]

    @property
    def timm_arch(self) -> str:
        return f"vit_{DINOV2_SIZES[self.size][0]}_patch14{'_reg4' if self.registers else ''}_dinov2"

    @property
    def hub_file(self) -> str:  # torch.hub's file name (and REPA's source)
        return f"dinov2_vit{self.size}14{'_reg4' if self.registers else ''}_pretrain.pth"

    @property
    def hf_repos(self) -> tuple[str, ...]:
        if self.family == "clip":
            return ("openai/clip-vit-large-patch14",)
        size = DINOV2_SIZES[self.size][0]
        registers = "with-registers-" if self.registers else ""
        return (f"timm/{self.timm_arch}.lvd142m", f"facebook/dinov2-{registers}{size}")


def parse_name(name: str) -> EncoderSpec:
    parts = name.strip().split("-")
    kind, rest = parts[0].lower(), parts[3:]
    if len(parts) >= 3 and parts[1] == "vit" and kind in ("dinov2", "dinov2reg") and \
            parts[2].lower() in DINOV2_SIZES and rest in ([], ["reg"]) and not (kind == "dinov2reg" and rest):
        size, registers = parts[2].lower(), kind == "dinov2reg" or rest == ["reg"]
        return EncoderSpec(f"dinov2-vit-{size}{'-reg' if registers else ''}", "dinov2", size, registers)
    if len(parts) == 3 and kind == "clip" and parts[1] == "vit" and parts[2] in ("L", "l"):
        return EncoderSpec("clip-vit-L", "clip", "L")
    raise ConfigError(f"unknown vision encoder {name!r}; expected one of {', '.join(NAMES)} (comma-separated for "
                      "several). REPA's mocov3, dinov1, mae and jepa encoders are not available here.")


def how_to_get(spec: EncoderSpec) -> str:
    """The fix: where to put the weights of ``spec`` and how to get them (on a machine with network)."""
    if spec.family == "clip":
        return ("Get CLIP ViT-L/14 once, then point weights at it (nothing is downloaded at run time):\n"
                "  * `huggingface-cli download openai/clip-vit-large-patch14 --local-dir assets/clip-vit-large-patch14`"
                ", then weights=assets/clip-vit-large-patch14 (the text encoder's folder is the same one)\n"
                "  * or `huggingface-cli download openai/clip-vit-large-patch14` into the Hugging Face cache and "
                "leave weights empty.")
    timm_repo, hf_repo = spec.hf_repos
    folder = spec.hub_file.split("_")[1]
    return (f"Get the {spec.name} weights once, then point weights at them (nothing is downloaded at run time):\n"
            f"  * REPA's file: `wget -P {Path(torch.hub.get_dir()) / 'checkpoints'} "
            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{folder}/{spec.hub_file}` (torch.hub's cache, found with "
            f"weights empty; or save it anywhere and set weights=PATH)\n"
            f"  * timm's copy: `huggingface-cli download {timm_repo}` (the Hugging Face cache; weights empty)\n"
            f"  * transformers' copy: `huggingface-cli download {hf_repo} --local-dir assets/{hf_repo.split('/')[1]}`, "
            f"then weights=assets/{hf_repo.split('/')[1]}")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (REPA's ``preprocess_raw_image``)
# ----------------------------------------------------------------------------------------------------------------
def encoder_input_size(resolution: int) -> int:
    """224 px per 256 px of image: the encoder's grid is ``resolution / 16`` tokens per side at patch 14."""
    if resolution <= 0 or resolution % 16:
        raise ConfigError(f"resolution {resolution} must be a positive multiple of 16: the encoders see "
                          "224 * resolution / 256 px, resolution / 16 patches of 14 px per side")
    return 224 * resolution // 256


def _normalize(x: Tensor, mean, std) -> Tensor:
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def preprocess_raw_images(images: Tensor, family: str, input_size: int) -> Tensor:
    """(B, 3, H, W) uint8 (or float in 0..255) -> float32 encoder input (B, 3, input_size, input_size).

    ``/255``, then DINOv2: ImageNet normalisation **then** bicubic resize; CLIP: bicubic resize **then** CLIP's
    normalisation (REPA's order). ``F.interpolate(mode="bicubic")`` with align_corners False and no antialias."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    x = images.float() / 255.0
    if family == "clip":
        x = F.interpolate(x, input_size, mode="bicubic")
        return _normalize(x, CLIP_MEAN, CLIP_STD)
    x = _normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return F.interpolate(x, input_size, mode="bicubic")


# ----------------------------------------------------------------------------------------------------------------
# The frozen encoder
# ----------------------------------------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """A frozen vision encoder: ``forward(images)`` -> (B, tokens, embed_dim) patch features, under no_grad.

    Attributes: ``name`` (canonical, e.g. 'dinov2-vit-b'), ``family`` ('dinov2' | 'clip'), ``embed_dim``,
    ``patch_size``, ``input_size`` (px), ``resolution`` (the images' px it was set up for), ``num_tokens``
    (``(input_size / patch_size)**2``), ``backend`` ('timm' | 'transformers'), ``source`` (where the weights came
    from). Always in eval mode (``.train()`` keeps it there) with every parameter's requires_grad False."""

    def __init__(self, model: nn.Module, *, spec: EncoderSpec, embed_dim: int, patch_size: int, resolution: int,
                 backend: str, prefix_tokens: int, source: str):
        super().__init__()
        self.model = model
        self.name, self.family = spec.name, spec.family
        self.embed_dim, self.patch_size = int(embed_dim), int(patch_size)
        self.resolution, self.input_size = int(resolution), encoder_input_size(resolution)
        self.num_tokens = (self.input_size // self.patch_size) ** 2
        self.backend, self.prefix_tokens, self.source = backend, int(prefix_tokens), str(source)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VisionEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """REPA's ``preprocess_raw_image`` for this encoder, on the encoder's device."""
        return preprocess_raw_images(images.to(self.device), self.family, self.input_size)

    @torch.no_grad()
    def features(self, pixels: Tensor) -> Tensor:
        """Preprocessed (B, 3, input_size, input_size) pixels -> (B, num_tokens, embed_dim)."""
        if self.backend == "timm":
            return dinov2.patch_tokens_timm(self.model, pixels)
        return self.model(pixel_values=pixels).last_hidden_state[:, self.prefix_tokens:]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 images (or float in 0..255) -> (B, num_tokens, embed_dim) features."""
        return self.features(self.preprocess(images))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, embed_dim={self.embed_dim}, input_size={self.input_size}, "
                f"tokens={self.num_tokens}, backend={self.backend!r}, source={self.source!r}")


# ----------------------------------------------------------------------------------------------------------------
# Finding the weights (local only)
# ----------------------------------------------------------------------------------------------------------------
def _hf_cached_folder(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "model.safetensors"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found).parent
    return None


def _cache_places(spec: EncoderSpec) -> list[tuple[str, Path | None]]:
    places = []
    if spec.family == "dinov2":
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_file
        places.append((str(hub_file), hub_file if hub_file.is_file() else None))
    from huggingface_hub import constants

    places += [(f"{repo} in the Hugging Face cache {constants.HF_HUB_CACHE}", _hf_cached_folder(repo))
               for repo in spec.hf_repos]
    return places


def locate_weights(spec: EncoderSpec, weights: str = "") -> Path:
    """The local file or folder holding ``spec``'s weights; WeightsNotFoundError (with the fix) when there is none."""
    if weights:
        path = Path(weights).expanduser()
        if path.exists():
            return path
        if weights.count("/") == 1 and not weights.startswith((".", "/", "~")) and \
                not weights.endswith(WEIGHT_SUFFIXES):
            cached = _hf_cached_folder(weights)
            if cached is not None:
                return cached
            raise WeightsNotFoundError(f"{spec.name}: {weights!r} is no local file or folder, and as a Hugging Face "
                                       f"hub id it is not in the local cache (nothing is downloaded at run time)."
                                       f"\n{how_to_get(spec)}")
        raise WeightsNotFoundError(f"{spec.name} weights not found: no file or folder {weights!r}.\n"
                                   f"{how_to_get(spec)}")
    places = _cache_places(spec)
    for _, found in places:
        if found is not None:
            return found
    looked = "".join(f"\n  - {where}" for where, _ in places)
    raise WeightsNotFoundError(f"{spec.name}: no weights given and none in the local caches; looked at:{looked}\n"
                               f"{how_to_get(spec)}")


def _folder_model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        return ""
    try:
        return str(json.loads(config.read_text()).get("model_type", ""))
    except (ValueError, AttributeError):
        return ""


def _weights_file_in(folder: Path, spec: EncoderSpec) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", spec.hub_file):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(files) == 1:
        return files[0]
    raise WeightsNotFoundError(f"{spec.name}: the folder {folder} holds {len(files) or 'no'} weights files "
                               f"({', '.join(p.name for p in files) or 'none of ' + ', '.join(WEIGHT_SUFFIXES)}) "
                               f"and no transformers config.json; give the file itself.\n{how_to_get(spec)}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _check_width(spec: EncoderSpec, width: int, source) -> None:
    if width != spec.expected_width:
        warnings.warn(f"{source} holds a {width}-wide encoder, but {spec.name} is {spec.expected_width} wide; "
                      f"loading it as it is (check the name and the weights)", EncoderSizeWarning, stacklevel=4)


def _check_registers(spec: EncoderSpec, registers: int, source) -> None:
    if spec.registers != (registers > 0):
        fix = f"{spec.name}-reg" if registers else spec.name.removesuffix("-reg")
        raise ConfigError(f"{source} holds DINOv2 {'with' if registers else 'without'} registers, but {spec.name} "
                          f"is {'with' if spec.registers else 'without'}; name the encoder {fix} or give other "
                          f"weights")


def _load_transformers(spec: EncoderSpec, folder: Path, model_type: str, resolution: int) -> VisionEncoder:
    from transformers import AutoModel, CLIPVisionModel

    wanted = ("clip", "clip_vision_model") if spec.family == "clip" else ("dinov2", "dinov2_with_registers")
    if model_type not in wanted:
        raise ConfigError(f"{folder} holds a transformers {model_type!r} model, not {spec.name} "
                          f"(expected model_type {' or '.join(wanted)})")
    cls = CLIPVisionModel if spec.family == "clip" else AutoModel
    try:
        model = cls.from_pretrained(str(folder), dtype=torch.float32)
    except OSError as error:  # missing or unreadable weight files
        first = (str(error).strip().splitlines() or [""])[0]
        raise WeightsNotFoundError(f"could not load {spec.name} from {folder} ({type(error).__name__}: {first})."
                                   f"\n{how_to_get(spec)}") from None
    config = model.config
    input_size = encoder_input_size(resolution)
    if spec.family == "clip":
        if config.image_size != input_size:
            raise ConfigError(f"{spec.name} sees {config.image_size} px inputs, i.e. resolution "
                              f"{config.image_size * 256 // 224} only (as in REPA); resolution {resolution} needs a "
                              f"DINOv2 encoder")
        prefix = 1
    else:
        registers = int(getattr(config, "num_register_tokens", 0) or 0) if model_type != "dinov2" else 0
        _check_registers(spec, registers, folder)
        if input_size % config.patch_size:
            raise ConfigError(f"{folder}: patch size {config.patch_size} does not divide the {input_size} px input")
        dinov2.resample_transformers_pos_embed(model, input_size)
        prefix = 1 + registers
    _check_width(spec, config.hidden_size, folder)
    return VisionEncoder(model, spec=spec, embed_dim=config.hidden_size, patch_size=config.patch_size,
                         resolution=resolution, backend="transformers", prefix_tokens=prefix, source=str(folder))


def _load_timm(spec: EncoderSpec, file: Path, resolution: int) -> VisionEncoder:
    state = {k: v for k, v in read_weights_file(file).items() if not k.startswith("head.")}  # REPA drops the head
    if dinov2.is_hub_layout(state):
        state = dinov2.hub_to_timm(state)
    dinov2.check_timm_state(state, file)
    _check_registers(spec, state["reg_token"].shape[1] if "reg_token" in state else 0, file)
    width = state["patch_embed.proj.weight"].shape[0]
    _check_width(spec, width, file)
    vit = dinov2.build_timm_dinov2(spec.timm_arch, state, encoder_input_size(resolution), file)
    return VisionEncoder(vit, spec=spec, embed_dim=width, patch_size=vit.patch_embed.patch_size[0],
                         resolution=resolution, backend="timm", prefix_tokens=vit.num_prefix_tokens,
                         source=str(file))


def load_vision_encoder(name: str, *, weights: str = "", resolution: int = 256, device="cpu") -> VisionEncoder:
    """One frozen encoder by REPA's name, its weights from ``weights`` (file, folder, cached hub id) or the local
    caches when empty, set up for ``resolution`` px images; on ``device``."""
    spec = parse_name(name)
    encoder_input_size(resolution)
    path = locate_weights(spec, weights)
    model_type = _folder_model_type(path) if path.is_dir() else ""
    if model_type or spec.family == "clip":
        if not path.is_dir():
            raise ConfigError(f"{spec.name} loads from a transformers folder (CLIPVisionModel or CLIPModel "
                              f"save_pretrained), not {path}.\n{how_to_get(spec)}")
        encoder = _load_transformers(spec, path, model_type, resolution)
    else:
        encoder = _load_timm(spec, _weights_file_in(path, spec) if path.is_dir() else path, resolution)
    return encoder.to(device)


def split_names(names: str) -> list[str]:
    """REPA's ``--enc-type``: comma-separated names; '' or 'None' means no encoder."""
    parts = [n.strip() for n in names.split(",")] if names.strip() not in ("", "None", "none") else []
    if any(not n for n in parts):
        raise ConfigError(f"empty name in the encoder list {names!r}")
    return parts


def load_vision_encoders(names: str, *, weights: str | list[str] | tuple[str, ...] = "", resolution: int = 256,
                         device="cpu") -> list[VisionEncoder]:
    """Several encoders (``names`` comma-separated, as REPA's ``--enc-type``); ``weights`` is empty (every encoder
    from the caches) or one entry per name (a comma-separated string or a list; an empty entry means the caches)."""
    parts = split_names(names)
    if isinstance(weights, str):
        weights = weights.split(",") if weights else []
    weights = list(weights) or [""] * len(parts)
    if len(weights) != len(parts):
        raise ConfigError(f"{len(parts)} encoders ({names!r}) but {len(weights)} weights entries; give one per "
                          f"encoder (comma-separated, empty for the caches) or none")
    return [load_vision_encoder(n, weights=w.strip(), resolution=resolution, device=device)
            for n, w in zip(parts, weights)]
