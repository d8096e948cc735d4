"""scripts/sweep.py on a tiny trained digits run, scored on the quickstart's digits features: the table (JSON, CSV)
and plot of a sweep, a killed sweep resumed without redoing finished points, the printed commands reproducing the
best point, CFG against autoguidance, post-hoc EMA lengths, refusals, and two processes writing what one does."""

from __future__ import annotations

import csv
import json
import os
import runpy
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval_fid
import sample
from diffusion.sampling.jobs import SampleJob
from diffusion.training.loop import train
from tests.helpers import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("private_caches")
SWEEP = runpy.run_path(str(REPO / "scripts" / "sweep.py"))["main"]
FAST = ["--n_samples=40", "--steps=4", "--chunk_size=20", f"--reference={REPO / 'configs' / 'digits_uvit.py'}",
        "--num_workers=0", "--device=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional digits U-ViT (4 steps) and a smaller, shorter one to guide it (2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny_config("--config.train.steps=4", "--config.train.ckpt_every=4"), root / "main")
    train(tiny_config("--config.train.steps=2", "--config.train.ckpt_every=2", "--config.model.embed_dim=16",
                      "--config.model.num_heads=1"), root / "guide")
    from accelerate.state import AcceleratorState, GradientState  # the module fixture ran train() outside a test

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root


def sweep(capsys, *argv) -> tuple[int, str, str]:
    code = SWEEP([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def table(out) -> dict:
    return json.loads((out / "sweep.json").read_text())


def npz(path) -> np.ndarray:
    with np.load(path) as data:
        return data["arr_0"]


def counting(monkeypatch, module) -> list:
    calls, original = [], module.main
    monkeypatch.setattr(module, "main", lambda argv: calls.append(list(argv)) or original(argv))
    return calls


def test_a_sweep_writes_its_table_csv_and_plot(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = sweep(capsys, runs / "main", "--guidance=1.0,2.0", *FAST, "--out", out)
    assert code == 0, err
    rows = table(out)["rows"]
    assert [(r["name"], r["guidance"], r["guide"], r["sigma_rel"]) for r in rows] == [
        ("cfg_ema_w1", 1.0, "", None), ("cfg_ema_w2", 2.0, "", None)]
    for r in rows:  # every score is the evaluation's own, of samples drawn with the point's guidance
        assert r["scores"] == {"fid": json.loads((out / r["name"] / "scores.json").read_text())["fid"]}
        job = json.loads((out / r["name"] / "samples.job.json").read_text())
        assert job["settings"]["sampler"]["guidance_scale"] == r["guidance"] and job["num_samples"] == 40
        assert job["settings"]["checkpoint"] == str((runs / "main" / "checkpoints" / "step_00000004").resolve())
        assert npz(out / r["name"] / "samples.npz").shape == (40, 8, 8, 3)
    assert rows[0]["scores"]["fid"] != rows[1]["scores"]["fid"]
    with open(out / "sweep.csv") as f:
        read = list(csv.DictReader(f))
    assert [(float(r["guidance"]), r["guide"], float(r["fid"])) for r in read] == [
        (r["guidance"], "cfg", r["scores"]["fid"]) for r in rows]
    with Image.open(out / "sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    best = min(rows, key=lambda r: r["scores"]["fid"])
    assert table(out)["best"] == best["name"]
    assert f"best: fid {best['scores']['fid']:.4f} at guidance {best['guidance']:g}, CFG" in stdout


def test_a_killed_sweep_resumes_without_redoing_finished_points(runs, tmp_path, capsys, monkeypatch):
    """One point done; then killed in the second point's sample job (one of its two chunks written), then killed
    again while scoring it; then run to the end: the finished point is not run again, the half-done job resumes
    from its chunk, the finished job is kept."""
    out = tmp_path / "sweep"
    full = [runs / "main", "--guidance=1.0,2.0,3.0", *FAST, "--out", out]
    assert sweep(capsys, runs / "main", "--guidance=1.0", *FAST, "--out", out)[0] == 0
    first = (out / "cfg_ema_w1" / "samples.npz").stat().st_mtime_ns
    write_chunk = SampleJob.write_chunk

    def killed(*args):
        raise KeyboardInterrupt

    def killed_after_one_chunk(job, c, *args):
        write_chunk(job, c, *args)
        killed()

    monkeypatch.setattr(SampleJob, "write_chunk", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        sweep(capsys, *full)
    monkeypatch.undo()
    monkeypatch.setattr(eval_fid, "main", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(capsys, *full)
    assert "(1 of 2 chunks reused, 1 drawn" in capsys.readouterr().out
    assert [r["name"] for r in table(out)["rows"]] == ["cfg_ema_w1"]
    monkeypatch.undo()
    samples, scores = counting(monkeypatch, sample), counting(monkeypatch, eval_fid)
    code, stdout, err = sweep(capsys, *full)
    assert code == 0, err
    ran = [next(a for a in argv if a.startswith("--out=")) for argv in samples]
    assert ran == [f"--out={out / 'cfg_ema_w2' / 'samples.npz'}", f"--out={out / 'cfg_ema_w3' / 'samples.npz'}"]
    assert len(scores) == 2 and "3 points, 1 done already" in err
    assert f"{out / 'cfg_ema_w2' / 'samples.npz'} is already complete" in stdout
    assert (out / "cfg_ema_w1" / "samples.npz").stat().st_mtime_ns == first
    assert [r["name"] for r in table(out)["rows"]] == ["cfg_ema_w1", "cfg_ema_w2", "cfg_ema_w3"]
    samples.clear()
    assert sweep(capsys, runs / "main", "--guidance=1.0,3.0", *FAST, "--out", out)[0] == 0 and samples == []


def test_the_printed_commands_reproduce_the_best_point(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = sweep(capsys, runs / "main", "--guidance=1.0,2.0", *FAST, "--out", out)
    assert code == 0, err
    commands = [shlex.split(line) for line in stdout.splitlines() if line.strip().startswith("python ")]
    assert [c[1] for c in commands] == ["sample.py", "eval_fid.py"]
    best = next(r for r in table(out)["rows"] if r["name"] == table(out)["best"])
    again, again_json = tmp_path / "again.npz", tmp_path / "again.json"
    argv = [f"--out={again}" if a.startswith("--out=") else a for a in commands[0][2:]]
    assert sample.main(argv) == 0
    argv = [str(again) if a.endswith("samples.npz") else f"--json={again_json}" if a.startswith("--json=") else a
            for a in commands[1][2:]]
    assert eval_fid.main(argv) == 0
    assert np.array_equal(npz(again), npz(best["samples"]))
    assert json.loads(again_json.read_text())["fid"] == best["scores"]["fid"]


def test_cfg_and_autoguidance_are_lines_of_one_sweep(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = sweep(capsys, runs / "main", "--guidance=1.0,3.0", "--guide", f"cfg,{runs / 'guide'}", *FAST,
                              "--out", out)
    assert code == 0, err
    rows = {(r["guide"] != "", r["guidance"]): r for r in table(out)["rows"]}
    assert len(rows) == 4 and rows[True, 3.0]["guide"] == str((runs / "guide").resolve())
    job = json.loads((out / rows[True, 3.0]["name"] / "samples.job.json").read_text())["settings"]
    assert job["guide"]["checkpoint"] == str((runs / "guide" / "checkpoints" / "step_00000002").resolve())
    assert "--guide=" + str((runs / "guide").resolve()) in rows[True, 3.0]["commands"]["sample"]
    assert "--guide" not in rows[False, 3.0]["commands"]["sample"]
    # w = 1 is the main model alone either way; at w = 3 the guide's difference is extrapolated, not CFG's
    assert rows[True, 1.0]["scores"]["fid"] == pytest.approx(rows[False, 1.0]["scores"]["fid"], rel=1e-3)
    assert not np.array_equal(npz(rows[True, 3.0]["samples"]), npz(rows[False, 3.0]["samples"]))


def test_post_hoc_ema_lengths_are_reconstructed_once(tmp_path, capsys, monkeypatch):
    posthoc = pytest.importorskip("diffusion.training.posthoc_ema")
    run = tmp_path / "power"
    train(tiny_config("--config.train.steps=6", "--config.train.ckpt_every=6", "--config.ema.kind=power",
                      "--config.ema.snapshot_every=2"), run)
    made = []
    original = posthoc.reconstruct_checkpoint
    monkeypatch.setattr(posthoc, "reconstruct_checkpoint", lambda *a, **k: made.append(a) or original(*a, **k))
    out = tmp_path / "sweep"
    code, stdout, err = sweep(capsys, run, "--guidance=2.0", "--sigma_rel=ema,0.075", *FAST, "--out", out)
    assert code == 0, err
    rows = {r["sigma_rel"]: r for r in table(out)["rows"]}
    assert set(rows) == {None, 0.075} and len(made) == 1
    rebuilt = out / "ema" / "sigma_rel-0.075"
    meta = json.loads((rebuilt / "meta.json").read_text())
    assert rows[0.075]["ema_residual"] == meta["posthoc_ema"]["residual"] and rows[None]["ema_residual"] is None
    assert json.loads((out / rows[0.075]["name"] / "samples.job.json").read_text())["settings"]["checkpoint"] == \
        str(rebuilt)
    assert rows[0.075]["commands"]["reconstruct"].startswith(f"python scripts/reconstruct_ema.py {run} "
                                                             f"--sigma_rel=0.075")
    assert not np.array_equal(npz(rows[0.075]["samples"]), npz(rows[None]["samples"]))
    assert sweep(capsys, run, "--guidance=2.0,1.0", "--sigma_rel=0.075", *FAST, "--out", out)[0] == 0
    assert len(made) == 1 and len(table(out)["rows"]) == 3  # extended: the reconstruction is reused


def test_refusals_and_the_dry_run(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    no_reference = [a for a in FAST if not a.startswith("--reference")]
    code, _, err = sweep(capsys, runs / "main", "--guidance=1.0", *no_reference, "--out", out)
    assert code == 2 and "names no eval.reference: give --reference" in err
    code, stdout, err = sweep(capsys, runs / "main", "--guidance=1.0,2.0", *FAST, "--out", out, "--dry_run")
    assert code == 0 and not out.exists()
    assert [shlex.split(line)[1] for line in stdout.splitlines()] == ["sample.py", "eval_fid.py"] * 2
    assert sweep(capsys, runs / "main", "--guidance=1.0", *FAST, "--out", out)[0] == 0
    code, _, err = sweep(capsys, runs / "main", "--guidance=1.0", *FAST, "--n_samples=30", "--out", out)
    assert code == 2 and "other settings (n_samples: 40 there, 30 now)" in err
    for bad, message in (("--metrics=pr", "no score to pick the best point by"), ("--guidance=a,b", "--guidance"),
                         ("--metrics=fid,bogus", "unknown metrics ['bogus']")):
        code, _, err = sweep(capsys, runs / "main" / "checkpoints" / "step_00000004", bad, *FAST, "--out",
                             tmp_path / "other")
        assert code == 2 and message in err, err
    code, _, err = sweep(capsys, runs / "main", "--sigma_rel=0.1", *FAST, "--out", tmp_path / "other")
    assert code == 2 and ("snapshots" in err or "not available" in err), err  # trained with the fixed EMA only
    code, stdout, _ = sweep(capsys, "--help")
    assert code == 0 and stdout.startswith(SWEEP.__globals__["__doc__"].strip()) and "--sigma_rel" in stdout


def test_two_processes_write_what_one_does(runs, tmp_path, capsys):
    """Under accelerate launch every process runs the sweep and the sample jobs split their chunks: the same samples,
    the same score (to rounding), one report."""
    one = tmp_path / "one"
    assert sweep(capsys, runs / "main", "--guidance=2.0", *FAST, "--out", one)[0] == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "scripts/sweep.py", str(runs / "main"), "--guidance=2.0",
           *FAST, f"--out={two}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best: fid") == 1  # rank 0 alone reports
    assert "2 drawn by 2 process(es)" in proc.stdout
    assert np.array_equal(npz(two / "cfg_ema_w2" / "samples.npz"), npz(one / "cfg_ema_w2" / "samples.npz"))
    # the features are extracted in shares: the statistics' sums in another order
    assert table(two)["rows"][0]["scores"]["fid"] == pytest.approx(table(one)["rows"][0]["scores"]["fid"], rel=1e-6)
