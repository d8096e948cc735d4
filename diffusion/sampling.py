"""Drawing samples: training previews, labelled PNG grids, and resumable many-process evaluation jobs.

Reproducibility: sample ``i`` of a run with seed ``s`` gets its own CPU ``torch.Generator`` seeded from (s, i). Its
initial noise and every random draw the sampler makes for it come from that generator (the samplers take a
``randn(x)`` callable; :class:`PerSampleNoise` stacks one draw per sample), and its evaluation label is a function of
(s, i) too. So sample ``i`` is the same whatever the batch size, the number of processes or the device it was drawn
on (up to the device's arithmetic), and a 50K-sample job can be split, killed and resumed without changing a pixel.

Evaluation jobs (:class:`SampleJob`) write fixed-size chunks ``OUT.parts/chunk_XXXXX.npz`` atomically, process ``r``
of ``w`` takes every ``w``-th unfinished chunk, and rank 0 streams the chunks into one ADM-style ``OUT.npz``
(``arr_0``: uint8 (N, H, W, 3); ``arr_1``: labels of class-conditional models) that the FID tools read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffusion.files import write_atomic

# objective.sample keyword arguments that come from the ``sample`` config section
SAMPLER_KEYS = ("sampler", "steps", "order", "t_end", "skip_type", "eta", "guidance_scale", "guidance_channels",
                "clip_denoised")
LABEL_MODES = ("uniform", "balanced", "train_freq")
MAX_GRID_ROWS = 16  # grids of models with more classes show this many evenly spaced classes unless told which
_NOISE, _LABELS = 0, 1  # independent random streams of one sample


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def sample_settings(sample_cfg) -> dict:
    """The ``sample`` config section -> keyword arguments of ``objective.sample``."""
    return {key: sample_cfg[key] for key in SAMPLER_KEYS}


def preview_settings(config):
    """``config.sample`` with the non-empty values of ``config.preview`` on top: the (cheaper) sampler the training
    previews use."""
    settings = copy.deepcopy(config.sample)
    for key, value in config.preview.items():
        if value not in ("", 0, None):
            settings[key] = value
    return settings


def check_settings(objective, settings: dict) -> None:
    """Refuse sampler settings the objective cannot run, with the valid choices in the message."""
    if settings["sampler"] not in objective.SAMPLERS:
        raise ValueError(f"unknown sampler {settings['sampler']!r} for {type(objective).__name__}; "
                         f"choose one of {', '.join(objective.SAMPLERS)}")
    if not isinstance(settings["steps"], int) or settings["steps"] < 1:
        raise ValueError(f"steps must be a positive number of network evaluations, got {settings['steps']!r}")
    channels = str(settings["guidance_channels"])
    if channels != "all" and not (channels.isdigit() and int(channels) > 0):
        raise ValueError(f"guidance_channels must be 'all' or a positive channel count, got {channels!r}")


def num_real_classes(model) -> int:
    """Classes a user can ask for (the null label, if any, excluded); 0 for unconditional models."""
    null = getattr(model, "null_label", None)
    if null is not None:
        return null
    return max(getattr(model, "num_classes", 0), 0)


# ----------------------------------------------------------------------------------------------------------
# Per-sample randomness and evaluation labels
# ----------------------------------------------------------------------------------------------------------


def index_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for one random stream of sample ``index``; hashed (numpy's SeedSequence) so that nearby
    (seed, index) pairs give unrelated streams."""
    state = np.random.SeedSequence([seed % 2**64, index, stream]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


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
            raise ValueError(f"unknown label distribution {self.mode!r}; choose one of {', '.join(LABEL_MODES)}")
        if self.num_classes < 1:
            raise ValueError("labels need a class-conditional model")
        if self.mode == "given":
            check_labels(self.given or [], self.num_classes)
            if not self.given:
                raise ValueError("no labels given")
        if self.mode == "train_freq" and len(self.class_counts or []) != self.num_classes:
            raise ValueError(f"train_freq needs {self.num_classes} class counts (the model's classes), got "
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
        raise ValueError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")


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
        raise ValueError(
            f"--label_dist train_freq needs the training set's class frequencies: the checkpoint records no "
            f"class_counts and {folder} is not an ImageFolder tree ({err}). Point --config.data.root at the "
            f"dataset (its train/ folder is counted), or use --label_dist uniform|balanced") from None


# ----------------------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, objective, sample_cfg, image_shape, *, labels: torch.Tensor | None = None, num: int = 0,
             contexts: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
             indices: Sequence[int] | None = None, seed: int = 0, decode: Callable | None = None, device="cpu",
             progress: bool = False) -> torch.Tensor:
    """Samples (float32, N x C x H x W) for ``labels`` (class-conditional), ``contexts`` (text, (N, tokens, dim)) or
    ``num`` unconditional ones; ``decode`` (latents -> images in [-1, 1]) is applied to latent samples.

    ``indices`` are the samples' global numbers (default 0..N-1): with ``seed`` they decide every random draw,
    so a sample does not depend on which batch it is drawn in. Guidance uses the model's null label or
    ``null_context`` (shape (tokens, dim)) as the unconditional input.
    """
    n = len(labels) if labels is not None else len(contexts) if contexts is not None else num
    indices = range(n) if indices is None else indices
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for {n} samples")
    randn = PerSampleNoise(seed, indices)
    noise = randn(torch.empty((n, *image_shape), device=device))
    cond, null_cond = {}, None
    if labels is not None:
        cond = {"y": labels.to(device)}
        if getattr(model, "null_label", None) is not None:
            null_cond = {"y": torch.full_like(cond["y"], model.null_label)}
    if contexts is not None:
        cond = {"context": contexts.to(device)}
        if null_context is not None:
            null_cond = {"context": null_context.to(device).expand(n, *null_context.shape)}
    was_training = model.training
    model.eval()
    try:
        out = objective.sample(model, noise, cond, null_cond=null_cond, randn=randn, progress=progress,
                               **sample_settings(sample_cfg)).float()
    finally:
        model.train(was_training)
    return decode(out) if decode is not None else out


@dataclass
class SampleSource:
    """Everything that decides sample ``i``: model, objective, sampler settings, seed and what sample ``i`` is
    conditioned on: a :class:`LabelPlan`, a prompt list with the text encoder, or text ``contexts`` (R, tokens,
    dim) with ``null_context`` (prompts and contexts are cycled by index), or nothing."""

    model: torch.nn.Module
    objective: object
    sample_cfg: object
    image_shape: tuple[int, ...]
    seed: int = 0
    labels: LabelPlan | None = None
    prompts: list[str] | None = None
    text_encoder: object = None
    contexts: torch.Tensor | None = None
    null_context: torch.Tensor | None = None
    decode: Callable | None = None
    device: str | torch.device = "cpu"

    def images(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (images in [-1, 1] (N, C, H, W), labels or None)."""
        labels = self.labels(indices) if self.labels is not None else None
        contexts, null_context = None, self.null_context
        if self.prompts is not None:
            contexts = self.text_encoder.encode([self.prompts[i % len(self.prompts)] for i in indices])
            null_context = self.text_encoder.null_context()
        elif self.contexts is not None:
            contexts = self.contexts[torch.as_tensor(list(indices)) % len(self.contexts)]
        images = generate(self.model, self.objective, self.sample_cfg, self.image_shape, labels=labels,
                          num=len(indices), contexts=contexts, null_context=null_context, indices=indices,
                          seed=self.seed, decode=self.decode, device=self.device)
        return images, labels

    def uint8(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (uint8 (N, H, W, 3) as the FID tools read them; grey images repeated to RGB, labels or None)."""
        images, labels = self.images(indices)
        pixels = to_uint8(images).numpy()
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        return pixels, None if labels is None else labels.numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), quantised like the FID pipelines."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def class_rows(num_classes: int, per_class: int, classes: list[int] | None = None) -> torch.Tensor:
    """Labels for a grid with one row per class: [c0]*per_class + [c1]*per_class + ..."""
    classes = list(range(num_classes)) if classes is None else classes
    return torch.tensor(classes).repeat_interleave(per_class)


def default_grid_classes(num_classes: int) -> list[int]:
    """Every class, or ``MAX_GRID_ROWS`` evenly spaced ones for models with many (ImageNet: 0, 62, 125, ...)."""
    if num_classes <= MAX_GRID_ROWS:
        return list(range(num_classes))
    return [r * num_classes // MAX_GRID_ROWS for r in range(MAX_GRID_ROWS)]


def grid_image(images: torch.Tensor, ncol: int, row_labels: list[str] | None = None, min_cell: int = 48,
               pad: int = 2) -> Image.Image:
    """A PNG-ready grid; small images are upscaled (nearest) to ``min_cell`` pixels, rows labelled on the left."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    nrow = -(-n // ncol)
    margin = 0
    font = ImageFont.load_default()
    if row_labels:
        margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in row_labels)
    canvas = Image.new("RGB", (margin + ncol * (cell_w + pad) + pad, nrow * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        tile = Image.fromarray(pixels[i].squeeze(-1).numpy() if c == 1 else pixels[i].numpy())
        tile = tile.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
        r, col = divmod(i, ncol)
        canvas.paste(tile, (margin + pad + col * (cell_w + pad), pad + r * (cell_h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((4, pad + r * (cell_h + pad) + cell_h // 2 - 5), text, fill="black", font=font)
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, ncol: int, row_labels: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, ncol, row_labels).save(path)
    return path


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def sample_grid(model, objective, sample_cfg, image_shape, path, *, class_names: list[str] | None = None,
                classes: list[int] | None = None, prompts: list[str] | None = None, text_encoder=None,
                contexts: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
                decode: Callable | None = None, seed: int | None = None, num: int | None = None,
                batch_size: int = 256, device="cpu", progress=False) -> Path:
    """One row per class (``sample_cfg.per_class`` columns), per prompt (with ``text_encoder``) or per text
    context (``contexts`` (R, tokens, dim), e.g. cached caption encodings, with ``null_context``), or a
    square-ish grid of ``num`` (default ``sample_cfg.num_unconditional``) unconditional samples. Drawn
    ``batch_size`` at a time; cell ``i`` (row-major) is sample ``i`` of ``seed``."""
    seed = sample_cfg.seed if seed is None else seed
    n_cls = num_real_classes(model)
    source = SampleSource(model, objective, sample_cfg, tuple(image_shape), seed=seed, decode=decode, device=device)
    if prompts is not None:
        source.prompts, source.text_encoder = [p for p in prompts for _ in range(sample_cfg.per_class)], text_encoder
        total, ncol, row_labels = len(source.prompts), sample_cfg.per_class, [_short(p) for p in prompts]
    elif contexts is not None:
        source.contexts = contexts.repeat_interleave(sample_cfg.per_class, dim=0)
        source.null_context = null_context
        total, ncol, row_labels = len(source.contexts), sample_cfg.per_class, None
    elif n_cls:
        classes = default_grid_classes(n_cls) if classes is None else classes
        check_labels(classes, n_cls)
        source.labels = LabelPlan("given", n_cls, given=class_rows(n_cls, sample_cfg.per_class, classes).tolist())
        total, ncol = len(source.labels.given), sample_cfg.per_class
        row_labels = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
    else:
        total = sample_cfg.num_unconditional if num is None else num
        ncol, row_labels = max(1, int(total**0.5)), None
    batches = [range(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]
    images = torch.cat([source.images(b)[0].cpu() for b in tqdm(batches, desc="grid", disable=not progress)])
    return save_grid(images, path, ncol, row_labels)


# ----------------------------------------------------------------------------------------------------------
# Resumable, sharded evaluation jobs
# ----------------------------------------------------------------------------------------------------------


class JobMismatchError(ValueError):
    """An existing job (parts or final file) was made with other settings than the ones asked for now."""


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
                raise ValueError(f"the {name} must be positive, got {value}")
        settings = json.loads(json.dumps(settings))  # the form it takes in the JSON record
        record = out.with_suffix(".job.json")
        if record.is_file():
            saved = json.loads(record.read_text())
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
        with np.load(self.chunk_path(c)) as data:
            images = data["images"]
            labels = data["labels"] if "labels" in data else None
        if len(images) != len(self.chunk_indices(c)):
            raise ValueError(f"{self.chunk_path(c)} holds {len(images)} samples, expected "
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
