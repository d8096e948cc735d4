"""The datasets that train on cached autoencoder features, and the reading of an extraction folder's manifest.

The folders are written by :mod:`diffusion.data.extraction`, whose docstring specifies their files and tensors.
A folder extracted with REPA encoders (``--repa_encoders``) gives every item ``"repa_features"`` too: a list, one
float32 (tokens, dim) per encoder in the manifest's ``repa_encoders`` order, of the same view (original or flip) as
the item's latent.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.errors import ConfigError, DatasetNotFoundError, InputError
from diffusion.pretrained.autoencoder import sample_posterior

# The names of an extraction folder's files, and the format its manifest and shards declare.
MANIFEST, SETTINGS = "manifest.json", "extraction.json"
CAPTIONS, NULL_CONTEXT = "captions.json", "null_context.safetensors"  # MS-COCO only
FORMAT = "transformer-diffusion/cached-features"
VERSION = 1
REPA_SETTINGS = "repa_encoders"  # the settings / manifest key listing the stored REPA encoders' features


def repa_key(encoder_name: str) -> str:
    """The shard key of one REPA encoder's features, e.g. ``repa_dinov2-vit-b``."""
    return f"repa_{encoder_name}"


def vision_encoder_digest(encoder: torch.nn.Module) -> str:
    """sha256 of a loaded vision encoder's state (every tensor's name, dtype, shape and bytes, in name order): the
    weights identity the manifest records and training compares (the position table is the one resampled for the
    encoder's resolution, so the digest also depends on it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_manifest(root: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a finished extraction (of ``kind``: imagefolder | coco, if given)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        unfinished = " It holds an unfinished extraction: rerun its command to finish it." if \
            (Path(root) / SETTINGS).is_file() else ""
        raise DatasetNotFoundError(f"no cached features at {root}: {path} not found.{unfinished} Make them with "
                                   f"scripts/extract_latents.py (ImageNet) or scripts/extract_coco.py (MS-COCO).")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a manifest of this project's cached features (format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r})")
    if kind is not None and manifest["kind"] != kind:
        reader = {dataset.kind: dataset.name for dataset in _DATASETS}.get(manifest["kind"], "?")
        raise ConfigError(f"{root} holds {manifest['kind']} features, but this dataset reads {kind} features; "
                          f"use data.name={reader}")
    return manifest


def load_captions(root: str | os.PathLike) -> list[dict[str, Any]]:
    """COCO captions of a feature folder, in dataset order: [{"index", "image_id", "file_name", "captions"}, ...]."""
    manifest = read_manifest(root, "coco")
    return json.loads((Path(root) / manifest["captions"]).read_text())


def _expect(root: Path, manifest: dict[str, Any], key: str, expected: Any, flag: str, config_key: str) -> None:
    if expected is not None and manifest[key] != expected:
        raise ConfigError(f"{root} was extracted with {key} {manifest[key]!r}, but the config says "
                          f"{config_key}={expected!r}. Re-extract with {flag} {expected}, or set "
                          f"--config.{config_key}={manifest[key]}")


def _check_autoencoder(root: Path, manifest: dict[str, Any], expected: str | None,
                       encoder_digest: Callable[[str], str] | None) -> None:
    """The config's autoencoder must have the encoder that made the cache: compared by its weights where the
    manifest records their digest (so a file with the same encoder and another decoder serves too), else by name."""
    recorded = manifest.get("encoder_sha256")
    if expected is None or recorded is None or encoder_digest is None:
        _expect(root, manifest, "autoencoder", expected, "--autoencoder", "autoencoder.pretrained")
        return
    digest = encoder_digest(manifest.get("autoencoder_dtype", "fp32"))
    if digest != recorded:
        raise ConfigError(f"{root} was extracted with autoencoder {manifest['autoencoder']!r}, whose encoder weights "
                          f"differ from those of the config's autoencoder.pretrained={expected!r} (encoder sha256 "
                          f"{recorded[:12]} there, {digest[:12]} here; only the decoder may differ). Re-extract with "
                          f"--autoencoder {expected}, or set --config.autoencoder.pretrained={manifest['autoencoder']}")


class _CachedFeatures(Dataset):
    """Both cached datasets: manifest checks, global index -> (shard, row), and shards memory-mapped by safetensors,
    opened lazily in each process (open handles cannot be pickled into DataLoader workers)."""

    name: str  # the data.name that builds it
    kind: str  # the extraction kind it reads (the manifest's "kind")

    def __init__(self, root: str | os.PathLike, expect_autoencoder: str | None, expect_resolution: int | None,
                 scale_factor: float | None, verify_checksums: bool,
                 encoder_digest: Callable[[str], str] | None = None) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root, self.kind)
        _check_autoencoder(self.root, self.manifest, expect_autoencoder, encoder_digest)
        _expect(self.root, self.manifest, "resolution", expect_resolution, "--resolution", "data.image_size")
        # The config's scale wins: sampling decodes with it, so training must encode with it too.
        self.scale_factor = float(self.manifest["scale_factor"] if scale_factor is None else scale_factor)
        self.shards = self.manifest["shards"]
        self._ends = np.cumsum([shard["count"] for shard in self.shards], dtype=np.int64)
        self._check_files(verify_checksums)
        self._files: dict[int, Any] = {}
        self.repa_encoders = list(self.manifest.get(REPA_SETTINGS, []))  # the stored REPA features' entries
        self._repa_keys = [entry["key"] for entry in self.repa_encoders]

    def _check_files(self, verify_checksums: bool) -> None:
        """Sizes always (cheap); sha256 of every shard when asked (reads everything once)."""
        for shard in self.shards:
            path = self.root / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise InputError(f"{path} is missing or has the wrong size (manifest: {shard['bytes']} bytes); "
                                 f"delete it and its .json record and rerun the extraction to rewrite it")
            if verify_checksums:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                if digest.hexdigest() != shard["sha256"]:
                    raise InputError(f"{path} fails its sha256 check; delete it and its .json record and rerun the "
                                     f"extraction to rewrite it")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def _locate(self, index: int) -> tuple[Any, int, int]:
        """-> (open shard, shard number, row in the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k = int(np.searchsorted(self._ends, index, side="right"))
        row = index - (int(self._ends[k - 1]) if k else 0)
        if k not in self._files:
            self._files[k] = safe_open(os.fspath(self.root / self.shards[k]["file"]), framework="pt")
        return self._files[k], k, row

    def _repa_features(self, shard: Any, *row: int) -> dict[str, list[Tensor]]:
        """``{"repa_features": [float32 (tokens, dim) per encoder]}`` at ``row`` (shard row[, view]), or {}."""
        if not self._repa_keys:
            return {}
        return {"repa_features": [shard.get_slice(key)[row].float() for key in self._repa_keys]}

    def _posterior_sample(self, moments: Tensor) -> Tensor:
        """(2C, h, w) stored moments -> float32 (C, h, w) scaled latent, a fresh draw at every call."""
        return sample_posterior(moments.float()[None], self.scale_factor)[0]


class LatentDataset(_CachedFeatures):
    """Cached ImageNet-style latents (``scripts/extract_latents.py``): ``{"x": float32 (C, h, w), "y": int64}``
    (and ``"repa_features"`` of the same view when the folder holds them).

    Every read draws a fresh posterior sample ``scale_factor * (mean + std * noise)`` (torch's RNG, seeded per
    DataLoader worker) from the original's or, with ``random_flip``, at random the flipped image's moments.
    ``scale_factor`` None takes the manifest's. ``expect_autoencoder`` / ``expect_resolution`` (the config's
    ``autoencoder.pretrained`` and ``data.image_size``) must match the manifest when given; with
    ``encoder_digest`` (dtype name -> :meth:`~diffusion.pretrained.autoencoder.Autoencoder.encoder_digest` of the
    config's autoencoder) the autoencoder is compared by its encoder's weights where the manifest records them.
    """

    name = "latents"  # its data.name
    kind = "imagefolder"  # the extraction it reads

    def __init__(self, root: str | os.PathLike, *, expect_autoencoder: str | None = None,
                 expect_resolution: int | None = None, scale_factor: float | None = None, random_flip: bool = True,
                 verify_checksums: bool = False, encoder_digest: Callable[[str], str] | None = None) -> None:
        super().__init__(root, expect_autoencoder, expect_resolution, scale_factor, verify_checksums, encoder_digest)
        self.random_flip = random_flip
        self.classes = list(self.manifest["classes"])
        self.class_counts = list(self.manifest["counts"]["per_class"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        shard, _, row = self._locate(index)
        view = int(torch.randint(2, ())) if self.random_flip else 0
        return {"x": self._posterior_sample(shard.get_slice("moments")[row, view]),
                "y": shard.get_slice("label")[row], **self._repa_features(shard, row, view)}


class CocoFeatureDataset(_CachedFeatures):
    """Cached MS-COCO features (``scripts/extract_coco.py``): ``{"x": float32 (C, h, w), "context": float32 (L,
    hidden)}``, a fresh posterior sample and one of the image's captions drawn at random at every read (and
    ``"repa_features"`` when the folder holds them).

    ``null_context`` (L, hidden) is the empty caption's encoding, for caption dropout and guidance. The captions as
    text are in :func:`load_captions`. ``expect_text_encoder`` must match the manifest's CLIP when given.
    """

    name = "coco_latents"
    kind = "coco"

    def __init__(self, root: str | os.PathLike, *, expect_autoencoder: str | None = None,
                 expect_resolution: int | None = None, expect_text_encoder: str | None = None,
                 scale_factor: float | None = None, verify_checksums: bool = False,
                 encoder_digest: Callable[[str], str] | None = None) -> None:
        super().__init__(root, expect_autoencoder, expect_resolution, scale_factor, verify_checksums, encoder_digest)
        _expect(self.root, self.manifest, "text_encoder", expect_text_encoder, "--clip", "text_encoder.pretrained")
        self.null_context = load_file(self.root / self.manifest["null_context"])["null_context"].float()
        self._caption_starts: dict[int, Tensor] = {}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        shard, k, row = self._locate(index)
        if k not in self._caption_starts:
            counts = shard.get_tensor("num_captions")
            self._caption_starts[k] = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        start, stop = self._caption_starts[k][row : row + 2].tolist()
        caption = start + int(torch.randint(stop - start, ()))
        return {"x": self._posterior_sample(shard.get_slice("moments")[row]),
                "context": shard.get_slice("context")[caption].float(), **self._repa_features(shard, row)}


_DATASETS = (LatentDataset, CocoFeatureDataset)
CACHED_FEATURE_DATASETS = tuple(dataset.name for dataset in _DATASETS)  # data.name values that read cached features
