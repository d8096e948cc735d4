"""Per-sample randomness: sample i's noise and label depend only on (seed, i)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion.config.schema import LABEL_MODES
from diffusion.errors import ConfigError
from diffusion.seeds import derive_seed

_NOISE, _LABELS = 0, 1  # independent random streams of one sample


def index_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for one random stream of sample ``index`` (``derive_seed(seed, index, stream)``), so that nearby
    (seed, index) pairs give unrelated streams. Sample jobs on disk hold samples drawn with it: never change it."""
    return derive_seed(seed, index, stream)


class PerSampleNoise:
    """``randn(x)`` for the samplers: row k of every draw comes from the generator of sample ``indices[k]``.

    Draws are made on the CPU in float32, then moved to ``x``'s device and dtype, so a sample is identical on
    any device and in any batch."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(index_seed(seed, int(i), _NOISE)) for i in indices]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"randn got a batch of {x.shape[0]}, but there are {len(self.generators)} samples")
        draws = [torch.randn(x.shape[1:], generator=g) for g in self.generators]
        return torch.stack(draws).to(x.device, x.dtype)


def _uniforms(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """One U[0, 1) float64 per sample from its label stream."""
    gens = [torch.Generator().manual_seed(index_seed(seed, int(i), _LABELS)) for i in indices]
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])


@dataclass
class LabelPlan:
    """The class of sample ``i``, a pure function of (seed, i), so chunks drawn anywhere agree.

    ``uniform``: uniform over the classes (DiT's evaluation). ``balanced``: class ``perm[i mod K]`` with a
    seed-fixed permutation, so any K consecutive samples hold every class once. ``train_freq``: drawn with the
    training set's class frequencies ``class_counts`` (U-ViT's ImageNet 64 evaluation). ``given``: the list
    ``given`` repeated.
    """

    mode: str
    num_classes: int
    seed: int = 0
    given: list[int] | None = None
    class_counts: list[int] | None = None
    _perm: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.mode not in (*LABEL_MODES, "given"):
            raise ConfigError(f"unknown label distribution {self.mode!r}; choose one of {', '.join(LABEL_MODES)}")
        if self.num_classes < 1:
            raise ConfigError("labels need a class-conditional model")
        if self.mode == "given":
            check_labels(self.given or [], self.num_classes)
            if not self.given:
                raise ConfigError("no labels given")
        if self.mode == "train_freq" and len(self.class_counts or []) != self.num_classes:
            raise ConfigError(f"train_freq needs {self.num_classes} class counts (the model's classes), got "
                              f"{len(self.class_counts or [])}")
        if self.mode == "balanced":
            self._perm = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(
                index_seed(self.seed, 0, _LABELS + 1)))

    def __call__(self, indices: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.mode == "given":
            return torch.tensor(self.given)[idx % len(self.given)]
        if self.mode == "balanced":
            return self._perm[idx % self.num_classes]
        u = _uniforms(self.seed, indices)
        if self.mode == "uniform":
            return (u * self.num_classes).long().clamp_(max=self.num_classes - 1)
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        cdf = counts.cumsum(0) / counts.sum()
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self.num_classes - 1)

    def describe(self) -> dict:
        """What decides the labels, for a job's settings record."""
        out = {"mode": self.mode, "num_classes": self.num_classes}
        if self.mode == "given":
            out["given"] = list(self.given)
        if self.mode == "train_freq":
            out["class_counts_sha256"] = hashlib.sha256(json.dumps(self.class_counts).encode()).hexdigest()[:16]
        return out


def check_labels(labels: Sequence[int], num_classes: int) -> None:
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")


def class_counts_from_folder(folder: str | Path) -> list[int]:
    """Images per class of an ImageFolder tree (class = sorted sub-folder, as torchvision numbers them)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(os.fspath(folder))
    counts = [0] * len(classes)
    for _, label in make_dataset(os.fspath(folder), class_to_idx, extensions=IMG_EXTENSIONS):
        counts[label] += 1
    return counts


def training_class_counts(config, meta: dict) -> list[int]:
    """Class frequencies of the training set: the checkpoint's ``meta["class_counts"]``, else counted from the
    ImageFolder tree at ``config.data.root/train``."""
    if meta.get("class_counts"):
        return list(meta["class_counts"])
    folder = Path(config.data.root) / "train"
    try:
        return class_counts_from_folder(folder)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(
            f"--label_dist train_freq needs the training set's class frequencies: the checkpoint records no "
            f"class_counts and {folder} is not an ImageFolder tree ({err}). Point --config.data.root at the "
            f"dataset (its train/ folder is counted), or use --label_dist uniform|balanced") from None
