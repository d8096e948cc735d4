"""REPA, representation alignment (Yu et al., ICLR 2025): a regulariser on top of a flow-matching loss that aligns
the backbone's hidden states after an early block with the patch features of a frozen pretrained vision encoder.

The pieces, as REPA's official code has them (github.com/sihyun-yu/REPA, ``models/sit.py``, ``loss.py``,
``train.py``; tests/fixtures/README.md, "REPA"):

* **The tap** (``register_tap``): a forward hook on block ``layer`` (1-based) that keeps the raw hidden states it
  outputs (no norm), before the remaining blocks and the final layer; REPA's ``encoder_depth``. DiT: the output of
  ``model.blocks[layer - 1]`` (the in-context design's two appended conditioning tokens dropped); U-ViT: the blocks
  counted through ``in_blocks``, ``mid_block``, ``out_blocks``, the ``model.extras`` prepended tokens (label, time,
  text) dropped. Only patch tokens remain, (B, L, D) in row-major patch order. The backbones are untouched: same
  forward signatures, same checkpoint keys.
* **The projector** (``build_projector``, ``Projectors``): one MLP per encoder, ``Linear(D, projector_dim) - SiLU -
  Linear(projector_dim, projector_dim) - SiLU - Linear(projector_dim, z_dim)`` applied token-wise, xavier-uniform
  weights and zero biases (REPA's init); state-dict names ``{i}.{0,2,4}`` (REPA's ``projectors.{i}.{0,2,4}``).
* **The alignment loss** (``alignment_loss``): both the encoder tokens z and the projected tokens z~ are
  L2-normalised over the feature dimension (``F.normalize``, eps 1e-12); for encoder i and sample j the term is the
  mean over tokens of -<z, z~> (negative cosine similarity in [-1, 1], -1 = aligned); REPA's ``proj_loss`` is the
  mean of the terms over encoders and samples (a 0-dim batch mean). ``alignment_loss_per_sample`` gives the mean
  over encoders of each sample's term, whose batch mean is REPA's value (our trainer averages per-sample losses).
  Encoder targets are detached: the encoder is frozen (REPA computes them under ``no_grad``). Where the backbone's
  token grid differs from the encoder's, the projected grid is resized to the encoder's (``match_tokens``) instead
  of REPA's silent mismatch; REPA's ``zip`` also truncates when encoder and projector counts differ, refused here.
* **The training loss** (``repa_training_losses``): the transport objective's per-sample denoising loss plus
  ``coeff`` x the per-sample alignment loss (REPA's ``proj_coeff``, 0.5); the batch mean is REPA's
  ``loss.mean() + proj_coeff * proj_loss``. ``legacy_p`` is REPA's ``--legacy`` label dropout: ``train.py`` drops
  labels itself with probability ``cfg_prob`` and the model's ``LabelEmbedder`` drops again (p(null) = 1 - 0.9^2 =
  0.19); our backbones never drop, the trainer does once (``cond.p_uncond``), so legacy adds the second drop here.

**Time direction.** REPA's time runs the other way from SiT's and this project's transport objective: t = 0 is data
(``x_t = alpha_t x + sigma_t eps``, linear alpha = 1 - t, sigma = t; cosine alpha = cos(pi t / 2), sigma =
sin(pi t / 2)) and its network predicts ``v = d_alpha x + d_sigma eps`` (linear: eps - x), derivatives in its own t.
With t_ours = 1 - t_repa the paths coincide (REPA's linear = our ``linear``, its cosine = our ``gvp``) and, since
d/dt_ours = -d/dt_repa, REPA's velocity is minus ours: the same squared error. A network trained in REPA's time (a
REPA checkpoint) is seen in ours through ``diffusion.objectives.repa_time.ReversedTime``, which the transport
objective applies with ``time_direction="repa"``; the regulariser itself has no time in it. REPA's
``lognormal`` time draw (sigma = exp(n), t = sigma / (1 + sigma)) is our ``logit_normal`` with mean 0, std 1 on the
linear path: 1 - t = sigmoid(-n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.objectives.guidance import drop_labels

# ----------------------------------------------------------------------------------------------------------------
# The projector
# ----------------------------------------------------------------------------------------------------------------


def build_projector(hidden_size: int, projector_dim: int = 2048, z_dim: int = 768) -> nn.Sequential:
    """REPA's ``build_mlp``: Linear(hidden, projector_dim) - SiLU - Linear(projector_dim, projector_dim) - SiLU -
    Linear(projector_dim, z_dim), with REPA's init (xavier-uniform weights, zero biases)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                        nn.SiLU(), nn.Linear(projector_dim, z_dim))
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return mlp


class Projectors(nn.ModuleList):
    """One projector per target encoder (REPA's ``model.projectors``), a ModuleList so that it has a state dict of
    its own (keys ``{i}.{0,2,4}.{weight,bias}``) beside the backbone's, which stays unchanged.
    ``projectors(h)`` maps tapped hidden states (B, L, hidden) to ``[(B, L, z_dim_i) for each encoder]``."""

    def __init__(self, hidden_size: int, z_dims: list[int] | tuple[int, ...], projector_dim: int = 2048):
        if not z_dims:
            raise ValueError("REPA needs at least one encoder: z_dims is empty")
        super().__init__([build_projector(hidden_size, projector_dim, z_dim) for z_dim in z_dims])

    def forward(self, h: Tensor) -> list[Tensor]:
        return [projector(h) for projector in self]


def split_repa_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A REPA ``SiT`` state dict -> (the backbone's: a DiT with ``learn_sigma=False`` loads it strictly, the
    projectors': ``Projectors`` loads it strictly)."""
    prefix = "projectors."
    backbone = {k: v for k, v in state.items() if not k.startswith(prefix)}
    projectors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return backbone, projectors


# ----------------------------------------------------------------------------------------------------------------
# The alignment loss
# ----------------------------------------------------------------------------------------------------------------


def match_tokens(z: Tensor, tokens: int) -> Tensor:
    """Projected tokens z (B, T, D) on a square row-major grid, resized to ``tokens`` tokens on the square grid of
    the encoder (returned as is when the counts agree). Upsampling: bilinear (``align_corners=False``, pixel
    centres aligned); downsampling: the mean over the backbone patches each encoder patch covers (``area``, exact
    box averages for integer ratios such as a patch-1 backbone against DINOv2's 16 x 16). Differentiable, computed
    in float32 and returned in z's dtype."""
    b, count, dim = z.shape
    if count == tokens:
        return z
    side, target = math.isqrt(count), math.isqrt(tokens)
    if side * side != count or target * target != tokens:
        raise ValueError(f"cannot resize {count} backbone tokens to {tokens} encoder tokens: both must be square "
                         f"grids")
    grid = z.float().transpose(1, 2).reshape(b, dim, side, side)
    if target < side:
        grid = F.interpolate(grid, size=(target, target), mode="area")
    else:
        grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(z.dtype)


def alignment_loss_per_sample(projected: list[Tensor], targets: list[Tensor]) -> Tensor:
    """(B,) float32: for each sample, the mean over encoders of the mean over tokens of -cos(z~, z) (both
    ``F.normalize``d over features). Its batch mean is REPA's ``proj_loss``. ``targets`` (B, T_i, z_dim_i) are
    detached; each ``projected[i]`` (B, L, z_dim_i) is resized to T_i tokens by ``match_tokens`` when L != T_i."""
    if len(projected) != len(targets) or not targets:
        raise ValueError(f"{len(projected)} projectors for {len(targets)} encoder targets: one projector per encoder")
    terms = []
    for i, (z_tilde, z) in enumerate(zip(projected, targets)):
        z = z.detach()
        if z.ndim != 3 or z_tilde.ndim != 3:
            raise ValueError(f"encoder {i}: expected (B, tokens, dim) features, got {tuple(z_tilde.shape)} projected "
                             f"and {tuple(z.shape)} targets")
        z_tilde = match_tokens(z_tilde, z.shape[1])
        if z_tilde.shape != z.shape:
            raise ValueError(f"encoder {i}: projected features {tuple(z_tilde.shape)} do not match the encoder's "
                             f"{tuple(z.shape)} (batch or feature width)")
        cos = (F.normalize(z_tilde.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)  # (B, T)
        terms.append(-cos.mean(dim=1))
    return torch.stack(terms).mean(dim=0)


def alignment_loss(projected: list[Tensor], targets: list[Tensor]) -> Tensor:
    """REPA's ``proj_loss`` (0-dim): sum over encoders i and samples j of the per-(i, j) token mean of -cos,
    divided by (encoders x B); see ``alignment_loss_per_sample``."""
    return alignment_loss_per_sample(projected, targets).mean()


# ----------------------------------------------------------------------------------------------------------------
# The tap
# ----------------------------------------------------------------------------------------------------------------


class Tap:
    """The hidden states of one block, kept at every forward by a forward hook: ``features`` (B, patch tokens,
    hidden) of the last forward (None before the first), with their autograd graph. ``remove()`` (or leaving a
    ``with`` block) takes the hook off."""

    def __init__(self, block: nn.Module, layer: int, start: int, count: int | None):
        self.layer, self.start, self.count = layer, start, count
        self.features: Tensor | None = None
        self._handle = block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output: Tensor) -> None:
        end = None if self.count is None else self.start + self.count
        self.features = output[:, self.start:end]

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_tap(points: tuple[list[nn.Module], int, int | None], layer: int) -> Tap:
    """A ``Tap`` on the output of block ``layer`` (1-based, REPA's ``encoder_depth``) of ``points``, a backbone's
    ``tap_blocks()`` (``diffusion.registry.tap_blocks``: the blocks in forward order, where the patch tokens start,
    how many). DiT: ``blocks[layer - 1]``; U-ViT: the ``layer``-th of in_blocks, mid_block, out_blocks (so layer <=
    depth // 2 taps an in-block, depth // 2 + 1 the mid block). Register it before ``torch.compile``; with
    activation checkpointing a block reruns in the backward pass and the hook refreshes ``features`` with equal
    values."""
    blocks, start, count = points
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"REPA's layer must lie in [1, {len(blocks)}] (the backbone's blocks), got {layer}")
    return Tap(blocks[layer - 1], layer, start, count)


# ----------------------------------------------------------------------------------------------------------------
# REPA's training loss
# ----------------------------------------------------------------------------------------------------------------


def legacy_label_drop(cond: dict, p: float, null_label: int | None, uniform: Tensor | None = None) -> dict:
    """REPA's ``--legacy`` second label drop: :func:`~diffusion.objectives.guidance.drop_labels` of ``y`` on top of
    the trainer's own drop (the row's ``uniform`` draw, fresh ``torch.rand`` when not given, below ``p``). Class
    labels only."""
    if p <= 0:
        return cond
    if "y" not in cond:
        raise ValueError("REPA's legacy label dropout applies to class labels: the conditioning has no 'y'")
    if null_label is None:
        raise ValueError("REPA's legacy label dropout needs the model's null label")
    return {**cond, "y": drop_labels(cond["y"], p, null_label, uniform)}


def repa_training_losses(objective, model: nn.Module, x1: Tensor, cond: dict, targets: list[Tensor],
                         projectors: Projectors, tap: Tap, coeff: float = 0.5, *, t: Tensor | None = None,
                         noise: Tensor | None = None, legacy_p: float = 0.0, null_label: int | None = None,
                         legacy_uniform: Tensor | None = None) -> dict[str, Tensor]:
    """REPA's loss on top of ``objective`` (the transport objective's ``training_losses(model, x1, cond, t=,
    noise=)``): {"loss": denoise + coeff x proj per sample (B,), "denoise" (B,), "proj" (B,), "pred", "projected":
    the projector outputs before any token resize}. ``tap`` must sit on ``model``'s backbone (``register_tap``);
    ``targets``: the frozen encoders' features of the same images, (B, T_i, z_dim_i) each, detached here.
    ``legacy_p`` / ``null_label`` / ``legacy_uniform``: REPA's ``--legacy`` second label drop
    (``legacy_label_drop``), applied before the forward. The batch mean of "loss" is REPA's total."""
    if coeff < 0:
        raise ValueError(f"REPA's coeff must be >= 0, got {coeff!r}")
    cond = legacy_label_drop(cond, legacy_p, null_label, legacy_uniform)
    tap.features = None
    terms = objective.training_losses(model, x1, cond, t=t, noise=noise)
    hidden = tap.features
    if hidden is None:
        raise RuntimeError(f"the REPA tap on block {tap.layer} did not fire: register it on the model being trained")
    if hidden.shape[0] != x1.shape[0]:
        raise RuntimeError(f"the REPA tap holds {hidden.shape[0]} rows for a batch of {x1.shape[0]}")
    projected = projectors(hidden)
    proj = alignment_loss_per_sample(projected, targets)
    denoise = terms["loss"]
    return {"loss": denoise + coeff * proj, "denoise": denoise, "proj": proj, "pred": terms["pred"],
            "projected": projected}
