"""The config schema: every section and key with its default, and the checks of values that need no objects."""

from __future__ import annotations

import difflib
import os

import ml_collections

from diffusion.errors import ConfigError


# Sections every config has; configs start from ``base_config()`` and change what differs.
def base_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            model=dict(name="uvit", preset=None),  # the rest splats into the backbone constructor
            diffusion=dict(kind="vp_sde"),  # vp_sde | sd_discrete | iddpm, plus that kind's settings
            # Label / caption dropout for classifier-free guidance (null label or null context from the model/data).
            # None: DiT's model.class_dropout_prob, else 0. A DiT config where both are set must agree.
            cond=dict(p_uncond=None),
            data=dict(name="", root="data", image_size=32, random_flip=True, num_workers=4, download=False,
                      split="", verify_checksums=True, on_corrupt="skip"),  # split: "" = training split; checksums:
            # md5 of CIFAR-10/CelebA files, sha256 of every latent shard (slow on ImageNet: the latent configs turn it
            # off); on_corrupt: an unreadable image is replaced by the next readable one and counted ("skip"), or
            # stops the run naming the file ("error")
            # Latent diffusion: the Stable Diffusion KL-f8 autoencoder (diffusers AutoencoderKL). ``pretrained``: a hub
            # id, a local diffusers folder, or a single original-format file (.pth/.ckpt/.safetensors) whose
            # architecture comes from ``single_file_config`` (a diffusers folder or hub id). Empty: pixel space.
            autoencoder=dict(pretrained="", single_file_config="", scale_factor=0.18215, dtype="fp32",
                             chunk_size=16),  # dtype: fp32 | fp16 | bf16; decode/encode this many images at a time
            # CLIP text encoder (transformers) for text-to-image prompts: a hub id or a local folder.
            text_encoder=dict(pretrained="", max_length=77, dtype="fp32"),
            optim=dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                       decay_all_params=True,  # False: no decay on norms, biases, embeddings
                       impl="auto"),  # AdamW kernel: auto (= fused) | fused | foreach | for_loop (training/speed.py)
            train=dict(
                steps=1000,
                batch_size=128,  # global: all processes and accumulation steps together
                grad_accum_steps=1,
                # Noise, times and label/caption dropout of step s drawn for the whole global batch from a generator
                # seeded by (seed, s), each process taking its rows: any process count and accumulation give the
                # same run. False: each process draws its own (the original repositories' way).
                global_noise=True,
                mixed_precision="no",  # no | fp16 | bf16 (weights, optimizer and EMA stay fp32)
                grad_clip=0.0,  # max grad norm; 0 = off
                ema_decay=0.9999,
                ema_warmup=False,  # decay min(ema_decay, (1 + step) / (10 + step)): forgets the init in short runs
                log_every=50,
                ckpt_every=5000,
                keep_checkpoints=0,  # keep only the newest N checkpoints; 0 = keep all
                sample_every=5000,  # preview grid of EMA samples; 0 = off
                compile=False,  # torch.compile (inductor) of the backbone
                tf32=False,  # TF32 matmuls and convolutions on NVIDIA GPUs (DiT's recipe); no effect on CPU
                attention="auto",  # auto | sdpa | math: auto = explicit softmax(qk^T)v for bf16/fp16 on CPU, else SDPA
                cpu_reuse_memory=True,  # CPU: keep freed activations in the heap (training/speed.py); no GPU effect
                # Shard weights, gradients and AdamW state over the processes (FSDP2, training/distributed.py), one
                # transformer block at a time: "" off (DDP) | full_shard (least memory) | shard_grad_op (weights
                # stay gathered from forward to backward). Checkpoints stay full state dicts.
                fsdp="",
            ),
            # The evaluation sampler: what sample.py uses by default and what stands behind the paper number.
            sample=dict(
                sampler="dpm_solver++2m",  # see diffusion.samplers: dpm_solver, dpm_solver++, dpm_solver++2m, ddim,
                steps=50,  # euler_maruyama, euler_ode (VP objectives); ddpm, ddim (iddpm). steps = network evals
                order=3,  # singlestep DPM-Solver: the highest order of the "fast" order sequence
                t_end=None,  # last time of continuous-time samplers; None = the sampler's paper default
                skip_type=None,  # time grid of DPM-Solver: logSNR | time_uniform; None = the paper default
                eta=0.0,  # DDIM stochasticity
                guidance_scale=1.0,  # eps_u + w (eps_c - eps_u); 1 = no guidance (U-ViT's s = w - 1)
                guidance_channels="all",  # or "k": guide only the first k channels (DiT's released CFG: "3")
                # Autoguidance (Karras et al. 2024): a guide network (checkpoint dir, run dir, released name, or a
                # weights file with guide_config) in place of CFG's unconditional branch: out_g + w (out_m - out_g)
                # with w = guidance_scale, same conditioning and input; "" = CFG (docs/sampling.md)
                guide="",
                guide_config="",
                # clamp x0 predictions to [-1, 1] (pixel models; latents are never clipped); None: the objective's
                # own setting (iddpm: diffusion.clip_denoised; the VP objectives: off)
                clip_denoised=None,
                # The transport objective's samplers (diffusion.kind=transport; SiT's sample.py defaults); each
                # sampler takes its own (Transport.SAMPLER_OPTIONS) and refuses the others unless left here.
                # The adaptive ODE methods' (dopri5's) tolerances:
                atol=1e-6,
                rtol=1e-3,
                diffusion_form="sigma",  # the SDE samplers' diffusion w(t): constant | SBDM | sigma | linear | ...
                diffusion_norm=1.0,  # ... times this
                last_step="mean",  # the SDE's last step: mean | tweedie | euler | none, over last_step_size
                last_step_size=0.04,
                time_shift=1.0,  # timestep shift of the time grid, SD3's convention (1 = the uniform grid)
                timestep_shift=0.0,  # the same in LightningDiT's convention: its 0.3 = time_shift 1/0.3 (0 = off)
                guidance_t_lo=0.0,  # guide only while guidance_t_lo <= t <= guidance_t_hi (t: 0 = noise, 1 = data)
                guidance_t_hi=1.0,
                labels="uniform",  # evaluation labels: uniform (DiT) | balanced | train_freq (U-ViT ImageNet 64)
                per_class=8,  # grid columns for conditional models
                num_unconditional=64,
                seed=0,
                n_samples=50_000,  # samples of an evaluation job (sample.py --out=*.npz; U-ViT's MS-COCO: 30000)
                # Precision of the network and the decoder while sampling (autocast): fp32 | fp16 | bf16. U-ViT
                # sampled under fp16 autocast, DiT in fp32 with TF32 matmuls (tf32: NVIDIA GPUs only).
                precision="fp32",
                tf32=False,
                # [-1, 1] -> uint8 of the samples (diffusion/sampling/pixels.py): round (U-ViT, DiT, SiT) | truncate
                # (REPA's generate.py: about half a grey level darker on average)
                quantize="round",
            ),
            # Training previews may use a cheaper sampler; empty / 0 values fall back to ``sample``.
            preview=dict(sampler="", steps=0),
            eval=dict(
                metric="",  # end-of-run check: "" | digits_accuracy
                per_class=100,
                seed=1,
                # FID during training: every `every` steps (0 = off) on n_samples EMA samples drawn with the
                # `sample` section's sampler and guidance, on all processes; the best step is recorded.
                every=0,
                n_samples=10_000,
                final_n_samples=0,  # > 0: score the best checkpoint with this many samples at the end (50K)
                feature_extractor="inception",  # inception (pytorch-fid's FID Inception) | dinov2 | digits (quickstart)
                inception_weights="",  # pt_inception-2015-12-05 .pth; "" = pytorch-fid's usual torch-hub cache
                dinov2_weights="",  # DINOv2 ViT-L/14 (feature_extractor=dinov2: FD-DINOv2); "" = torch-hub / HF caches
                reference="",  # reference statistics .npz (mu, sigma); "" = computed from the training data
                batch_size=250,  # samples per process and network batch
                # How FID/sFID/IS/precision-recall are measured: pytorch_fid (pytorch-fid's Inception front end;
                # U-ViT's numbers, with its statistics files) | adm (ADM's evaluator: TF1 resize, stored reference
                # statistics, IS in splits of 5,000; DiT's, SiT's and REPA's numbers)
                protocol="pytorch_fid",
                # The sampler that selects the checkpoint (in-training FID); "" / 0 / None: the sample section's.
                # U-ViT selected with DPM-Solver(++) at 50 evaluations (unguided but for MS-COCO), then reported its
                # paper sampler. Another sampler than sample.sampler takes its own t_end and skip_type defaults.
                sampler="",
                steps=0,
                guidance_scale=None,
                # Text-to-image: the cached MS-COCO features (scripts/extract_coco.py) whose captions condition the
                # in-training FID samples, sample i on image i's caption (U-ViT: val2014); "" = the training set's.
                captions="",
            ),
            # The EMA of the weights. fixed: train.ema_decay's EMA (ema.safetensors, what sampling loads). power: that
            # EMA and also one power-function EMA per sigma_rel (post-hoc EMA, EDM2 section 3; training/posthoc_ema.py),
            # each written every snapshot_every steps (0 = never) to WORKDIR/phema/ as snapshot_dtype (fp32 | fp16 |
            # bf16), from which scripts/reconstruct_ema.py makes the EMA of any sigma_rel after training.
            ema=dict(kind="fixed", sigma_rels=(0.05, 0.10), snapshot_every=0, snapshot_dtype="fp32"),
            wandb=dict(mode="offline", project="transformer-diffusion", name=""),  # online | offline | disabled
            # REPA (representation alignment, diffusion/objectives/repa.py): align the backbone's hidden states after
            # block ``layer`` (1-based; U-ViT counts in_blocks, mid_block, out_blocks) through an MLP projector of
            # width projector_dim with frozen vision encoders' patch features, loss = denoising + coeff x alignment.
            # encoders: REPA's comma-separated names (e.g. "dinov2-vit-b"); "" = off. stop_at_step: no alignment
            # term from this step on (0 = never stops). legacy: REPA's --legacy second label drop (p(null) 0.19).
            # encoder_weights: local weights for the encoders ("" = their usual download cache).
            repa=dict(encoders="", layer=8, projector_dim=2048, coeff=0.5, stop_at_step=0, legacy=False,
                      encoder_weights=""),
        )
    )


MIXED_PRECISION = ("no", "fp16", "bf16")


FSDP_MODES = ("", "full_shard", "shard_grad_op")


ON_CORRUPT = ("skip", "error")


LABEL_MODES = ("uniform", "balanced", "train_freq")  # sample.labels: the class labels of evaluation samples


EVAL_METRICS = ("", "digits_accuracy")  # eval.metric: the end-of-run check


EVAL_PROTOCOLS = ("pytorch_fid", "adm")  # eval.protocol


SAMPLE_PRECISIONS = ("fp32", "fp16", "bf16")  # sample.precision


SAMPLE_QUANTIZE = ("round", "truncate")  # sample.quantize


EMA_KINDS = ("fixed", "power")  # ema.kind


SNAPSHOT_DTYPES = ("fp32", "fp16", "bf16")  # ema.snapshot_dtype


SIGMA_REL_MAX = 12 ** -0.5  # the uniform average over the whole run (gamma = 0): every power EMA is narrower


def _choice(key: str, value, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    close = difflib.get_close_matches(str(value), choices, n=1)
    fix = close[0] if close else choices[0]
    return (f"unknown {key} {value!r}; use one of {', '.join(choices)}"
            f"{f' (did you mean {fix!r}?)' if close else ''}: --config.{key}={fix}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Refuse training settings that cannot work, before anything is built: each message names the key, the value
    and a fix that works as written. All problems are reported together."""
    tc, oc = config.train, config.optim
    defaults = base_config().train
    problems = []
    at_least_one = {
        "steps": "optimizer steps to train for",
        "batch_size": "the global batch over all processes and accumulation steps",
        "grad_accum_steps": "micro-batches per optimizer step",
        "log_every": "steps between loss lines",
    }
    for key, what in at_least_one.items():
        if tc[key] < 1:
            problems.append(f"train.{key} must be >= 1 ({what}), got {tc[key]}: e.g. "
                            f"--config.train.{key}={defaults[key]}")
    if tc.ckpt_every < 1:
        problems.append(f"train.ckpt_every must be >= 1, got {tc.ckpt_every}; to save only at the end use "
                        f"--config.train.ckpt_every={max(tc.steps, 1)}")
    for key, zero in (("sample_every", "no previews"), ("keep_checkpoints", "keep all")):
        if tc[key] < 0:
            problems.append(f"train.{key} must be >= 0 (0 = {zero}), got {tc[key]}: --config.train.{key}=0")
    if not 0.0 <= tc.ema_decay <= 1.0:
        problems.append(f"train.ema_decay must lie in [0, 1], got {tc.ema_decay}: e.g. --config.train.ema_decay=0.9999")
    if tc.grad_clip < 0:
        problems.append(f"train.grad_clip must be >= 0 (0 = off), got {tc.grad_clip}: --config.train.grad_clip=0")
    if oc.lr < 0 or oc.warmup_steps < 0:
        problems.append(f"optim.lr and optim.warmup_steps must be >= 0, got {oc.lr} and {oc.warmup_steps}")
    for key, value, choices in (("train.mixed_precision", tc.mixed_precision, MIXED_PRECISION),
                                ("data.on_corrupt", config.data.on_corrupt, ON_CORRUPT),
                                ("train.fsdp", tc.fsdp, FSDP_MODES)):
        problem = _choice(key, value, choices)
        if problem:
            problems.append(problem)
    problems += _batch_split(tc) + _sampling_problems(config)
    ev = config.eval
    if ev.metric not in EVAL_METRICS:
        problems.append(f"unknown eval.metric {ev.metric!r}; known: {', '.join(EVAL_METRICS[1:])}")
    if ev.final_n_samples > 0 and ev.every <= 0:
        problems.append(f"eval.final_n_samples={ev.final_n_samples} scores the best in-training FID checkpoint, but "
                        f"eval.every=0 computes none: e.g. --config.eval.every={max(tc.ckpt_every, 1)}")
    for key, value, choices in (("eval.protocol", ev.protocol, EVAL_PROTOCOLS),
                                ("sample.precision", config.sample.precision, SAMPLE_PRECISIONS),
                                ("sample.quantize", config.sample.quantize, SAMPLE_QUANTIZE)):
        problem = _choice(key, value, choices)
        if problem:
            problems.append(problem)
    problems += _repa_problems(config.repa) if "repa" in config else []
    problems += _ema_problems(config.ema) if "ema" in config else []
    if ev.every > 0 and ev.n_samples < 2:
        problems.append(f"eval.n_samples must be >= 2 for an FID, got {ev.n_samples}: e.g. "
                        f"--config.eval.n_samples=10000")
    if problems:
        raise ConfigError("; ".join(problems))


def _batch_split(tc) -> list[str]:
    """The global batch must split evenly over the processes of this launch (``WORLD_SIZE``, set by torchrun and
    accelerate launch) and the accumulation steps."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = processes * tc.grad_accum_steps
    if tc.batch_size < 1 or per_step < 1 or tc.batch_size % per_step == 0:
        return []
    fix = per_step * max(1, round(tc.batch_size / per_step))
    return [f"train.batch_size={tc.batch_size} must be divisible by processes x grad_accum_steps = {processes} x "
            f"{tc.grad_accum_steps}: e.g. --config.train.batch_size={fix}"]


def _sampling_problems(config) -> list[str]:
    """The settings of the evaluation and preview samplers that need no objective (the sampler names do: the
    trainer checks them against it), first used thousands of steps in."""
    sc, problems = config.sample, []
    steps = {"sample.steps": sc.steps}
    if config.preview.steps not in ("", 0, None):  # 0: the sample section's
        steps["preview.steps"] = config.preview.steps
    for key, value in steps.items():
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key} must be a positive number of network evaluations, got {value!r}: e.g. "
                            f"--config.{key}={base_config()[key]}")
    channels = str(sc.guidance_channels)
    if channels != "all" and not (channels.isdigit() and int(channels) > 0):
        problems.append(f"sample.guidance_channels must be 'all' or a positive channel count, got {channels!r}: "
                        f"--config.sample.guidance_channels=all")
    if sc.labels not in LABEL_MODES:
        problems.append(f"sample.labels={sc.labels!r}; choose one of {', '.join(LABEL_MODES)}")
    if sc.get("guide_config") and not sc.get("guide"):
        problems.append(f"sample.guide_config={sc.guide_config!r} describes a guide weights file, but sample.guide "
                        f"is unset: --config.sample.guide=PATH, or drop guide_config")
    return problems


def _ema_problems(ec) -> list[str]:
    """The ``ema`` section's values (post-hoc EMA)."""
    problems = []
    for key, value, choices in (("ema.kind", ec.kind, EMA_KINDS), ("ema.snapshot_dtype", ec.snapshot_dtype,
                                                                   SNAPSHOT_DTYPES)):
        problem = _choice(key, value, choices)
        if problem:
            problems.append(problem)
    sigmas = ec.sigma_rels if isinstance(ec.sigma_rels, (tuple, list)) else ()
    if (not sigmas or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < SIGMA_REL_MAX
                              for s in sigmas) or len(set(sigmas)) != len(sigmas)):
        problems.append(f"ema.sigma_rels must be distinct relative EMA widths in (0, {SIGMA_REL_MAX:.4f}), got "
                        f"{ec.sigma_rels!r}: e.g. --config.ema.sigma_rels=(0.05,0.1)")
    if not isinstance(ec.snapshot_every, int) or isinstance(ec.snapshot_every, bool) or ec.snapshot_every < 0:
        problems.append(f"ema.snapshot_every must be a number of steps >= 0 (0 = no snapshots), got "
                        f"{ec.snapshot_every!r}: e.g. --config.ema.snapshot_every=1000")
    return problems


def _repa_problems(rc) -> list[str]:
    """The ``repa`` section's values (checked whether or not ``repa.encoders`` turns it on)."""
    problems = []
    for key, low, example in (("layer", 1, 8), ("projector_dim", 1, 2048)):
        if not isinstance(rc[key], int) or isinstance(rc[key], bool) or rc[key] < low:
            problems.append(f"repa.{key} must be an integer >= {low}, got {rc[key]!r}: e.g. --config.repa.{key}="
                            f"{example}")
    if not rc.coeff >= 0:
        problems.append(f"repa.coeff must be >= 0 (the alignment loss's weight), got {rc.coeff!r}: e.g. "
                        f"--config.repa.coeff=0.5")
    if rc.stop_at_step < 0:
        problems.append(f"repa.stop_at_step must be >= 0 (0 = never stops), got {rc.stop_at_step!r}: "
                        f"--config.repa.stop_at_step=0")
    return problems
