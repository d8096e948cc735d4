"""Labelled PNG grids of samples: one row per class or prompt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffusion.registry import describe
from diffusion.sampling.generate import SampleSource
from diffusion.sampling.per_sample import LabelPlan, check_labels
from diffusion.sampling.pixels import to_uint8

MAX_GRID_ROWS = 16  # grids of models with more classes show this many evenly spaced classes unless told which


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
                batch_size: int = 256, device="cpu", progress=False, guide=None) -> Path:
    """One row per class (``sample_cfg.per_class`` columns), per prompt (with ``text_encoder``) or per text
    context (``contexts`` (R, tokens, dim), e.g. cached caption encodings, with ``null_context``), or a
    square-ish grid of ``num`` (default ``sample_cfg.num_unconditional``) unconditional samples. Drawn
    ``batch_size`` at a time; cell ``i`` (row-major) is sample ``i`` of ``seed``. ``guide``: an autoguidance guide
    network (None: CFG)."""
    seed = sample_cfg.seed if seed is None else seed
    n_cls, labels, row_labels = describe(model).num_labels, None, None
    if prompts is not None:
        prompts, ncol, row_labels = [p for p in prompts for _ in range(sample_cfg.per_class)], sample_cfg.per_class, \
            [_short(p) for p in prompts]
        total = len(prompts)
    elif contexts is not None:
        contexts, ncol = contexts.repeat_interleave(sample_cfg.per_class, dim=0), sample_cfg.per_class
        total = len(contexts)
    elif n_cls:
        classes = default_grid_classes(n_cls) if classes is None else classes
        check_labels(classes, n_cls)
        labels = LabelPlan("given", n_cls, given=class_rows(n_cls, sample_cfg.per_class, classes).tolist())
        total, ncol = len(labels.given), sample_cfg.per_class
        row_labels = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
    else:
        total = sample_cfg.num_unconditional if num is None else num
        ncol = max(1, int(total**0.5))
    source = SampleSource(model, objective, sample_cfg, tuple(image_shape), seed=seed, labels=labels, prompts=prompts,
                          text_encoder=text_encoder, contexts=contexts, null_context=null_context, decode=decode,
                          device=device, guide=guide)
    batches = [range(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]
    images = torch.cat([source.images(b)[0].cpu() for b in tqdm(batches, desc="grid", disable=not progress)])
    return save_grid(images, path, ncol, row_labels)
