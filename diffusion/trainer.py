"""The training loop: one for every backbone, objective and dataset, read top to bottom.

accelerate provides devices, DDP over processes and nodes, and mixed precision (autocast + fp16 grad scaler).
Weights, optimizer state and the EMA stay fp32. Randomness is reseeded from (seed, rank, step) at the start and
after every checkpoint, and the data order is a function of (seed, position), so a resumed run sees the same
data order and noise draws from its checkpoint onwards as a run that never stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.config import ConfigError, config_to_json
from diffusion.data import InfiniteSampler, build_dataset, digits_classifier_accuracy
from diffusion.registry import build_model, build_objective, label_dropout, resolve_model_kwargs
from diffusion.sampling import class_rows, generate, num_real_classes, preview_settings, sample_grid

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


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int | None) -> torch.Tensor:
    """Classifier-free guidance training: replace each label by the null label with probability p_uncond."""
    if p_uncond <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def drop_contexts(context: torch.Tensor, p_uncond: float, null_context: torch.Tensor) -> torch.Tensor:
    """Text-to-image guidance training: replace each caption's tokens by the empty caption's with p_uncond."""
    if p_uncond <= 0:
        return context
    drop = torch.rand(context.shape[0], device=context.device) < p_uncond
    return torch.where(drop.view(-1, 1, 1), null_context.to(context), context)


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
    shape: tuple[int, ...]  # (C, H, W) the backbone sees: latents for latent models
    encode: Callable | None  # images -> scaled latents, when the config encodes on the fly (the original DiT's way)
    decode: Callable | None  # scaled latents -> images, for previews
    null_context: torch.Tensor | None  # the empty caption's tokens (text-to-image), the target of caption dropout
    class_names: list[str] | None
    class_counts: list[int] | None  # per-class training counts (sample.py's train_freq labels)


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
    shape = autoencoder.latent_shape(config.data.image_size) if on_the_fly else tuple(dataset[0]["x"].shape)
    null_context = getattr(dataset, "null_context", None)
    return TrainData(dataset=dataset, shape=tuple(shape), encode=autoencoder.encode if on_the_fly else None,
                     decode=autoencoder.decode if autoencoder is not None else None,
                     null_context=None if null_context is None else null_context.to(device),
                     class_names=[str(c) for c in getattr(dataset, "classes", [])] or None,
                     class_counts=class_counts(dataset))


def check_conditioning(net, data: TrainData, p_uncond: float) -> None:
    """The model's conditioning must be one the data can feed, and guidance training needs a null input."""
    sample = data.dataset[0]
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


def batch_conditioning(net, batch: dict, data: TrainData, p_uncond: float, device) -> dict:
    """The network's conditioning inputs for one batch, with classifier-free guidance dropout applied."""
    if getattr(net, "clip_dim", None) is not None:
        return {"context": drop_contexts(batch["context"].to(device, non_blocking=True), p_uncond, data.null_context)}
    if num_real_classes(net) > 0:
        return {"y": drop_labels(batch["y"].to(device, non_blocking=True), p_uncond, net.null_label)}
    return {}


def preview_contexts(data: TrainData, config) -> dict:
    """Text-to-image previews: the captions of the first training images (a fixed choice), one row each."""
    if data.null_context is None:
        return {}
    with torch.random.fork_rng():
        torch.manual_seed(config.sample.seed)
        contexts = torch.stack([data.dataset[i]["context"] for i in range(min(4, len(data.dataset)))])
    return {"contexts": contexts.to(data.null_context.device), "null_context": data.null_context}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(config, workdir: str | Path) -> Path:
    """Train from ``config`` in ``workdir``, resuming from its newest checkpoint. Returns the final checkpoint."""
    tc, oc = config.train, config.optim
    # A multi-process launch (torchrun / accelerate launch) on a machine without CUDA: DDP over gloo on the CPU.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu_ddp,
                              dynamo_backend="inductor" if tc.compile else None)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir, is_main)

    per_step = world * tc.grad_accum_steps
    if tc.batch_size % per_step:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by processes x grad_accum_steps "
                          f"= {world} x {tc.grad_accum_steps}")
    micro_batch = tc.batch_size // per_step
    if config.eval.metric not in EVAL_METRICS:
        raise ConfigError(f"unknown eval.metric {config.eval.metric!r}; known: {', '.join(EVAL_METRICS[1:])}")

    if tc.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # -- data, model, objective ----------------------------------------------------------------------------
    data = prepare_data(config, accelerator.device)
    dataset, image_shape, class_names = data.dataset, data.shape, data.class_names
    torch.manual_seed(config.seed)  # identical initial weights on every rank and every launch
    net = build_model(config.model)
    model_name, model_kwargs = resolve_model_kwargs(config.model)
    objective = build_objective(config.diffusion)
    p_uncond = label_dropout(config, model_name, model_kwargs)
    check_conditioning(net, data, p_uncond)
    meta = {"model_name": model_name, "model_kwargs": model_kwargs, "image_shape": list(image_shape),
            "class_names": class_names, "class_counts": data.class_counts, "torch": torch.__version__}

    ema = copy.deepcopy(net).float().requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(param_groups(net, oc.weight_decay, oc.decay_all_params), lr=oc.lr,
                                  betas=tuple(oc.betas), eps=oc.eps)

    # -- resume --------------------------------------------------------------------------------------------
    step, resume_from = 0, ckpt.latest_checkpoint(workdir)
    if resume_from is not None:
        saved_meta = json.loads((resume_from / "meta.json").read_text())
        if saved_meta["model_name"] != model_name or saved_meta["model_kwargs"] != json.loads(json.dumps(model_kwargs)):
            raise ConfigError(f"{workdir} holds a run of a different model ({resume_from}); "
                              f"use another --workdir or the original config")
        from safetensors.torch import load_file

        net.load_state_dict(load_file(resume_from / "model.safetensors"))
        ema.load_state_dict(load_file(resume_from / "ema.safetensors"))
        state = ckpt.load_train_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    model, optimizer = accelerator.prepare(net, optimizer)
    if resume_from is not None and accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    ema.to(accelerator.device)

    sampler = InfiniteSampler(len(dataset), rank=rank, world_size=world, seed=config.seed,
                              start_index=step * tc.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler,
                                         num_workers=config.data.num_workers, drop_last=True,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=config.data.num_workers > 0)
    batches = iter(loader)
    reseed(config.seed, rank, step)

    wandb_logger = WandbLogger(config, workdir, is_main)
    if is_main:
        (workdir / "config.json").write_text(config_to_json(config))
        n_params = sum(p.numel() for p in net.parameters())
        what = f"resuming from {resume_from} (step {step})" if resume_from else "starting from scratch"
        log.info("%s | %s %s, %.2fM params | %d process(es), micro-batch %d x %d accum | %s", workdir, model_name,
                 config.model.get("preset") or "", n_params / 1e6, world, micro_batch, tc.grad_accum_steps, what)
        print(f"[train] {what}; workdir {workdir}", file=sys.stderr)

    def save(at_step: int) -> Path:
        path = None
        if is_main:
            train_state = {"optimizer": optimizer.state_dict(), "step": at_step,
                           "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {}}
            path = ckpt.save_checkpoint(workdir, at_step, model_state=net.state_dict(), ema_state=ema.state_dict(),
                                        config=config, meta=meta, train_state=train_state, keep=tc.keep_checkpoints)
            log.info("step %d: saved %s", at_step, path)
        accelerator.wait_for_everyone()
        reseed(config.seed, rank, at_step)
        return path or ckpt.checkpoint_dirs(workdir)[-1]

    def preview(at_step: int) -> Path | None:
        path = None
        if is_main:
            path = sample_grid(ema, objective, preview_settings(config), image_shape,
                               workdir / "samples" / f"step_{at_step:08d}.png", class_names=class_names,
                               device=accelerator.device, decode=data.decode, **preview_contexts(data, config))
            wandb_logger.image("samples", path, at_step)
        accelerator.wait_for_everyone()
        return path

    # -- loop ----------------------------------------------------------------------------------------------
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    window_start, window_steps = time.perf_counter(), 0
    last_ckpt = resume_from
    bar = tqdm(total=tc.steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    while step < tc.steps:
        lr = learning_rate(step, oc.lr, oc.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(tc.grad_accum_steps):
            batch = next(batches)
            x = batch["x"].to(accelerator.device, non_blocking=True)
            if data.encode is not None:
                x = data.encode(x)
            cond = batch_conditioning(net, batch, data, p_uncond, accelerator.device)
            sync = micro == tc.grad_accum_steps - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                loss = objective.training_losses(model, x, cond)["loss"].mean()
                accelerator.backward(loss / tc.grad_accum_steps)
            loss_sum += loss.detach() / tc.grad_accum_steps
        if tc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, net, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
        step += 1
        window_steps += 1
        bar.update(1)

        checkpoint_now = step % tc.ckpt_every == 0 or step == tc.steps
        if step % tc.log_every == 0 or checkpoint_now:
            mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / window_steps
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"loss is {mean_loss} at step {step}; nothing was saved after {last_ckpt or 'the start'}. "
                    f"Lower optim.lr, enable train.grad_clip, or use train.mixed_precision=bf16/no.")
            elapsed = time.perf_counter() - window_start
            throughput = window_steps * tc.batch_size / elapsed
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.0f}")
            log.info("step %d loss %.5f lr %.3e img/s %.1f", step, mean_loss, lr, throughput)
            wandb_logger.log({"loss": mean_loss, "lr": lr, "img_per_sec": throughput}, step)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if checkpoint_now:
            last_ckpt = save(step)
        if tc.sample_every > 0 and step % tc.sample_every == 0 and step != tc.steps:
            preview(step)
    bar.close()

    final = last_ckpt if last_ckpt is not None and last_ckpt.name == f"step_{step:08d}" else save(step)
    grid = preview(step)
    if is_main:
        metrics = evaluate(config, ema, objective, image_shape, accelerator.device)
        if metrics:
            log.info("step %d eval %s", step, metrics)
            wandb_logger.log(metrics, step)
            (final / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"[train] checkpoint: {final}", file=sys.stderr)
        print(f"[train] sample grid: {grid}", file=sys.stderr)
        for k, v in metrics.items():
            print(f"[train] {k}: {v:.4f}", file=sys.stderr)
    wandb_logger.finish()
    accelerator.end_training()
    return final


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
