"""Config files and command-line overrides.

A config file is a Python file with ``get_config() -> ml_collections.ConfigDict`` (U-ViT's convention). The
command line is ``--config=configs/x.py [--config.section.key=value ...] [--workdir=DIR]`` (absl's syntax, parsed
here so that ``python train.py`` and ``accelerate launch train.py`` behave the same). Override values are
converted to the type already in the config; a key the config does not have is an error that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import shlex
import traceback
from pathlib import Path

import ml_collections


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
                       impl="auto"),  # AdamW kernel: auto (= fused) | fused | foreach | for_loop (diffusion/speed.py)
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
                cpu_reuse_memory=True,  # CPU: keep freed activations in the heap (diffusion/speed.py); no GPU effect
                # Shard weights, gradients and AdamW state over the processes (FSDP2, diffusion/distributed.py), one
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
                # clamp x0 predictions to [-1, 1] (pixel models; latents are never clipped); None: the objective's
                # own setting (iddpm: diffusion.clip_denoised; the VP objectives: off)
                clip_denoised=None,
                labels="uniform",  # evaluation labels: uniform (DiT) | balanced | train_freq (U-ViT ImageNet 64)
                per_class=8,  # grid columns for conditional models
                num_unconditional=64,
                seed=0,
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
                feature_extractor="inception",  # inception (pytorch-fid's FID Inception) | digits (quickstart)
                inception_weights="",  # pt_inception-2015-12-05 .pth; "" = pytorch-fid's usual torch-hub cache
                reference="",  # reference statistics .npz (mu, sigma); "" = computed from the training data
                batch_size=250,  # samples per process and network batch
            ),
            wandb=dict(mode="offline", project="transformer-diffusion", name=""),  # online | offline | disabled
        )
    )


def dit_paper_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DiT's training recipe (Peebles & Xie, Sec. 4): AdamW lr 1e-4 constant, no weight decay, batch 256,
    EMA 0.9999, improved-DDPM hybrid loss with learned sigma, 10% label dropout (``model.class_dropout_prob``, the
    one source of the rate: ``cond.p_uncond`` stays None), fp32 with TF32 matmuls; 250-step DDPM sampling."""
    config.model.update(name="dit", preset="DiT-XL/2", class_dropout_prob=0.1, learn_sigma=True)
    config.diffusion = ml_collections.ConfigDict(dict(kind="iddpm", num_steps=1000, beta_schedule="linear",
                                                      learn_sigma=True))
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(batch_size=256, ema_decay=0.9999, grad_clip=0.0, mixed_precision="no", tf32=True)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="all")
    return config


def dit_imagenet_recipe(config: ml_collections.ConfigDict, resolution: int, steps: int) -> ml_collections.ConfigDict:
    """DiT-XL/2 on ImageNet SD-VAE latents with :func:`dit_paper_recipe`: cached latents of every image and its flip
    (``scripts/extract_latents.py``), the ft-EMA autoencoder, checkpoints every 50K steps, logs every 100. Sampling as
    behind the paper's FID: 250-step ancestral DDPM, guidance 1.5 on the first 3 latent channels (the released
    sampler's leftover; ``--guidance_channels all`` is the fix)."""
    config = dit_paper_recipe(config)
    config.seed = 0
    config.model.update(preset="DiT-XL/2", input_size=resolution // 8, in_channels=4, num_classes=1000)
    config.data.update(name="latents", root=f"data/imagenet{resolution}_latents", image_size=resolution,
                       random_flip=True, num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.train.update(steps=steps, log_every=100, ckpt_every=50_000, sample_every=10_000)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="3", labels="uniform",
                         per_class=4)
    config.preview.update(sampler="ddim", steps=50)
    return config


def uvit_latent_recipe(config: ml_collections.ConfigDict, resolution: int, preset: str, kind: str, autoencoder: str,
                       guidance_s: float) -> ml_collections.ConfigDict:
    """U-ViT's ImageNet 256/512 recipe on cached SD-VAE latents (SPEC.md section 1): batch 1024, AdamW 2e-4 with
    betas (0.99, 0.99) and weight decay 0.03, 5K warm-up steps, EMA 0.9999, fp16. The continuous-time L models
    train with 15% label dropout and sample with DPM-Solver (noise prediction, logSNR grid, t 1 -> 1e-4); the
    discrete-time H models with 10% and DPM-Solver++ (time-uniform grid, 1 -> 1e-3); both 50 evaluations.
    Guidance: U-ViT's ``s`` is ``w - 1`` in this project's ``eps_u + w (eps_c - eps_u)``."""
    config.seed = 1234
    config.model.update(name="uvit", preset=preset)
    config.diffusion.kind = kind
    config.cond.p_uncond = 0.15 if kind == "vp_sde" else 0.1
    config.data.update(name="latents", root=f"data/imagenet{resolution}_latents", image_size=resolution,
                       random_flip=True, num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained=autoencoder, scale_factor=0.18215)
    config.optim.update(lr=2e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    steps = 300_000 if kind == "vp_sde" and resolution == 256 else 500_000  # only ImageNet-256 L/2 stops at 300K
    config.train.update(steps=steps, batch_size=1024, mixed_precision="fp16",
                        ema_decay=0.9999, log_every=100, ckpt_every=50_000, sample_every=5_000)
    sampler = dict(sampler="dpm_solver", t_end=1e-4, skip_type="logSNR") if kind == "vp_sde" else dict(
        sampler="dpm_solver++", t_end=1e-3, skip_type="time_uniform")
    config.sample.update(**sampler, steps=50, order=3, guidance_scale=1.0 + guidance_s, labels="uniform",
                         per_class=4)
    config.preview.update(steps=25)
    return config


def uvit_t2i_recipe(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """U-ViT's MS-COCO recipe (SPEC.md section 1): cached image moments + CLIP ViT-L/14 caption tokens, discrete
    schedule, 10% caption dropout to the empty caption's encoding, batch 256, AdamW 2e-4 betas (0.9, 0.9) wd 0.03,
    5K warm-up, 1M steps, EMA 0.9999, fp16; DPM-Solver++ 50 evaluations with s = 1 (w = 2); scale 0.23010."""
    config.seed = 1234
    config.model.update(name="uvit", preset=preset)
    config.diffusion.kind = "sd_discrete"
    config.cond.p_uncond = 0.1
    config.data.update(name="coco_latents", root="data/mscoco256_features/train", image_size=256, random_flip=False,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="assets/stable-diffusion/autoencoder_kl.pth", scale_factor=0.23010)
    config.text_encoder.update(pretrained="openai/clip-vit-large-patch14", max_length=77)
    config.optim.update(lr=2e-4, betas=(0.9, 0.9), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=1_000_000, batch_size=256, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="dpm_solver++", steps=50, order=3, t_end=1e-3, skip_type="time_uniform",
                         guidance_scale=2.0, per_class=4)
    config.preview.update(steps=25)
    return config


class ConfigError(ValueError):
    """A config file or override the user has to fix; the message says what and how."""


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Run a config file's ``get_config()``. Its mistakes (syntax errors, exceptions) become one ConfigError naming
    the file and line, not a traceback into the loader."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} defines no get_config()")
        config = module.get_config()
    except SyntaxError as err:
        text = f": {err.text.strip()}" if err.text and err.text.strip() else ""
        raise ConfigError(f"{err.filename or path}:{err.lineno}: syntax error in the config file: {err.msg}{text}"
                          ) from None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- any mistake in the user's file is reported the same way
        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        raise ConfigError(f"{where}: the config file raised {type(err).__name__}: {err}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected an "
                          f"ml_collections.ConfigDict (start from diffusion.config.base_config())")
    return config


def _parse_value(text: str, current):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"expected a boolean, got {text!r}")
        return lowered in ("true", "1", "yes")
    if isinstance(current, (int, float)):
        try:
            return type(current)(ast.literal_eval(text)) if isinstance(current, float) else int(text)
        except (ValueError, SyntaxError) as err:
            raise ConfigError(f"expected a {type(current).__name__}, got {text!r}") from err
    if isinstance(current, str):
        return text
    try:  # None, tuples, lists: Python literals; anything else stays a string
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


# Settings each diffusion kind's builder reads from the ``diffusion`` section besides ``kind`` (the builders in
# diffusion.objectives / diffusion.iddpm hold their defaults; tests/test_config.py checks that every one is accepted).
DIFFUSION_KEYWORDS = {
    "vp_sde": ("beta_min", "beta_max"),
    "sd_discrete": ("num_steps", "linear_start", "linear_end"),
    "iddpm": ("num_steps", "beta_schedule", "learn_sigma", "timestep_respacing", "sigma_small", "clip_denoised"),
}


def _settable_keywords(config: ml_collections.ConfigDict, section: str) -> tuple[str, ...]:
    """Keys of ``model`` (the backbone's constructor keywords) or ``diffusion`` (the kind's builder settings) that
    may be set although the config file leaves them out."""
    if section not in config:
        return ()
    if section == "diffusion":
        return DIFFUSION_KEYWORDS.get(config.diffusion.get("kind", ""), ())
    from diffusion.registry import constructor_keywords  # the registry imports this module

    return tuple(sorted(constructor_keywords(config.model.get("name", ""))))


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    node, parts = config, dotted_key.split(".")
    if (len(parts) == 2 and parts[0] in ("model", "diffusion") and parts[1] not in config.get(parts[0], {})
            and parts[1] in _settable_keywords(config, parts[0])):
        config[parts[0]][parts[1]] = _parse_value(text, None)
        return
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "config"
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if depth == 1 and parts[0] in ("model", "diffusion"):  # plus the keywords its builder accepts
                known = sorted(set(known) | set(_settable_keywords(config, parts[0])))
            close = difflib.get_close_matches(part, known, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{dotted_key}': {where} has no '{part}'.{hint} "
                              f"Known keys there: {', '.join(sorted(known))}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"'{dotted_key}' is a section, not a value; set one of its keys")
    try:
        node[parts[-1]] = _parse_value(text, current)
    except ConfigError as err:
        raise ConfigError(f"bad value for '{dotted_key}': {err}") from None


def parse_command_line(argv: list[str], flags: dict[str, str | None] | None = None, require_config: bool = True):
    """Parse ``--config=FILE``, ``--config.a.b=V`` and the extra ``--name=V`` flags listed in ``flags`` (name ->
    default). Returns (config or None, {flag: value}). Accepts ``--flag value`` as well as ``--flag=value``; a flag
    whose default is a bool is a switch: ``--name`` alone sets it, ``--name=false`` clears it."""
    flags = dict(flags or {})
    config_path, overrides, values = None, [], dict(flags)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        switch = isinstance(flags.get(name), bool)
        if not eq and not switch:
            if not args:
                raise ConfigError(f"flag --{name} needs a value")
            value = args.pop(0)
        if name == "config":
            config_path = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif switch:
            try:
                values[name] = _parse_value(value, True) if eq else True
            except ConfigError as err:
                raise ConfigError(f"bad value for --{name}: {err}") from None
        elif name in flags:
            values[name] = value
        else:
            known = ", ".join(["--config", "--config.<key>"] + [f"--{f}" for f in flags])
            raise ConfigError(f"unknown flag --{name}; known flags: {known}")
    values["config_path"] = config_path
    if config_path is None:
        if require_config or overrides:
            raise ConfigError("missing --config=configs/<name>.py")
        return None, values
    config = load_config(config_path)
    for key, value in overrides:
        apply_override(config, key, value)
    return config, values


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull ``--config.key=value`` (or ``--config.key value``) out of argv; the rest goes to argparse."""
    overrides, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if not args:
                    raise ConfigError(f"flag {arg} needs a value")
                value = args.pop(0)
            overrides.append((key, value))
        else:
            rest.append(arg)
    return overrides, rest


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A saved config, with keys added to ``base_config()`` since it was written filled in from the defaults."""
    def tuples(obj):  # JSON has no tuples; the configs use them for betas
        if isinstance(obj, dict):
            return {k: tuples(v) for k, v in obj.items()}
        return tuple(obj) if isinstance(obj, list) else obj

    def merge(defaults: dict, saved: dict) -> dict:
        out = dict(defaults)
        for key, value in saved.items():
            both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            # diffusion sections hold kind-specific keys: a default for one kind must not leak into another
            out[key] = merge(defaults[key], value) if both_dicts and key != "diffusion" else value
        return out

    return ml_collections.ConfigDict(merge(base_config().to_dict(), tuples(json.loads(text))))


# ----------------------------------------------------------------------------------------------------------
# Checks of values, listing and comparing configs
# ----------------------------------------------------------------------------------------------------------

MIXED_PRECISION = ("no", "fp16", "bf16")
FSDP_MODES = ("", "full_shard", "shard_grad_op")
ON_CORRUPT = ("skip", "error")


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
    ev = config.eval
    if ev.final_n_samples > 0 and ev.every <= 0:
        problems.append(f"eval.final_n_samples={ev.final_n_samples} scores the best in-training FID checkpoint, but "
                        f"eval.every=0 computes none: e.g. --config.eval.every={max(tc.ckpt_every, 1)}")
    if ev.every > 0 and ev.n_samples < 2:
        problems.append(f"eval.n_samples must be >= 2 for an FID, got {ev.n_samples}: e.g. "
                        f"--config.eval.n_samples=10000")
    if problems:
        raise ConfigError("; ".join(problems))


def flatten_config(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"train.steps": 1000, ...}: every value under its dotted key (tuples and lists compare as lists)."""
    items = config.items() if isinstance(config, dict) else config.to_dict().items()
    flat = {}
    for key, value in items:
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(flatten_config(value if isinstance(value, dict) else value.to_dict(), f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def override_flag(key: str, value) -> str:
    """``--config.<key>=<value>`` as typed in a shell (quoted where needed); parses back to ``value``."""
    return shlex.quote(f"--config.{key}={value}")


def describe_config(config: ml_collections.ConfigDict) -> str:
    """The config's keys and values as ``--config.<key>=<value>`` lines (for ``--help``), plus the keys that are
    settable although the file leaves them at their defaults (backbone keywords, diffusion settings)."""
    lines = [f"  {override_flag(key, value)}" for key, value in flatten_config(config).items()]
    for section in ("model", "diffusion"):
        unset = sorted(set(_settable_keywords(config, section)) - set(config[section]))
        if unset:
            default = "the preset's or the constructor's" if section == "model" else "the builder's"
            lines.append(f"  also settable (now at {default} default): "
                         + ", ".join(f"{section}.{name}" for name in unset))
    return "\n".join(lines)
