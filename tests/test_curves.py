"""Runs you can look at without wandb: scalars.jsonl and curves.png of a tiny run hold what it logged (read back from
both), a resumed run logs no step twice, the gradient norm is the unclipped one, and scripts/plot_runs.py overlays
runs."""

from __future__ import annotations

import json
import re
import runpy
import shutil

import pytest
from PIL import Image

from diffusion.training import logs
from diffusion.training.logs import Curves, read_scalars
from diffusion.training.loop import train
from diffusion.training.pieces import learning_rate
from tests.helpers import REPO, tiny_config

STEPS = ["--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.log_every=1",
         "--config.optim.warmup_steps=2", "--config.optim.lr=1e-3"]
FID = ["--config.eval.every=2", "--config.eval.n_samples=20", "--config.eval.batch_size=20",
       "--config.eval.feature_extractor=digits"]
ACCURACY = ["--config.eval.metric=digits_accuracy", "--config.eval.per_class=1"]
TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "img_per_sec"}


def png_summary(path) -> dict:
    """What draw_curves says it drew: {panel: {run: [points, last step, last value]}}."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
        return json.loads(image.text["Description"])


def loss_lines(workdir) -> list[dict]:
    return [r for r in read_scalars(workdir) if "loss" in r]


def test_a_tiny_run_writes_its_scalars_and_redraws_its_curves(tmp_path, monkeypatch):
    draws = []
    original = Curves.draw

    def counting(self):  # the steps in the file at each redraw
        draws.append(max(r["step"] for r in read_scalars(self.path)))
        return original(self)

    monkeypatch.setattr(Curves, "draw", counting)
    train(tiny_config(*STEPS, *FID, *ACCURACY), tmp_path)
    records = read_scalars(tmp_path / "scalars.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4] and all(set(r) == TRAIN_KEYS for r in train_lines)
    assert [r["lr"] for r in train_lines] == [learning_rate(k, 1e-3, 2) for k in range(4)]  # the step's own lr
    assert all(r["grad_norm"] > 0 and r["img_per_sec"] > 0 for r in train_lines)
    log = (tmp_path / "log.txt").read_text()
    text = re.findall(r"step (\d+) loss (\S+) lr \S+ grad norm (\S+)", log)
    assert [(int(s), float(loss), float(g)) for s, loss, g in text] == [
        (r["step"], pytest.approx(r["loss"], abs=1e-5), pytest.approx(r["grad_norm"], rel=1e-3)) for r in train_lines]
    history = json.loads((tmp_path / "fid.json").read_text())["scores"]
    assert [(r["step"], r["fid20"]) for r in records if "fid20" in r] == [(2, history["2"]), (4, history["4"])]
    accuracy = json.loads((tmp_path / "checkpoints" / "step_00000004" / "eval.json").read_text())
    assert [r for r in records if "digits_accuracy" in r] == [{"step": 4, **accuracy}]
    assert draws == [2, 4, 4]  # after each FID and at the end
    drawn = png_summary(tmp_path / "curves.png")
    assert drawn["loss"][tmp_path.name] == [4, 4, train_lines[-1]["loss"]]
    assert drawn["fid20"][tmp_path.name] == [2, 4, history["4"]]
    assert set(drawn) == {"loss", "lr", "grad_norm", "img_per_sec", "fid20", "digits_accuracy"}


def test_resume_logs_no_step_twice(tmp_path):
    """A run killed after logging steps 3 and 4 but before saving step 4 (and mid-line) resumes from step 2: the
    scalars after it go and come back once, with the same values (CPU runs resume bit-identically); running the
    finished run's command again replaces its end-of-run scores rather than adding them twice."""
    config = tiny_config(*STEPS, *ACCURACY)
    train(config, tmp_path)
    first = loss_lines(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    with open(tmp_path / "scalars.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.9')  # the line a kill cut short
    train(config, tmp_path)
    again = loss_lines(tmp_path)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in again] == [(r["loss"], r["grad_norm"], r["lr"])
                                                                    for r in first]
    lines = (tmp_path / "scalars.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    train(config, tmp_path)  # finished: nothing to train, the end-of-run check logged again at step 4
    records = read_scalars(tmp_path)
    assert [r["step"] for r in records if "digits_accuracy" in r] == [4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_the_logged_gradient_norm_is_before_clipping_and_costs_nothing_unclipped(tmp_path):
    """The norm is computed with or without train.grad_clip; unclipped, computing it changes nothing (a bound
    never reached trains the same run), and the clipped run logs the same first norm (before clipping) but then
    trains differently."""
    runs = {}
    for name, clip in (("off", 0.0), ("never", 1e9), ("tight", 0.05)):
        train(tiny_config(*STEPS, f"--config.train.grad_clip={clip}", "--config.optim.warmup_steps=0"),
              tmp_path / name)
        runs[name] = loss_lines(tmp_path / name)
    pick = lambda name, key: [r[key] for r in runs[name]]  # noqa: E731
    assert pick("off", "loss") == pick("never", "loss") and pick("off", "grad_norm") == pick("never", "grad_norm")
    assert pick("tight", "grad_norm")[0] == pick("off", "grad_norm")[0] > 0.05
    assert pick("tight", "loss")[1:] != pick("off", "loss")[1:]


def test_plot_runs_overlays_two_runs(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        lines = [{"step": s, "loss": scale / s, "lr": 1e-3, "img_per_sec": 100.0} for s in range(1, 6)]
        lines.append({"step": 5, "fid10k": 10 * scale})
        (tmp_path / name / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    main = runpy.run_path(str(REPO / "scripts" / "plot_runs.py"))["main"]
    out = tmp_path / "compare.png"
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main([*runs, "--out", str(out), "--keys", "loss,fid"]) == 0
    assert "2 run(s), 2 panel(s) (fid10k, loss)" in capsys.readouterr().out
    drawn = png_summary(out)
    assert drawn == {"loss": {runs[0]: [5, 5, 0.2], runs[1]: [5, 5, 0.4]},
                     "fid10k": {runs[0]: [1, 5, 10.0], runs[1]: [1, 5, 20.0]}}
    assert main([*runs, "--out", str(out), "--keys", "psnr"]) == 2
    assert "the runs log: fid10k, img_per_sec, loss, lr" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_curves_without_matplotlib_leave_the_scalars_and_say_so(tmp_path, monkeypatch, capsys):
    curves = Curves(tmp_path)
    curves.resume(0)
    curves.append({"loss": 1.5, "grad_norm": float("inf")}, 1)
    assert read_scalars(tmp_path) == [{"step": 1, "loss": 1.5, "grad_norm": None}]  # plain JSON, no Infinity

    def missing(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(logs, "draw_curves", missing)
    assert curves.draw() is None and not (tmp_path / "curves.png").exists()
    assert "scalars are in" in capsys.readouterr().err


def test_curves_are_redrawn_only_when_something_new_was_logged(tmp_path):
    curves = Curves(tmp_path)
    curves.resume(0)
    curves.append({"loss": 1.0}, 1)
    png = curves.draw()
    drawn = png.stat().st_mtime_ns, png.stat().st_ino
    assert curves.draw() == png and (png.stat().st_mtime_ns, png.stat().st_ino) == drawn  # an FID, then the end
    curves.append({"loss": 0.5}, 2)
    curves.draw()
    assert png_summary(png)["loss"][tmp_path.name] == [2, 2, 0.5]
