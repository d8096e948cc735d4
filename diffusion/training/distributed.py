"""Fully sharded data parallel training (``train.fsdp``) for the largest models, through accelerate's FSDP2.

Each transformer block becomes one FSDP unit (``torch.distributed.fsdp.fully_shard``): its parameters, gradients and
AdamW state live as DTensor shards, 1/N per process, gathered block by block for the forward and backward. What the
trainer keeps outside the sharded network is kept so that nothing else changes:

* Checkpoints are the ordinary full state dicts (same keys, same optimizer layout): :func:`full_state` gathers the
  shards at save time, and :func:`shard_like` and :func:`shard_optimizer_state` cut loaded weights and optimizer
  state back into shards. A checkpoint
  written with FSDP resumes without it and the other way round, and sample.py reads it as any other.
* The EMA is averaged shard by shard (:class:`ShardedEMA`, no communication in the step) and gathered into the full
  EMA module, which previews, FID and checkpoints read, only when they read it.
* Mixed precision: the blocks compute in bf16/fp16 under autocast as without FSDP (norms and softmax stay fp32);
  FSDP all-gathers the low-precision copy of the weights and reduces gradients in fp32. Weights, optimizer state and
  EMA stay fp32.

accelerate switches FSDP on for GPU (and other accelerator) launches only; torch's FSDP2 runs over gloo on the CPU
as well, so :func:`enable_on_cpu` marks a CPU launch as FSDP in accelerate's state (what accelerate's own tests do).
That is how tests/test_fsdp.py holds FSDP to DDP on a CPU machine.
"""

from __future__ import annotations

import functools

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import tree_map

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_plugin(mode: str, block_class: str, mixed_precision: str) -> FullyShardedDataParallelPlugin | None:
    """accelerate's FSDP2 plugin wrapping every ``block_class`` module as one unit; None when ``mode`` is off.
    full_shard frees each block's gathered weights after its forward and gathers them again for its backward (least
    memory); shard_grad_op keeps them until the backward (one all-gather fewer per block and step)."""
    if not mode:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = LOW_PRECISION.get(mixed_precision)
    # Inputs are not cast: timesteps and the residual stream between blocks stay fp32, as under autocast alone.
    policy = (MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, output_dtype=torch.float32,
                                   cast_forward_inputs=False) if low is not None else None)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=mode == "full_shard", auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[block_class], state_dict_type="FULL_STATE_DICT",
        mixed_precision_policy=policy)


def enable_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin | None) -> None:
    """A multi-process CPU launch (gloo) with FSDP asked for: accelerate left it as DDP; make it FSDP."""
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin


def is_sharded(net: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in net.parameters())


def autocast_forward(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Run ``model``'s forward under the accelerator's autocast, as accelerate does for DDP but not for FSDP2."""
    if accelerator.mixed_precision == "no":
        return
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = autocast_forward


def full_state(tree):
    """``tree`` (a state dict, nested) with every DTensor shard set gathered into a full CPU tensor, plain tensors
    as they are. A collective when it holds DTensors: every process calls it, with the same tree."""
    return tree_map(lambda t: t.full_tensor().cpu() if isinstance(t, DTensor) else t, tree)


def _like(value, param: torch.Tensor):
    """``value`` cut into ``param``'s shards when ``param`` is a DTensor of its shape; else ``value``."""
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def shard_tensor_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor (every process holds it) cut into the shards of ``param`` when that is a DTensor of its shape
    (the power EMAs of post-hoc EMA, restored); ``value`` as it is otherwise."""
    return _like(value, param)


def shard_like(state: dict, module: torch.nn.Module) -> dict:
    """A full state dict (every process holds it) with each tensor cut into the shards of ``module``'s entry of the
    same name and shape, ready for ``module.load_state_dict``; as it is for an unsharded module."""
    if not is_sharded(module):
        return state
    own = module.state_dict()
    return {k: _like(v, own[k]) if k in own else v for k, v in state.items()}


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (every process holds it) with each per-parameter tensor cut into the shards of its
    parameter, ready for ``optimizer.load_state_dict``. Saved states number the parameters in param-group order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {i: {k: _like(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": per_param}


class ShardedEMA:
    """The EMA of a sharded network: fp32 shards placed like its parameters, so that the per-step update is local
    (no communication). :meth:`gather` writes the average into the full EMA module before anything reads it."""

    def __init__(self, ema: torch.nn.Module, net: torch.nn.Module):
        self.ema, self.net = ema, net
        self.reshard()

    def reshard(self) -> None:
        """Cut the full EMA module into shards again (after a resume loaded it)."""
        params = zip(self.ema.parameters(), self.net.parameters(), strict=True)
        self.shards = [_like(e.detach().float(), p) for e, p in params]
        self.stale = False

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shards, [p.detach().float() for p in self.net.parameters()], 1.0 - decay)
        self.stale = True

    @torch.no_grad()
    def gather(self) -> torch.nn.Module:
        """The full EMA module, brought up to date: a collective after an update (every process calls it)."""
        if self.stale:
            for e, shard in zip(self.ema.parameters(), self.shards, strict=True):
                e.copy_(shard.full_tensor() if isinstance(shard, DTensor) else shard)
            for eb, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
                eb.copy_(b)
            self.stale = False
        return self.ema
