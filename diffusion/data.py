"""Pixel-space datasets, a resumable distributed index stream and a digits sample classifier.

Every dataset built by :func:`build_dataset` yields dicts:

    {"x": float32 tensor (C, H, W) in [-1, 1]}                      unlabelled (celeba64)
    {"x": float32 tensor (C, H, W) in [-1, 1], "y": int64 scalar}   labelled (digits, cifar10, imagenet)

Labelled datasets always carry ``"y"``; the model config decides whether it is used. A random horizontal flip is
applied only when ``train`` and ``cfg.random_flip`` (default True). Data are read in their usual on-disk formats
through torchvision's own loaders; a missing dataset raises :class:`DatasetNotFoundError` saying where it was looked
for and how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.svm import SVC
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import pil_loader
from torchvision.datasets.utils import check_integrity

DATASET_NAMES = ("digits", "cifar10", "celeba64", "imagenet")

CELEBA_CROP = (57, 25, 128)  # top, left, side of the original U-ViT face crop of the aligned 178x218 images
CELEBA_TEXT_FILES = (
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_attr_celeba.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Image transforms


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 image (PIL or HWC / HW array) -> float32 (C, H, W) in [-1, 1]."""
    arr = np.array(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class _ImageTransform:
    """PIL image -> optional geometric preparation -> tensor in [-1, 1] -> optional random horizontal flip.

    A class rather than a closure so that DataLoader workers can pickle it; the flip draws from torch's RNG, which
    the DataLoader seeds differently in every worker.
    """

    def __init__(self, prepare: Callable[[Image.Image], Image.Image | np.ndarray] | None, flip: bool) -> None:
        self.prepare = prepare
        self.flip = flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = _to_tensor(self.prepare(image) if self.prepare is not None else image)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / DiT centre crop: halve with BOX while the short side is >= 2*res, BICUBIC so the short side is res,
    then take the central res x res square. Returns a uint8 (res, res, C) array."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _celeba_crop(pil_image: Image.Image, image_size: int) -> Image.Image:
    """U-ViT's CelebA preparation: 128x128 crop at (top 57, left 25), bilinear resize to image_size."""
    top, left, side = CELEBA_CROP
    face = pil_image.convert("RGB").crop((left, top, left + side, top + side))
    return face.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder loader whose errors name the offending file."""
    try:
        return pil_loader(path)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------------
# Datasets


class _AsDict(Dataset):
    """Turns a torchvision (image, target) dataset into {"x": image[, "y": int64 label]} items."""

    def __init__(self, base: Dataset, labelled: bool) -> None:
        self.base = base
        self.labelled = labelled
        self.classes = list(getattr(base, "classes", [])) if labelled else []

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.base[index]
        if self.labelled:
            return {"x": x, "y": torch.tensor(y, dtype=torch.int64)}
        return {"x": x}


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits, held as one (N, 1, 8, 8) tensor; no train/test split."""

    def __init__(self, random_flip: bool = False) -> None:
        digits = load_digits()
        self.x = torch.from_numpy(digits.images / 16.0 * 2.0 - 1.0).float().unsqueeze(1)
        self.y = torch.from_numpy(digits.target).long()
        self.classes = [str(c) for c in digits.target_names]
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self.x[index]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x, "y": self.y[index]}


class _CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 with switchable md5 verification (copies other than the official files, such as test
    fixtures or subsets, have other checksums). ``check_integrity(path, None)`` only checks the file exists."""

    def __init__(self, *args: Any, verify_checksums: bool = True, **kwargs: Any) -> None:
        if not verify_checksums:  # instance attributes shadow the class lists, which stay untouched
            self.train_list = [[name, None] for name, _ in self.train_list]
            self.test_list = [[name, None] for name, _ in self.test_list]
            self.meta = {**self.meta, "md5": None}
        super().__init__(*args, **kwargs)


class _CelebA(torchvision.datasets.CelebA):
    """torchvision's CelebA with switchable md5 verification of its five annotation files (it never hashes images)."""

    def __init__(self, *args: Any, verify_checksums: bool = True, **kwargs: Any) -> None:
        if not verify_checksums:
            self.file_list = [(file_id, None, name) for file_id, _, name in self.file_list]
        super().__init__(*args, **kwargs)


def _checksum_error(dataset: str, folder: Path, entries: Sequence[tuple[str, str | None]]) -> RuntimeError:
    """Error for files that exist but fail torchvision's md5 check (only computed once loading has failed)."""
    bad = [name for name, md5 in entries if not check_integrity(folder / name, md5)]
    return RuntimeError(
        f"{dataset} files under {folder} fail torchvision's md5 check: {', '.join(bad) or 'unknown'}. Re-extract the "
        f"official archive, or set --config.data.verify_checksums=False for a deliberately modified or subset copy."
    )


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (folder / name).exists()]


def _build_cifar10(cfg: Any, train: bool, flip: bool) -> Dataset:
    root = Path(cfg.root)
    folder = root / _CIFAR10.base_folder
    meta = _CIFAR10.meta
    files = [name for name, _ in _CIFAR10.train_list + _CIFAR10.test_list] + [meta["filename"]]
    download = bool(cfg.get("download", False))
    missing = _missing(folder, files)
    if missing and not download:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Put the extracted `cifar-10-batches-py/` "
            f"folder under {root}, or set --config.data.download=True to let torchvision download it."
        )
    verify = bool(cfg.get("verify_checksums", True))
    transform = _ImageTransform(None, flip)
    try:
        base = _CIFAR10(root, train=train, transform=transform, download=download, verify_checksums=verify)
    except RuntimeError as e:
        entries = [*map(tuple, _CIFAR10.train_list + _CIFAR10.test_list), (meta["filename"], meta["md5"])]
        raise _checksum_error("CIFAR-10", folder, entries) from e
    return _AsDict(base, labelled=True)


def _build_celeba64(cfg: Any, train: bool, flip: bool) -> Dataset:
    root = Path(cfg.root)
    folder = root / _CelebA.base_folder
    download = bool(cfg.get("download", False))
    missing = _missing(folder, ("img_align_celeba", *CELEBA_TEXT_FILES))
    if missing and not download:
        raise DatasetNotFoundError(
            f"CelebA not found: {folder} lacks {', '.join(missing)}. Put the aligned images in "
            f"{folder / 'img_align_celeba'}/ (000001.jpg ...) and the annotation files {', '.join(CELEBA_TEXT_FILES)} "
            f"in {folder}/. torchvision can fetch them with --config.data.download=True (needs `gdown`), but Google "
            f"Drive quotas often make that fail; download manually from the CelebA page if so."
        )
    split = cfg.get("split") or ("train" if train else "valid")
    transform = _ImageTransform(partial(_celeba_crop, image_size=int(cfg.get("image_size", 64))), flip)
    verify = bool(cfg.get("verify_checksums", True))
    try:
        base = _CelebA(root, split=split, target_type=[], transform=transform, download=download,
                       verify_checksums=verify)
    except RuntimeError as e:
        entries = [(name, md5) for _, md5, name in _CelebA.file_list if name in CELEBA_TEXT_FILES]
        raise _checksum_error("CelebA", folder, entries) from e
    return _AsDict(base, labelled=False)


def _build_imagenet(cfg: Any, train: bool, flip: bool) -> Dataset:
    folder = Path(cfg.root) / (cfg.get("split") or ("train" if train else "val"))
    transform = _ImageTransform(partial(center_crop_arr, image_size=int(cfg.image_size)), flip)
    try:
        base = torchvision.datasets.ImageFolder(os.fspath(folder), transform=transform, loader=_load_rgb)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"ImageNet not found at {folder} ({e}). Expected an ImageFolder tree: {folder}/<class, e.g. n01440764>/"
            f"<image>.JPEG, one sub-folder per class (labels follow the sorted folder names); set --config.data.root "
            f"to the folder holding `train/` and `val/`, or --config.data.split to the sub-folder name."
        ) from e
    return _AsDict(base, labelled=True)


def _build_digits(cfg: Any, train: bool, flip: bool) -> Dataset:
    return DigitsDataset(random_flip=flip)


_BUILDERS: dict[str, Callable[[Any, bool, bool], Dataset]] = {
    "digits": _build_digits,
    "cifar10": _build_cifar10,
    "celeba64": _build_celeba64,
    "imagenet": _build_imagenet,
}


def build_dataset(cfg: Any, train: bool = True) -> Dataset:
    """The dataset named by ``cfg.name`` (one of :data:`DATASET_NAMES`), yielding dicts as in the module docstring.

    ``cfg`` needs attribute access and ``.get``: ``name``; ``root`` (all but digits); ``image_size`` (imagenet,
    celeba64 -- default 64); optional ``random_flip`` (True), ``download`` (False), ``verify_checksums`` (True) and
    ``split`` (celeba64: train/valid/test/all; imagenet: the sub-folder of root).
    """
    if cfg.name not in _BUILDERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASET_NAMES)}")
    native = {"digits": 8, "cifar10": 32}.get(cfg.name)
    if native is not None and cfg.get("image_size", native) != native:
        raise ValueError(f"{cfg.name} images are {native}x{native}, but image_size={cfg.image_size}")
    flip = train and bool(cfg.get("random_flip", True))
    return _BUILDERS[cfg.name](cfg, train, flip)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


class InfiniteSampler(Sampler[int]):
    """Endless, deterministic, resumable index stream, sharded over ranks.

    The global stream concatenates epochs; epoch e is ``torch.randperm(n)`` drawn from a generator seeded with
    ``seed + e`` (``arange(n)`` without shuffling). Rank r takes global positions r, r + world_size, ... that are
    >= ``start_index``, the number of global positions already consumed (``step * global_batch_size`` on resume).
    Only the current epoch's permutation is held, and resuming jumps straight to the right epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_index: int = 0,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_index = start_index

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self.start_index + (self.rank - self.start_index) % self.world_size
        epoch, order = -1, []
        while True:
            e, offset = divmod(position, self.dataset_len)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield order[offset]
            position += self.world_size


# ----------------------------------------------------------------------------------------------------------------------
# Digits evaluation

_digits_classifier: SVC | None = None


def make_digits_classifier() -> SVC:
    """The (unfitted) classifier used to judge digit samples: an RBF SVM on the 64 raw pixel values in 0..16."""
    return SVC(gamma=0.001, C=10.0)


def digits_classifier_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples (N, 1, 8, 8) in [-1, 1] that a classifier fit on all 1,797 real digits assigns to the
    given labels (N,). About 1.0 for real digits, about 0.1 for noise with balanced labels."""
    global _digits_classifier
    if samples.shape[1:] != (1, 8, 8) or labels.shape != samples.shape[:1]:
        raise ValueError(f"expected samples (N, 1, 8, 8) and labels (N,), got {tuple(samples.shape)}, "
                         f"{tuple(labels.shape)}")
    if _digits_classifier is None:
        digits = load_digits()
        _digits_classifier = make_digits_classifier().fit(digits.data, digits.target)
    pixels = (samples.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 16
    predicted = _digits_classifier.predict(pixels.reshape(len(pixels), 64).numpy())
    return float((predicted == labels.detach().cpu().numpy()).mean())
