"""The sweep over guidance, guide and EMA length, all but running it (``scripts/sweep.py`` runs the points): the grid
of points and their names, the command lines of a point's sample job and evaluation, the table (JSON and CSV) that
a resumed sweep reads its finished points from, the best point and the plot."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusion.errors import ConfigError
from diffusion.files import write_atomic

TABLE, CSV, PLOT = "sweep.json", "sweep.csv", "sweep.png"  # in the sweep's directory
# eval_fid.py metric -> the keys of its scores; the best point is the lowest of the first distance in --metrics
# (the highest Inception Score if that comes first)
SCORE_KEYS = {"fid": ("fid",), "sfid": ("sfid",), "fd_dinov2": ("fd_dinov2",), "is": ("inception_score",),
              "pr": ("precision", "recall")}
HIGHER_IS_BETTER = ("inception_score", "precision", "recall")
SELECTABLE = ("fid", "sfid", "fd_dinov2", "is")
RECONSTRUCT = "scripts/reconstruct_ema.py"


@dataclass(frozen=True)
class Point:
    """One point of the sweep: guidance scale w, guide ("" = classifier-free guidance) and EMA length (None = the
    checkpoint's own EMA)."""

    guidance: float
    guide: str = ""
    sigma_rel: float | None = None

    @property
    def guide_label(self) -> str:
        if not self.guide:
            return "cfg"
        digest = hashlib.sha1(self.guide.encode()).hexdigest()[:6]  # two guides of the same name stay apart
        return f"guide-{Path(self.guide).name or 'guide'}-{digest}"

    @property
    def ema_label(self) -> str:
        return "ema" if self.sigma_rel is None else f"ema{self.sigma_rel:g}"

    @property
    def name(self) -> str:
        """The point's directory under the sweep's, stable across reruns of the same settings."""
        return f"{self.guide_label}_{self.ema_label}_w{self.guidance:g}"

    @property
    def line(self) -> str:
        """The plot's line this point is on: its guide and EMA length."""
        guide = "CFG" if not self.guide else f"guide {Path(self.guide).name}"
        return f"{guide}, {'EMA of the checkpoint' if self.sigma_rel is None else f'sigma_rel {self.sigma_rel:g}'}"

    def record(self) -> dict:
        return {"guidance": self.guidance, "guide": self.guide, "sigma_rel": self.sigma_rel}


def parse_floats(text: str, flag: str) -> list[float]:
    """``"1.0,1.5,2"`` -> [1.0, 1.5, 2.0], refusing anything else with the flag's name."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{flag} takes numbers separated by commas, e.g. 1.0,1.5,2.0; got {text!r}") from None
    if not values:
        raise ConfigError(f"--{flag} needs at least one value")
    return list(dict.fromkeys(values))


def grid(guidances: Sequence[float], guides: Sequence[str], sigma_rels: Sequence[float | None]) -> list[Point]:
    """Every (guide, EMA length, guidance) point, in the order they are run: one line of the plot after another."""
    return [Point(w, g, s) for g in guides for s in sigma_rels for w in guidances]


def command_line(script: str, argv: Sequence[str]) -> str:
    """The shell line that runs ``script`` with ``argv`` (from the repository root)."""
    return shlex.join(["python", script, *argv])


def best_key(metrics: Sequence[str]) -> str:
    """The score the best point is chosen by: the first of fid, sfid, fd_dinov2, is in ``metrics``."""
    chosen = next((m for m in metrics if m in SELECTABLE), None)
    if chosen is None:
        raise ConfigError(f"--metrics={','.join(metrics)} gives no score to pick the best point by: add one of "
                          f"{', '.join(SELECTABLE)}")
    return SCORE_KEYS[chosen][0]


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


class Table:
    """The sweep's record (``DIR/sweep.json``, mirrored as ``DIR/sweep.csv``): the settings every point shares and
    one row per finished point (its settings, scores, files and commands). A sweep resumed with other settings is
    refused; rows of points outside the current grid (an earlier, wider sweep) stay."""

    def __init__(self, directory: str | Path, settings: dict, rows: list[dict] | None = None):
        self.dir, self.settings, self.rows = Path(directory), settings, rows or []

    @classmethod
    def open(cls, directory: str | Path, settings: dict, pinned: Sequence[str] = ()) -> Table:
        """The recorded sweep in ``directory`` (its ``pinned`` settings, e.g. the checkpoint chosen when it started,
        are taken from the record), or a new one."""
        path = Path(directory) / TABLE
        if not path.is_file():
            return cls(directory, settings)
        saved = json.loads(path.read_text())
        settings = {**settings, **{k: saved["settings"][k] for k in pinned if k in saved["settings"]}}
        changed = [k for k in sorted(set(settings) | set(saved["settings"]))
                   if settings.get(k) != saved["settings"].get(k)]
        if changed:
            shown = "; ".join(f"{k}: {saved['settings'].get(k)!r} there, {settings.get(k)!r} now" for k in changed)
            raise ConfigError(f"{path} records a sweep with other settings ({shown}): rerun it with those settings "
                              f"to resume or extend it, or give another --out")
        return cls(directory, settings, saved["rows"])

    def row(self, point: Point) -> dict | None:
        return next((r for r in self.rows if Point(r["guidance"], r["guide"], r["sigma_rel"]) == point), None)

    def add(self, point: Point, row: dict) -> None:
        self.rows = [r for r in self.rows if Point(r["guidance"], r["guide"], r["sigma_rel"]) != point]
        self.rows.append({"name": point.name, **point.record(), **row})
        self.rows.sort(key=lambda r: (r["guide"], -1.0 if r["sigma_rel"] is None else r["sigma_rel"], r["guidance"]))

    def score_keys(self) -> list[str]:
        return [k for m in self.settings["metrics"] for k in SCORE_KEYS[m]]

    def best(self) -> dict | None:
        key = best_key(self.settings["metrics"])
        rows = [r for r in self.rows if r["scores"].get(key) is not None]
        if not rows:
            return None
        sign = -1.0 if key in HIGHER_IS_BETTER else 1.0
        return min(rows, key=lambda r: sign * r["scores"][key])

    def write(self) -> None:
        """sweep.json, sweep.csv and sweep.png, each written whole."""
        self.dir.mkdir(parents=True, exist_ok=True)
        best = self.best()
        text = json.dumps({"settings": self.settings, "rows": self.rows,
                           "best": best["name"] if best else None}, indent=2) + "\n"
        write_atomic(self.dir / TABLE, lambda f: f.write(text.encode()))
        write_atomic(self.dir / CSV, lambda f: f.write(self.csv_text().encode()))
        draw_sweep(self, self.dir / PLOT)

    def csv_text(self) -> str:
        keys = self.score_keys()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "guidance", "guide", "sigma_rel", *keys, "ema_residual", "samples"])
        for r in self.rows:
            writer.writerow([r["name"], r["guidance"], r["guide"] or "cfg",
                             "" if r["sigma_rel"] is None else r["sigma_rel"],
                             *(r["scores"].get(k, "") for k in keys),
                             "" if r.get("ema_residual") is None else r["ema_residual"], r["samples"]])
        return out.getvalue()


def draw_sweep(table: Table, out: str | Path) -> Path:
    """One panel per score against the guidance scale, one line per guide and EMA length; the best point starred."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    keys = [k for k in table.score_keys() if any(k in r["scores"] for r in table.rows)] or [best_key(
        table.settings["metrics"])]
    fig = Figure(figsize=(5.0 * len(keys), 3.6), layout="constrained")
    best = table.best()
    settings = table.settings
    steps = f", {settings['steps']} steps" if settings.get("steps") else ""
    fig.suptitle(f"{Path(settings['run']).name}: {settings['n_samples']} samples, "
                 f"{settings.get('sampler') or 'the sample section sampler'}{steps}", fontsize=10)
    lines: dict[str, list[dict]] = {}
    for r in table.rows:
        lines.setdefault(Point(r["guidance"], r["guide"], r["sigma_rel"]).line, []).append(r)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for label, rows in lines.items():
            rows = sorted((r for r in rows if r["scores"].get(key) is not None), key=lambda r: r["guidance"])
            ax.plot([r["guidance"] for r in rows], [r["scores"][key] for r in rows], marker="o", markersize=4,
                    label=label)
        if best is not None and best["scores"].get(key) is not None:
            ax.plot([best["guidance"]], [best["scores"][key]], marker="*", markersize=14, color="black",
                    linestyle="none", label=f"best ({best['name']})" if i == 0 else None)
        ax.set_xlabel("guidance scale w", fontsize=9)
        ax.set_ylabel(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    out = Path(out)
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=90))
    return out
