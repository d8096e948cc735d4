"""Sample from any checkpoint: a labelled PNG grid, or a resumable many-process .npz for FID.

    python sample.py --ckpt=runs/digits_uvit                               # grid.png, one row per class
    python sample.py --ckpt=DiT-XL-2-256x256.pt --labels=207,360,387 --out=dogs.png
    python sample.py --ckpt=mscoco_uvit_small.pth --prompts "a red bus" "two dogs on a beach"
    accelerate launch --num_processes=8 sample.py --ckpt=imagenet256_uvit_huge.pth --out=samples.npz \\
        --n_samples=50000 [--png_dir=samples/] [--label_dist=uniform|balanced|train_freq]

--ckpt is a trainer checkpoint (checkpoints/step_XXXXXXXX) or run directory (its newest checkpoint; the config is
read from it: --config is refused, --config.key=value overrides apply), a released file known by name (see
`python -m diffusion.released`; its config comes from that table), or any other weights file in the original
formats (U-ViT .pth state_dict, DiT .pt EMA state_dict or {"model", "ema", "opt", "args"} training checkpoint,
.safetensors) together with --config=configs/<name>.py. EMA weights unless --ema=false.

Sampler settings default to the config's `sample` section (the paper's sampler for the paper configs); the
sampler flags override them. Guidance w is eps_u + w (eps_c - eps_u); U-ViT's papers write s = w - 1.

--out=*.npz starts (or resumes) an evaluation job: --n_samples samples in chunks of --chunk_size, written to
OUT.parts/ as they finish, recorded with their settings in OUT.job.json; every process takes its share; rerun the
same command after a crash and finished chunks are kept. The result is ADM's format: arr_0 uint8 (N, H, W, 3),
arr_1 the labels (class-conditional models). Sample i depends only on (--seed, i): the file is the same for any
number of processes, and for any batch size up to floating-point rounding (bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from diffusion.checkpoint import latest_checkpoint, load_checkpoint_dir, read_weights_file
from diffusion.config.cli import split_overrides
from diffusion.config.loading import apply_override, describe_config, load_config
from diffusion.errors import ConfigError
from diffusion.registry import build_model, build_objective, resolve_model_kwargs
from diffusion.released import RELEASED, released_config
from diffusion.sampling.generate import SampleSource, check_settings, num_real_classes, sample_settings
from diffusion.sampling.grids import sample_grid
from diffusion.sampling.jobs import SampleJob, run_job
from diffusion.sampling.per_sample import LABEL_MODES, LabelPlan, check_labels, training_class_counts


def str2bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir, run dir, released file or weights file")
    p.add_argument("--config", help="config file describing a weights file (not for checkpoint dirs)")
    p.add_argument("--out", default="grid.png", help="*.png: a labelled grid; *.npz: an evaluation job")
    p.add_argument("--n_samples", type=int, help="samples in an .npz job (default 50000, or the recorded job's); "
                   "unconditional grid size")
    p.add_argument("--png_dir", help="also write every sample of an .npz job as DIR/000000.png ...")
    p.add_argument("--batch_size", type=int, default=64, help="samples per network batch and process")
    p.add_argument("--chunk_size", type=int, help="samples per chunk file of an .npz job (fixed per job; 256)")
    g = p.add_argument_group("sampler (defaults: the config's sample section)")
    g.add_argument("--sampler")
    g.add_argument("--steps", type=int, help="network evaluations")
    g.add_argument("--order", type=int)
    g.add_argument("--t_end", type=float)
    g.add_argument("--skip_type", help="logSNR | time_uniform")
    g.add_argument("--eta", type=float)
    g.add_argument("--guidance", type=float, help="guidance scale w (1 = none)")
    g.add_argument("--guidance_channels", help="all, or k: guide only the first k channels")
    g.add_argument("--clip_denoised", type=str2bool)
    c = p.add_argument_group("conditioning")
    c.add_argument("--labels", help="class labels, e.g. 3,1,4: grid rows, or cycled over an .npz job")
    c.add_argument("--label_dist", choices=LABEL_MODES, help="labels of an .npz job (default: sample.labels)")
    c.add_argument("--prompts", nargs="+", help="text prompts of a text-to-image model")
    c.add_argument("--prompts_file", help="one prompt per line")
    c.add_argument("--per_class", type=int, help="grid columns per class or prompt")
    p.add_argument("--seed", type=int, help="default: sample.seed")
    p.add_argument("--ema", type=str2bool, default=True, help="EMA weights (default) or the raw ones")
    p.add_argument("--device", help="default: the process's GPU, else cpu")
    return p


# ----------------------------------------------------------------------------------------------------------
# Checkpoint -> model, config
# ----------------------------------------------------------------------------------------------------------


def load_source(ckpt: str, config_path: str | None, overrides, ema: bool):
    """-> (state_dict, config, meta, resolved checkpoint path) for a checkpoint dir, released or weights file."""
    path = Path(ckpt)
    weights = "ema" if ema else "model"
    if path.is_dir():
        if config_path:
            raise ConfigError("--config is only for weights files: a checkpoint directory carries its own config "
                              "(use --config.key=value to override parts of it)")
        resolved = path if (path / "meta.json").is_file() else latest_checkpoint(path) or path
        state, config, meta = load_checkpoint_dir(resolved, weights=weights)
    elif path.is_file():
        config_path = config_path or released_config(path.name)
        if config_path is None:
            raise ConfigError(f"{path} is a weights file: add --config=configs/<name>.py describing its model "
                              f"(released files known by name need none: {', '.join(RELEASED)})")
        config, meta, resolved = load_config(config_path), {}, path
        state = read_weights_file(path, prefer=weights)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for key, value in overrides:
        apply_override(config, key, value)
    return state, config, meta, resolved.resolve()


def load_weights(model: torch.nn.Module, state: dict, source: Path, config) -> None:
    """Strict load, or one error naming the keys and shapes that do not fit (no raw traceback)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        what = f"{type(model).__name__} ({config.model.get('preset') or 'no preset'})"
        found = "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                          for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                             ("shape mismatches (file vs model)", shapes)) if keys)
        raise ConfigError(f"{source} does not fit the configured {what}: {found} (check --config and the "
                          f"--config.model.* overrides)")
    model.load_state_dict(state)


def apply_sampler_flags(sample_cfg, args) -> None:
    for key, flag in (("sampler", "sampler"), ("steps", "steps"), ("order", "order"), ("t_end", "t_end"),
                      ("skip_type", "skip_type"), ("eta", "eta"), ("guidance_scale", "guidance"),
                      ("guidance_channels", "guidance_channels"), ("clip_denoised", "clip_denoised"),
                      ("per_class", "per_class"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            sample_cfg[key] = value


def read_prompts(args) -> list[str] | None:
    if args.prompts and args.prompts_file:
        raise ConfigError("give --prompts or --prompts_file, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{path} holds no prompts")
        return prompts
    return args.prompts


def check_conditioning(model, args, prompts, guidance_scale: float) -> str:
    """'text' | 'class' | 'none', refusing flags that do not fit the model."""
    kind = "text" if getattr(model, "clip_dim", None) is not None else "class" if num_real_classes(model) else "none"
    label_flags = [f for f in ("labels", "label_dist") if getattr(args, f) is not None]
    if kind != "text" and prompts:
        raise ConfigError(f"prompts need a text-to-image model; this one is "
                          f"{'class-conditional: use --labels' if kind == 'class' else 'unconditional'}")
    if kind != "class" and label_flags:
        raise ConfigError(f"--{label_flags[0]} needs a class-conditional model; this one is "
                          f"{'text-to-image: use --prompts or --prompts_file' if kind == 'text' else 'unconditional'}")
    if kind == "text" and not prompts:
        raise ConfigError("this is a text-to-image model: give --prompts \"a photo of ...\" or --prompts_file")
    if kind == "class" and guidance_scale != 1.0 and getattr(model, "null_label", None) is None:
        raise ConfigError("guidance needs a model trained with a null label; this one has none: use --guidance 1")
    return kind


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def load_codecs(config, kind: str, model, device):
    """-> (autoencoder or None, text encoder or None): what latent and text-to-image models need around them."""
    autoencoder = text_encoder = None
    if config.autoencoder.pretrained:
        from diffusion.data.autoencoder import Autoencoder

        autoencoder = Autoencoder.from_config(config.autoencoder, device)
    if kind == "text":
        from diffusion.data.text_encoder import TextEncoder

        if not config.text_encoder.pretrained:
            raise ConfigError("a text-to-image model needs --config.text_encoder.pretrained (a CLIP folder or hub id)")
        text_encoder = TextEncoder.from_config(config.text_encoder, device)
        width = text_encoder.null_context().shape[-1]
        if width != model.clip_dim:
            raise ConfigError(f"the text encoder gives {width}-d tokens; the model expects clip_dim={model.clip_dim}")
    return autoencoder, text_encoder


def input_shape(model, config, meta: dict, autoencoder) -> tuple[int, ...]:
    """(C, H, W) the network samples in: the trainer's record, else the autoencoder's latents of
    ``data.image_size`` images, else pixels."""
    if meta.get("image_shape"):
        return tuple(meta["image_shape"])
    if autoencoder is not None:
        return autoencoder.latent_shape(config.data.image_size)
    channels = getattr(model, "in_chans", None) or model.in_channels
    return (channels, config.data.image_size, config.data.image_size)


def job_settings(config, source: Path, weights: str, shape, settings: dict, labels, prompts, autoencoder,
                 text_encoder) -> dict:
    """Everything that decides the samples of an .npz job (recorded; a resume must match it)."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16] if prompts else None
    return {
        "checkpoint": str(source), "weights": weights, "model": resolve_model_kwargs(config.model)[1],
        "diffusion": config.diffusion.to_dict(), "image_shape": list(shape), "sampler": settings,
        "seed": config.sample.seed, "labels": labels.describe() if labels else None,
        "prompts": {"count": len(prompts), "sha256": digest} if prompts else None,
        "autoencoder": {k: config.autoencoder[k] for k in ("pretrained", "single_file_config", "scale_factor",
                                                           "dtype")} if autoencoder else None,
        "text_encoder": config.text_encoder.to_dict() if text_encoder else None,
    }


def run(args, overrides) -> str:
    """Load, check, sample; returns the summary line (empty on ranks other than 0)."""
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ConfigError(f"--out must end in .png (a grid) or .npz (an evaluation job), got {out}")
    npz = out.suffix == ".npz"
    if not npz and (args.png_dir or args.label_dist or args.chunk_size):
        raise ConfigError("--png_dir, --label_dist and --chunk_size belong to .npz jobs (--out=samples.npz)")
    if not npz and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a grid is drawn by one process; launch several only for --out=*.npz jobs")

    state_dict, config, meta, source = load_source(args.ckpt, args.config, overrides, args.ema)
    model = build_model(config.model)
    load_weights(model, state_dict, source, config)
    objective = build_objective(config.diffusion)
    apply_sampler_flags(config.sample, args)
    settings = sample_settings(config.sample)
    check_settings(objective, settings)
    prompts = read_prompts(args)
    kind = check_conditioning(model, args, prompts, settings["guidance_scale"])
    given = [int(c) for c in args.labels.split(",")] if args.labels else None
    if given is not None:
        check_labels(given, num_real_classes(model))

    dist_state = None
    if npz:
        from accelerate import PartialState

        dist_state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
        device = torch.device(args.device) if args.device else dist_state.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    autoencoder, text_encoder = load_codecs(config, kind, model, device)
    decode = autoencoder.decode if autoencoder is not None else None
    shape = input_shape(model, config, meta, autoencoder)

    weights = "EMA" if args.ema else "raw"
    channels = "" if settings["guidance_channels"] == "all" else f" on {settings['guidance_channels']} channels"
    what = (f"from {source.name} ({weights} weights), {settings['sampler']} {settings['steps']} steps, guidance "
            f"{settings['guidance_scale']:g}{channels}, seed {config.sample.seed}")
    if not npz:
        path = sample_grid(model, objective, config.sample, shape, out, class_names=meta.get("class_names"),
                           classes=given, prompts=prompts, text_encoder=text_encoder, decode=decode,
                           num=args.n_samples, batch_size=args.batch_size, device=device, progress=True)
        return f"wrote {path}: grid {what}"

    labels = None
    if kind == "class":
        mode = "given" if given else args.label_dist or config.sample.labels
        counts = training_class_counts(config, meta) if mode == "train_freq" else None
        labels = LabelPlan(mode, num_real_classes(model), seed=config.sample.seed, given=given, class_counts=counts)
    recorded = job_settings(config, source, weights, shape, settings, labels, prompts, autoencoder, text_encoder)
    job = SampleJob.open(out, args.n_samples, recorded, chunk_size=args.chunk_size)
    if job.done():
        return f"{out} is already complete ({job.num_samples} samples, {job.record}); nothing to do"
    drawer = SampleSource(model, objective, config.sample, shape, seed=config.sample.seed, labels=labels,
                          prompts=prompts, text_encoder=text_encoder, decode=decode, device=device)
    stats = run_job(job, drawer.uint8, batch_size=min(args.batch_size, job.chunk_size), state=dist_state,
                    png_dir=args.png_dir)
    if not dist_state.is_main_process:
        return ""
    cond = f"labels {labels.mode}" if labels else f"{len(prompts)} prompts" if prompts else "unconditional"
    return (f"wrote {out}: {job.num_samples} samples of {'x'.join(map(str, stats['shape'][1:]))} "
            f"({stats['reused_chunks']} of {job.num_chunks} chunks reused, {stats['drawn_chunks']} drawn by "
            f"{dist_state.num_processes} process(es) at {stats['images_per_second']:.1f} img/s) {what}, {cond}"
            f"{f'; PNGs in {args.png_dir}' if args.png_dir else ''}")


def print_help(rest: list[str], overrides) -> int:
    """Usage and flags; with --config, that config's keys and values (the ones --config.key=value can set)."""
    build_parser().print_help()
    paths = [a.partition("=")[2] for a in rest if a.startswith("--config=")]
    paths += [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"]
    if not paths:
        print("\nAdd --config=FILE to list that config's keys and values.")
        return 0
    try:
        config = load_config(paths[-1])
        for key, value in overrides:
            apply_override(config, key, value)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nKeys of {paths[-1]} with the overrides given (set any with --config.<key>=<value>):")
    print(describe_config(config))
    return 0


def main(argv: list[str]) -> int:
    try:
        overrides, rest = split_overrides(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        return print_help(rest, overrides)
    args = build_parser().parse_args(rest)  # bad flags exit 2
    start = time.perf_counter()
    try:
        summary = run(args, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary:
        print(f"{summary} [{time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
