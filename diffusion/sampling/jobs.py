"""Resumable many-process sampling jobs written as ADM's .npz."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffusion.errors import ConfigError, InputError, JobMismatchError
from diffusion.files import write_atomic
from diffusion.sampling.settings import OPTION_KEYS, option_default

# Settings that job records gained after the first records were written: (path in ``settings``, the value every
# older job was drawn with). A record without one reads as that value, so an older half-finished job resumes; new
# settings without one (a caller that predates the key) mean that value too, and are recorded with it.
ADDED_SETTINGS = ((("sampler", "precision"), "fp32"), (("sampler", "tf32"), False),
                  (("sampler", "quantize"), "round"),  # sample.quantize: samples were rounded before it existed
                  (("guide",), ""))  # sample.guide: every job was guided by CFG (or unguided) before it existed


def _with_added_settings(settings: dict) -> dict:
    for path, value in ADDED_SETTINGS:
        node = settings
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], value)
    return settings


def _without_unused_options(saved: dict, settings: dict) -> None:
    """Records written before each sampler took only its own options held every sampler option, used or not: one
    the new settings leave out that holds its default was unused then too, and is dropped from ``saved``."""
    old, new = saved.get("sampler"), settings.get("sampler")
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [k for k in old if k not in new and k in OPTION_KEYS and old[k] == option_default(k)]:
            del old[key]


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


@dataclass
class SampleJob:
    """``num_samples`` samples as chunks of ``chunk_size``: chunk ``c`` holds samples [c K, (c + 1) K) in
    ``OUT.parts/chunk_XXXXX.npz`` (``images`` uint8 NHWC, ``labels``). ``OUT.job.json`` records the chunk size and
    the ``settings`` that decide the samples; resuming with other settings is refused."""

    out: Path
    num_samples: int
    chunk_size: int
    settings: dict

    @property
    def parts(self) -> Path:
        return self.out.with_suffix(".parts")

    @property
    def record(self) -> Path:
        return self.out.with_suffix(".job.json")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_path(self, c: int) -> Path:
        return self.parts / f"chunk_{c:05d}.npz"

    def chunk_indices(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples))

    def _description(self) -> dict:
        return {"num_samples": self.num_samples, "chunk_size": self.chunk_size, "settings": self.settings}

    @classmethod
    def open(cls, out: str | Path, num_samples: int | None, settings: dict, chunk_size: int | None = None,
             default_num_samples: int = 50_000, default_chunk_size: int = 256) -> SampleJob:
        """A new job, or the one recorded beside ``out`` (its sample count and chunk size unless given).
        Raises :class:`JobMismatchError` if the recorded job differs. Safe to call on every rank."""
        out = Path(out)
        for name, value in (("number of samples", num_samples), ("chunk size", chunk_size)):
            if value is not None and value < 1:
                raise ConfigError(f"the {name} must be positive, got {value}")
        settings = _with_added_settings(json.loads(json.dumps(settings)))  # the form it takes in the JSON record
        record = out.with_suffix(".job.json")
        if record.is_file():
            saved = json.loads(record.read_text())
            _with_added_settings(saved.get("settings", {}))
            _without_unused_options(saved.get("settings", {}), settings)
            job = cls(out, num_samples or saved["num_samples"], chunk_size or saved["chunk_size"], settings)
            changed = [d.removeprefix("settings.") for d in _differences(saved, job._description())]
            if changed:
                raise JobMismatchError(
                    f"{record} records a job with other settings (changed: {', '.join(changed)}). Re-run with the "
                    f"original settings to resume, or delete {record} and {job.parts} (and {out}) to start over")
            return job
        if out.exists():
            raise JobMismatchError(f"{out} exists but has no job record {record}; delete it or choose another --out")
        return cls(out, num_samples or default_num_samples, chunk_size or default_chunk_size, settings)

    def write_record(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        text = json.dumps(self._description(), indent=2, sort_keys=True).encode()
        write_atomic(self.record, lambda f: f.write(text))

    def done(self) -> bool:
        return self.out.is_file()

    def pending(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.chunk_path(c).is_file()]

    def write_chunk(self, c: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        write_atomic(self.chunk_path(c), lambda f: np.savez(f, **arrays))

    def read_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            with np.load(self.chunk_path(c)) as data:
                images = data["images"]
                labels = data["labels"] if "labels" in data else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"{self.chunk_path(c)} is unreadable ({type(err).__name__}: {err}); delete it and "
                             f"re-run to redraw it") from None
        if len(images) != len(self.chunk_indices(c)):
            raise InputError(f"{self.chunk_path(c)} holds {len(images)} samples, expected "
                             f"{len(self.chunk_indices(c))}; delete it and re-run to redraw it")
        return images, labels

    def write_pngs(self, chunks: Sequence[int], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for c in chunks:
            for i, image in zip(self.chunk_indices(c), self.read_chunk(c)[0]):
                Image.fromarray(image).save(folder / f"{i:06d}.png")

    def assemble(self) -> tuple[int, ...]:
        """Stream every chunk into ``OUT.npz`` (never all images in memory at once), then remove the parts.
        Returns the shape of ``arr_0``."""
        first_images, first_labels = self.read_chunk(0)
        shape = (self.num_samples, *first_images.shape[1:])

        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as arr:
                    np.lib.format.write_array_header_1_0(
                        arr, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                              "shape": shape})
                    for c in range(self.num_chunks):
                        arr.write(np.ascontiguousarray(self.read_chunk(c)[0], dtype=np.uint8).tobytes())
                if first_labels is not None:
                    labels = np.concatenate([self.read_chunk(c)[1] for c in range(self.num_chunks)])
                    with zf.open("arr_1.npy", "w", force_zip64=True) as arr:
                        np.lib.format.write_array(arr, labels.astype(np.int64))

        write_atomic(self.out, write)
        shutil.rmtree(self.parts)
        return shape


def run_job(job: SampleJob, draw: Callable[[range], tuple[np.ndarray, np.ndarray | None]], *, batch_size: int,
            state, png_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Draw the job's unfinished chunks on all processes of ``state`` (an accelerate ``PartialState``), then
    assemble on rank 0. ``draw(indices) -> (uint8 NHWC images, labels or None)``. Returns counts, timing and (on
    rank 0) the shape of the assembled images."""
    from accelerate.utils import broadcast_object_list

    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        job.write_record()
    state.wait_for_everyone()
    pending = broadcast_object_list([job.pending()])[0]  # one listing, so every rank agrees on the split
    mine = pending[rank::world]
    total = sum(len(job.chunk_indices(c)) for c in pending)
    start = time.perf_counter()
    show = progress and state.is_main_process
    with tqdm(total=total, unit="img", desc=f"sampling ({world} proc)", disable=not show, dynamic_ncols=True) as bar:
        for c in mine:
            indices = job.chunk_indices(c)
            parts = []
            for s in range(0, len(indices), batch_size):
                batch = indices[s:s + batch_size]
                parts.append(draw(batch))
                bar.update(min(len(batch) * world, total - bar.n))  # rank 0's pace stands for every rank's
            labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
            job.write_chunk(c, np.concatenate([p[0] for p in parts]), labels)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    if png_dir is not None:
        job.write_pngs(list(range(job.num_chunks))[rank::world], Path(png_dir))
        state.wait_for_everyone()
    shape = job.assemble() if state.is_main_process else None
    return {"shape": shape, "drawn_chunks": len(pending), "reused_chunks": job.num_chunks - len(pending),
            "seconds": seconds, "images_per_second": total / seconds if seconds > 0 else 0.0}
