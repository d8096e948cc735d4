"""The training datasets by name (:func:`build_dataset`): the pixel-space ones (digits, CIFAR-10, CelebA 64,
ImageNet), MS-COCO with its captions, and the image preparations (crops) they and the evaluation share.

Every dataset built by :func:`build_dataset` yields dicts:

    {"x": float32 tensor (C, H, W) in [-1, 1]}                      unlabelled (celeba64)
    {"x": float32 tensor (C, H, W) in [-1, 1], "y": int64 scalar}   labelled (digits, cifar10, imagenet)
    {"x": float32 scaled latent (C, h, w), "y": int64 scalar}       cached ImageNet latents ("latents")
    {"x": float32 scaled latent (C, h, w), "context": (77, hidden)} cached MS-COCO features ("coco_latents")

The two cached-feature datasets live in :mod:`diffusion.data.cached`, their extraction in
:mod:`diffusion.data.extraction`.

Labelled datasets always carry ``"y"``; the model config decides whether it is used. A random horizontal flip is
applied only when ``train`` and ``cfg.random_flip`` (default True). Data are read in their usual on-disk formats
through torchvision's own loaders; a missing dataset raises :class:`DatasetNotFoundError` saying where it was looked
for and how to provide it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset
from torchvision.datasets.folder import pil_loader
from torchvision.datasets.utils import check_integrity

from diffusion.data.cached import CACHED_FEATURE_DATASETS, CocoFeatureDataset, LatentDataset
from diffusion.errors import ConfigError, CorruptImageError, DatasetNotFoundError
from diffusion.pretrained.autoencoder import Autoencoder, resolve_dtype

COCO_SPLITS = ("train", "val")
CELEBA_CROP = (57, 25, 128)  # top, left, side of the original U-ViT face crop of the aligned 178x218 images
CELEBA_TEXT_FILES = (
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_attr_celeba.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


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


def center_square_lanczos(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """U-ViT's MS-COCO preparation: the central square (side = the short side), Lanczos-resized to image_size.
    Returns a uint8 (res, res, 3) array."""
    width, height = pil_image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = pil_image.convert("RGB").crop((left, top, left + side, top + side))
    return np.array(square.resize((image_size, image_size), resample=Image.Resampling.LANCZOS))


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder loader whose errors name the offending file."""
    try:
        return pil_loader(path)
    except (OSError, ValueError) as e:
        raise CorruptImageError(f"cannot read image file {path}: {e}") from e


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


class CocoCaptions(Dataset):
    """MS-COCO 2014 images with all their captions (5-7 each), in increasing image-id order.

    Reads ``ROOT/{split}2014/<file_name>`` and ``ROOT/annotations/captions_{split}2014.json`` (the official
    captions file: ``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``/``id``/``caption``).
    Images without a caption are left out; an image's captions keep their annotation-id order. Item i is
    ``{"x": float32 (3, res, res) in [-1, 1], "captions": list[str]}`` (centre square, Lanczos); the caption lists
    have different lengths, so batch items with a ``collate_fn`` that keeps them as lists. Text-to-image training
    reads the cached features of these images instead (``coco_latents``, :mod:`diffusion.data.cached`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 256) -> None:
        if split not in COCO_SPLITS:
            raise ConfigError(f"MS-COCO split must be one of {', '.join(COCO_SPLITS)}, got {split!r}")
        root = Path(root)
        self.folder = root / f"{split}2014"
        annotations = root / "annotations" / f"captions_{split}2014.json"
        missing = [str(path) for path in (self.folder, annotations) if not path.exists()]
        if missing:
            raise DatasetNotFoundError(
                f"MS-COCO not found: {' and '.join(missing)} missing. Expected the official 2014 release under "
                f"{root}: {split}2014/ (COCO_{split}2014_*.jpg) and annotations/captions_{split}2014.json "
                f"(from annotations_trainval2014.zip)."
            )
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
        captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for ann in coco["annotations"]:
            captions[ann["image_id"]].append((ann["id"], ann["caption"]))
        images = sorted((im for im in coco["images"] if captions[im["id"]]), key=lambda im: im["id"])
        self.image_ids = [int(im["id"]) for im in images]
        self.file_names = [str(im["file_name"]) for im in images]
        self.captions = [[text for _, text in sorted(captions[im["id"]])] for im in images]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, index: int) -> Path:
        return self.folder / self.file_names[index]

    def load_image(self, index: int) -> np.ndarray:
        """The prepared uint8 (res, res, 3) image; an unreadable file raises OSError naming it."""
        return center_square_lanczos(_load_rgb(os.fspath(self.path(index))), self.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": _to_tensor(self.load_image(index)), "captions": list(self.captions[index])}


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


def _encoder_digests(autoencoder_cfg: Any, loaded: Autoencoder | None) -> Callable[[str], str]:
    """dtype name -> the digest of the config autoencoder's encoder with its weights in that dtype: from ``loaded``
    (the run's autoencoder) where its weights hold those values, else from a copy loaded on the CPU (only then)."""

    def digest(dtype: str) -> str:
        if loaded is not None and loaded.dtype in (torch.float32, resolve_dtype(dtype)):
            return loaded.encoder_digest(dtype)
        copy = Autoencoder.load(autoencoder_cfg.pretrained, scale_factor=autoencoder_cfg.scale_factor,
                                single_file_config=autoencoder_cfg.get("single_file_config", ""), dtype=dtype)
        return copy.encoder_digest()

    return digest


def _cached_feature_checks(cfg: Any, autoencoder_cfg: Any, text_encoder_cfg: Any,
                           autoencoder: Autoencoder | None = None) -> dict[str, Any]:
    """What a cached-feature folder must match: the config's pixel resolution, autoencoder and (COCO) text encoder.

    Without an ``autoencoder_cfg`` only the resolution is checked; with one, an empty ``pretrained`` is an error,
    since sampling would then decode these latents with no autoencoder at all. The autoencoder is compared by its
    encoder's weights (``autoencoder``, the one already loaded from ``autoencoder_cfg``, saves loading it again).
    """
    checks: dict[str, Any] = {"expect_resolution": int(cfg.image_size),
                              "verify_checksums": bool(cfg.get("verify_checksums", False))}
    if autoencoder_cfg is not None:
        if not autoencoder_cfg.get("pretrained"):
            raise ConfigError(f"data.name={cfg.name!r} trains on cached autoencoder latents, but "
                              f"autoencoder.pretrained is empty; set --config.autoencoder.pretrained to the "
                              f"autoencoder named in {Path(cfg.root) / 'manifest.json'}")
        checks.update(expect_autoencoder=autoencoder_cfg.pretrained, scale_factor=autoencoder_cfg.scale_factor,
                      encoder_digest=_encoder_digests(autoencoder_cfg, autoencoder))
    if cfg.name == CocoFeatureDataset.name and text_encoder_cfg is not None and text_encoder_cfg.get("pretrained"):
        checks["expect_text_encoder"] = text_encoder_cfg.pretrained
    return checks


def _build_latents(cfg: Any, train: bool, flip: bool, checks: dict[str, Any]) -> Dataset:
    return LatentDataset(cfg.root, random_flip=flip, **checks)


def _build_coco_latents(cfg: Any, train: bool, flip: bool, checks: dict[str, Any]) -> Dataset:
    return CocoFeatureDataset(cfg.root, **checks)  # no flips: captions may say "left" or "right"


# Every dataset by its data.name; the cached-feature ones also take the checks of _cached_feature_checks.
_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "digits": _build_digits,
    "cifar10": _build_cifar10,
    "celeba64": _build_celeba64,
    "imagenet": _build_imagenet,
    LatentDataset.name: _build_latents,
    CocoFeatureDataset.name: _build_coco_latents,
}
DATASET_NAMES = tuple(_BUILDERS)


def build_dataset(cfg: Any, train: bool = True, *, autoencoder_cfg: Any = None, text_encoder_cfg: Any = None,
                  autoencoder: Autoencoder | None = None) -> Dataset:
    """The dataset named by ``cfg.name`` (one of :data:`DATASET_NAMES`), yielding dicts as in the module docstring.

    ``cfg`` needs attribute access and ``.get``: ``name``; ``root`` (all but digits); ``image_size`` (imagenet,
    celeba64 -- default 64); optional ``random_flip`` (True), ``download`` (False), ``verify_checksums`` (True) and
    ``split`` (celeba64: train/valid/test/all; imagenet: the sub-folder of root).

    Cached features (``latents``, ``coco_latents``): ``root`` is the extraction folder, ``image_size`` the PIXEL
    resolution the images were encoded at (checked against its manifest), ``verify_checksums`` (default False here:
    file sizes only) hashes every shard at open. ``autoencoder_cfg`` (the config's ``autoencoder`` section) must
    have the encoder that made the latents (compared by weights; ``autoencoder``: that autoencoder already loaded),
    and its ``scale_factor`` scales them; ``text_encoder_cfg`` (the
    ``text_encoder`` section), when given with a ``pretrained``, must name the one that encoded the captions.
    """
    if cfg.name not in _BUILDERS:
        raise ConfigError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASET_NAMES)}")
    native = {"digits": 8, "cifar10": 32}.get(cfg.name)
    if native is not None and cfg.get("image_size", native) != native:
        raise ConfigError(f"{cfg.name} images are {native}x{native}, but image_size={cfg.image_size}")
    flip = train and bool(cfg.get("random_flip", True))
    if cfg.name in CACHED_FEATURE_DATASETS:
        checks = _cached_feature_checks(cfg, autoencoder_cfg, text_encoder_cfg, autoencoder)
        return _BUILDERS[cfg.name](cfg, train, flip, checks)
    return _BUILDERS[cfg.name](cfg, train, flip)


