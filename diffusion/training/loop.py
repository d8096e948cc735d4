"""The training loop, read top to bottom: :func:`train`, one optimizer step, the loop, saving, previews, FID and the
end of the run -- one loop for every backbone, objective and dataset (the run's objects are built in run.py).

accelerate provides devices, DDP over processes and nodes -- or, with ``train.fsdp``, sharded training
(diffusion/training/distributed.py) -- and mixed precision (autocast + fp16 grad scaler). Weights, optimizer state and
the EMA stay fp32.

Determinism. The randomness of step s is a function of (seed, s), every stream's seed derived by
:func:`diffusion.seeds.derive_seed`: with ``train.global_noise`` the noise, times and label/caption dropout of the
whole global batch come from one generator seeded by (seed, s) and each process takes its rows, so 2 processes x B,
1 process x 2B and 2 accumulation steps x B are the same run; torch's global RNG is reseeded from (seed, rank, s)
every step; and an item's augmentation depends on its position in the data stream
(:class:`diffusion.data.stream.StreamItems`). Checkpoints store the samples consumed, so a run resumed from any
checkpoint -- also one saved on a signal at an arbitrary step -- continues bit-identically (CPU, fp32).

Robustness. One run per working directory (``train.lock``). SIGTERM, SIGINT and SIGUSR1 save a checkpoint at the
next step boundary and raise :class:`StoppedBySignal` (train.py exits 3); a second signal exits at once. Resume
takes the newest checkpoint whose checksums verify, naming the damaged ones it skips, and refuses config changes
that would alter the run (resume.py's ``RESUMABLE_CHANGES`` lists those it accepts) unless ``allow_config_change``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.config.schema import check_values
from diffusion.errors import NonFiniteLossError
from diffusion.evaluation.training import end_of_run_metrics, fid_name
from diffusion.registry import set_attention
from diffusion.sampling.grids import sample_grid
from diffusion.sampling.loader import load_for_sampling
from diffusion.sampling.settings import preview_settings
from diffusion.training.data import (
    batch_conditioning,
    count_skipped,
    micro_batch_rows,
    preview_contexts,
    step_draws,
    stream_batches,
)
from diffusion.training.distributed import full_state
from diffusion.training.logs import report
from diffusion.training.pieces import ema_decay_at, learning_rate, reseed, update_ema
from diffusion.training.repa import RepaTraining, legacy_uniform, repa_losses
from diffusion.training.resume import Progress
from diffusion.training.run import Run, start_run
from diffusion.training.stopping import StoppedBySignal, StopRequest, workdir_lock

log = logging.getLogger("diffusion.train")


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
        run, progress = start_run(config, workdir, allow_config_change)
        final = train_loop(run, progress, stop)
        if stop.agreed(run.accelerator):
            run.wandb.finish()
            raise StoppedBySignal(stop.signal_name or "a signal to another process", progress.step,
                                  final if run.is_main else None)
        return finish(run, progress, final)


# ----------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the next log line reports: this process's loss since the last line and images it skipped."""

    loss_sum: torch.Tensor
    terms_sum: torch.Tensor | None = None  # REPA: the sums of its denoise and proj terms
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(2))  # sum of the finite norms, their count
    steps: int = 0
    skipped: int = 0
    lr: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def loss_terms(objective, model, x: torch.Tensor, cond: dict, *, repa: RepaTraining | None = None,
               images: torch.Tensor | None = None, given: dict | None = None, step: int = 0,
               legacy: torch.Tensor | None = None, features=None) -> dict[str, torch.Tensor]:
    """One micro-batch's loss terms (per sample): the objective's with the step's draws ``given``, or REPA's
    (denoising + alignment, targets from ``images`` or cached ``features``, legacy draws ``legacy``). The training
    step and the benchmark both call this."""
    if repa is None:
        return objective.training_losses(model, x, cond, **(given or {}))
    return repa_losses(repa, objective, model, images, x, cond, given or {}, step, legacy, features)


def train_step(run: Run, batches, progress: Progress, window: Window) -> None:
    """One optimizer step over grad_accum_steps micro-batches, then the EMA update."""
    tc, oc, seed = run.config.train, run.config.optim, run.config.seed
    reseed(seed, run.rank, progress.step)
    window.lr = learning_rate(progress.step, oc.lr, oc.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = window.lr
    draws = (step_draws(run.objective, tc.batch_size, run.data.shape, seed, progress.step, run.device)
             if tc.global_noise else None)
    for micro in range(tc.grad_accum_steps):
        batch = next(batches)
        window.skipped += count_skipped(batch.pop("skipped"), run.config.data.on_corrupt, run.rank, run.world)
        given, uniform = draws.rows(micro, run.micro_batch, run.rank, run.world) if draws else ({}, None)
        x = images = batch["x"].to(run.device, non_blocking=True)
        if run.data.encode is not None:
            x = run.data.encode(x)
        cond = batch_conditioning(run.net, batch, run.data, run.p_uncond, run.device, uniform)
        sync = micro == tc.grad_accum_steps - 1
        with nullcontext() if sync else run.accelerator.no_sync(run.model):
            legacy = None
            if run.repa is not None:
                rows = micro_batch_rows(micro, run.micro_batch, run.rank, run.world)
                legacy = legacy_uniform(seed, progress.step, tc.batch_size, rows, run.device)
            terms = loss_terms(run.objective, run.model, x, cond, repa=run.repa, images=images, given=given,
                               step=progress.step, legacy=legacy, features=batch.get("repa_features"))
            if run.repa is not None:
                window.terms_sum += torch.stack([terms["denoise"].mean(), terms["proj"].mean()]).detach() / \
                    tc.grad_accum_steps
            loss = terms["loss"].mean()
            run.accelerator.backward(loss / tc.grad_accum_steps)
        window.loss_sum += loss.detach() / tc.grad_accum_steps
    # the norm for the log, also unclipped (an infinite bound computes it and leaves the gradients as they are)
    norm = run.accelerator.clip_grad_norm_(run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    if norm is not None:  # (DeepSpeed's may be)
        norm = norm.detach().float().to(window.grad_norm.device)
        finite = torch.isfinite(norm)  # an fp16 step the grad scaler skips
        window.grad_norm += torch.stack([torch.where(finite, norm, 0.0), finite.float()])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    decay = ema_decay_at(progress.step, tc.ema_decay, tc.ema_warmup)
    if run.sharded_ema is not None:
        run.sharded_ema.update(decay)
    else:
        update_ema(run.ema, run.net, decay)
    if run.power_ema is not None:  # t = the steps done after this one: EDM2's beta, 0 at the first step
        run.power_ema.update(progress.step + 1)
    progress.step += 1
    progress.samples_seen += tc.batch_size
    window.steps += 1


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train_loop(run: Run, progress: Progress, stop: StopRequest) -> Path:
    """Steps until train.steps or a stop request all processes agree on; returns the checkpoint of the step the
    loop ended at (saving one unless the periodic save just did)."""
    tc, ev = run.config.train, run.config.eval
    batches = stream_batches(run.data.dataset, run.config.seed, run.micro_batch, run.config.data.num_workers,
                             run.device, run.rank, run.world, progress.samples_seen)
    window = Window(loss_sum=torch.zeros((), device=run.device),
                    terms_sum=torch.zeros(2, device=run.device) if run.repa is not None else None,
                    grad_norm=torch.zeros(2, device=run.device))
    run.wandb.start(progress.step)  # scalars.jsonl: what the stopped run logged after this step goes
    with tqdm(total=tc.steps, initial=progress.step, disable=not run.is_main, desc="train", dynamic_ncols=True) as bar:
        while progress.step < tc.steps and not stop.agreed(run.accelerator):
            train_step(run, batches, progress, window)
            bar.update(1)
            step = progress.step
            checkpoint_now = step % tc.ckpt_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or checkpoint_now:
                log_window(run, step, window, progress.saved, bar)
            with off_the_clock(bar, window):  # the bar's rate and ETA are the training steps' alone
                if run.power_ema is not None:
                    run.power_ema.maybe_snapshot(step, run.workdir, run.is_main)
                if checkpoint_now:
                    save(run, progress)
                if run.fid is not None and ev.every > 0 and step % ev.every == 0:
                    score_fid(run, progress)
                if tc.sample_every > 0 and step % tc.sample_every == 0 and step != tc.steps:
                    preview(run, step)
    return progress.saved if progress.saved_now else save(run, progress)


@contextmanager
def off_the_clock(bar, window: Window):
    """Leave the time spent inside (checkpoints, FID, previews) out of the progress bar's rate, elapsed time and
    ETA, and out of the next log line's images/s: their clocks start that much later."""
    start = time.perf_counter()
    try:
        yield
    finally:
        paused = time.perf_counter() - start
        window.start += paused
        if not bar.disable:  # tqdm's own clocks: the run's start and its last print (the rate's reference)
            bar.start_t += paused
            bar.last_print_t += paused


def log_window(run: Run, step: int, window: Window, last_ckpt: Path | None, bar) -> None:
    """The global mean loss (every process's micro-batches weigh the same) and throughput since the last line."""
    extra = [] if window.terms_sum is None else list(window.terms_sum)
    totals = run.accelerator.reduce(torch.stack([window.loss_sum, torch.tensor(float(window.skipped),
                                                                               device=run.device), *extra,
                                                 *window.grad_norm]),
                                    reduction="sum")
    grad_norm = (totals[-2] / totals[-1]).item() if totals[-1] > 0 else math.nan  # every process's is the same
    mean_loss = totals[0].item() / run.world / window.steps
    run.skipped_images += int(totals[1].item())
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"loss is {mean_loss} at step {step}; nothing was saved after {last_ckpt or 'the start'}. "
            f"Lower optim.lr, enable train.grad_clip, or use train.mixed_precision=bf16/no.")
    throughput = window.steps * run.config.train.batch_size / (time.perf_counter() - window.start)
    skipped = f" | {run.skipped_images} unreadable images skipped so far" if run.skipped_images else ""
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{window.lr:.2e}", img_s=f"{throughput:.0f}")
    terms = {name: totals[2 + i].item() / run.world / window.steps for i, name in enumerate(("denoise", "proj"))
             if window.terms_sum is not None}
    shown = "".join(f" {name} {value:.5f}" for name, value in terms.items())
    log.info("step %d loss %.5f%s lr %.3e grad norm %.4g img/s %.1f%s", step, mean_loss, shown, window.lr,
             grad_norm, throughput, skipped)
    run.wandb.log({"loss": mean_loss, **terms, "lr": window.lr, "grad_norm": grad_norm, "img_per_sec": throughput},
                  step)
    window.loss_sum.zero_()
    window.grad_norm.zero_()
    if window.terms_sum is not None:
        window.terms_sum.zero_()
    window.steps, window.skipped, window.start = 0, 0, time.perf_counter()


# ----------------------------------------------------------------------------------------------------------
# Saving, previews, FID
# ----------------------------------------------------------------------------------------------------------


def save(run: Run, progress: Progress) -> Path:
    """Checkpoint the run at its current step (rank 0 writes; everyone waits, and with FSDP gathers the shards)."""
    path = None
    ema = run.full_ema()
    model_state, optimizer_state = full_state(run.net.state_dict()), full_state(run.optimizer.state_dict())
    phema_state = run.power_ema.checkpoint_state() if run.power_ema is not None else None
    if run.is_main:
        scaler = run.accelerator.scaler
        train_state = {"optimizer": optimizer_state, "step": progress.step,
                       "samples_seen": progress.samples_seen, "scaler": scaler.state_dict() if scaler else {}}
        path = ckpt.save_checkpoint(run.workdir, progress.step, model_state=model_state,
                                    ema_state=ema.state_dict(), config=run.config, meta=run.meta,
                                    train_state=train_state, keep=run.config.train.keep_checkpoints,
                                    projectors_state=run.repa.projectors.state_dict() if run.repa else None,
                                    phema_state=phema_state)
        log.info("step %d: saved %s", progress.step, path)
    run.accelerator.wait_for_everyone()
    progress.saved = path or run.workdir / ckpt.CHECKPOINTS / f"step_{progress.step:08d}"
    return progress.saved


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


def score_fid(run: Run, progress: Progress) -> None:
    """FID-``eval.n_samples`` of the EMA weights with the selection sampler and guidance; the step gets a checkpoint
    (so the best one can be scored in full later) and the score goes to the console, log.txt, wandb, fid.json and
    scalars.jsonl (curves.png redrawn)."""
    step, ev, sc = progress.step, run.config.eval, run.fid.selection
    if not progress.saved_now:
        save(run, progress)
    start = time.perf_counter()
    fid = run.fid(run.full_ema(), ev.n_samples, progress=run.is_main)
    seconds = time.perf_counter() - start
    run.fid_history.add(step, fid)
    if run.is_main:
        run.fid_history.write()
        text = (f"step {step} FID-{ev.n_samples} {fid:.4f} ({sc.sampler}, {sc.steps} steps, guidance "
                f"{sc.guidance_scale:g}{run.fid.guide_note}; best {run.fid_history.best_step}; {seconds:.1f} s, not "
                f"in the training rate)")
        log.info("%s", text)
        print(f"[train] {text}", file=sys.stderr)
        run.wandb.log({fid_name(ev.n_samples): fid}, step)
        run.wandb.draw()  # curves.png at every evaluation
    run.accelerator.wait_for_everyone()


def score_best_checkpoint(run: Run) -> dict:
    """U-ViT's recipe after training: the best in-training checkpoint scored with ``eval.final_n_samples`` samples of
    the ``sample`` section's sampler."""
    history, n = run.fid_history, run.config.eval.final_n_samples
    best = history.best_step
    if n <= 0 or best is None:
        return {}
    path = run.workdir / ckpt.CHECKPOINTS / f"step_{best:08d}"
    if not path.is_dir():
        report(run.is_main, f"the best checkpoint {path} is gone (train.keep_checkpoints); FID-{n} not computed")
        return {}
    model = load_for_sampling(path, codecs=False, with_guide=False).model  # run.fid holds the guide already
    model = set_attention(model, run.config.train.attention).to(run.device)
    fid = run.fid(model, n, progress=run.is_main, final=True)  # the paper's sampler (the sample section)
    history.final = {"step": best, "n_samples": n, "fid": fid, "checkpoint": str(path)}
    if run.is_main:
        history.write()
    return {f"best_{fid_name(n)}": fid, "best_step": best}


# ----------------------------------------------------------------------------------------------------------
# The end of the run
# ----------------------------------------------------------------------------------------------------------


def finish(run: Run, progress: Progress, final: Path) -> Path:
    """The final preview grid and evaluation, and the summary lines."""
    grid = preview(run, progress.step)
    best = score_best_checkpoint(run) if run.fid is not None else {}
    ema = run.full_ema()
    if run.is_main:
        metrics = {**end_of_run_metrics(run.config, ema, run.objective, run.data.shape, run.device), **best}
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
