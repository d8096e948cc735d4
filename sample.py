"""Sample a labelled image grid from a checkpoint.

    python sample.py --ckpt runs/digits_uvit [--out grid.png] [--labels 3,1,4] [--seed 0] \
        [--steps 50] [--guidance 2.0] [--sampler dpm_solver++2m]

``--ckpt`` is a checkpoint directory written by train.py (``.../checkpoints/step_XXXXXXXX``) or a run directory
(its newest checkpoint). The model, diffusion and sampler settings come from the checkpoint's config; the flags
override the sampler settings. EMA weights are used.
"""

import argparse
import sys

import torch

from diffusion.checkpoint import load_checkpoint_dir
from diffusion.registry import build_model, build_objective
from diffusion.sampling import sample_grid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint or run directory written by train.py")
    parser.add_argument("--out", default="grid.png", help="output PNG")
    parser.add_argument("--labels", default=None, help="comma-separated class indices, one grid row each")
    parser.add_argument("--per-class", type=int, default=None, help="samples per row")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (network evaluations)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance w in eps_u + w (eps_c - eps_u); 1 = off")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        state, config, meta = load_checkpoint_dir(args.ckpt, weights="ema")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = build_model(config.model)
    model.load_state_dict(state, strict=True)
    model.to(args.device).eval()
    objective = build_objective(config.diffusion)
    sample_cfg = config.sample
    for key, value in (("steps", args.steps), ("guidance_scale", args.guidance), ("sampler", args.sampler),
                       ("per_class", args.per_class)):
        if value is not None:
            sample_cfg[key] = value
    classes = [int(c) for c in args.labels.split(",")] if args.labels else None
    try:
        path = sample_grid(model, objective, sample_cfg, tuple(meta["image_shape"]), args.out,
                           class_names=meta.get("class_names"), classes=classes, seed=args.seed,
                           device=args.device, progress=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} (step {meta['step']} EMA weights, {sample_cfg.sampler}, {sample_cfg.steps} steps, "
          f"guidance {sample_cfg.guidance_scale})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
