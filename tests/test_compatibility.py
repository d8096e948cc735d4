"""Files written by the main before the package was split into layers (tests/fixtures/legacy_main, made by commit
dfabe43: see tests/fixtures/README.md) still load and resume: its checkpoint continues training, and its
half-finished sample job completes with exactly the samples the old code drew."""

from __future__ import annotations

import json
import shutil

import numpy as np

import sample
from diffusion.training.loop import train
from tests.helpers import FIXTURES, logged_losses, tiny_config

LEGACY = FIXTURES / "legacy_main"
# The old run and job were made with these settings (the README of the fixtures gives the commands).
JOB = ["--n_samples=6", "--chunk_size=2", "--batch_size=2", "--steps=100", "--sampler=ddim"]


def legacy_copy(tmp_path):
    """The legacy workdir and job under tmp_path; the job record names its checkpoint by path, so it is re-pointed."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "checkpoints", run / "checkpoints")
    for name in ("job.parts", "job.job.json"):
        (shutil.copytree if name.endswith("parts") else shutil.copy)(LEGACY / name, tmp_path / name)
    record = json.loads((tmp_path / "job.job.json").read_text())
    record["settings"]["checkpoint"] = str((run / "checkpoints" / "step_00000002").resolve())
    (tmp_path / "job.job.json").write_text(json.dumps(record, indent=2))
    return run


def test_a_legacy_sample_job_resumes_with_the_old_samples(tmp_path, capsys):
    run = legacy_copy(tmp_path)
    code = sample.main([f"--ckpt={run / 'checkpoints' / 'step_00000002'}", f"--out={tmp_path / 'job.npz'}", *JOB,
                        "--device=cpu"])
    assert code == 0 and "1 of 3 chunks reused" in capsys.readouterr().out
    new, old = np.load(tmp_path / "job.npz"), np.load(LEGACY / "complete.npz")
    assert sorted(new.files) == sorted(old.files) == ["arr_0", "arr_1"]
    assert all(np.array_equal(new[k], old[k]) for k in old.files)


def test_a_legacy_checkpoint_resumes_training(tmp_path):
    run = legacy_copy(tmp_path)
    final = train(tiny_config("--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.log_every=2"),
                  run)
    log = (run / "log.txt").read_text()
    assert "resuming from" in log and "step_00000002 (step 2)" in log
    assert final.name == "step_00000004" and len(logged_losses(run)) == 1
