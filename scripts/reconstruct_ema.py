"""Reconstruct the EMA of any length after training from a run's post-hoc EMA snapshots (EDM2, section 3).

    python scripts/reconstruct_ema.py RUN --sigma_rel 0.075 [--step N] [--out DIR]
    python sample.py --ckpt DIR ...          (or eval_fid.py, scripts/sweep.py: DIR loads like any checkpoint)

RUN is a training run directory trained with --config.ema.kind=power and --config.ema.snapshot_every=K: its
WORKDIR/phema/ holds a snapshot of every tracked power-function EMA every K steps. The least-squares combination of
the snapshots up to step N (default: the newest snapshot's step) that best matches the power-function EMA profile of
relative width --sigma_rel at step N is written as a checkpoint directory (default RUN/phema/ema-SIGMA-step_N) with
the run's config and model description; the fit's relative residual ||target - fit|| / ||target|| (L2 over the
averaging profiles) is printed and recorded in its meta.json. The library call is
diffusion.training.posthoc_ema.reconstruct_checkpoint(run_dir, sigma_rel, step=None, out=None) -> (path, residual).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.errors import ConfigError, InputNotFoundError  # noqa: E402
from diffusion.training.posthoc_ema import reconstruct_checkpoint  # noqa: E402

__all__ = ["reconstruct_checkpoint", "main"]

COMMAND = Command(__doc__, config="none", overrides=False, positional="RUN",
                  positional_help="the training run directory (with phema/ snapshots and checkpoints/)", flags=(
    Flag("sigma_rel", required=True, type=float, help="relative EMA width to reconstruct, in (0, 0.2887): e.g. 0.075"),
    Flag("step", type=int, help="the training step of the EMA (default: the newest snapshot's)"),
    Flag("out", metavar="DIR", help="checkpoint directory to write (default: RUN/phema/ema-SIGMA-step_STEP)"),
))


def run(args: Arguments) -> int:
    if len(args.positional) != 1:
        raise ConfigError(f"give one run directory, got {len(args.positional)}: scripts/reconstruct_ema.py RUN "
                          f"--sigma_rel 0.075")
    run_dir = Path(args.positional[0])
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run directory not found: {run_dir}")
    path, residual = reconstruct_checkpoint(run_dir, args.sigma_rel, step=args.step, out=args.out)
    print(f"sigma_rel {args.sigma_rel:g}: residual {residual:.3e} (relative L2 distance of the profiles); "
          f"checkpoint {path}")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
