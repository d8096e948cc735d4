"""Overlay the curves of training runs: every run's scalars.jsonl (loss, lr, grad norm, images/s, FID ...) in one PNG.

    python scripts/plot_runs.py runs/digits_uvit                                   # -> curves.png here
    python scripts/plot_runs.py runs/a runs/b --out compare.png --keys loss,fid    # fid: fid10k, fid50k, ...

RUN is a run directory (its scalars.jsonl, which the trainer appends at every log line and evaluation) or a
scalars file. One panel per scalar, one line per run, the step on the x axis; ``--keys`` picks panels by name or
name prefix. Every run draws its own curves.png as it trains; this is for several at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the package is importable from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.errors import ConfigError, InputNotFoundError  # noqa: E402
from diffusion.training.logs import SCALARS, curve_series, draw_curves, read_scalars  # noqa: E402

COMMAND = Command(__doc__, config="none", overrides=False, positional="RUN [RUN ...]",
                  positional_help="run directories (or their scalars.jsonl files)", flags=(
    Flag("out", "curves.png", metavar="PNG", help="the PNG to write"),
    Flag("keys", "", metavar="NAME,NAME,...", help="the panels: scalar names or prefixes (default: every scalar)"),
))


def load_runs(specs: list[str]) -> list[tuple[str, list[dict]]]:
    """(label, records) of every RUN; refuses one without a scalars file."""
    runs = []
    for spec in specs:
        path = Path(spec)
        file = path / SCALARS if path.is_dir() else path
        if not file.is_file():
            raise InputNotFoundError(f"{spec}: no {SCALARS} (a run directory of this trainer, or its scalars file)")
        runs.append((spec, read_scalars(file)))
    return runs


def run(args: Arguments) -> int:
    if not args.positional:
        raise ConfigError("give at least one RUN (a run directory)")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] or None
    runs = load_runs(args.positional)
    drawn = {name for _, records in runs for name in curve_series(records, keys)}
    if not drawn:
        known = sorted({name for _, records in runs for name in curve_series(records)})
        raise ConfigError(f"nothing to draw for --keys={args.keys}; the runs log: {', '.join(known) or 'nothing yet'}")
    out = draw_curves(runs, args.out, keys)
    print(f"wrote {out}: {len(runs)} run(s), {len(drawn)} panel(s) ({', '.join(sorted(drawn))})")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
