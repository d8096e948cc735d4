"""The objects of one training run."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from diffusion.config.loading import config_to_json
from diffusion.errors import ConfigError
from diffusion.evaluation.training import FidHistory, TrainingFID
from diffusion.registry import (
    block_class,
    build_model,
    build_objective,
    label_dropout,
    resolve_model_kwargs,
    set_attention,
)
from diffusion.sampling.generate import check_settings, num_real_classes, preview_settings, sample_settings
from diffusion.sampling.per_sample import LABEL_MODES
from diffusion.training.data import check_conditioning, prepare_data
from diffusion.training.distributed import (
    ShardedEMA,
    enable_on_cpu,
    fsdp_plugin,
)
from diffusion.training.logs import WandbLogger, setup_logging
from diffusion.training.pieces import param_groups
from diffusion.training.speed import adamw, reuse_freed_memory

log = logging.getLogger("diffusion.train")


if TYPE_CHECKING:
    from diffusion.training.data import TrainData


EVAL_METRICS = ("", "digits_accuracy")


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
