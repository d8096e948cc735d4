"""Sample a labelled image grid from a checkpoint.

    python sample.py --ckpt=runs/digits_uvit [--out=grid.png] [--labels=3,1,4] [--seed=0] \
        [--steps=50] [--guidance=2.0] [--sampler=dpm_solver++2m] [--per_class=8]
    python sample.py --ckpt=DiT-XL-2-256x256.pt --config=configs/<name>.py [--config.key=value ...]

``--ckpt`` is a checkpoint directory written by train.py (``.../checkpoints/step_XXXXXXXX``), a run directory
(its newest checkpoint), or a weights file in the original repositories' formats (U-ViT ``.pth`` state_dict, DiT
``.pt`` EMA state_dict or ``{"model", "ema", "opt", "args"}`` training checkpoint, ``.safetensors``), which needs
``--config`` to describe the model. Model, diffusion and sampler settings come from the checkpoint's config (EMA
weights); the flags override the sampler settings.
"""

import sys
from pathlib import Path

import torch

from diffusion.checkpoint import load_checkpoint_dir, read_weights_file
from diffusion.config import ConfigError, parse_command_line
from diffusion.registry import build_model, build_objective
from diffusion.sampling import sample_grid

FLAGS = {"ckpt": None, "out": "grid.png", "labels": None, "per_class": None, "seed": None, "steps": None,
         "guidance": None, "sampler": None, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def load(flags: dict, config):
    """-> (state_dict, config, meta) from a trainer checkpoint or an original-format weights file + config."""
    path = Path(flags["ckpt"])
    if path.is_dir():
        if config is not None:
            raise ConfigError("--config is only for weights files: a checkpoint directory carries its own config")
        return load_checkpoint_dir(path, weights="ema")
    if config is None:
        raise ConfigError(f"{path} is a weights file: add --config=configs/<name>.py describing its model")
    meta = {"step": path.name, "image_shape": None, "class_names": None}
    return read_weights_file(path, prefer="ema"), config, meta


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        config, flags = parse_command_line(argv, FLAGS, require_config=False)
        if flags["ckpt"] is None:
            raise ConfigError("missing --ckpt=<checkpoint dir, run dir or weights file>")
        state, config, meta = load(flags, config)
        model = build_model(config.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{flags['ckpt']} does not fit the configured {type(model).__name__}: "
                              f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        model.to(flags["device"]).eval()
        objective = build_objective(config.diffusion)
        sample_cfg = config.sample
        for key, flag, cast in (("steps", "steps", int), ("guidance_scale", "guidance", float),
                                ("sampler", "sampler", str), ("per_class", "per_class", int)):
            if flags[flag] is not None:
                sample_cfg[key] = cast(flags[flag])
        channels = getattr(model, "in_chans", None) or model.in_channels
        image_shape = meta["image_shape"] or (channels, config.data.image_size, config.data.image_size)
        classes = [int(c) for c in flags["labels"].split(",")] if flags["labels"] else None
        seed = int(flags["seed"]) if flags["seed"] is not None else None
        path = sample_grid(model, objective, sample_cfg, tuple(image_shape), flags["out"],
                           class_names=meta.get("class_names"), classes=classes, seed=seed,
                           device=flags["device"], progress=True)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({meta['step']} EMA weights, {sample_cfg.sampler}, {sample_cfg.steps} steps, "
          f"guidance {sample_cfg.guidance_scale})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
