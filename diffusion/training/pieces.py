"""Small pieces of a training step: parameter groups, learning rate, EMA, caption dropout, the step's global RNG
(label dropout: :func:`diffusion.objectives.guidance.drop_labels`)."""

from __future__ import annotations

import torch

from diffusion.seeds import derive_seed

NO_DECAY_NAMES = ("pos_embed", "label_emb", "embedding_table")


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """The papers' configs decay every parameter (as the original code did); ``decay_all=False`` exempts
    norms, biases and embeddings, the usual transformer recipe."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    no_decay = [p for n, p in params if p.ndim < 2 or any(k in n for k in NO_DECAY_NAMES)]
    decay = [p for n, p in params if not (p.ndim < 2 or any(k in n for k in NO_DECAY_NAMES))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """The learning rate of update ``step`` (counted from 0): U-ViT's linear warm-up ``base_lr * min(step / W, 1)``
    (its LambdaLR is stepped after each update, so the first update has lr 0 and update W the full rate), then
    constant. DiT and SiT use no warm-up (``warmup_steps=0``: ``base_lr`` throughout)."""
    return base_lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else base_lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Plain decay as both originals; with warm-up the average forgets the random init within a short run."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def drop_contexts(context: torch.Tensor, p_uncond: float, null_context: torch.Tensor,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Text-to-image guidance training: replace each caption's tokens by the empty caption's with p_uncond."""
    if p_uncond <= 0:
        return context
    u = torch.rand(context.shape[0], device=context.device) if uniform is None else uniform
    return torch.where((u < p_uncond).view(-1, 1, 1), null_context.to(context), context)


def reseed(seed: int, rank: int, step: int) -> None:
    """torch's global RNG for step ``step`` of process ``rank``: whatever draws from it is a function of the step."""
    torch.manual_seed(derive_seed(seed, "torch", rank, step))
