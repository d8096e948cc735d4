"""Features of a whole image source: batched, on every process of a launch, cached per source.

The source is cut into batches of ``batch_size`` images; process r of w takes batches r, r + w, ... (an accelerate
``PartialState`` says which; none = one process). The batches do not depend on w, so neither do the features.
:func:`extract_features` gathers every process's rows on rank 0 in source order; :func:`accumulate_statistics`
keeps only running sums (any number of images) and all-reduces them, so every process gets the statistics.

Feature caches (:func:`cached_features`) are plain .npz files: the extractor's outputs (``pool``, ``logits``,
``spatial``; float32, (N, D) each: about 20 KB per image for the Inception) and ``_fingerprint``, ``_extractor``,
``_source`` (strings). A cache is used only when its fingerprint and extractor id match the source and extractor of
now: an .npz whose size or modification time changed, or a folder whose file list did, is extracted again. Caches
lie beside the .npz file or folder (``samples.npz`` -> ``samples.features-<extractor id>.npz``), or in a cache folder
(dataset configs, read-only places, or whenever one is given).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusion.errors import InputError
from diffusion.evaluation.extractors import FeatureExtractor
from diffusion.evaluation.metrics import RunningStatistics, statistics
from diffusion.evaluation.sources import ImageSource
from diffusion.files import write_atomic

STATISTICS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # features -> names in stats files


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/transformer-diffusion/eval`` (``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transformer-diffusion" / "eval"


def rank_and_world(state) -> tuple[int, int]:
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise InputError(f"images of different sizes in one batch ({', '.join(map(str, shapes[:4]))}): give an image "
                         f"folder one size with --resolution R (ADM's centre crop)")
    return np.stack(images)


def _my_batches(num_images: int, batch_size: int, state) -> list[range]:
    """This process's share of the global batches [0, B), [B, 2B), ...: every world-th one from its rank."""
    if num_images < 1 or batch_size < 1:
        raise InputError(f"need at least one image and a positive batch size, got {num_images} and {batch_size}")
    rank, world = rank_and_world(state)
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)][rank::world]


def _source_batches(source: ImageSource, batch_size: int, num_workers: int, state
                    ) -> Iterator[tuple[range, np.ndarray]]:
    """(indices, uint8 images) of this process's batches of ``source``, decoded by ``num_workers`` workers."""
    if len(source) == 0:
        raise InputError(f"{source.description} holds no images")
    mine = _my_batches(len(source), batch_size, state)
    loader = DataLoader(source, batch_sampler=[list(r) for r in mine], collate_fn=_stack,
                        num_workers=num_workers if source.decodes else 0)
    return zip(mine, loader)


def _features(batches: Iterable[tuple[range, np.ndarray]], extractor: FeatureExtractor, total: int, state,
              progress: bool) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    """(indices, features) of each batch, with a progress bar on rank 0."""
    rank, world = rank_and_world(state)
    label = f"{extractor.id} features ({world} proc)"
    with tqdm(total=total, unit="img", desc=label, disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for indices, images in batches:
            yield indices, extractor(images)
            bar.update(min(len(indices) * world, total - bar.n))  # rank 0's pace stands for every rank's


def _statistics(features: Iterable[tuple[range, dict[str, torch.Tensor]]], extractor: FeatureExtractor,
                keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Running statistics of the ``keys`` features over every process (all must call it), in the file format."""
    keys = [key for key in keys if key in extractor.dims]
    running = {key: RunningStatistics(extractor.dims[key], extractor.device) for key in keys}
    for _, batch in features:
        for key in keys:
            running[key].update(batch[key])
    out = {}
    for key in keys:
        running[key].all_reduce()
        out.update(zip(STATISTICS_KEYS[key], running[key].compute()))
    return out


def _gather_on_main(obj, state) -> list | None:
    """Every process's ``obj`` in rank order on rank 0 (None elsewhere)."""
    rank, world = rank_and_world(state)
    if world == 1:
        return [obj]
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj, state):
    """Rank 0's ``obj`` on every process."""
    if rank_and_world(state)[1] == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def extract_features(source: ImageSource, extractor: FeatureExtractor, *, batch_size: int = 250,
                     num_workers: int = 0, state=None, progress: bool = True) -> dict[str, np.ndarray] | None:
    """Every image's features, float32 (N, D) per output of the extractor, in source order, on rank 0; None on the
    other processes (all must call it)."""
    batches = _source_batches(source, batch_size, num_workers, state)
    parts = [(indices.start, {key: value.float().cpu().numpy() for key, value in features.items()})
             for indices, features in _features(batches, extractor, len(source), state, progress)]
    gathered = _gather_on_main(parts, state)
    if gathered is None:
        return None
    ordered = [features for _, features in sorted((p for part in gathered for p in part), key=lambda p: p[0])]
    return {key: np.concatenate([f[key] for f in ordered]) for key in ordered[0]}


def accumulate_statistics(source: ImageSource, extractor: FeatureExtractor, *, batch_size: int = 250,
                          num_workers: int = 0, state=None, progress: bool = True) -> dict[str, np.ndarray]:
    """Statistics of the source's pool (and spatial) features in the reference-file format (``mu``, ``sigma``,
    ``mu_s``, ``sigma_s``; float64), from running sums: any number of images; the result on every process."""
    batches = _source_batches(source, batch_size, num_workers, state)
    return _statistics(_features(batches, extractor, len(source), state, progress), extractor, STATISTICS_KEYS)


def generated_statistics(draw: Callable[[range], np.ndarray | torch.Tensor], num_images: int,
                         extractor: FeatureExtractor, *, batch_size: int = 250, keys: tuple[str, ...] = ("pool",),
                         state=None, progress: bool = False) -> dict[str, np.ndarray]:
    """Statistics of ``num_images`` images made on the fly (FID during training), on every process.

    ``draw(indices)`` returns uint8 (len(indices), H, W, C) images for those global sample numbers, e.g.
    ``lambda i: sample_source.uint8(i)[0]`` (:class:`diffusion.sampling.SampleSource`: sample i depends only on the
    seed and i). Process r draws the batches r, r + w, ... of ``batch_size``; only running sums are kept, then
    all-reduced. ``keys``: "pool" (FID) and/or "spatial" (sFID).
    """
    batches = ((indices, draw(indices)) for indices in _my_batches(num_images, batch_size, state))
    return _statistics(_features(batches, extractor, num_images, state, progress), extractor, keys)


def statistics_of_features(features: dict[str, np.ndarray], keys: tuple[str, ...] = tuple(STATISTICS_KEYS)
                           ) -> dict[str, np.ndarray]:
    """The reference-file format (``mu``, ``sigma``[, ``mu_s``, ``sigma_s``]) of extracted features, for the
    ``keys`` among pool / spatial that the features have."""
    out = {}
    for key in keys:
        if key in features:
            out.update(zip(STATISTICS_KEYS[key], statistics(features[key])))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Feature caches


def feature_cache_path(source: ImageSource, extractor_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Beside the source's file or folder when that is writable and no ``cache_dir`` is given; else in ``cache_dir``
    (default :func:`default_cache_dir`) under a name that says which source it is."""
    name = f"features-{extractor_id}.npz"
    beside = source.beside
    if cache_dir is None and beside is not None and os.access(beside.parent, os.W_OK):
        return beside.parent / f"{beside.name.removesuffix('.npz')}.{name}"
    return Path(cache_dir or default_cache_dir()) / f"{source.cache_name}.{name}"


def read_cache(path: Path, fingerprint: str, extractor_id: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file written for this fingerprint and extractor; None if it is absent or another's."""
    try:
        with np.load(path) as data:
            if str(data["_fingerprint"]) != fingerprint or str(data["_extractor"]) != extractor_id:
                return None
            return {key: data[key] for key in data.files if not key.startswith("_")}
    except (OSError, ValueError, KeyError):  # absent, unreadable or not a cache: extract again
        return None


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a hidden temporary file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def cached_features(source: ImageSource, extractor: FeatureExtractor, *, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, batch_size: int = 250, num_workers: int = 0, state=None,
                    progress: bool = True) -> tuple[dict[str, np.ndarray] | None, bool]:
    """-> (:func:`extract_features` of the source, read from its cache when valid, else extracted and cached; whether
    the cache was used). Rank 0 reads and writes the cache; every process must call it."""
    path = feature_cache_path(source, extractor.id, cache_dir) if use_cache else None
    main = rank_and_world(state)[0] == 0
    fingerprint = source.fingerprint() if path is not None and main else ""
    features = read_cache(path, fingerprint, extractor.id) if path is not None and main else None
    if broadcast_from_main(features is not None, state):
        return features, True
    features = extract_features(source, extractor, batch_size=batch_size, num_workers=num_workers, state=state,
                                progress=progress)
    if path is not None and main:
        write_npz_atomic(path, {**features, "_fingerprint": np.array(fingerprint), "_extractor": np.array(extractor.id),
                                "_source": np.array(source.description)})
    return features, False
