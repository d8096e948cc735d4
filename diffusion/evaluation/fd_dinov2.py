"""FD-DINOv2's features (EDM2's ``calculate_metrics.py``, after layer6ai-labs/dgm-eval): DINOv2 ViT-L/14's class
token after the final norm, 1024-d, the output of torch.hub's ``dinov2_vitl14`` (its head is an identity).

EDM2's ``DINOv2Detector`` (its default ``resize_mode='torch'``) feeds the network

    uint8 (N, 3, H, W) -> float32 -> ``F.interpolate(size=(224, 224), mode='bicubic', antialias=True)`` (always,
    never rounded or clamped) -> / 255 -> (x - ImageNet mean) / ImageNet std

and the hub model interpolates its 37 x 37 position table (518 px) to the 16 x 16 grid of 224 px inputs in every
forward: bicubic, no antialias, scale factor (16 + 0.1) / 37 (``interpolate_offset``). Here the encoder comes from
``diffusion.pretrained.vision_encoders.load_vision_encoder`` (timm or transformers, local files only) set up for 518 px,
so the released table is kept as stored, and that table is then resampled once the hub's way and the model set up
for 224 px; the forward is then the hub's. (A weights file with another grid than 37 x 37 is first resampled to
37 x 37 by the loader, REPA's way.) The Frechet distance of these features is ``fd_dinov2``; statistics are float64,
as everywhere here (``diffusion.evaluation.metrics``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.evaluation.inception import weights_digest
from diffusion.pretrained.vision_encoders import IMAGENET_MEAN, IMAGENET_STD, WEIGHT_SUFFIXES, load_vision_encoder

ENCODER = "dinov2-vit-l"  # torch.hub's dinov2_vitl14
INPUT_SIZE = 224  # EDM2's resize
RELEASED_GRID = 37  # the released checkpoints' position table: 518 px / 14
LOAD_RESOLUTION = RELEASED_GRID * 16  # load_vision_encoder's resolution whose token grid is 37 (518 px inputs)
INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2's interpolate_offset


def edm2_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's float32 (N, 3, 224, 224) input, as EDM2's ``DINOv2Detector``."""
    x = F.interpolate(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


def hub_interpolate_pos_embed(table: torch.Tensor, grid: int, num_prefix: int) -> torch.Tensor:
    """(1, prefix + M*M, D) -> (1, prefix + grid*grid, D) as facebookresearch/dinov2's ``interpolate_pos_encoding``
    (float32, bicubic without antialias, scale factor (grid + 0.1) / M; prefix rows kept)."""
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:].float()
    side, dim = int(round(patches.shape[1] ** 0.5)), patches.shape[-1]
    if side * side != patches.shape[1]:
        raise ValueError(f"the position table holds {patches.shape[1]} patch positions, not a square grid")
    scale = (grid + INTERPOLATE_OFFSET) / side
    out = F.interpolate(patches.reshape(1, side, side, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                        mode="bicubic", antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolating a {side}x{side} table gave {tuple(out.shape[-2:])}, not {grid}x{grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([prefix.float(), out], dim=1).to(table.dtype)


def _set_up_for_224(encoder: nn.Module) -> None:
    """The encoder's model with its position table resampled the hub's way for 224 px inputs, in place."""
    vit, grid = encoder.model, INPUT_SIZE // encoder.patch_size
    if encoder.backend == "timm":
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        vit.pos_embed = nn.Parameter(hub_interpolate_pos_embed(vit.pos_embed.data, grid, prefix),
                                     requires_grad=False)
        vit.patch_embed.img_size, vit.patch_embed.grid_size = (INPUT_SIZE,) * 2, (grid, grid)
        vit.patch_embed.num_patches = grid * grid
    else:  # transformers Dinov2Model: the table then matches the token count, so its forward uses it as it is
        embeddings = vit.embeddings
        table = hub_interpolate_pos_embed(embeddings.position_embeddings.data, grid, 1)
        embeddings.position_embeddings = nn.Parameter(table, requires_grad=False)
        vit.config.image_size = INPUT_SIZE


def weights_identity(source: str | os.PathLike) -> str:
    """sha256 of a weights file, or of a transformers folder's config and weight files (their names and digests)."""
    path = Path(source)
    if path.is_file():
        return weights_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((*WEIGHT_SUFFIXES, ".json"))):
        digest.update(f"{file.name}:{weights_digest(file)}\n".encode())
    return digest.hexdigest()


class DINOv2Features:
    """EDM2's FD-DINOv2 features as a feature network (see ``diffusion.evaluation.extractors``): ``{"pool": (N,
    1024)}`` (the width of the weights). ``weights``: what ``load_vision_encoder`` takes (a torch.hub
    ``dinov2_vitl14_pretrain.pth``, a timm file, a transformers folder or a cached hub id; "" = the local caches).
    ``id`` = ``dinov2-<sha256[:12]>`` of the weights."""

    def __init__(self, weights: str = "", device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.encoder = load_vision_encoder(ENCODER, weights=weights, resolution=LOAD_RESOLUTION, device=self.device)
        _set_up_for_224(self.encoder)
        self.dims = {"pool": self.encoder.embed_dim}
        self.weights_path = Path(self.encoder.source)
        self.id = f"dinov2-{weights_identity(self.weights_path)[:12]}"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> the network's input (grey images read as RGB)."""
        if images.shape[-1] == 1:
            images = images.expand(-1, -1, -1, 3)
        return edm2_preprocess(images.permute(0, 3, 1, 2).contiguous())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(images)
        model = self.encoder.model
        if self.encoder.backend == "timm":
            tokens = model.forward_features(x)
        else:
            tokens = model(pixel_values=x).last_hidden_state
        return {"pool": tokens[:, 0].float()}
