"""Extraction of cached autoencoder features (sharded, multi-process, resumable) and their on-disk format.

Latent diffusion would spend most of its time in the autoencoder's encoder unless the encodings are cached. As U-ViT
does, we cache the encoder's *moments* (the posterior's mean and log-variance), not one frozen sample, so training
still draws a fresh posterior sample at every step; ImageNet images are cached together with their horizontal flip,
so the random flip survives caching. MS-COCO also caches every caption's CLIP last hidden state.

Extraction (``scripts/extract_latents.py``, ``scripts/extract_coco.py``) runs on any number of processes
(``accelerate launch`` / ``torchrun``; rank and world size from ``accelerate.PartialState``). Shard k holds the
source's items [k*S, (k+1)*S) and is written by rank k mod world, so the files do not depend on the number of
processes, and no two processes ever write the same file (OUT must be on a file system all processes share). An
extraction folder holds:

    shard_000000.safetensors   one shard's tensors (below), written to a hidden temporary file and renamed
    shard_000000.json          its record: range, count, skipped files, sha256, size, the writer's rank and world
                               size. Renamed into place after the shard, so a shard is done exactly when its record
                               exists: a rerun skips it
    extraction.json            the run's settings; rerunning into the folder with other settings is refused
    manifest.json              by rank 0 once every shard is done: settings, counts, skipped files, shard list,
                               and ``encoder_sha256``: the autoencoder's encoder weights (``encoder`` and
                               ``quant_conv``, in ``autoencoder_dtype``; ``Autoencoder.encoder_digest``), which the
                               training side compares (older manifests lack it: their autoencoder name is compared)
    captions.json              (COCO) every stored image's index, id, file name and captions, in dataset order
    null_context.safetensors   (COCO) "null_context": float32 (L, hidden), the encoding of the empty caption

Shard tensors (n stored images, m captions; floating point in the manifest's ``dtype``; C latent channels):

    imagefolder  moments (n, 2, 2C, h, w): [original, h-flipped] x [mean | logvar]; label, index int64 (n,)
    coco         moments (n, 2C, h, w); context (m, L, hidden), image i's captions being the num_captions[i] rows
                 after those of images 0..i-1 of the shard; num_captions, image_id, index int64 (n,)

With ``--repa_encoders`` (REPA, diffusion/training/repa.py) a shard also holds every encoder's patch features of the
stored views, under ``repa_<encoder name>`` (e.g. ``repa_dinov2-vit-b``): imagefolder (n, 2, tokens, dim), [original,
h-flipped] as the moments; coco (n, tokens, dim). They are REPA's targets: the encoder (set up for ``resolution``)
run on the same uint8 crop the moments were encoded from, in float32 (``--repa_fp16``: float16, a relative rounding of
about 5e-4 in the targets). The settings (so extraction.json and the manifest) list the encoders under
``repa_encoders``: name, key, weights source, ``sha256`` (:func:`~diffusion.data.cached.vision_encoder_digest` of the
loaded encoder), resolution, input size, tokens, dim, dtype. Features cannot be added to a folder extracted without
them (its settings differ, so the run is refused): extract into a new folder. Size: ViT-B at 256 px is 256 x 768
float32 per view, 1.6 MB per ImageNet image with its flip (about 2 TB for ImageNet-1k; half with --repa_fp16); a
process holds one shard's features in memory before writing it.

``index`` is the item's position in the source (ImageFolder order; COCO image-id order), so skipped images leave gaps.
The datasets that train on these folders are in :mod:`diffusion.data.cached`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from accelerate import PartialState
from PIL import Image
from safetensors.torch import save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diffusion.config.schema import ON_CORRUPT
from diffusion.data.cached import (
    CAPTIONS,
    FORMAT,
    MANIFEST,
    NULL_CONTEXT,
    REPA_SETTINGS,
    SETTINGS,
    VERSION,
    repa_key,
    vision_encoder_digest,
)
from diffusion.data.datasets import CocoCaptions, center_crop_arr
from diffusion.errors import ConfigError, CorruptImageError, DatasetNotFoundError, JobMismatchError
from diffusion.files import write_atomic
from diffusion.pretrained.autoencoder import Autoencoder
from diffusion.pretrained.text_encoder import TextEncoder
from diffusion.pretrained.vision_encoders import load_vision_encoders, split_names

# Ranks that finish early wait at the final barrier for the slowest one; the default collective timeout (10-30 min)
# is too short for a resumed run whose remaining shards are unevenly spread.
BARRIER_TIMEOUT = timedelta(hours=12)


def _shard_name(k: int) -> str:
    return f"shard_{k:06d}"


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()))


class ImageFolderImages(Dataset):
    """An ImageFolder tree (labels follow the sorted class-folder names), each image ADM-centre-cropped."""

    def __init__(self, folder: str | os.PathLike, resolution: int) -> None:
        try:  # absolute paths, so that skipped files are named unambiguously in the manifest
            self.base = torchvision.datasets.ImageFolder(os.fspath(Path(folder).resolve()))
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"no ImageFolder tree at {folder} ({e}); expected {folder}/<class>/<image>, "
                                       f"one sub-folder per class, e.g. ImageNet's train/n01440764/*.JPEG") from e
        self.classes = list(self.base.classes)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.base)

    def path(self, index: int) -> str:
        return self.base.samples[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.base.samples[index]
        return {"index": index, "image": center_crop_arr(self.base.loader(path), self.resolution), "label": label}


class CocoImageCaptions(Dataset):
    """MS-COCO images (centre square, Lanczos) with their captions, image ids and file names: what extraction caches,
    read by :class:`diffusion.data.datasets.CocoCaptions` (FID's images alone: ``diffusion.evaluation.sources``)."""

    def __init__(self, root: str | os.PathLike, split: str, resolution: int) -> None:
        self.coco = CocoCaptions(Path(root).resolve(), split, resolution)

    def __len__(self) -> int:
        return len(self.coco)

    def path(self, index: int) -> str:
        return os.fspath(self.coco.path(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "image": self.coco.load_image(index), "captions": self.coco.captions[index],
                "image_id": self.coco.image_ids[index], "file_name": self.coco.file_names[index]}


class _Guarded(Dataset):
    """An unreadable image becomes an error item, so one bad file stops neither a DataLoader worker nor the run."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.source[index]
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return {"index": index, "path": self.source.path(index), "error": f"{type(e).__name__}: {e}"}


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _pixels(items: list[dict[str, Any]], device: torch.device) -> Tensor:
    """uint8 HWC images -> float32 (B, 3, H, W) in [-1, 1] on ``device`` (the uint8 copy is the cheap one to move)."""
    images = torch.from_numpy(np.stack([item["image"] for item in items])).to(device)
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _int64(items: list[dict[str, Any]], key: str) -> Tensor:
    return torch.tensor([item[key] for item in items], dtype=torch.int64)


def _uint8(items: list[dict[str, Any]], device: torch.device) -> Tensor:
    """uint8 HWC images -> uint8 (B, 3, H, W) on ``device``: what REPA's encoders take (and what training's
    ``images_to_uint8`` gives back from the [-1, 1] images)."""
    return torch.from_numpy(np.stack([item["image"] for item in items])).to(device).permute(0, 3, 1, 2)


class RepaFeatures:
    """REPA's frozen vision encoders (``names`` comma-separated, as ``repa.encoders``), set up for ``resolution``
    px images: each one's patch features of the stored views, and their settings entries."""

    def __init__(self, names: str, weights: str, resolution: int, device: torch.device, fp16: bool) -> None:
        self.encoders = load_vision_encoders(names, weights=weights, resolution=resolution, device=device)
        self.dtype = _storage_dtype(fp16)
        self.device = device

    def settings(self) -> list[dict[str, Any]]:
        return [{"name": e.name, "key": repa_key(e.name), "weights": e.source, "sha256": vision_encoder_digest(e),
                 "resolution": e.resolution, "input_size": e.input_size, "tokens": e.num_tokens,
                 "dim": e.embed_dim, "dtype": self.dtype} for e in self.encoders]

    def encode(self, items: list[dict[str, Any]], flip: bool) -> dict[str, Tensor]:
        """{key: float32 (B, 2, tokens, dim) [original, flipped] with ``flip``, else (B, tokens, dim)}."""
        pixels = _uint8(items, self.device)
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        out = {}
        for encoder in self.encoders:
            features = encoder(pixels.to(encoder.device)).float()
            out[repa_key(encoder.name)] = torch.stack(features.chunk(2), dim=1) if flip else features
        return out


def _repa_settings(repa: RepaFeatures | None) -> dict[str, Any]:
    """The settings entry of the REPA features (none without encoders, so older folders resume unchanged)."""
    return {REPA_SETTINGS: repa.settings()} if repa is not None else {}


class ExtractionJob(Protocol):
    source: Any  # a Dataset of source items with .path(index)
    settings: dict[str, Any]  # JSON: what the run computes; a resume must have the same
    autoencoder: Autoencoder | None  # whose encoder's digest the manifest records (None: none recorded)

    def encode(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Tensors for these items, concatenated along dim 0 across a shard's batches."""

    def shard_info(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """JSON for the shard record (items without their images)."""

    def finish(self, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0, all shards done: extra files, and extra manifest fields (``counts`` merges into the counts)."""


class ImageFolderLatents:
    """ImageNet-style: moments of every image and of its horizontal flip, and its label."""

    def __init__(self, source: ImageFolderImages, autoencoder: Autoencoder, settings: dict[str, Any],
                 repa: RepaFeatures | None = None) -> None:
        self.source, self.autoencoder, self.settings, self.repa = source, autoencoder, settings, repa

    def encode(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        x = _pixels(items, self.autoencoder.device)
        moments = self.autoencoder.encode_moments(torch.cat([x, x.flip(-1)]))  # (2B, 2C, h, w)
        features = self.repa.encode(items, flip=True) if self.repa is not None else {}
        return {"moments": torch.stack(moments.chunk(2), dim=1),  # (B, 2, 2C, h, w)
                "label": _int64(items, "label"), "index": _int64(items, "index"), **features}

    def shard_info(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        labels = [item["label"] for item in items]
        return {"class_counts": np.bincount(labels, minlength=len(self.source.classes)).tolist()}

    def finish(self, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
        per_class = np.sum([r["class_counts"] for r in records], axis=0, dtype=np.int64)
        return {"counts": {"per_class": per_class.tolist()}}


class CocoFeatures:
    """MS-COCO: moments of every image (no flip: captions may say left or right) and the CLIP encoding of every
    caption; at the end the empty caption's encoding and all captions as text."""

    def __init__(self, source: CocoImageCaptions, autoencoder: Autoencoder, text_encoder: TextEncoder,
                 settings: dict[str, Any], repa: RepaFeatures | None = None) -> None:
        self.source, self.autoencoder, self.text_encoder, self.settings = source, autoencoder, text_encoder, settings
        self.repa = repa

    def encode(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        captions = [caption for item in items for caption in item["captions"]]
        features = self.repa.encode(items, flip=False) if self.repa is not None else {}
        return {"moments": self.autoencoder.encode_moments(_pixels(items, self.autoencoder.device)),
                "context": self.text_encoder.encode(captions),
                "num_captions": torch.tensor([len(item["captions"]) for item in items], dtype=torch.int64),
                "image_id": _int64(items, "image_id"), "index": _int64(items, "index"), **features}

    def shard_info(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("index", "image_id", "file_name", "captions")
        return {"captions": [{key: item[key] for key in keys} for item in items]}

    def finish(self, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [entry for record in records for entry in record["captions"]]
        _write_json(out / CAPTIONS, captions)
        null = self.text_encoder.null_context().float().cpu().contiguous()
        write_atomic(out / NULL_CONTEXT, lambda f: f.write(save({"null_context": null})))
        return {"counts": {"captions": sum(len(entry["captions"]) for entry in captions)},
                "captions": CAPTIONS, "null_context": NULL_CONTEXT}


def _shard_done(out: Path, k: int) -> bool:
    """Its record exists (renamed into place last) and the shard file it describes has the recorded size."""
    record_path = out / f"{_shard_name(k)}.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    if record["count"] == 0:
        return True
    shard = out / record["file"]
    return shard.is_file() and shard.stat().st_size == record["bytes"]


def _claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Rank 0, before any shard is written: create ``out``, record the settings (or keep the recorded ones) and remove
    temporary files a killed run left behind."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SETTINGS).is_file():
        _write_json(out / SETTINGS, settings)
    for stale in out.glob(".*.tmp*"):
        stale.unlink()


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    recorded = json.loads((out / SETTINGS).read_text())
    keys = [key for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]
    if keys == [REPA_SETTINGS] and REPA_SETTINGS not in recorded:
        raise JobMismatchError(f"{out} holds an extraction without REPA features: they cannot be added to it (its "
                               f"shards are written and recorded without them). Extract into another --out folder "
                               f"with --repa_encoders (the latents are recomputed with them), or rerun without "
                               f"--repa_encoders to resume it as it was.")
    changed = [f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now" for key in keys]
    if changed:
        raise JobMismatchError(f"{out} holds an extraction with other settings ({'; '.join(changed)}). Rerun with "
                               f"the original settings to resume it, or extract into another --out folder.")


def _batch_plan(shards: list[int], num_items: int, shard_size: int, batch_size: int
                ) -> Iterator[tuple[int, list[int], tuple[int, int] | None]]:
    """(shard, item indices, the shard's source range if this is its last batch, else None) for these shards.
    Batches never cross shards and do not depend on the number of processes, so neither do the encoder's numbers."""
    for k in shards:
        start, stop = k * shard_size, min((k + 1) * shard_size, num_items)
        for first in range(start, stop, batch_size):
            last = first + batch_size >= stop
            yield k, list(range(first, min(first + batch_size, stop))), (start, stop) if last else None


def _storage_dtypes(settings: dict[str, Any]) -> dict[str, torch.dtype]:
    """Floating-point storage dtype by shard key ("" for every key not named: the moments, contexts)."""
    dtypes = {"": getattr(torch, settings["dtype"])}
    dtypes.update({entry["key"]: getattr(torch, entry["dtype"]) for entry in settings.get(REPA_SETTINGS, [])})
    return dtypes


def _write_shard(out: Path, k: int, span: tuple[int, int], parts: dict[str, list[Tensor]],
                 dtypes: dict[str, torch.dtype],
                 infos: list[dict[str, Any]], skipped: list[dict[str, Any]], job: ExtractionJob,
                 writer: tuple[int, int]) -> None:
    record: dict[str, Any] = {"shard": k, "start": span[0], "stop": span[1], "count": len(infos),
                              "skipped": skipped, "file": None, "bytes": 0, "sha256": None,
                              "rank": writer[0], "world": writer[1]}
    if infos:
        tensors = {}
        for key, chunks in parts.items():
            tensor = torch.cat(chunks)
            dtype = dtypes.get(key, dtypes[""])
            tensors[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).cpu().contiguous()
        data = save(tensors, metadata={"format": FORMAT})  # one key: safetensors writes a map's keys in any order
        record.update(file=f"{_shard_name(k)}.safetensors", bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        write_atomic(out / record["file"], lambda f: f.write(data))
    record.update(job.shard_info(infos))
    _write_json(out / f"{_shard_name(k)}.json", record)


def _write_manifest(out: Path, job: ExtractionJob, settings: dict[str, Any], num_shards: int) -> dict[str, Any]:
    missing = [k for k in range(num_shards) if not _shard_done(out, k)]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) of {out} are not done (e.g. {missing[:5]}): a process failed; "
                           f"rerun the same command to finish them")
    records = [json.loads((out / f"{_shard_name(k)}.json").read_text()) for k in range(num_shards)]
    skipped = [entry for record in records for entry in record["skipped"]]
    manifest = {"format": FORMAT, "version": VERSION, **settings,
                "counts": {"images": sum(r["count"] for r in records), "skipped": len(skipped)},
                "skipped": skipped,
                "shards": [{key: r[key] for key in ("file", "start", "stop", "count", "bytes", "sha256")}
                           for r in records if r["count"]]}
    # What the latents depend on, by value: a training config may name another file with the same encoder.
    if getattr(job, "autoencoder", None) is not None:
        manifest["encoder_sha256"] = job.autoencoder.encoder_digest()
    extra = job.finish(out, records)
    manifest["counts"].update(extra.pop("counts", {}))
    manifest.update(extra)
    _write_json(out / MANIFEST, manifest)
    return manifest


def process_state() -> PartialState:
    """accelerate's view of this launch (rank, world size, device); CPU-only launches synchronise over gloo."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def run_extraction(job: ExtractionJob, out: str | os.PathLike, *, shard_size: int = 1024, batch_size: int = 32,
                   num_workers: int = 4, on_corrupt: str = "skip") -> dict[str, Any] | None:
    """Extract ``job`` into ``out`` on every process of this launch, skipping shards already done; returns the
    manifest on rank 0 (None elsewhere)."""
    if on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    state = process_state()
    out = Path(out)
    num_items = len(job.source)
    num_shards = -(-num_items // shard_size)
    settings = {**job.settings, "num_source_images": num_items, "shard_size": shard_size}
    if state.is_main_process:
        _claim_folder(out, settings)
    state.wait_for_everyone()
    _check_settings(out, settings)

    rank, world = state.process_index, state.num_processes
    todo = [k for k in range(rank, num_shards, world) if not _shard_done(out, k)]
    plan = list(_batch_plan(todo, num_items, shard_size, batch_size))
    with tqdm(total=sum(len(indices) for _, indices, _ in plan), desc=f"rank {rank}/{world}", unit="img",
              position=rank, dynamic_ncols=True) as progress:
        if plan:
            _extract_shards(job, out, plan, dtypes=_storage_dtypes(settings), num_workers=num_workers,
                            on_corrupt=on_corrupt, writer=(rank, world), progress=progress)
    state.wait_for_everyone()
    return _write_manifest(out, job, settings, num_shards) if state.is_main_process else None


def _extract_shards(job: ExtractionJob, out: Path, plan: list[tuple[int, list[int], tuple[int, int] | None]], *,
                    dtypes: dict[str, torch.dtype], num_workers: int, on_corrupt: str, writer: tuple[int, int],
                    progress: tqdm) -> None:
    """Encode the batches of ``plan`` (:func:`_batch_plan`'s) and write each shard after its last batch.
    ``writer``: (rank, world size), for the shard records."""
    loader = DataLoader(_Guarded(job.source), batch_sampler=[indices for _, indices, _ in plan],
                        num_workers=num_workers, collate_fn=_as_list)
    parts, infos, skipped = defaultdict(list), [], []
    for (k, indices, span), batch in zip(plan, loader):
        good = [item for item in batch if "error" not in item]
        for bad in (item for item in batch if "error" in item):
            if on_corrupt == "error":
                raise CorruptImageError(f"cannot read image {bad['path']} ({bad['error']}); rerun with "
                                        f"--on_corrupt skip to skip and count unreadable images")
            skipped.append({key: bad[key] for key in ("index", "path", "error")})
        if good:
            with torch.inference_mode():
                for key, value in job.encode(good).items():
                    parts[key].append(value.cpu())
            infos.extend({key: v for key, v in item.items() if key != "image"} for item in good)
        progress.update(len(indices))
        if span is not None:
            _write_shard(out, k, span, parts, dtypes, infos, skipped, job, writer)
            parts, infos, skipped = defaultdict(list), [], []


def _storage_dtype(fp16: bool) -> str:
    return "float16" if fp16 else "float32"


def extract_imagefolder(data: str | os.PathLike, out: str | os.PathLike, *, resolution: int, autoencoder: str,
                        single_file_config: str = "", scale_factor: float = 0.18215, fp16: bool = False,
                        autoencoder_dtype: str = "fp32", repa_encoders: str = "", repa_encoder_weights: str = "",
                        repa_fp16: bool = False, **run_kwargs: Any) -> dict[str, Any] | None:
    """Moments of every image of the ImageFolder ``data`` and of its flip, at ``resolution`` (ADM centre crop), and
    with ``repa_encoders`` (comma-separated, as ``repa.encoders``; weights as ``repa.encoder_weights``) those
    encoders' features of both. ``run_kwargs`` go to :func:`run_extraction`."""
    state = process_state()
    source = ImageFolderImages(data, resolution)
    ae = Autoencoder.load(autoencoder, scale_factor=scale_factor, single_file_config=single_file_config,
                          dtype=autoencoder_dtype, device=state.device)
    settings = {"kind": "imagefolder", "source": str(Path(data).resolve()), "classes": source.classes,
                "autoencoder": autoencoder, "single_file_config": single_file_config, "scale_factor": scale_factor,
                "autoencoder_dtype": autoencoder_dtype, "resolution": resolution,
                "latent_shape": list(ae.latent_shape(resolution)), "dtype": _storage_dtype(fp16), "flip": True}
    repa = _repa(repa_encoders, repa_encoder_weights, resolution, state.device, repa_fp16)
    settings.update(_repa_settings(repa))
    return run_extraction(ImageFolderLatents(source, ae, settings, repa), out, **run_kwargs)


def _repa(names: str, weights: str, resolution: int, device: torch.device, fp16: bool) -> RepaFeatures | None:
    if not split_names(names):
        if weights:
            raise ConfigError(f"--repa_encoder_weights={weights!r} without --repa_encoders: name the encoders")
        return None
    return RepaFeatures(names, weights, resolution, device, fp16)


def extract_coco(root: str | os.PathLike, split: str, out: str | os.PathLike, *, autoencoder: str, clip: str,
                 resolution: int = 256, single_file_config: str = "", scale_factor: float = 0.23010,
                 max_length: int = 77, fp16: bool = False, autoencoder_dtype: str = "fp32", repa_encoders: str = "",
                 repa_encoder_weights: str = "", repa_fp16: bool = False, **run_kwargs: Any
                 ) -> dict[str, Any] | None:
    """Moments of every MS-COCO image of ``split`` and the CLIP encodings of all its captions (and, with
    ``repa_encoders``, those encoders' features of every image)."""
    state = process_state()
    source = CocoImageCaptions(root, split, resolution)
    ae = Autoencoder.load(autoencoder, scale_factor=scale_factor, single_file_config=single_file_config,
                          dtype=autoencoder_dtype, device=state.device)
    te = TextEncoder.load(clip, device=state.device, max_length=max_length)
    settings = {"kind": "coco", "source": str(Path(root).resolve()), "split": split, "autoencoder": autoencoder,
                "single_file_config": single_file_config, "scale_factor": scale_factor,
                "autoencoder_dtype": autoencoder_dtype, "resolution": resolution,
                "latent_shape": list(ae.latent_shape(resolution)), "dtype": _storage_dtype(fp16), "flip": False,
                "text_encoder": clip, "max_length": max_length, "context_shape": [max_length, te.hidden_size]}
    repa = _repa(repa_encoders, repa_encoder_weights, resolution, state.device, repa_fp16)
    settings.update(_repa_settings(repa))
    return run_extraction(CocoFeatures(source, ae, te, settings, repa), out, **run_kwargs)

