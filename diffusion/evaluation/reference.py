"""Reference statistics and features: the files the papers' numbers use, the ones made here, the trainer's.

File formats (.npz):

    statistics file        mu (D,), sigma (D, D) float64 [+ mu_s, sigma_s: the spatial features', for sFID].
                           U-ViT's ``fid_stats_*.npz``, pytorch-fid's ``--save-stats`` and ``eval_fid.py
                           --save_stats`` (which adds mu_s/sigma_s when the extractor has spatial features).
    ADM reference batch    arr_0 uint8 (N, H, W, 3) images + mu, sigma, mu_s, sigma_s computed by ADM's TensorFlow
                           evaluator (``VIRTUAL_imagenet256_labeled.npz``: 10,000 images, statistics of the whole
                           training set). Under the adm protocol (``--protocol adm``, ``eval.protocol``) its stored
                           statistics are the FID/sFID reference and arr_0 serves only precision/recall, as in ADM's
                           evaluator; under pytorch_fid the statistics are recomputed from arr_0 with the extractor
                           of the samples (both sides of a Frechet distance from one network) unless the stored ones
                           are asked for (``--adm_stats``).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np

from diffusion.errors import InputError, InputNotFoundError
from diffusion.evaluation.extractors import FeatureExtractor
from diffusion.evaluation.features import (
    STATISTICS_KEYS,
    accumulate_statistics,
    broadcast_from_main,
    cached_features,
    default_cache_dir,
    rank_and_world,
    read_cache,
    statistics_of_features,
    write_npz_atomic,
)
from diffusion.evaluation.protocols import get_protocol
from diffusion.evaluation.sources import DatasetImages, ImageSource, NpzImages, open_images

STATISTICS_FILE_KEYS = tuple(name for names in STATISTICS_KEYS.values() for name in names)  # mu, sigma, mu_s, ...
# an ADM batch's stored statistics: never used (computed from arr_0), used when the file has them, or required
STORED_STATISTICS = ("never", "if_stored", "required")


def _open_npz(path: str | os.PathLike):
    """``np.load`` of an .npz file (arrays read on access), or one InputError naming a file that is not one."""
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path} is not a readable .npz file ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path} is not an .npz file (it holds a single array)")
    return data


def npz_arrays(path: str | os.PathLike) -> list[str]:
    """Names of the arrays in an .npz (nothing is loaded)."""
    with _open_npz(path) as data:
        return list(data.files)


def read_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` (and ``mu_s``, ``sigma_s`` if present) of a statistics file or ADM batch, as float64."""
    with _open_npz(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise InputError(f"{path} holds no FID statistics (mu, sigma); its arrays: {', '.join(data.files)}")
        return {key: data[key].astype(np.float64) for key in STATISTICS_FILE_KEYS if key in data.files}


def save_statistics(path: str | os.PathLike, stats: dict[str, np.ndarray]) -> Path:
    """Write a statistics file (float64 ``mu``, ``sigma``[, ``mu_s``, ``sigma_s``]) atomically."""
    path = Path(path)
    write_npz_atomic(path, {key: np.asarray(stats[key], np.float64) for key in STATISTICS_FILE_KEYS if key in stats})
    return path


def check_dimensions(stats: dict[str, np.ndarray], extractor: FeatureExtractor, where: str) -> dict[str, np.ndarray]:
    """Refuse statistics of another feature space than the extractor's (e.g. Inception stats with digit features)."""
    dim = extractor.dims["pool"]
    if stats["mu"].shape != (dim,) or stats["sigma"].shape != (dim, dim):
        raise InputError(f"{where} holds statistics of {stats['mu'].shape[0]}-d features, but the {extractor.id} "
                         f"extractor makes {dim}-d ones: use statistics made with the same extractor")
    return stats


@dataclass
class Reference:
    """What samples are compared with: statistics in the file format, and the images' features when it has images."""

    description: str
    statistics: dict[str, np.ndarray]
    features: dict[str, np.ndarray] | None = None
    num_images: int | None = None
    statistics_from: str = "images"  # "images": computed here with the extractor; "file": read from the file
    cached: bool = False  # the features came from a cache

    def record(self) -> dict:
        """For the JSON report."""
        return {"path": self.description, "num_images": self.num_images, "statistics": self.statistics_from}


def load_reference(spec: str | os.PathLike, extractor: FeatureExtractor, *, need_features: bool = False,
                   statistics_of: tuple[str, ...] = ("pool", "spatial"), stored_statistics: str = "never",
                   resolution: int | None = None, coco_split: str | None = None,
                   overrides: list[tuple[str, str]] = (), cache_dir: str | os.PathLike | None = None,
                   use_cache: bool = True, batch_size: int = 250, num_workers: int = 0, state=None,
                   progress: bool = True) -> Reference | None:
    """The reference ``spec`` names (a statistics file, an ADM batch or any .npz of images, an image folder, a
    dataset config, an MS-COCO root): on rank 0, None on the other processes (all must call it).

    Image features are extracted (or read from their cache) when statistics must be computed or ``need_features``
    (precision/recall). Statistics computed from images are those of the ``statistics_of`` features (pool: FID,
    spatial: sFID). ``stored_statistics`` (:data:`STORED_STATISTICS`): "if_stored" takes an ADM batch's own
    ``mu``/``sigma``/``mu_s``/``sigma_s`` instead when it has them (the adm protocol), "required" insists on them
    (``--adm_stats``).
    """
    if stored_statistics not in STORED_STATISTICS:
        raise ValueError(f"stored_statistics must be one of {', '.join(STORED_STATISTICS)}, got {stored_statistics!r}")
    main = rank_and_world(state)[0] == 0
    path = Path(spec)
    arrays = npz_arrays(path) if path.suffix == ".npz" and path.is_file() and not coco_split else None
    if arrays is not None and "arr_0" not in arrays:
        if need_features:
            raise InputError(f"precision/recall need the reference's images, but {path} is a statistics file (mu, "
                             f"sigma): give an ADM reference batch, an image folder or a dataset config")
        stats = check_dimensions(read_statistics(path), extractor, str(path))
        return Reference(str(path), stats, statistics_from="file") if main else None
    file_stats, stored = None, arrays is not None and "mu" in arrays
    if stored_statistics == "required" and not stored:
        raise InputError(f"--adm_stats takes the statistics stored in an ADM reference batch; {path} has none")
    if stored_statistics != "never" and stored:
        file_stats = check_dimensions(read_statistics(path), extractor, str(path))
    source: ImageSource = NpzImages(path) if arrays is not None else open_images(
        spec, resolution=resolution, coco_split=coco_split, overrides=overrides)
    if not need_features and file_stats is None:  # FID/sFID only: running statistics, never all the features
        stats, cached = cached_statistics(source, extractor, cache_dir, use_cache=use_cache, state=state,
                                          batch_size=batch_size, num_workers=num_workers, progress=progress)
        stats = {k: stats[k] for key in statistics_of for k in STATISTICS_KEYS[key] if k in stats}
        return Reference(source.description, stats, None, len(source), "images", cached) if main else None
    features, cached = None, False
    if need_features:
        features, cached = cached_features(source, extractor, cache_dir=cache_dir, use_cache=use_cache,
                                           batch_size=batch_size, num_workers=num_workers, state=state,
                                           progress=progress)
    if not main:
        return None
    if file_stats is not None:
        return Reference(source.description, file_stats, features, len(source), "file", cached)
    stats = statistics_of_features(features, statistics_of)
    return Reference(source.description, stats, features, len(source), "images", cached)


def reference_statistics_for_config(config: ml_collections.ConfigDict, extractor: FeatureExtractor,
                                    cache_dir: str | os.PathLike, *, state=None, batch_size: int = 250,
                                    num_workers: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """The reference statistics FID during training compares with, on every process (all must call it).

    ``config.eval.reference`` if set: a statistics file as it is; an ADM batch's stored statistics under
    ``eval.protocol = "adm"``, else the statistics of its images; without it the statistics of the config's training
    images (pixel datasets, digits; latent configs must set ``eval.reference``). Computed statistics are kept in
    ``cache_dir`` as
    ``reference-<source>-<extractor id>.npz`` and reused while the source and extractor are unchanged.
    """
    reference = config.eval.get("reference", "")
    if reference:
        path = Path(reference)
        if not path.is_file():
            raise InputNotFoundError(f"eval.reference {path} not found: give a statistics .npz (mu, sigma), an ADM "
                                     f"reference batch, or leave it empty to use the training images")
        arrays, protocol = npz_arrays(path), get_protocol(config.eval.get("protocol", "pytorch_fid"))
        if "arr_0" not in arrays or ("mu" in arrays and protocol.stored_statistics):
            return check_dimensions(read_statistics(path), extractor, f"eval.reference {path}")
        source: ImageSource = NpzImages(path)
    else:
        source = DatasetImages(config, description="data")
    return cached_statistics(source, extractor, cache_dir, state=state, batch_size=batch_size,
                             num_workers=num_workers, progress=progress)[0]


def cached_statistics(source: ImageSource, extractor: FeatureExtractor, cache_dir: str | os.PathLike | None, *,
                      use_cache: bool = True, state=None, batch_size: int = 250, num_workers: int = 0,
                      progress: bool = False) -> tuple[dict[str, np.ndarray], bool]:
    """(statistics, read from the cache) of a (possibly huge) image source from running sums -- no per-image
    features are kept -- cached in ``cache_dir`` as ``reference-<source>-<extractor id>.npz`` while the source and
    extractor are unchanged; on every process (all must call it)."""
    cache = Path(cache_dir or default_cache_dir()) / f"reference-{source.cache_name}-{extractor.id}.npz"
    main = rank_and_world(state)[0] == 0
    stats = read_cache(cache, source.fingerprint(), extractor.id) if main and use_cache else None
    stats = broadcast_from_main(stats, state)
    if stats is not None:
        return stats, True
    stats = accumulate_statistics(source, extractor, batch_size=batch_size, num_workers=num_workers, state=state,
                                  progress=progress)
    if main and use_cache:
        write_npz_atomic(cache, {**stats, "_fingerprint": np.array(source.fingerprint()),
                                 "_extractor": np.array(extractor.id)})
    return stats, False

