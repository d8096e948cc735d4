"""The run's log: log.txt, wandb, notices on stderr, and the run's scalars in a plain file with a PNG of their curves
(``scalars.jsonl``, ``curves.png``): a run is readable without wandb."""

from __future__ import annotations

import json
import logging
import math
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffusion.files import write_atomic

log = logging.getLogger("diffusion.train")

SCALARS, CURVES = "scalars.jsonl", "curves.png"  # in the run directory
NOT_CURVES = ("best_step",)  # logged scalars that are a step number, not a curve
LOG_SCALE = ("loss", "denoise", "proj", "grad_norm")  # drawn on a log axis when positive over a wide range


def setup_logging(workdir: Path, is_main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_main:
        handler = logging.FileHandler(workdir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)


class WandbLogger:
    """wandb, offline unless the config says online: a run needs no account. ``mode="disabled"`` skips it. Every
    logged scalar also goes to the run's :class:`Curves` (rank 0, whatever the mode).

    Offline, wandb itself is silenced (its start banner and the ~20 lines of run history and sync hints it prints at
    the end); one line of ours says where the run is and how to upload it."""

    def __init__(self, config, workdir: Path, is_main: bool):
        self.run = None
        self.curves = Curves(workdir) if is_main else None
        if not is_main or config.wandb.mode == "disabled":
            return
        import wandb

        id_file = workdir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        offline = config.wandb.mode == "offline"
        self.run = wandb.init(project=config.wandb.project, name=config.wandb.name or workdir.name, id=run_id,
                              resume="allow", dir=str(workdir), mode=config.wandb.mode, config=config.to_dict(),
                              settings=wandb.Settings(silent=True) if offline else None)
        if offline:
            folder = Path(self.run.dir).parent  # wandb/offline-run-<time>-<id>; files/ is the run's own folder
            log.info("wandb offline run in %s", folder)
            print(f"[train] wandb (offline): {folder}; upload it with `wandb sync {folder}`", file=sys.stderr)

    def start(self, step: int) -> None:
        """The loop starts (or resumes) at ``step``: the scalars logged after it by the run that stopped go."""
        if self.curves is not None:
            self.curves.resume(step)

    def log(self, values: dict, step: int) -> None:
        if self.curves is not None:
            self.curves.append(values, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def draw(self) -> None:
        """Redraw curves.png (rank 0): at every evaluation and at the end."""
        if self.curves is not None:
            self.curves.draw()

    def finish(self) -> None:
        self.draw()
        if self.run is not None:
            self.run.finish()


def report(is_main: bool, text: str) -> None:
    """A notice for the user on stderr and in log.txt (rank 0: ``is_main``)."""
    if is_main:
        log.warning("%s", text)
        print(f"[train] {text}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# scalars.jsonl and curves.png
# ----------------------------------------------------------------------------------------------------------


def read_scalars(path: str | Path) -> list[dict]:
    """The records of a scalars file in order, each ``{"step": s, name: value, ...}``; a line cut short by a kill
    is left out. A run directory reads its ``scalars.jsonl``."""
    path = Path(path)
    path = path / SCALARS if path.is_dir() else path
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _plain(value):
    """A logged value as JSON holds it: numbers as Python numbers, non-finite ones as null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = float(value)  # 0-d tensors, numpy scalars
    return value if isinstance(value, int) or math.isfinite(value) else None


class Curves:
    """The scalars of one run, appended to ``workdir/scalars.jsonl`` one JSON object per logged step, and
    ``workdir/curves.png`` drawn from them. A resumed run first drops what was logged after its checkpoint, so no
    step is there twice."""

    def __init__(self, workdir: str | Path):
        self.path, self.png = Path(workdir) / SCALARS, Path(workdir) / CURVES
        self.resumed_at: int | None = None
        self.resumed_keys: set[str] = set()  # what the resumed step already holds (a finished run run again)
        self.changed = True  # since the last drawing (an FID at the last step, then the end: drawn once)

    def resume(self, step: int) -> None:
        """Keep the records up to ``step`` (the checkpoint resumed from; 0: none) and nothing cut short."""
        records = read_scalars(self.path)
        kept = [r for r in records if r["step"] <= step]
        self.resumed_at, self.resumed_keys = step, {k for r in kept if r["step"] == step for k in r} - {"step"}
        if self.path.is_file() and (len(kept) != len(records) or len(records) != _lines(self.path)):
            self._write(kept)

    def append(self, values: dict, step: int) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if step == self.resumed_at and self.resumed_keys & set(values):  # logged again: the new values replace
            self._write([self._without(r, set(values)) for r in read_scalars(self.path)])
            self.resumed_keys -= set(values)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.changed = True

    def _without(self, record: dict, keys: set[str]) -> dict:
        if record["step"] != self.resumed_at:
            return record
        return {k: v for k, v in record.items() if k == "step" or k not in keys}

    def _write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records if len(r) > 1).encode()
        write_atomic(self.path, lambda f: f.write(text))

    def draw(self) -> Path | None:
        """curves.png of every scalar logged so far (unless it shows them already); None (with a notice) when
        matplotlib is missing."""
        if not self.changed and self.png.is_file():
            return self.png
        try:
            self.changed = False
            return draw_curves([(self.path.parent.name, read_scalars(self.path))], self.png)
        except ImportError as err:
            report(True, f"{self.png} not drawn ({err}); the scalars are in {self.path}")
            return None


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def curve_series(records: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, tuple[list, list]]:
    """{name: (steps, values)} of every scalar in ``records`` (first-logged order; null values left out). ``keys``
    selects: a name given, or every name that starts with it ("fid" is fid10k, fid50k, ...)."""
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step" and name not in NOT_CURVES and value is not None:
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    if keys is None:
        return series
    chosen = [n for key in keys for n in series if n == key or (key not in series and n.startswith(key))]
    return {name: series[name] for name in dict.fromkeys(chosen)}


def draw_curves(runs: Sequence[tuple[str, Sequence[dict]]], out: str | Path, keys: Sequence[str] | None = None
                ) -> Path:
    """One panel per scalar, one line per run (``(label, records)``), step on the x axis, written whole to ``out``
    (PNG, matplotlib's Agg). The PNG's Description text holds, per panel and run, the points drawn and the last one
    ``{name: {label: [n, last step, last value]}}``."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    drawn = [(label, curve_series(records, keys)) for label, records in runs]
    names = list(dict.fromkeys(name for _, series in drawn for name in series)) or ["(nothing logged yet)"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    width, height = 4.2 * cols, 3.0 * rows
    fig = Figure(figsize=(width, height))  # margins in inches: a constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.65 / height,
                        wspace=0.3, hspace=0.55)
    if len(runs) == 1:
        fig.suptitle(runs[0][0], fontsize=11)
    summary: dict[str, dict] = {}
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        values_drawn = []
        for label, series in drawn:
            if name not in series:
                continue
            steps, values = series[name]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
            summary.setdefault(name, {})[label] = [len(steps), steps[-1], values[-1]]
            values_drawn += values
        if name in LOG_SCALE and values_drawn and min(values_drawn) > 0 and max(values_drawn) > 20 * min(values_drawn):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(runs) > 1 and i == 0:
            ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=80,
                                            metadata={"Description": json.dumps(summary)}))
    return out
