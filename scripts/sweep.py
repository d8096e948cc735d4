"""Sweep guidance scale, guide and EMA length of a trained model: every point a sample.py job and an eval_fid.py score.

    python scripts/sweep.py runs/digits_uvit --guidance 1.0,1.5,2.0,3.0 --n_samples 10000 --metrics fid \\
        --reference configs/digits_uvit.py
    python scripts/sweep.py RUN --guidance 1.0,2.0 --guide cfg,runs/digits_uvit_guide      # CFG and autoguidance
    python scripts/sweep.py RUN --guidance 1.5,2.0 --sigma_rel 0.05,0.075,0.1              # post-hoc EMA lengths
    accelerate launch --num_processes=8 scripts/sweep.py RUN --guidance 1.0,1.5 --metrics fid,fd_dinov2

RUN is a run directory (its newest checkpoint, chosen when the sweep starts and kept by its table), a checkpoint
directory, or what sample.py's --ckpt takes. The points are every guide (--guide: comma-separated, ``cfg`` for
classifier-free guidance, else a guide checkpoint, run directory or released name; default: the config's
sample.guide) x EMA length (--sigma_rel: each reconstructed once from RUN's post-hoc EMA snapshots into
OUT/ema/, ``ema`` for the checkpoint's own EMA; default: the checkpoint's own) x guidance scale (--guidance; default:
the config's). Each point is run in OUT/<point>/ (default OUT: RUN/sweep) as exactly the two commands the table
records: ``sample.py --out=OUT/<point>/samples.npz`` (a resumable job, the same file for any number of processes)
and ``eval_fid.py`` against --reference (default: the config's eval.reference) with the config's feature extractor,
weights and protocol. Under ``accelerate launch`` every process runs the sweep: the sample jobs split their chunks
and eval_fid.py its features. Rerun the same command after a kill and the finished points are read from the table,
a half-done sample job resumes from its finished chunks; new --guidance / --guide / --sigma_rel values extend the
same table. OUT/sweep.json and sweep.csv hold the table, OUT/sweep.png the scores against guidance (one line per
guide and EMA length); at the end the best point is printed with the commands that reproduce it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the package and the entry points are importable from anywhere

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402

import eval_fid  # noqa: E402
import sample  # noqa: E402
from diffusion.checkpoint import resolve_checkpoint_dir  # noqa: E402
from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.config.loading import apply_override, config_from_json  # noqa: E402
from diffusion.errors import ConfigError, UserError  # noqa: E402
from diffusion.sampling.loader import read_checkpoint  # noqa: E402
from diffusion.tools.sweep import (  # noqa: E402
    CSV,
    PLOT,
    RECONSTRUCT,
    SCORE_KEYS,
    TABLE,
    Point,
    Table,
    best_key,
    command_line,
    grid,
    parse_floats,
)
from diffusion.training import posthoc_ema  # noqa: E402

COMMAND = Command(__doc__, config="optional", positional="RUN",
                  positional_help="a run directory, a checkpoint directory, or what sample.py's --ckpt takes", flags=(
    Flag("guidance", metavar="W,W,...", help="guidance scales (default: the config's sample.guidance_scale)"),
    Flag("guide", metavar="G,G,...", help="cfg and/or guide checkpoints for autoguidance, e.g. "
         "cfg,runs/digits_uvit_guide (default: the config's sample.guide, usually CFG)"),
    Flag("sigma_rel", metavar="S,S,...", help="post-hoc EMA lengths reconstructed from RUN's snapshots, ema for the "
         "checkpoint's own (default: the checkpoint's own)"),
    Flag("step", type=int, help="the training step of the reconstructed EMAs (default: the newest snapshot's)"),
    Flag("sampler", help="default: the config's sample.sampler"),
    Flag("steps", type=int, help="default: the config's sample.steps"),
    Flag("n_samples", 10_000, int, help="samples per point"),
    Flag("metrics", "fid", help=f"eval_fid.py's, comma-separated, of {','.join(SCORE_KEYS)}; the first of fid, sfid, "
         f"fd_dinov2, is picks the best point"),
    Flag("reference", metavar="PATH", help="eval_fid.py's REFERENCE (default: the config's eval.reference)"),
    Flag("out", metavar="DIR", help="the sweep's directory (default: RUN/sweep)"),
    Flag("seed", type=int, help="default: the config's sample.seed"),
    Flag("batch_size", 64, int, help="sample.py's samples per network batch and process"),
    Flag("chunk_size", type=int, help="sample.py's chunk size (default: its own)"),
    Flag("eval_batch_size", 250, int, help="eval_fid.py's images per batch and process"),
    Flag("num_workers", 4, int, help="eval_fid.py's image-decoding workers"),
    Flag("device", help="default: the process's GPU, else cpu"),
    Flag("dry_run", False, bool, help="print every pending point's commands, run nothing"),
))


# ----------------------------------------------------------------------------------------------------------
# The run, the grid and the settings every point shares
# ----------------------------------------------------------------------------------------------------------


def resolve_run(spec: str, args: Arguments):
    """(config with the overrides, the checkpoint the points sample, the run directory or None)."""
    path = Path(spec)
    if path.is_dir():
        if args.config_path:
            raise ConfigError("--config is only for weights files: a checkpoint directory carries its own config")
        found = resolve_checkpoint_dir(path)
        config = config_from_json((found / "config.json").read_text())
        run_dir = path if found != path else path.parent.parent if path.parent.name == "checkpoints" else None
        checkpoint = found.resolve()
    else:
        _, config, _, checkpoint = read_checkpoint(spec, args.config_path)
        run_dir = None
    for key, value in args.overrides:
        apply_override(config, key, value)
    return config, str(checkpoint), run_dir


def existing(path: str) -> str:
    """A path that is there, made absolute (the printed commands work from anywhere); other names stay."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def parse_guides(text: str | None, config) -> list[str]:
    if text is None:
        return [existing(config.sample.get("guide", ""))]
    return list(dict.fromkeys("" if g.strip() in ("", "cfg") else existing(g.strip()) for g in text.split(",")))


def parse_sigma_rels(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    own = [None] if "ema" in [v.strip() for v in text.split(",")] else []
    rest = ",".join(v for v in text.split(",") if v.strip() not in ("ema", ""))
    return own + (parse_floats(rest, "sigma_rel") if rest else [])


def sweep_settings(args: Arguments, config, checkpoint: str) -> dict:
    """What every point shares: a resumed sweep must match (but the checkpoint, which its table keeps)."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in SCORE_KEYS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metrics {unknown or args.metrics!r}; choose from {', '.join(SCORE_KEYS)}")
    best_key(metrics)
    reference = args.reference or config.eval.get("reference", "")
    if not reference:
        raise ConfigError("the run's config names no eval.reference: give --reference (a statistics .npz, an ADM "
                          "reference batch, an image folder or a dataset config such as configs/digits_uvit.py)")
    if args.n_samples < 2:
        raise ConfigError(f"--n_samples must be >= 2 for an FID, got {args.n_samples}")
    ev, sc = config.eval, config.sample
    return {"run": existing(args.positional[0]), "checkpoint": checkpoint, "n_samples": args.n_samples,
            "sampler": args.sampler or sc.sampler, "steps": args.steps or sc.steps,
            "seed": sc.seed if args.seed is None else args.seed, "metrics": metrics, "reference": existing(reference),
            "extractor": ev.feature_extractor, "protocol": ev.get("protocol", "pytorch_fid"),
            "inception": existing(ev.get("inception_weights", "")), "dinov2": existing(ev.get("dinov2_weights", "")),
            "ema_step": args.step, "config": existing(args.config_path or ""),
            "overrides": [f"{k}={v}" for k, v in args.overrides]}


# ----------------------------------------------------------------------------------------------------------
# One point: its EMA, its two commands
# ----------------------------------------------------------------------------------------------------------


def sample_argv(settings: dict, ckpt: str, point: Point, npz: Path, args: Arguments, config) -> list[str]:
    argv = [f"--ckpt={ckpt}", f"--out={npz}", f"--n_samples={settings['n_samples']}", f"--guidance={point.guidance:g}"]
    if point.guide or config.sample.get("guide", ""):
        argv.append(f"--guide={point.guide}")  # also "" (CFG) against a config that names a guide
    argv += [f"--sampler={settings['sampler']}", f"--steps={settings['steps']}", f"--seed={settings['seed']}",
             f"--batch_size={args.batch_size}"]
    argv += [f"--chunk_size={args.chunk_size}"] if args.chunk_size else []
    argv += [f"--device={args.device}"] if args.device else []
    argv += [f"--config={settings['config']}"] if settings["config"] and point.sigma_rel is None else []
    return argv + [f"--config.{item}" for item in settings["overrides"]]


def eval_argv(settings: dict, npz: Path, scores: Path, args: Arguments) -> list[str]:
    argv = [str(npz), settings["reference"], f"--metrics={','.join(settings['metrics'])}",
            f"--extractor={settings['extractor']}", f"--protocol={settings['protocol']}"]
    argv += [f"--{name}={settings[name]}" for name in ("inception", "dinov2") if settings[name]]
    argv += [f"--json={scores}", f"--batch_size={args.eval_batch_size}", f"--num_workers={args.num_workers}"]
    return argv + ([f"--device={args.device}"] if args.device else [])


def on_main(state, work):
    """``work()`` on rank 0, its result (or its UserError, raised) on every rank: no rank waits for a failed one."""
    result = [None, None]
    if state.is_main_process:
        try:
            result = [work(), None]
        except UserError as err:
            result = [None, str(err)]
    result = broadcast_object_list(result) if state.num_processes > 1 else result
    if result[1] is not None:
        raise UserError(result[1])
    return result[0]


def reconstruction(run_dir: Path | None, sigma_rel: float, settings: dict, out: Path, state, dry: bool):
    """(the checkpoint of RUN's EMA of ``sigma_rel``, reconstructed once into OUT/ema/, the fit's residual, the
    command that makes it)."""
    if run_dir is None:
        raise ConfigError("--sigma_rel reconstructs from a run directory's post-hoc EMA snapshots: RUN must be the "
                          "run directory (trained with --config.ema.kind=power)")
    path = out / "ema" / f"sigma_rel-{sigma_rel:g}"
    step = [f"--step={settings['ema_step']}"] if settings["ema_step"] is not None else []
    command = command_line(RECONSTRUCT, [str(run_dir.resolve()), f"--sigma_rel={sigma_rel:g}", *step, f"--out={path}"])
    if dry:
        return path, None, command

    def make():
        meta = path / "meta.json"
        if meta.is_file():  # made by an earlier run of this sweep (written whole: a directory renamed into place)
            return json.loads(meta.read_text()).get("posthoc_ema", {}).get("residual")
        return posthoc_ema.reconstruct_checkpoint(run_dir, sigma_rel, step=settings["ema_step"], out=path)[1]

    return path, on_main(state, make), command


def run_point(point: Point, settings: dict, ckpt: str, args: Arguments, config, out: Path, state) -> dict:
    """The point's sample job and evaluation in OUT/<point>/ (every process); its row on rank 0."""
    folder = out / point.name
    npz, scores = folder / "samples.npz", folder / "scores.json"
    jobs = (("sample", sample, sample_argv(settings, ckpt, point, npz, args, config)),
            ("eval", eval_fid, eval_argv(settings, npz, scores, args)))
    seconds, commands = {}, {}
    for step, module, argv in jobs:
        script = f"{module.__name__}.py"
        commands[step] = command_line(script, argv)
        start = time.perf_counter()
        code = module.main(argv)  # the module's main as it is now (a test counts the jobs through it)
        state.wait_for_everyone()  # rank 0 assembles the .npz before anyone scores it
        if code != 0:
            raise UserError(f"point {point.name}: {script} exited with status {code} (its message is above); "
                            f"the command was: {commands[step]}")
        seconds[step] = round(time.perf_counter() - start, 3)
    if not state.is_main_process:
        return {}
    measured = json.loads(scores.read_text())
    keys = [k for m in settings["metrics"] for k in SCORE_KEYS[m]]
    return {"scores": {k: measured[k] for k in keys if k in measured}, "samples": str(npz), "checkpoint": ckpt,
            "seconds": seconds, "commands": commands}


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------


def planned(point: Point, settings: dict, ckpt: str, args: Arguments, config, out: Path) -> list[str]:
    """The sample.py and eval_fid.py lines a point would run (--dry_run)."""
    npz = out / point.name / "samples.npz"
    return [command_line("sample.py", sample_argv(settings, ckpt, point, npz, args, config)),
            command_line("eval_fid.py", eval_argv(settings, npz, npz.with_name("scores.json"), args))]


def summary(table: Table) -> str:
    key = best_key(table.settings["metrics"])
    lines = [f"[sweep] {len(table.rows)} points in {table.dir / TABLE} ({CSV}, {PLOT}):"]
    lines += [f"  {r['name']}: " + "  ".join(f"{k} {v:.4f}" for k, v in r["scores"].items()) for r in table.rows]
    best = table.best()
    if best is None:
        return "\n".join(lines)
    point = Point(best["guidance"], best["guide"], best["sigma_rel"])
    lines += [f"best: {key} {best['scores'][key]:.4f} at guidance {point.guidance:g}, {point.line} "
              f"({table.dir / best['name']})",
              "reproduce it from the repository root (sample.py: any number of processes under accelerate launch "
              "give the same samples):"]
    lines += [f"  {best['commands'][k]}" for k in ("reconstruct", "sample", "eval") if best["commands"].get(k)]
    return "\n".join(lines)


def run(args: Arguments) -> int:
    if len(args.positional) != 1:
        raise ConfigError(f"give one RUN (a run or checkpoint directory), got {len(args.positional)}")
    config, checkpoint, run_dir = resolve_run(args.positional[0], args)
    settings = sweep_settings(args, config, checkpoint)
    guidances = parse_floats(args.guidance, "guidance") if args.guidance else [float(config.sample.guidance_scale)]
    points = grid(guidances, parse_guides(args.guide, config), parse_sigma_rels(args.sigma_rel))
    if args.out is None and not Path(args.positional[0]).is_dir():
        raise ConfigError("give --out=DIR: RUN is not a directory to keep the sweep in")
    out = Path(args.out or Path(args.positional[0]) / "sweep").resolve()
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    table = Table.open(out, settings, pinned=("checkpoint",))
    state.wait_for_everyone()  # every process has read the table before rank 0 adds to it
    pending = [p for p in points if table.row(p) is None]
    say = print if state.is_main_process else (lambda *a, **k: None)
    say(f"[sweep] {len(points)} points, {len(points) - len(pending)} done already; checkpoint "
        f"{table.settings['checkpoint']}; {out}", file=sys.stderr, flush=True)
    for i, point in enumerate(pending):
        ckpt, residual, rebuild = table.settings["checkpoint"], None, None
        if point.sigma_rel is not None:
            ckpt, residual, rebuild = reconstruction(run_dir, point.sigma_rel, table.settings, out, state,
                                                     args.dry_run)
        say(f"[sweep] point {i + 1}/{len(pending)}: {point.name}", file=sys.stderr, flush=True)
        if args.dry_run:
            say("\n".join([*([rebuild] if rebuild else []), *planned(point, table.settings, str(ckpt), args, config,
                                                                  out)]))
            continue
        row = run_point(point, table.settings, str(ckpt), args, config, out, state)
        if state.is_main_process:
            row["ema_residual"] = residual
            if rebuild:
                row["commands"] = {"reconstruct": rebuild, **row["commands"]}
            table.add(point, row)
            table.write()
    if not args.dry_run:
        if state.is_main_process and not (out / TABLE).is_file():
            table.write()  # a sweep with nothing left to run still leaves its table, CSV and plot
        say(summary(table))
    state.wait_for_everyone()
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
