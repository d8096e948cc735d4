"""Resuming a run from its newest intact checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list

from diffusion import checkpoint as ckpt
from diffusion.config.loading import flatten_config, override_flag
from diffusion.errors import ConfigError
from diffusion.training.distributed import (
    ShardedEMA,
    autocast_forward,
    is_sharded,
    shard_optimizer_state,
)
from diffusion.training.logs import report
from diffusion.training.run import Progress

if TYPE_CHECKING:
    from diffusion.training.run import Run


def prepare(run: Run, resumed: Path | None, train_state: dict) -> None:
    """Hand the (resumed) network and optimizer to accelerate, then load the checkpoint's optimizer state (cut into
    shards with FSDP, which replaces the parameters) and grad-scaler state (the scaler exists only after this)."""
    run.model, run.optimizer = run.accelerator.prepare(run.net, run.optimizer)
    run.ema.to(run.device)
    if is_sharded(run.net):
        autocast_forward(run.model, run.accelerator)
        run.sharded_ema = ShardedEMA(run.ema, run.net)
    elif run.config.train.fsdp:
        report(run, f"train.fsdp={run.config.train.fsdp} needs a multi-process launch; training unsharded")
    if train_state:
        load_state(run.optimizer, shard_optimizer_state(train_state["optimizer"], run.optimizer),
                   resumed / "train_state.pt")
    scaler_state = train_state.get("scaler") or {}
    if scaler_state and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(scaler_state)


# Config keys whose change a resumed run accepts (and logs): they leave the meaning of the checkpoint's optimizer
# state, EMA and data position intact. lr, warm-up and clipping are often changed on purpose mid-run; grad_accum_steps
# splits the same global batch (the same run with train.global_noise); train.fsdp computes the same step and saves the
# same full state dicts (tests/test_fsdp.py). Every other key -- model, diffusion, data,
# autoencoder, text encoder, seed, label dropout, batch size, optimizer betas/eps/weight decay, EMA, global_noise,
# and keys added later -- is refused unless train.py --allow_config_change.
RESUMABLE_CHANGES = (
    "train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.sample_every",
    "train.compile", "train.tf32", "train.attention", "train.cpu_reuse_memory", "optim.impl",
    "train.mixed_precision", "train.grad_accum_steps", "train.grad_clip", "train.fsdp",
    "optim.lr", "optim.warmup_steps", "data.num_workers", "data.verify_checksums", "data.download",
    "data.on_corrupt", "autoencoder.chunk_size", "sample.*", "preview.*", "eval.*", "wandb.*",
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


def check_config_changes(run: Run, found: ckpt.Checkpoint, allow: bool) -> None:
    """Refuse a resume whose config changes the run (naming each key), unless ``allow``; log accepted changes."""
    changes = config_changes(found.config, run.config, found.meta, run.meta)
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused and not allow:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        restore = " ".join(_restore_flag(k, old) for k, (old, _) in refused.items())
        what = (f"{run.workdir} holds a run of a different model ({found.path})"
                if any(k.startswith("model.") for k in refused) else f"resuming {found.path} with a changed config")
        raise ConfigError(f"{what}: {listing}. Such changes alter what the run trains. To continue the run, restore "
                          f"them: {restore}; to start a new run, use another --workdir; to continue with the changes "
                          f"anyway, rerun with --allow_config_change")
    if changes:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        how = " (accepted by --allow_config_change)" if refused else ""
        report(run, f"config changes since {found.path.name}{how}: {listing}")


def find_checkpoint(run: Run) -> ckpt.Checkpoint | None:
    """Rank 0 removes stale ``.tmp`` saves and picks the newest checkpoint whose files verify, naming each damaged
    one it passes over; every other process then reads the same one."""
    choice: list[str | None] = [None]
    found = None
    if run.is_main:
        for path in ckpt.remove_stale_tmp(run.workdir):
            report(run, f"removed {path}, left by a save that never finished")
        dirs = ckpt.checkpoint_dirs(run.workdir)
        for path in reversed(dirs):
            try:
                found = ckpt.load_checkpoint(path)
                choice = [path.name]
                break
            except ckpt.CheckpointError as err:
                report(run, f"warning: skipping damaged checkpoint {path.name}: {err}")
        if dirs and found is None:
            raise ckpt.CheckpointError(f"no usable checkpoint under {run.workdir / ckpt.CHECKPOINTS}: every one is "
                                       f"damaged (see above); move them elsewhere to start this run from scratch")
    if run.world > 1:
        broadcast_object_list(choice)
        if not run.is_main and choice[0] is not None:
            found = ckpt.load_checkpoint(run.workdir / ckpt.CHECKPOINTS / choice[0], verify=False)
    return found


def load_state(target, state: dict, source: Path) -> None:
    """``target.load_state_dict(state)`` (a module or the optimizer); a mismatch -- reachable only through
    --allow_config_change -- is one error naming the file and torch's first findings."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        findings = "; ".join(line.strip() for line in str(err).splitlines()[-3:] if line.strip())
        raise ConfigError(f"{source} does not fit the configured model: {findings}") from None


def resume(run: Run, allow_config_change: bool) -> tuple[Progress, Path | None, dict]:
    """Load the newest intact checkpoint into the run's network and EMA, once its config is found to continue this
    one. -> (progress, the checkpoint or None, its train state: optimizer and grad scaler, loaded by prepare)."""
    found = find_checkpoint(run)
    if found is None:
        return Progress(), None, {}
    check_config_changes(run, found, allow_config_change)
    load_state(run.net, found.model, found.path / "model.safetensors")
    load_state(run.ema, found.ema, found.path / "ema.safetensors")
    state = found.train_state
    # Checkpoints from before samples_seen was recorded consumed step x their own batch size.
    samples_seen = state.get("samples_seen", state["step"] * found.config.train.batch_size)
    return Progress(step=state["step"], samples_seen=samples_seen), found.path, state
