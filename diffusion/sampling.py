"""Drawing samples from a model for previews and ``sample.py``, and writing labelled PNG grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def num_real_classes(model) -> int:
    """Classes a user can ask for (the null label, if any, excluded); 0 for unconditional models."""
    null = getattr(model, "null_label", None)
    if null is not None:
        return null
    return max(getattr(model, "num_classes", 0), 0)


def class_rows(num_classes: int, per_class: int, classes: list[int] | None = None) -> torch.Tensor:
    """Labels for a grid with one row per class: [c0]*per_class + [c1]*per_class + ..."""
    classes = list(range(num_classes)) if classes is None else classes
    return torch.tensor(classes).repeat_interleave(per_class)


@torch.no_grad()
def generate(model, objective, sample_cfg, image_shape, *, labels: torch.Tensor | None = None, num: int = 0,
             seed: int = 0, device="cpu", progress: bool = False) -> torch.Tensor:
    """Samples in [-1, 1] (unclipped model space) for ``labels`` (class-conditional) or ``num`` unconditional ones.

    Initial noise (and a stochastic sampler's draws) come from a CPU generator seeded with ``seed``, so the same
    seed gives the same samples on any device.
    """
    was_training = model.training
    model.eval()
    n = len(labels) if labels is not None else num
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *image_shape), generator=generator).to(device)
    cond, null_cond = {}, None
    if labels is not None:
        labels = labels.to(device)
        cond = {"y": labels}
        if getattr(model, "null_label", None) is not None:
            null_cond = {"y": torch.full_like(labels, model.null_label)}
    out = objective.sample(model, noise, cond, null_cond=null_cond, guidance_scale=sample_cfg.guidance_scale,
                           guidance_channels=sample_cfg.guidance_channels, steps=sample_cfg.steps,
                           sampler=sample_cfg.sampler, clip_denoised=sample_cfg.clip_denoised,
                           generator=generator, progress=progress)
    model.train(was_training)
    return out.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), quantised like the FID pipelines."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


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


def sample_grid(model, objective, sample_cfg, image_shape, path, *, class_names: list[str] | None = None,
                classes: list[int] | None = None, seed: int | None = None, device="cpu", progress=False) -> Path:
    """One row per class (``sample_cfg.per_class`` columns), or a square-ish unconditional grid."""
    seed = sample_cfg.seed if seed is None else seed
    n_cls = num_real_classes(model)
    if n_cls:
        classes = list(range(n_cls)) if classes is None else classes
        bad = [c for c in classes if not 0 <= c < n_cls]
        if bad:
            raise ValueError(f"labels {bad} out of range: this model has classes 0..{n_cls - 1}")
        labels = class_rows(n_cls, sample_cfg.per_class, classes)
        images = generate(model, objective, sample_cfg, image_shape, labels=labels, seed=seed, device=device,
                          progress=progress)
        names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
        return save_grid(images, path, sample_cfg.per_class, names)
    num = sample_cfg.num_unconditional
    images = generate(model, objective, sample_cfg, image_shape, num=num, seed=seed, device=device,
                      progress=progress)
    return save_grid(images, path, max(1, int(num**0.5)))
