"""Where evaluated images come from: ADM-style .npz files, image folders, dataset configs and MS-COCO.

Every source is a map-style Dataset of uint8 (H, W, C) images (C = 3, or 1 for grey datasets such as digits), the
pixels the feature extractor sees, plus what caches need:

    description    what the user named, for messages and the JSON record
    fingerprint()  a string that changes when the images would (file sizes and modification times, settings)
    beside         the file or folder feature caches are kept next to (None: only in a cache folder)
    cache_name     a file-name-safe stem for caches kept in a cache folder
    decodes        whether reading an image decodes a file (worth DataLoader workers)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from pytorch_fid.fid_score import IMAGE_EXTENSIONS
from torch.utils.data import Dataset

from diffusion.config.loading import load_config
from diffusion.data.cached import CACHED_FEATURE_DATASETS
from diffusion.data.datasets import CocoCaptions, build_dataset, center_crop_arr
from diffusion.errors import ConfigError, CorruptImageError, DatasetNotFoundError, InputError, InputNotFoundError
from diffusion.sampling.pixels import to_uint8

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _safe_stem(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:48]


class ImageSource(Dataset):
    """Base: the cache-related attributes every source has (see the module docstring)."""

    description: str
    beside: Path | None = None
    decodes: bool = False

    @property
    def cache_name(self) -> str:
        return f"{_safe_stem(self.description)}-{self.fingerprint()[:12]}"

    def fingerprint(self) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------------
# .npz files: arr_0 uint8 (N, H, W, C), read without loading it whole


def _member_data_offset(path: Path, info: zipfile.ZipInfo, header_length: int) -> int:
    """Byte offset of an uncompressed zip member's array data: after the local file header (30 bytes, file name,
    extra field; the extra field may differ from the central directory's) and the .npy header."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length + header_length


class NpzImages(ImageSource):
    """``arr_0`` of an ADM-style .npz (sample.py's output, ADM's reference batches). A stored (uncompressed) member is
    memory-mapped; a compressed one (``np.savez_compressed``) is streamed forwards, so 50K images at 512 px never
    sit in memory at once."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputNotFoundError(f"no such .npz file: {self.path}")
        self.description = str(self.path)
        self.beside = self.path
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise InputError(f"{self.path} is not an .npz file (not a zip archive): truncated, or another kind of "
                             f"file") from None
        with archive as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if key not in names:
                raise InputError(f"{self.path} holds no images ({key}); its arrays: {', '.join(names)}")
            self._info = zf.getinfo(f"{key}.npy")
            with zf.open(self._info) as f:
                version = np.lib.format.read_magic(f)
                read_header = _HEADER_READERS.get(version)
                if read_header is None:
                    raise InputError(f"{self.path}: {key} is stored in .npy format version {version}, not read here")
                shape, fortran, dtype = read_header(f)
                header_length = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise InputError(f"{self.path}: {key} must be uint8 (N, H, W, 3) images as sample.py and ADM write them, "
                             f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
        self.shape = tuple(shape)
        self._item_bytes = int(np.prod(shape[1:]))
        self._memmap = None
        if self._info.compress_type == zipfile.ZIP_STORED:
            offset = _member_data_offset(self.path, self._info, header_length)
            self._memmap = np.memmap(self.path, np.uint8, "r", offset=offset, shape=self.shape)
        self._header_length, self._stream, self._next = header_length, None, 0

    def __len__(self) -> int:
        return self.shape[0]

    def fingerprint(self) -> str:
        return _digest(["npz", str(self.path.resolve()), _stat_key(self.path), self.shape])

    def _read_forward(self, index: int) -> np.ndarray:
        """Image ``index`` of a compressed member: read on from the last one (reopened to go back)."""
        if self._stream is None or index < self._next:
            self._stream = zipfile.ZipFile(self.path).open(self._info)
            self._stream.read(self._header_length)
            self._next = 0
        for _ in range(self._next, index):  # other processes' images
            self._read_item(index)
        self._next = index + 1
        return np.frombuffer(self._read_item(index), np.uint8).reshape(self.shape[1:])

    def _read_item(self, index: int) -> bytes:
        data = self._stream.read(self._item_bytes)
        if len(data) != self._item_bytes:
            raise InputError(f"{self.path} ends before image {index} of {len(self)}: the file is truncated")
        return data

    def __getitem__(self, index: int) -> np.ndarray:
        if self._memmap is not None:
            return np.array(self._memmap[index])
        return self._read_forward(index)


# ----------------------------------------------------------------------------------------------------------------------
# Image folders


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (pytorch-fid's extensions, any case, any depth), hidden ones left out, sorted by
    relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix[1:].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class FolderImages(ImageSource):
    """Every image file under a folder (flat sample folders, or ImageFolder trees such as ImageNet's train/), read as
    RGB like pytorch-fid. ``resolution``: ADM's centre crop to that size (``center_crop_arr``: ImageNet 64/256/512);
    without it the images are used as they are and must all have one size."""

    decodes = True

    def __init__(self, folder: str | os.PathLike, resolution: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputNotFoundError(f"no such image folder: {self.folder}")
        self.files = list_images(self.folder)
        if not self.files:
            raise DatasetNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.folder}")
        self.resolution = resolution
        self.description = str(self.folder) + (f" (ADM centre crop to {resolution})" if resolution else "")
        self.beside = self.folder

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        listing = [[p.relative_to(self.folder).as_posix(), *_stat_key(p)] for p in self.files]
        return _digest(["folder", str(self.folder.resolve()), self.resolution, listing])

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as e:
            raise CorruptImageError(f"cannot read image file {path}: {e}") from e
        return center_crop_arr(image, self.resolution) if self.resolution else np.asarray(image)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset configs and MS-COCO


class DatasetImages(ImageSource):
    """The training images of a config's pixel dataset, as ``build_dataset(config.data, train=True)`` prepares them
    (CelebA's face crop, ADM's ImageNet crop, ...) with flips off, quantised back to uint8 like samples are."""

    decodes = True

    def __init__(self, config: ml_collections.ConfigDict, description: str = "the config's dataset") -> None:
        data = ml_collections.ConfigDict(config.data.to_dict())
        if data.name in CACHED_FEATURE_DATASETS:
            reference = config.get("eval", {}).get("reference", "")
            raise ConfigError(
                f"data.name={data.name!r} holds autoencoder latents, not images, so it cannot be a FID reference: "
                f"pass the image folder the latents came from (e.g. ImageNet's train/ with --resolution "
                f"{data.image_size}; MS-COCO's root with --coco val), or a reference .npz"
                f"{f' (this config names {reference})' if reference else ' (set eval.reference for training)'}")
        data.random_flip = False
        self.dataset = build_dataset(data, train=True)
        self.settings = {key: data.get(key) for key in ("name", "image_size", "split")}
        self.settings["root"] = str(Path(data.root).resolve()) if data.name != "digits" else ""
        self.description = f"{description} ({data.name}{'' if data.name == 'digits' else ' at ' + str(data.root)})"

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def cache_name(self) -> str:
        return f"{self.settings['name']}{self.settings['image_size']}-{self.fingerprint()[:12]}"

    def fingerprint(self) -> str:
        return _digest(["dataset", self.settings, len(self)])

    def __getitem__(self, index: int) -> np.ndarray:
        return to_uint8(self.dataset[index]["x"][None])[0].numpy()


class CocoImages(ImageSource):
    """MS-COCO 2014 images that have captions, centre square, Lanczos to ``resolution`` (U-ViT's
    ``fid_stats_mscoco256_val.npz``), read through :class:`diffusion.data.datasets.CocoCaptions`."""

    decodes = True

    def __init__(self, root: str | os.PathLike, split: str = "val", resolution: int = 256) -> None:
        self.coco = CocoCaptions(root, split, resolution)
        self.annotations = Path(root) / "annotations" / f"captions_{split}2014.json"
        self.settings = {"root": str(Path(root).resolve()), "split": split, "resolution": resolution}
        self.description = f"MS-COCO {split}2014 at {root} ({resolution} px)"

    def __len__(self) -> int:
        return len(self.coco)

    @property
    def cache_name(self) -> str:
        return f"coco_{self.settings['split']}{self.settings['resolution']}-{self.fingerprint()[:12]}"

    def fingerprint(self) -> str:
        return _digest(["coco", self.settings, _stat_key(self.annotations), len(self)])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.coco.load_image(index)


# ----------------------------------------------------------------------------------------------------------------------
# From the command line


def open_images(spec: str | os.PathLike, *, resolution: int | None = None, coco_split: str | None = None,
                overrides: list[tuple[str, str]] = ()) -> ImageSource:
    """The source a command-line argument names: ``*.py`` a dataset config (with ``--config.key=value``
    ``overrides``), ``*.npz`` its ``arr_0``, a folder its image files (ADM-cropped to ``resolution`` if given) or,
    with ``coco_split``, the MS-COCO 2014 root (at ``resolution``, default 256)."""
    path = Path(spec)
    if coco_split and not path.is_dir():
        raise InputNotFoundError(f"--coco needs the MS-COCO root folder (holding {coco_split}2014/ and annotations/), "
                                 f"got {path}")
    if path.suffix == ".py":
        return DatasetImages(load_config(path, overrides), description=str(path))
    if overrides:
        raise ConfigError("--config.key=value overrides apply to a dataset config (configs/<name>.py) only")
    if coco_split:
        return CocoImages(path, coco_split, resolution or 256)
    if path.suffix == ".npz":
        return NpzImages(path)
    if path.is_dir():
        return FolderImages(path, resolution)
    raise InputNotFoundError(f"{path} is neither an .npz file, an image folder nor a config file (configs/<name>.py)")
