"""Resuming a run: the newest intact checkpoint, the config changes a resume accepts, and restoring everything the
checkpoint holds (weights, EMA, optimizer, grad scaler, data position) in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from diffusion import checkpoint as ckpt
from diffusion.config.loading import flatten_config, override_flag
from diffusion.errors import ConfigError
from diffusion.training.distributed import ShardedEMA, shard_like, shard_optimizer_state
from diffusion.training.logs import report
from diffusion.training.posthoc_ema import PowerEMA
from diffusion.weights import load_state_strict


@dataclass
class Progress:
    """Where a run stands besides its weights and optimizer: step and data position (what a checkpoint's train_state
    records), and the newest checkpoint the run has, saved or resumed from."""

    step: int = 0
    samples_seen: int = 0  # global stream positions consumed: the data position never depends on batch-size history
    saved: Path | None = None

    @property
    def saved_now(self) -> bool:
        """Whether the newest checkpoint is of the current step."""
        return self.saved is not None and self.saved.name == f"step_{self.step:08d}"


# Config keys whose change a resumed run accepts (and logs): they leave the meaning of the checkpoint's optimizer
# state, EMA and data position intact. lr, warm-up and clipping are often changed on purpose mid-run; grad_accum_steps
# splits the same global batch (the same run with train.global_noise); train.fsdp computes the same step and saves the
# same full state dicts (tests/test_fsdp.py); the post-hoc EMA's snapshot interval and dtype change only which snapshots
# are written from then on. Every other key -- model, diffusion, data,
# autoencoder, text encoder, seed, label dropout, batch size, optimizer betas/eps/weight decay, EMA, global_noise,
# and keys added later -- is refused unless train.py --allow_config_change.
RESUMABLE_CHANGES = (
    "train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.sample_every",
    "train.compile", "train.tf32", "train.attention", "train.cpu_reuse_memory", "optim.impl",
    "train.mixed_precision", "train.grad_accum_steps", "train.grad_clip", "train.fsdp",
    "optim.lr", "optim.warmup_steps", "data.num_workers", "data.verify_checksums", "data.download",
    "data.on_corrupt", "autoencoder.chunk_size", "sample.*", "preview.*", "eval.*", "wandb.*",
    "ema.snapshot_every", "ema.snapshot_dtype",
)


_UNSET = "<unset>"


def _resumable(key: str) -> bool:
    return key in RESUMABLE_CHANGES or f"{key.split('.')[0]}.*" in RESUMABLE_CHANGES


def _restore_flag(key: str, value) -> str:
    return f"(drop --config.{key})" if value == _UNSET else override_flag(key, value)


def config_changes(saved, config, saved_meta: dict, meta: dict) -> dict[str, tuple]:
    """{key: (checkpoint's value, new value)} for every differing key; the model compares as the resolved
    constructor kwargs (a preset and the same kwargs spelled out are the same model)."""
    def flat(cfg, model_meta: dict) -> dict:
        values = {k: v for k, v in flatten_config(cfg).items() if not k.startswith("model.")}
        model = {"name": model_meta["model_name"], **model_meta["model_kwargs"]}
        return values | flatten_config(model, "model.")

    old, new = flat(saved, saved_meta), flat(config, meta)
    return {k: (old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(old.keys() | new.keys())
            if old.get(k, _UNSET) != new.get(k, _UNSET)}


def check_config_changes(found: ckpt.Checkpoint, config, meta: dict, workdir: Path, allow: bool,
                         is_main: bool) -> None:
    """Refuse a resume whose config changes the run (naming each key), unless ``allow``; log accepted changes."""
    changes = config_changes(found.config, config, found.meta, meta)
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused and not allow:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        restore = " ".join(_restore_flag(k, old) for k, (old, _) in refused.items())
        what = (f"{workdir} holds a run of a different model ({found.path})"
                if any(k.startswith("model.") for k in refused) else f"resuming {found.path} with a changed config")
        raise ConfigError(f"{what}: {listing}. Such changes alter what the run trains. To continue the run, restore "
                          f"them: {restore}; to start a new run, use another --workdir; to continue with the changes "
                          f"anyway, rerun with --allow_config_change")
    if changes:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        how = " (accepted by --allow_config_change)" if refused else ""
        report(is_main, f"config changes since {found.path.name}{how}: {listing}")


def find_checkpoint(workdir: Path, accelerator: Accelerator) -> ckpt.Checkpoint | None:
    """Rank 0 removes stale ``.tmp`` saves and picks the newest checkpoint whose files verify, naming each damaged
    one it passes over; every other process then reads the same one."""
    is_main = accelerator.is_main_process
    choice: list[str | None] = [None]
    found = None
    if is_main:
        for path in ckpt.remove_stale_tmp(workdir):
            report(is_main, f"removed {path}, left by a save that never finished")
        dirs = ckpt.checkpoint_dirs(workdir)
        for path in reversed(dirs):
            try:
                found = ckpt.load_checkpoint(path)
                choice = [path.name]
                break
            except ckpt.CheckpointError as err:
                report(is_main, f"warning: skipping damaged checkpoint {path.name}: {err}")
        if dirs and found is None:
            raise ckpt.CheckpointError(f"no usable checkpoint under {workdir / ckpt.CHECKPOINTS}: every one is "
                                       f"damaged (see above); move them elsewhere to start this run from scratch")
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
        if not is_main and choice[0] is not None:
            found = ckpt.load_checkpoint(workdir / ckpt.CHECKPOINTS / choice[0], verify=False)
    return found


def restore(found: ckpt.Checkpoint | None, net: torch.nn.Module, ema: torch.nn.Module, sharded_ema: ShardedEMA | None,
            optimizer: torch.optim.Optimizer, scaler, projectors: torch.nn.Module | None = None,
            is_main: bool = True, power_ema: PowerEMA | None = None) -> Progress:
    """Load everything ``found`` holds into the run, after accelerate.prepare: weights and EMA (cut into shards with
    FSDP, which replaced the parameters), optimizer state (likewise), grad-scaler state (the scaler exists only
    after prepare) and the data position. A mismatch -- reachable only through --allow_config_change -- is one
    ConfigError naming the file. REPA's ``projectors`` come from projectors.safetensors; a checkpoint without them
    (REPA turned on by --allow_config_change) leaves them fresh, their optimizer state empty; so do the power EMAs
    of post-hoc EMA (``power_ema``) that phema.safetensors lacks, which start at the loaded weights."""
    if found is None:
        return Progress()
    load_state_strict(net, shard_like(found.model, net), found.path / "model.safetensors")
    load_state_strict(ema, found.ema, found.path / "ema.safetensors")
    if sharded_ema is not None:
        sharded_ema.reshard()
    restore_power_ema(found, power_ema, is_main)
    state = found.train_state
    saved_optimizer = state["optimizer"]
    if projectors is not None and found.projectors is not None:
        load_state_strict(projectors, found.projectors, found.path / "projectors.safetensors", what="projectors")
    elif projectors is not None or found.projectors is not None:
        report(is_main, f"{found.path.name} has {'no' if projectors is not None else 'its'} REPA projectors: "
                        f"{'starting fresh projectors' if projectors is not None else 'not used by this run'}")
        saved_optimizer = fit_param_groups(saved_optimizer, optimizer)
    load_state_strict(optimizer, shard_optimizer_state(saved_optimizer, optimizer), found.path / "train_state.pt")
    if state["scaler"] and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    return Progress(step=state["step"], samples_seen=state["samples_seen"], saved=found.path)


def restore_power_ema(found: ckpt.Checkpoint, power_ema: PowerEMA | None, is_main: bool) -> None:
    """The power EMAs from phema.safetensors; those it lacks (reachable through --allow_config_change) start at the
    loaded weights, and a checkpoint's power EMAs that this run does not track are named and left."""
    if power_ema is None:
        if found.phema is not None:
            report(is_main, f"{found.path.name} has power EMAs (post-hoc EMA); not tracked by this run (ema.kind)")
        return
    missing = power_ema.load_checkpoint_state(found.phema)
    if missing:
        report(is_main, f"{found.path.name} has no power EMA of sigma_rel {', '.join(map(repr, missing))}: it starts "
                        f"at the weights of step {found.train_state['step']}, so its profile is not a power function "
                        f"before that step")


def fit_param_groups(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state with the current optimizer's parameter groups beyond (or without) the saved ones:
    REPA's projectors' groups come after the backbone's, so adding them starts their state empty and dropping them
    keeps the backbone's."""
    current = optimizer.state_dict()["param_groups"]
    groups = [*saved["param_groups"][:len(current)], *current[len(saved["param_groups"]):]]
    kept = {i for group in groups[:len(saved["param_groups"])] for i in group["params"]}
    return {"state": {i: v for i, v in saved["state"].items() if i in kept}, "param_groups": groups}
