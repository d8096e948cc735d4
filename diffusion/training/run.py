"""The objects of one training run, built once by :func:`start_run` and checked against each other: accelerator, data,
network, EMA, optimizer, objective, logging and FID during training, resumed from the newest intact checkpoint."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusion import checkpoint as ckpt
from diffusion.config.loading import config_to_json
from diffusion.errors import ConfigError
from diffusion.evaluation.training import FidHistory, TrainingFID, selection_sample_config
from diffusion.registry import (
    block_class,
    build_model,
    build_objective,
    describe,
    label_dropout,
    resolve_model_kwargs,
    set_attention,
)
from diffusion.sampling.settings import preview_settings, sampler_settings
from diffusion.training.data import TrainData, check_conditioning, fid_captions, prepare_data
from diffusion.training.distributed import ShardedEMA, autocast_forward, enable_on_cpu, fsdp_plugin, is_sharded
from diffusion.training.logs import WandbLogger, report, setup_logging
from diffusion.training.pieces import param_groups
from diffusion.training.posthoc_ema import PowerEMA, build_power_ema
from diffusion.training.repa import RepaTraining, WithProjectors, build_repa, check_repa
from diffusion.training.resume import Progress, check_config_changes, find_checkpoint, restore
from diffusion.training.speed import adamw, cpu_has_native_bf16, reuse_freed_memory

log = logging.getLogger("diffusion.train")


@dataclass
class Run:
    """The objects of one training run, built by :func:`start_run`."""

    config: object
    workdir: Path
    accelerator: Accelerator
    data: TrainData
    net: torch.nn.Module  # the bare network: the weights saved and averaged into the EMA
    ema: torch.nn.Module
    sharded_ema: ShardedEMA | None  # with FSDP: the EMA's running shards; ``ema`` is gathered from them
    model: torch.nn.Module  # net as prepared by accelerate (DDP or FSDP, compile): what the loss calls
    optimizer: torch.optim.Optimizer
    objective: object
    p_uncond: float
    meta: dict
    micro_batch: int
    wandb: WandbLogger
    fid: TrainingFID | None  # FID during training (eval.every / eval.final_n_samples)
    fid_history: FidHistory | None
    skipped_images: int = 0  # unreadable images replaced so far (data.on_corrupt=skip)
    repa: RepaTraining | None = None  # REPA's encoders, projectors and tap (repa.encoders), else None
    power_ema: PowerEMA | None = None  # ema.kind=power: the power-function EMAs of post-hoc EMA, else None

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


def start_run(config, workdir: Path, allow_config_change: bool = False) -> tuple[Run, Progress]:
    """Every object of the run, built once, and where it stands: resumed from the newest intact checkpoint in
    ``workdir`` (refused when its config would change the run, unless ``allow_config_change``), else step 0."""
    tc, oc = config.train, config.optim
    check_repa(config)
    accelerator = build_accelerator(config)
    is_main, device = accelerator.is_main_process, accelerator.device
    setup_logging(workdir, is_main)
    speed_settings(tc, device, is_main)
    data = prepare_data(config, device)
    net, objective, p_uncond, meta = build_network(config, data)
    found = find_checkpoint(workdir, accelerator)
    if found is not None:
        check_config_changes(found, config, meta, workdir, allow_config_change, is_main)
    ema = copy.deepcopy(net).float().requires_grad_(False).eval()
    repa = build_repa(config, net, config.data.image_size, p_uncond, device)  # the tap: after the EMA's copy
    projectors = repa.projectors if repa is not None else None
    groups = param_groups(net, oc.weight_decay, oc.decay_all_params)
    if projectors is not None:  # after the backbone's: its optimizer state keeps its indices
        groups += param_groups(projectors, oc.weight_decay, oc.decay_all_params)
    optimizer = adamw(groups, oc.lr, oc.betas, oc.eps, oc.impl)
    model, optimizer, sharded_ema = prepare(accelerator, net, ema, optimizer, tc.fsdp, projectors)
    power_ema = build_power_ema(config.ema, net, ema)  # after prepare: with FSDP, shards placed like the parameters
    if power_ema is not None and not config.ema.snapshot_every:
        report(is_main, "ema.kind=power with ema.snapshot_every=0: the power EMAs are tracked but no snapshot is "
                        "written, so scripts/reconstruct_ema.py will have nothing to combine: e.g. "
                        "--config.ema.snapshot_every=1000")
    progress = restore(found, net, ema, sharded_ema, optimizer, accelerator.scaler, projectors,
                       is_main=is_main, power_ema=power_ema)
    micro_batch = tc.batch_size // (accelerator.num_processes * tc.grad_accum_steps)  # check_values: divisible
    sharded = f" sharded ({tc.fsdp})" if sharded_ema is not None else ""
    layout = (f"{accelerator.num_processes} process(es){sharded}, micro-batch {micro_batch} x "
              f"{tc.grad_accum_steps} accum")
    wandb = WandbLogger(config, workdir, is_main)
    if is_main:
        announce(config, workdir, meta, net, layout, progress, found)
    fid, fid_history = start_fid(config, workdir, accelerator, data, objective, net)
    return Run(config=config, workdir=workdir, accelerator=accelerator, data=data, net=net, ema=ema,
               sharded_ema=sharded_ema, model=model, optimizer=optimizer, objective=objective, p_uncond=p_uncond,
               meta=meta, micro_batch=micro_batch, wandb=wandb, fid=fid, fid_history=fid_history,
               repa=repa, power_ema=power_ema), progress


# ----------------------------------------------------------------------------------------------------------
# The pieces of start_run, in its order
# ----------------------------------------------------------------------------------------------------------


def build_accelerator(config) -> Accelerator:
    """Devices, processes and mixed precision. A multi-process launch (torchrun / accelerate launch) on a machine
    without CUDA is DDP over gloo on the CPU; with train.fsdp, FSDP2 over the backbone's blocks."""
    tc = config.train
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_ddp = launched and not torch.cuda.is_available()
    plugin = fsdp_plugin(tc.fsdp, block_class(config.model.name), tc.mixed_precision) if launched else None
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu_ddp, fsdp_plugin=plugin,
                              dynamo_backend="inductor" if tc.compile else None)
    enable_on_cpu(accelerator, plugin)
    return accelerator


def speed_settings(tc, device: torch.device, is_main: bool) -> None:
    """TF32 and the CPU heap setting; a notice when bf16 would be emulated on this CPU."""
    if tc.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if tc.cpu_reuse_memory and device.type == "cpu":
        reuse_freed_memory()
    if tc.mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        report(is_main, "train.mixed_precision=bf16: this CPU has no native bf16 instructions (no avx512_bf16 or "
                        "amx_bf16), so torch emulates bf16 in software, far slower than fp32; "
                        "--config.train.mixed_precision=no trains faster here")


def build_network(config, data: TrainData) -> tuple[torch.nn.Module, object, float, dict]:
    """(network, objective, label-dropout rate, checkpoint meta), checked against the data and the samplers."""
    torch.manual_seed(config.seed)  # identical initial weights on every rank and every launch
    net = set_attention(build_model(config.model), config.train.attention)
    model_name, model_kwargs = resolve_model_kwargs(config.model)
    objective = build_objective(config.diffusion)
    p_uncond = label_dropout(config, net)
    check_conditioning(net, data, p_uncond)
    check_sampling(config, objective, net, data)
    meta = {"model_name": model_name, "model_kwargs": json.loads(json.dumps(model_kwargs)),
            "image_shape": list(data.shape), "class_names": data.class_names, "class_counts": data.class_counts,
            "torch": torch.__version__}
    return net, objective, p_uncond, meta


def check_sampling(config, objective, net, data: TrainData) -> None:
    """The evaluation and preview samplers and the FID labels are used thousands of steps in: refuse what the
    objective or the data cannot run now (config.schema.check_values has checked the rest), not at the first
    preview."""
    try:
        for section in (config.sample, preview_settings(config), selection_sample_config(config)):
            sampler_settings(objective, section)
    except ValueError as err:
        raise ConfigError(f"sample / preview / eval section: {err} (e.g. --config.preview.sampler=...)") from None
    if (config.eval.every > 0 and describe(net).num_labels and config.sample.labels == "train_freq"
            and data.class_counts is None):
        raise ConfigError("sample.labels=train_freq needs the training set's class counts, which this dataset does "
                          "not provide: --config.sample.labels=uniform")


def prepare(accelerator: Accelerator, net, ema, optimizer, fsdp: str, projectors=None):
    """Hand the network and optimizer to accelerate (DDP, or FSDP replacing the parameters by shards; compile) ->
    (the model the loss calls, the optimizer, the EMA's shards with FSDP or None). REPA's ``projectors`` are
    wrapped with the network (training.repa.WithProjectors) so that DDP syncs their gradients too."""
    model, optimizer = accelerator.prepare(net if projectors is None else WithProjectors(net, projectors), optimizer)
    ema.to(accelerator.device)
    sharded_ema = None
    if is_sharded(net):
        autocast_forward(model, accelerator)
        sharded_ema = ShardedEMA(ema, net)
    elif fsdp:
        report(accelerator.is_main_process, f"train.fsdp={fsdp} needs a multi-process launch; training unsharded")
    return model, optimizer, sharded_ema


def announce(config, workdir: Path, meta: dict, net, layout: str, progress: Progress,
             found: ckpt.Checkpoint | None) -> None:
    """config.json and the first log line (rank 0)."""
    (workdir / "config.json").write_text(config_to_json(config))
    n_params = sum(p.numel() for p in net.parameters())
    what = f"resuming from {found.path} (step {progress.step})" if found else "starting from scratch"
    log.info("%s | %s %s, %.2fM params | %s | %s", workdir, meta["model_name"], config.model.get("preset") or "",
             n_params / 1e6, layout, what)
    print(f"[train] {what}; workdir {workdir}", file=sys.stderr)


def start_fid(config, workdir: Path, accelerator: Accelerator, data: TrainData, objective, net=None):
    """(scorer, history) of FID during training when the config asks for it, else (None, None); ``net``'s contract
    is what a ``sample.guide`` (autoguidance) is checked against."""
    ev = config.eval
    if ev.every <= 0 and ev.final_n_samples <= 0:
        return None, None
    fid = TrainingFID(config, workdir, state=accelerator, device=accelerator.device, objective=objective,
                      shape=data.shape, decode=data.decode, class_counts=data.class_counts,
                      captions=fid_captions(config, data),
                      null_context=data.null_context, info=describe(net) if net is not None else None)
    return fid, FidHistory.load(workdir)
