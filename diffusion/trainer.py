"""The training loop: one for every backbone, objective and dataset, read top to bottom.

accelerate provides devices, DDP over processes and nodes -- or, with ``train.fsdp``, sharded training
(diffusion/distributed.py) -- and mixed precision (autocast + fp16 grad scaler). Weights, optimizer state and the EMA
stay fp32.

Determinism. The randomness of step s is a function of (seed, s): with ``train.global_noise`` the noise, times and
label/caption dropout of the whole global batch come from one generator seeded by (seed, s) and each process takes
its rows, so 2 processes x B, 1 process x 2B and 2 accumulation steps x B are the same run; torch's global RNG is
reseeded from (seed, rank, s) every step; and an item's augmentation depends on its position in the data stream
(``diffusion.data.StreamItems``). Checkpoints store the samples consumed, so a run resumed from any checkpoint --
also one saved on a signal at an arbitrary step -- continues bit-identically (CPU, fp32).

Robustness. One run per working directory (``train.lock``). SIGTERM, SIGINT and SIGUSR1 save a checkpoint at the
next step boundary and raise :class:`StoppedBySignal` (train.py exits 3); a second signal exits at once. Resume
takes the newest checkpoint whose checksums verify, naming the damaged ones it skips, and refuses config changes
that would alter the run (:data:`RESUMABLE_CHANGES` lists those it accepts) unless ``allow_config_change``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.config import ConfigError, check_values, config_to_json, flatten_config, override_flag
from diffusion.data import (
    InfiniteSampler,
    StreamItems,
    UnreadableDataError,
    build_dataset,
    digits_classifier_accuracy,
)
from diffusion.distributed import (
    ShardedEMA,
    autocast_forward,
    enable_on_cpu,
    fsdp_plugin,
    full_state,
    is_sharded,
    shard_optimizer_state,
)
from diffusion.evaluation.training import FidHistory, TrainingFID, fid_name
from diffusion.registry import (
    block_class,
    build_model,
    build_objective,
    label_dropout,
    resolve_model_kwargs,
    set_attention,
)
from diffusion.sampling import (
    LABEL_MODES,
    check_settings,
    class_rows,
    generate,
    num_real_classes,
    preview_settings,
    sample_grid,
    sample_settings,
)
from diffusion.speed import adamw, reuse_freed_memory

log = logging.getLogger("diffusion.train")

NO_DECAY_NAMES = ("pos_embed", "label_emb", "embedding_table")
EVAL_METRICS = ("", "digits_accuracy")


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


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
    """Linear warm-up to ``base_lr``, then constant (both papers)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


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


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int | None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance training: replace each label by the null label with probability p_uncond
    (where the row's ``uniform`` draw, fresh ones if not given, is below it)."""
    if p_uncond <= 0:
        return y
    u = torch.rand(y.shape, device=y.device) if uniform is None else uniform
    return torch.where(u < p_uncond, torch.full_like(y, null_label), y)


def drop_contexts(context: torch.Tensor, p_uncond: float, null_context: torch.Tensor,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Text-to-image guidance training: replace each caption's tokens by the empty caption's with p_uncond."""
    if p_uncond <= 0:
        return context
    u = torch.rand(context.shape[0], device=context.device) if uniform is None else uniform
    return torch.where((u < p_uncond).view(-1, 1, 1), null_context.to(context), context)


def reseed(seed: int, rank: int, step: int) -> None:
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % 2**63)


def setup_logging(workdir: Path, is_main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_main:
        handler = logging.FileHandler(workdir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)


class WandbLogger:
    """wandb, offline unless the config says online: a run needs no account. ``mode="disabled"`` skips it."""

    def __init__(self, config, workdir: Path, is_main: bool):
        self.run = None
        if not is_main or config.wandb.mode == "disabled":
            return
        import wandb

        id_file = workdir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(project=config.wandb.project, name=config.wandb.name or workdir.name, id=run_id,
                              resume="allow", dir=str(workdir), mode=config.wandb.mode, config=config.to_dict())

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


# ----------------------------------------------------------------------------------------------------------
# Data: pixels, latents encoded on the fly, or cached latents / COCO features
# ----------------------------------------------------------------------------------------------------------

LATENT_DATASETS = ("latents", "coco_latents")  # yield scaled SD-VAE latents already


@dataclass
class TrainData:
    """What the loop needs from the data side."""

    dataset: torch.utils.data.Dataset
    example: dict  # the first readable item: what the model's conditioning is checked against
    shape: tuple[int, ...]  # (C, H, W) the backbone sees: latents for latent models
    encode: Callable | None  # images -> scaled latents, when the config encodes on the fly (the original DiT's way)
    decode: Callable | None  # scaled latents -> images, for previews
    null_context: torch.Tensor | None  # the empty caption's tokens (text-to-image), the target of caption dropout
    class_names: list[str] | None
    class_counts: list[int] | None  # per-class training counts (sample.py's train_freq labels)

    def caption_contexts(self, count: int, seed: int) -> torch.Tensor:
        """(count, tokens, dim) caption contexts of the first training images, each image's caption choice fixed
        by ``seed``: what text-to-image previews and FID samples are conditioned on."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return torch.stack([self.dataset[i]["context"] for i in range(min(count, len(self.dataset)))])


def class_counts(dataset) -> list[int] | None:
    counts = getattr(dataset, "class_counts", None)
    targets = getattr(getattr(dataset, "base", None), "targets", None)
    if counts is None and targets is not None:
        counts = torch.bincount(torch.as_tensor(targets), minlength=len(dataset.classes)).tolist()
    return [int(c) for c in counts] if counts is not None else None


def prepare_data(config, device) -> TrainData:
    autoencoder = None
    if config.autoencoder.pretrained:
        from diffusion.autoencoder import Autoencoder

        autoencoder = Autoencoder.from_config(config.autoencoder, device=device)
    elif config.data.name in LATENT_DATASETS:
        raise ConfigError(f"data.name={config.data.name!r} holds SD-VAE latents: set autoencoder.pretrained to the "
                          f"autoencoder they were extracted with (checked against the manifest; decodes previews)")
    dataset = build_dataset(config.data, train=True, autoencoder_cfg=config.autoencoder,
                            text_encoder_cfg=config.text_encoder)
    on_the_fly = autoencoder is not None and config.data.name not in LATENT_DATASETS
    example, _ = StreamItems(dataset, config.seed).read(0)
    shape = autoencoder.latent_shape(config.data.image_size) if on_the_fly else tuple(example["x"].shape)
    null_context = getattr(dataset, "null_context", None)
    return TrainData(dataset=dataset, example=example, shape=tuple(shape),
                     encode=autoencoder.encode if on_the_fly else None,
                     decode=autoencoder.decode if autoencoder is not None else None,
                     null_context=None if null_context is None else null_context.to(device),
                     class_names=[str(c) for c in getattr(dataset, "classes", [])] or None,
                     class_counts=class_counts(dataset))


def check_conditioning(net, data: TrainData, p_uncond: float) -> None:
    """The model's conditioning must be one the data can feed, and guidance training needs a null input."""
    sample = data.example
    if getattr(net, "clip_dim", None) is not None:
        if "context" not in sample:
            raise ConfigError(f"the model is text-conditioned (clip_dim set) but dataset {type(data.dataset).__name__} "
                              f"yields no caption contexts; use data.name=coco_latents")
        if p_uncond > 0 and data.null_context is None:
            raise ConfigError("cond.p_uncond > 0 needs the dataset's null_context (the empty caption's encoding)")
        return
    if num_real_classes(net) > 0 and "y" not in sample:
        raise ConfigError(f"the model is class-conditional but dataset {type(data.dataset).__name__} has no labels")
    if num_real_classes(net) > 0 and p_uncond > 0 and getattr(net, "null_label", None) is None:
        raise ConfigError("cond.p_uncond > 0 needs a model with a null label (U-ViT: num_classes = classes + 1 "
                          "and null_label = classes; DiT: class_dropout_prob > 0)")


def check_sampling(config, objective, net, data: TrainData) -> None:
    """The evaluation and preview samplers and the FID labels are used thousands of steps in: refuse a setting they
    cannot run now, not at the first preview."""
    try:
        check_settings(objective, sample_settings(config.sample))
        check_settings(objective, sample_settings(preview_settings(config)))
    except ValueError as err:
        raise ConfigError(f"sample / preview section: {err} (e.g. --config.preview.sampler=...)") from None
    if config.sample.labels not in LABEL_MODES:
        raise ConfigError(f"sample.labels={config.sample.labels!r}; choose one of {', '.join(LABEL_MODES)}")
    if (config.eval.every > 0 and num_real_classes(net) and config.sample.labels == "train_freq"
            and data.class_counts is None):
        raise ConfigError("sample.labels=train_freq needs the training set's class counts, which this dataset does "
                          "not provide: --config.sample.labels=uniform")


def batch_conditioning(net, batch: dict, data: TrainData, p_uncond: float, device,
                       uniform: torch.Tensor | None = None) -> dict:
    """The network's conditioning inputs for one batch, with classifier-free guidance dropout applied (decided by
    ``uniform``, one draw per row, when given)."""
    if getattr(net, "clip_dim", None) is not None:
        context = batch["context"].to(device, non_blocking=True)
        return {"context": drop_contexts(context, p_uncond, data.null_context, uniform)}
    if num_real_classes(net) > 0:
        return {"y": drop_labels(batch["y"].to(device, non_blocking=True), p_uncond, net.null_label, uniform)}
    return {}


def preview_contexts(data: TrainData, config) -> dict:
    """Text-to-image previews: the captions of the first training images (a fixed choice), one row each."""
    if data.null_context is None:
        return {}
    contexts = data.caption_contexts(4, config.sample.seed)
    return {"contexts": contexts.to(data.null_context.device), "null_context": data.null_context}


# ----------------------------------------------------------------------------------------------------------
# One run per working directory; stopping on signals
# ----------------------------------------------------------------------------------------------------------


@contextmanager
def workdir_lock(workdir: Path):
    """Rank 0 holds ``workdir/train.lock`` for the whole run, taken before any collective so that a refused run
    ends at once (the other ranks of its launch are then stopped by the launcher)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock = ckpt.WorkdirLock(workdir)
    note = lock.acquire()
    if note:
        print(f"[train] {note}", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None on processes other than rank 0)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}")


class StopRequest:
    """Handlers for what schedulers send before a time limit or preemption (SIGTERM, SIGUSR1) and for Ctrl-C
    (SIGINT): the first signal asks the loop to save and stop at the next step boundary; another one more than
    ``REPEAT_GRACE`` seconds later exits at once without saving (status 128 + signal number). Repeats within the
    grace period count as the same request: launchers (torchrun, accelerate launch) forward a terminal's Ctrl-C to
    workers that have received it already."""

    REPEAT_GRACE = 2.0

    def __init__(self):
        self.signal_name: str | None = None
        self._first = 0.0
        self._previous: dict = {}
        self._speak = int(os.environ.get("RANK", "0")) == 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self._first = name, time.monotonic()
            self._say(f"{name}: saving a checkpoint at the end of this step (a signal 2 s later or more exits at "
                      f"once, without saving)")
        elif time.monotonic() - self._first > self.REPEAT_GRACE:
            self._say(f"{name} again: exiting now without saving")
            os._exit(128 + signum)

    def _say(self, text: str) -> None:
        if self._speak:  # os.write: a handler may interrupt a print() to the same stream
            os.write(2, f"\n[train] {text}\n".encode())

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop. A collective (max) with several processes, so that all of them
        stop after the same step; one scalar per step."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor(float(self.signal_name is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="max").item() > 0


# ----------------------------------------------------------------------------------------------------------
# The run's objects
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands besides its weights and optimizer: what a checkpoint's train_state records."""

    step: int = 0
    samples_seen: int = 0  # global stream positions consumed: the data position never depends on batch-size history


@dataclass
class Run:
    """The objects of one training run, built by :func:`start_run`."""

    config: object
    workdir: Path
    accelerator: Accelerator
    data: TrainData
    net: torch.nn.Module  # the bare network: the weights saved and averaged into the EMA
    ema: torch.nn.Module
    model: torch.nn.Module  # net as prepared by accelerate (DDP or FSDP, compile): what the loss calls
    optimizer: torch.optim.Optimizer
    objective: object
    p_uncond: float
    meta: dict
    micro_batch: int
    wandb: WandbLogger | None = None
    skipped_images: int = 0
    fid: TrainingFID | None = None  # FID during training (eval.every / eval.final_n_samples)
    fid_history: FidHistory | None = None
    sharded_ema: ShardedEMA | None = None  # with FSDP: the EMA's running shards; ``ema`` is gathered from them

    def full_ema(self) -> torch.nn.Module:
        """The EMA module, up to date. With FSDP a collective: every process calls it before any of them reads."""
        return self.sharded_ema.gather() if self.sharded_ema is not None else self.ema

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_run(config, workdir: Path) -> Run:
    """Accelerator, logging, data, model, objective, EMA and optimizer of a run, checked against each other."""
    tc, oc = config.train, config.optim
    # A multi-process launch (torchrun / accelerate launch) on a machine without CUDA: DDP over gloo on the CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_ddp = launched and not torch.cuda.is_available()
    plugin = fsdp_plugin(tc.fsdp, block_class(config.model.name), tc.mixed_precision) if launched else None
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu_ddp, fsdp_plugin=plugin,
                              dynamo_backend="inductor" if tc.compile else None)
    enable_on_cpu(accelerator, plugin)
    setup_logging(workdir, accelerator.is_main_process)
    per_step = accelerator.num_processes * tc.grad_accum_steps
    if tc.batch_size % per_step:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by processes x grad_accum_steps "
                          f"= {accelerator.num_processes} x {tc.grad_accum_steps}: e.g. "
                          f"--config.train.batch_size={per_step * max(1, round(tc.batch_size / per_step))}")
    if config.eval.metric not in EVAL_METRICS:
        raise ConfigError(f"unknown eval.metric {config.eval.metric!r}; known: {', '.join(EVAL_METRICS[1:])}")
    if tc.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if tc.cpu_reuse_memory and accelerator.device.type == "cpu":
        reuse_freed_memory()

    data = prepare_data(config, accelerator.device)
    torch.manual_seed(config.seed)  # identical initial weights on every rank and every launch
    net = set_attention(build_model(config.model), tc.attention)
    model_name, model_kwargs = resolve_model_kwargs(config.model)
    objective = build_objective(config.diffusion)
    p_uncond = label_dropout(config, model_name, model_kwargs)
    check_conditioning(net, data, p_uncond)
    check_sampling(config, objective, net, data)
    meta = {"model_name": model_name, "model_kwargs": json.loads(json.dumps(model_kwargs)),
            "image_shape": list(data.shape), "class_names": data.class_names, "class_counts": data.class_counts,
            "torch": torch.__version__}
    ema = copy.deepcopy(net).float().requires_grad_(False).eval()
    optimizer = adamw(param_groups(net, oc.weight_decay, oc.decay_all_params), oc.lr, oc.betas, oc.eps, oc.impl)
    return Run(config=config, workdir=workdir, accelerator=accelerator, data=data, net=net, ema=ema, model=net,
               optimizer=optimizer, objective=objective, p_uncond=p_uncond, meta=meta,
               micro_batch=tc.batch_size // per_step)


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


def announce(run: Run, progress: Progress, resumed: Path | None) -> None:
    """config.json, the first log line, wandb: rank 0 only."""
    run.wandb = WandbLogger(run.config, run.workdir, run.is_main)
    if not run.is_main:
        return
    tc = run.config.train
    (run.workdir / "config.json").write_text(config_to_json(run.config))
    n_params = sum(p.numel() for p in run.net.parameters())
    what = f"resuming from {resumed} (step {progress.step})" if resumed else "starting from scratch"
    sharded = f" sharded ({tc.fsdp})" if run.sharded_ema is not None else ""
    log.info("%s | %s %s, %.2fM params | %d process(es)%s, micro-batch %d x %d accum | %s", run.workdir,
             run.meta["model_name"], run.config.model.get("preset") or "", n_params / 1e6, run.world, sharded,
             run.micro_batch, tc.grad_accum_steps, what)
    print(f"[train] {what}; workdir {run.workdir}", file=sys.stderr)


def report(run: Run, text: str) -> None:
    """A notice for the user on stderr and in log.txt (rank 0)."""
    if run.is_main:
        log.warning("%s", text)
        print(f"[train] {text}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Data and randomness of a step
# ----------------------------------------------------------------------------------------------------------


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the main process. A terminal's Ctrl-C and a scheduler's SIGTERM
    reach the whole process group; a worker killed by one would end the run before its checkpoint is saved."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stream_batches(dataset, seed: int, batch_size: int, num_workers: int, device: torch.device, rank: int = 0,
                   world: int = 1, samples_seen: int = 0):
    """Batches of rank ``rank``'s share of the training stream from global position ``samples_seen`` on, endlessly
    (also what scripts/benchmark.py reads, so it times the trainer's data path)."""
    sampler = InfiniteSampler(len(dataset), rank=rank, world_size=world, seed=seed, start_index=samples_seen,
                              with_positions=True)
    loader = torch.utils.data.DataLoader(StreamItems(dataset, seed), batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    return iter(loader)


def training_batches(run: Run, samples_seen: int):
    """This process's micro-batches from global stream position ``samples_seen`` on, endlessly."""
    return stream_batches(run.data.dataset, run.config.seed, run.micro_batch, run.config.data.num_workers, run.device,
                          run.rank, run.world, samples_seen)


def count_skipped(run: Run, skipped: list[str]) -> int:
    """Apply data.on_corrupt to the unreadable images a micro-batch replaced: stop naming the file, or warn."""
    errors = [error for item in skipped if item for error in item.split("\n")]
    if errors and run.config.data.on_corrupt == "error":
        raise UnreadableDataError(f"{errors[0]}. Replace or delete the file, or set --config.data.on_corrupt=skip to "
                                  f"skip unreadable images (each is replaced by the next readable one and counted)")
    for error in errors:
        where = f" (process {run.rank})" if run.world > 1 else ""
        print(f"[train] warning{where}: skipped an unreadable image, the next readable one took its place: {error}",
              file=sys.stderr)
        log.warning("skipped an unreadable image: %s", error)
    return len(errors)


@dataclass
class StepDraws:
    """Times, noise and dropout draws of one step for the whole global batch, rows in stream order."""

    t: torch.Tensor
    noise: torch.Tensor
    uniform: torch.Tensor

    def rows(self, micro: int, micro_batch: int, rank: int, world: int) -> tuple[dict, torch.Tensor]:
        """({"t", "noise"}, uniform) of this process's micro-batch ``micro``: the sampler deals rank r the global
        positions r, r + world, ..., so micro-batch m holds the step's rows m * mb * world + r + j * world."""
        rows = slice(micro * micro_batch * world + rank, (micro + 1) * micro_batch * world, world)
        return {"t": self.t[rows], "noise": self.noise[rows]}, self.uniform[rows]


def step_draws(run: Run, step: int) -> StepDraws:
    """One generator seeded by (seed, step), on the device, drawing for ``train.batch_size`` rows at once: the
    same numbers for any process count, micro-batch size or accumulation."""
    n = run.config.train.batch_size
    generator = torch.Generator(run.device).manual_seed((run.config.seed + 1) * 6_364_136_223_846_793 + step)
    t = run.objective.sample_time(n, run.device, generator)
    uniform = torch.rand(n, device=run.device, generator=generator)
    noise = torch.randn((n, *run.data.shape), device=run.device, generator=generator)
    return StepDraws(t=t, noise=noise, uniform=uniform)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the next log line reports: this process's loss since the last line and images it skipped."""

    loss_sum: torch.Tensor
    steps: int = 0
    skipped: int = 0
    lr: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def train_step(run: Run, batches, progress: Progress, window: Window) -> None:
    """One optimizer step over grad_accum_steps micro-batches, then the EMA update."""
    tc, oc = run.config.train, run.config.optim
    reseed(run.config.seed, run.rank, progress.step)
    window.lr = learning_rate(progress.step, oc.lr, oc.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = window.lr
    draws = step_draws(run, progress.step) if tc.global_noise else None
    for micro in range(tc.grad_accum_steps):
        batch = next(batches)
        window.skipped += count_skipped(run, batch.pop("skipped"))
        given, uniform = draws.rows(micro, run.micro_batch, run.rank, run.world) if draws else ({}, None)
        x = batch["x"].to(run.device, non_blocking=True)
        if run.data.encode is not None:
            x = run.data.encode(x)
        cond = batch_conditioning(run.net, batch, run.data, run.p_uncond, run.device, uniform)
        sync = micro == tc.grad_accum_steps - 1
        with nullcontext() if sync else run.accelerator.no_sync(run.model):
            loss = run.objective.training_losses(run.model, x, cond, **given)["loss"].mean()
            run.accelerator.backward(loss / tc.grad_accum_steps)
        window.loss_sum += loss.detach() / tc.grad_accum_steps
    if tc.grad_clip > 0:
        run.accelerator.clip_grad_norm_(run.model.parameters(), tc.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    decay = ema_decay_at(progress.step, tc.ema_decay, tc.ema_warmup)
    if run.sharded_ema is not None:
        run.sharded_ema.update(decay)
    else:
        update_ema(run.ema, run.net, decay)
    progress.step += 1
    progress.samples_seen += tc.batch_size
    window.steps += 1


def log_window(run: Run, step: int, window: Window, last_ckpt: Path | None, bar) -> None:
    """The global mean loss (every process's micro-batches weigh the same) and throughput since the last line."""
    totals = run.accelerator.reduce(torch.stack([window.loss_sum, torch.tensor(float(window.skipped),
                                                                               device=run.device)]), reduction="sum")
    mean_loss = totals[0].item() / run.world / window.steps
    run.skipped_images += int(totals[1].item())
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"loss is {mean_loss} at step {step}; nothing was saved after {last_ckpt or 'the start'}. "
            f"Lower optim.lr, enable train.grad_clip, or use train.mixed_precision=bf16/no.")
    throughput = window.steps * run.config.train.batch_size / (time.perf_counter() - window.start)
    skipped = f" | {run.skipped_images} unreadable images skipped so far" if run.skipped_images else ""
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{window.lr:.2e}", img_s=f"{throughput:.0f}")
    log.info("step %d loss %.5f lr %.3e img/s %.1f%s", step, mean_loss, window.lr, throughput, skipped)
    run.wandb.log({"loss": mean_loss, "lr": window.lr, "img_per_sec": throughput}, step)
    window.loss_sum.zero_()
    window.steps, window.skipped, window.start = 0, 0, time.perf_counter()


def save(run: Run, progress: Progress) -> Path:
    """Checkpoint the run at its current step (rank 0 writes; everyone waits, and with FSDP gathers the shards)."""
    path = None
    ema = run.full_ema()
    model_state, optimizer_state = full_state(run.net.state_dict()), full_state(run.optimizer.state_dict())
    if run.is_main:
        scaler = run.accelerator.scaler
        train_state = {"optimizer": optimizer_state, "step": progress.step,
                       "samples_seen": progress.samples_seen, "scaler": scaler.state_dict() if scaler else {}}
        path = ckpt.save_checkpoint(run.workdir, progress.step, model_state=model_state,
                                    ema_state=ema.state_dict(), config=run.config, meta=run.meta,
                                    train_state=train_state, keep=run.config.train.keep_checkpoints)
        log.info("step %d: saved %s", progress.step, path)
    run.accelerator.wait_for_everyone()
    return path or run.workdir / ckpt.CHECKPOINTS / f"step_{progress.step:08d}"


def preview(run: Run, step: int) -> Path | None:
    """A grid of EMA samples in workdir/samples (rank 0)."""
    path, ema = None, run.full_ema()
    if run.is_main:
        path = sample_grid(ema, run.objective, preview_settings(run.config), run.data.shape,
                           run.workdir / "samples" / f"step_{step:08d}.png", class_names=run.data.class_names,
                           device=run.device, decode=run.data.decode, **preview_contexts(run.data, run.config))
        run.wandb.image("samples", path, step)
    run.accelerator.wait_for_everyone()
    return path


def start_fid(run: Run) -> None:
    """Feature extractor and reference statistics for FID during training, when the config asks for it."""
    ev = run.config.eval
    if ev.every <= 0 and ev.final_n_samples <= 0:
        return
    run.fid = TrainingFID(run.config, run.workdir, state=run.accelerator, device=run.device, data=run.data,
                          objective=run.objective)
    run.fid_history = FidHistory.load(run.workdir)


def score_fid(run: Run, progress: Progress, last_ckpt: Path | None) -> Path:
    """FID-``eval.n_samples`` of the EMA weights with the evaluation sampler and guidance; the step gets a checkpoint
    (so the best one can be scored in full later) and the score goes to the console, log.txt, wandb and fid.json."""
    step = progress.step
    if last_ckpt is None or last_ckpt.name != f"step_{step:08d}":
        last_ckpt = save(run, progress)
    fid = run.fid(run.full_ema(), run.config.eval.n_samples, progress=run.is_main)
    run.fid_history.add(step, fid)
    if run.is_main:
        run.fid_history.write()
        best = run.fid_history.best_step
        text = (f"step {step} FID-{run.config.eval.n_samples} {fid:.4f} ({run.config.sample.sampler}, "
                f"{run.config.sample.steps} steps, guidance {run.config.sample.guidance_scale:g}; best {best})")
        log.info("%s", text)
        print(f"[train] {text}", file=sys.stderr)
        run.wandb.log({fid_name(run.config.eval.n_samples): fid}, step)
    run.accelerator.wait_for_everyone()
    return last_ckpt


def score_best_checkpoint(run: Run) -> dict:
    """U-ViT's recipe after training: the best in-training checkpoint scored with ``eval.final_n_samples``."""
    history, n = run.fid_history, run.config.eval.final_n_samples
    best = history.best_step if history is not None else None
    if n <= 0 or best is None:
        return {}
    path = run.workdir / ckpt.CHECKPOINTS / f"step_{best:08d}"
    if not path.is_dir():
        report(run, f"the best checkpoint {path} is gone (train.keep_checkpoints); FID-{n} not computed")
        return {}
    model = copy.deepcopy(run.ema)
    model.load_state_dict(ckpt.load_checkpoint_dir(path, weights="ema")[0])
    fid = run.fid(model, n, progress=run.is_main)
    history.final = {"step": best, "n_samples": n, "fid": fid, "checkpoint": str(path)}
    if run.is_main:
        history.write()
    return {f"best_{fid_name(n)}": fid, "best_step": best}


def train_loop(run: Run, progress: Progress, stop: StopRequest, last_ckpt: Path | None) -> Path:
    """Steps until train.steps or a stop request all processes agree on; returns the checkpoint of the step the
    loop ended at (saving one unless the periodic save just did)."""
    tc = run.config.train
    batches = training_batches(run, progress.samples_seen)
    window = Window(loss_sum=torch.zeros((), device=run.device))
    with tqdm(total=tc.steps, initial=progress.step, disable=not run.is_main, desc="train", dynamic_ncols=True) as bar:
        while progress.step < tc.steps and not stop.agreed(run.accelerator):
            train_step(run, batches, progress, window)
            bar.update(1)
            step = progress.step
            checkpoint_now = step % tc.ckpt_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or checkpoint_now:
                log_window(run, step, window, last_ckpt, bar)
            if checkpoint_now:
                last_ckpt = save(run, progress)
            if run.fid is not None and run.config.eval.every > 0 and step % run.config.eval.every == 0:
                last_ckpt = score_fid(run, progress, last_ckpt)
            if tc.sample_every > 0 and step % tc.sample_every == 0 and step != tc.steps:
                preview(run, step)
    if last_ckpt is not None and last_ckpt.name == f"step_{progress.step:08d}":
        return last_ckpt
    return save(run, progress)


def finish(run: Run, progress: Progress, final: Path) -> Path:
    """The final preview grid and evaluation, and the summary lines."""
    grid = preview(run, progress.step)
    best = score_best_checkpoint(run) if run.fid is not None else {}
    ema = run.full_ema()
    if run.is_main:
        metrics = {**evaluate(run.config, ema, run.objective, run.data.shape, run.device), **best}
        if metrics:
            log.info("step %d eval %s", progress.step, metrics)
            run.wandb.log(metrics, progress.step)
            (final / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"[train] checkpoint: {final}", file=sys.stderr)
        print(f"[train] sample grid: {grid}", file=sys.stderr)
        if run.skipped_images:
            print(f"[train] {run.skipped_images} unreadable images were skipped (data.on_corrupt=skip); see "
                  f"{run.workdir / 'log.txt'}", file=sys.stderr)
        for k, v in metrics.items():
            print(f"[train] {k}: {v:.4f}", file=sys.stderr)
    run.wandb.finish()
    run.accelerator.end_training()
    return final


def train(config, workdir: str | Path, allow_config_change: bool = False) -> Path:
    """Train from ``config`` in ``workdir``, resuming from its newest intact checkpoint. Returns the final checkpoint.

    Raises StoppedBySignal once a checkpoint is saved after SIGTERM/SIGINT/SIGUSR1; ConfigError for settings that
    cannot work or that change the run being resumed (unless ``allow_config_change``); WorkdirBusyError when
    another live run holds ``workdir``; CheckpointSaveError when a checkpoint cannot be written.
    """
    check_values(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir), StopRequest() as stop:
        run = start_run(config, workdir)
        progress, resumed, train_state = resume(run, allow_config_change)
        prepare(run, resumed, train_state)
        announce(run, progress, resumed)
        start_fid(run)
        final = train_loop(run, progress, stop, resumed)
        if stop.agreed(run.accelerator):
            run.wandb.finish()
            raise StoppedBySignal(stop.signal_name or "a signal to another process", progress.step,
                                  final if run.is_main else None)
        return finish(run, progress, final)


def evaluate(config, ema, objective, image_shape, device) -> dict:
    """End-of-run evaluation named by ``config.eval.metric`` (empty: none)."""
    metric = config.eval.metric
    if not metric:
        return {}
    if metric == "digits_accuracy":
        labels = class_rows(num_real_classes(ema), config.eval.per_class)
        samples = generate(ema, objective, config.sample, image_shape, labels=labels, seed=config.eval.seed,
                           device=device)
        return {"digits_accuracy": digits_classifier_accuracy(samples.cpu(), labels)}
    raise AssertionError(f"eval.metric {metric!r} passed validation but has no implementation")
