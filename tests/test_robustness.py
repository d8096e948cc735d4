"""Runs that survive signals, shared workdirs, bad input and damaged files; multi-process training equals one
process. Real subprocesses (train.py, torchrun) on the tiny digits U-ViT of tests/test_train.py."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train as train_py
from diffusion.checkpoint import (
    checkpoint_dirs,
    load_checkpoint_dir,
    load_train_state,
    verify_checkpoint,
)
from diffusion.config.cli import parse_command_line
from diffusion.config.schema import check_values
from diffusion.data.datasets import build_dataset
from diffusion.data.stream import StreamItems
from diffusion.errors import CheckpointError, ConfigError, WorkdirBusyError
from diffusion.training.loop import train
from diffusion.training.stopping import WorkdirLock
from diffusion.weights import read_weights_file
from tests.helpers import REPO, TINY_UVIT, logged_losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
COMMON = [*TINY_UVIT, "--config.train.log_every=5", "--config.data.random_flip=True"]  # flips: position-seeded items
TRAIN_PY = [sys.executable, "train.py", "--config=configs/digits_uvit.py", *COMMON]


def tiny(*overrides):
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_uvit.py'}", *COMMON, *overrides])
    return cfg


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys()
        diff = max((sa[k] - sb[k]).abs().max().item() for k in sa)
        assert diff <= atol, (name, diff)


def main_train(capsys, *argv) -> tuple[int, str]:
    """train.py's main() in this process: (exit status, stderr)."""
    capsys.readouterr()
    code = train_py.main([f"--config={REPO / 'configs/digits_uvit.py'}", *COMMON, *argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A run stopped at its step-2 checkpoint: the starting point of the resume tests (copy before changing)."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(tiny("--config.train.steps=2", "--config.train.ckpt_every=2"), workdir)
    return workdir


def copy_run(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 1), (signal.SIGINT, 0)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_a_step_boundary_and_the_run_resumes_bit_identically(tmp_path, sig, workers):
    """SIGTERM goes to the whole process group, DataLoader worker included (as a scheduler or a terminal sends it);
    SIGINT to the trainer alone."""
    work = tmp_path / "stopped"
    common = ["--config.train.ckpt_every=100000", f"--config.data.num_workers={workers}"]
    proc = subprocess.Popen([*TRAIN_PY, "--config.train.steps=100000", *common, f"--workdir={work}"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = work / "log.txt"
    wait_for(lambda: log.is_file() and "step 5 loss" in log.read_text())
    if workers:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == train_py.EXIT_STOPPED, err[-2000:]
    (saved,) = checkpoint_dirs(work)
    step = int(saved.name[len("step_"):])
    assert f"stopped by {sig.name} at step {step}: checkpoint saved in {saved}" in err and "Traceback" not in err
    verify_checkpoint(saved)
    assert load_train_state(saved)["samples_seen"] == 32 * step
    assert not (work / "train.lock").exists()

    end = step + 7  # resume (train.steps is a change a resume accepts) and compare with a run that never stopped
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): CPU reductions depend on the thread count
    try:
        train(tiny(f"--config.train.steps={end}", *common), work)
        train(tiny(f"--config.train.steps={end}", *common), tmp_path / "straight")
    finally:
        torch.set_num_threads(threads)
    a, b = work / "checkpoints" / f"step_{end:08d}", tmp_path / "straight" / "checkpoints" / f"step_{end:08d}"
    assert_same_weights(a, b)
    oa, ob = load_train_state(a)["optimizer"], load_train_state(b)["optimizer"]
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])


def test_a_repeated_signal_exits_at_once_and_launcher_echoes_do_not(tmp_path):
    code = """
import os, signal, time
from diffusion.training.stopping import StopRequest
StopRequest.REPEAT_GRACE = 0.5
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGINT)  # within the grace period: the same request (a launcher's echo)
    time.sleep(0.1)
    print("requested", stop.signal_name, flush=True)
    time.sleep(0.6)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
print("not reached")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "requested SIGUSR1" in proc.stdout and "not reached" not in proc.stdout
    assert "SIGTERM again: exiting now without saving" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------------------------------------


def test_a_second_run_in_a_locked_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    holder = WorkdirLock(work)
    holder.acquire()  # a live run: this very process
    code, err = main_train(capsys, "--config.train.steps=1", f"--workdir={work}")
    assert code == 2 and "Traceback" not in err
    assert f"workdir {work} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}" in err
    assert f"delete {work / 'train.lock'}" in err and checkpoint_dirs(work) == []
    holder.release()
    assert not (work / "train.lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    code, err = main_train(capsys, "--config.train.steps=1", f"--workdir={work}")
    assert code == 0, err
    assert f"took over the stale lock {work / 'train.lock'}" in err and f"process {dead.pid} is not running" in err
    assert not (work / "train.lock").exists()  # released at the end


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    lock = tmp_path / WorkdirLock.NAME
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(WorkdirBusyError, match="host elsewhere, pid 1"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - WorkdirLock.STALE_AFTER - 1
    os.utime(lock, (old, old))
    taker = WorkdirLock(tmp_path)
    assert "no heartbeat for" in taker.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()


# ----------------------------------------------------------------------------------------------------------
# Config changes on resume
# ----------------------------------------------------------------------------------------------------------

REFUSED = {
    "train.batch_size": "16",
    "seed": "1",
    "diffusion.kind": "sd_discrete",
    "optim.betas": "(0.5, 0.9)",
    "optim.weight_decay": "0.1",
    "data.random_flip": "False",
    "cond.p_uncond": "0.2",
    "train.ema_decay": "0.9",
    "train.global_noise": "False",
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_resume_refuses_a_change_that_alters_the_run_and_its_suggested_fix_works(base_run, tmp_path, key):
    work = copy_run(base_run, tmp_path)
    changed = f"--config.{key}={REFUSED[key]}"
    with pytest.raises(ConfigError, match=rf"resuming .*step_00000002 with a changed config: {re.escape(key)}: ") as e:
        train(tiny("--config.train.steps=2", changed), work)
    message = str(e.value)
    assert "--allow_config_change" in message and "another --workdir" in message
    restore = shlex.split(message.split("restore them: ")[1].split("; to start")[0])
    assert train(tiny("--config.train.steps=2", changed, *restore), work).name == "step_00000002"


def test_resume_refuses_another_model_naming_the_keys(base_run, tmp_path):
    work = copy_run(base_run, tmp_path)
    with pytest.raises(ConfigError, match=r"different model .*model.embed_dim: 32 -> 48.*--config.model.embed_dim=32"):
        train(tiny("--config.train.steps=2", "--config.model.embed_dim=48"), work)
    with pytest.raises(ConfigError, match=r"model.safetensors does not fit the configured model"):
        train(tiny("--config.train.steps=2", "--config.model.embed_dim=48"), work, allow_config_change=True)


def test_resume_accepts_and_logs_harmless_changes(base_run, tmp_path):
    work = copy_run(base_run, tmp_path)
    train(tiny("--config.train.steps=4", "--config.optim.lr=1e-3", "--config.train.log_every=1",
               "--config.train.grad_accum_steps=2", "--config.sample.steps=3", "--config.train.ckpt_every=4"), work)
    log = (work / "log.txt").read_text()
    assert "config changes since step_00000002: optim.lr: 0.002 -> 0.001; sample.steps: 4 -> 3; train.ckpt_every: " \
           "2 -> 4; train.grad_accum_steps: 1 -> 2; train.log_every: 5 -> 1; train.steps: 2 -> 4" in log
    assert load_train_state(checkpoint_dirs(work)[-1])["step"] == 4


def test_allow_config_change_continues_from_the_samples_consumed(base_run, tmp_path, capsys):
    work = copy_run(base_run, tmp_path)
    code, err = main_train(capsys, "--config.train.steps=4", "--config.train.batch_size=16",
                           "--config.train.ckpt_every=4", f"--workdir={work}", "--allow_config_change")
    assert code == 0, err
    assert "(accepted by --allow_config_change): train.batch_size: 32 -> 16" in err
    assert load_train_state(work / "checkpoints" / "step_00000004")["samples_seen"] == 2 * 32 + 2 * 16


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
    work = tmp_path / "run"
    train(tiny("--config.train.steps=4", "--config.train.ckpt_every=2"), work)
    intact = tmp_path / "step4"
    shutil.copytree(work / "checkpoints" / "step_00000004", intact)
    damaged = work / "checkpoints" / "step_00000004" / "ema.safetensors"
    truncate(damaged)
    (work / "checkpoints" / "step_00000006.tmp").mkdir()  # a save killed half-way

    with pytest.raises(CheckpointError, match=f"{re.escape(str(damaged))} is truncated or damaged"):
        load_checkpoint_dir(work)  # what sample.py reads
    capsys.readouterr()
    assert sample.main([f"--ckpt={work}", f"--out={tmp_path / 'grid.png'}"]) == 2
    err = capsys.readouterr().err
    assert f"{damaged} is truncated or damaged" in err and "--ckpt=" in err and "Traceback" not in err

    code, err = main_train(capsys, "--config.train.steps=4", "--config.train.ckpt_every=2", f"--workdir={work}")
    assert code == 0, err
    assert f"skipping damaged checkpoint step_00000004: {damaged} is truncated or damaged" in err
    assert f"removed {work / 'checkpoints' / 'step_00000006.tmp'}" in err
    assert f"resuming from {work / 'checkpoints' / 'step_00000002'} (step 2)" in err
    assert_same_weights(work / "checkpoints" / "step_00000004", intact)  # retrained to the same weights
    assert [p.name for p in (work / "checkpoints").iterdir()] != [] and not list(work.glob("checkpoints/*.tmp"))


def test_a_bit_flip_is_detected_by_checksum(base_run, tmp_path):
    work = copy_run(base_run, tmp_path)
    path = work / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify_checkpoint(path.parent)
    assert load_checkpoint_dir(work)[0].keys()  # the EMA weights alone are still intact


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error, exit 2, a fix that works as written, earlier checkpoints intact
# ----------------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("--config.train.steps=0", "train.steps must be >= 1"),
    ("--config.train.steps=-5", "train.steps must be >= 1"),
    ("--config.train.ckpt_every=0", "train.ckpt_every must be >= 1"),
    ("--config.train.log_every=0", "train.log_every must be >= 1"),
    ("--config.train.batch_size=0", "train.batch_size must be >= 1"),
    ("--config.train.mixed_precision=bf61", "unknown train.mixed_precision 'bf61'"),
    ("--config.data.on_corrupt=skp", "unknown data.on_corrupt 'skp'"),
]


@pytest.mark.parametrize("bad, message", BAD_VALUES, ids=[b for b, _ in BAD_VALUES])
def test_bad_values_are_one_clear_error_with_a_working_fix(base_run, tmp_path, capsys, bad, message):
    work = copy_run(base_run, tmp_path)
    code, err = main_train(capsys, "--config.train.steps=2", bad, f"--workdir={work}")
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
    fix = re.findall(r"--config\.[\w.]+=[^\s;,)]+", err)[-1]
    assert fix.split("=")[0] == bad.split("=")[0]
    check_values(tiny("--config.train.steps=2", bad, fix))  # the suggested flag, as written, fixes it
    verify_checkpoint(work / "checkpoints" / "step_00000002")
    assert [p.name for p in checkpoint_dirs(work)] == ["step_00000002"]


def test_config_file_mistakes_name_file_and_line(tmp_path, capsys):
    header = "from diffusion.config.schema import base_config\n\n"
    broken = tmp_path / "broken.py"
    broken.write_text(header + "def get_config(:\n    return base_config()\n")
    raising = tmp_path / "raising.py"
    raising.write_text(header + "def get_config():\n    return base_confg()\n")
    for path, expected in ((broken, f"{broken}:3: syntax error in the config file: invalid syntax"),
                           (raising, f"{raising}:4: the config file raised NameError")):
        capsys.readouterr()
        assert train_py.main([f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_help_lists_flags_and_the_configs_keys(capsys):
    proc = subprocess.run([sys.executable, "train.py", "--help", "--config=configs/digits_uvit.py",
                           "--config.train.steps=7"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("--allow_config_change", "--workdir=DIR", "Exit status", "--config.train.steps=7",
                 "--config.data.on_corrupt=skip", "'--config.optim.betas=[0.9, 0.99]'", "diffusion.beta_max"):
        assert text in proc.stdout, text
    assert train_py.main(["--help"]) == 0 and "Add --config=FILE" in capsys.readouterr().out
    assert sample.main(["--help", "--config=configs/digits_dit.py"]) == 0
    out = capsys.readouterr().out
    assert "--ckpt" in out and "--config.model.hidden_size=" in out


class NotWeights:
    """Some object a .pt file may pickle besides tensors."""


def test_damaged_and_foreign_weights_files_are_named_without_torch_advice(base_run, tmp_path, capsys):
    ckpt = copy_run(base_run, tmp_path) / "checkpoints" / "step_00000002"
    loose = tmp_path / "ema.safetensors"
    shutil.copy(ckpt / "ema.safetensors", loose)
    truncate(loose)

    torch.save({"ema": NotWeights()}, tmp_path / "object.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {loose: f"{loose} is not a readable safetensors file",
             tmp_path / "object.pt": "NotWeights, which is never unpickled here",
             tmp_path / "notes.pt": f"{tmp_path / 'notes.pt'} is not a readable PyTorch checkpoint",
             tmp_path / "list.pt": "holds no weights"}
    for path, expected in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            read_weights_file(path)
        capsys.readouterr()
        code = sample.main([f"--ckpt={path}", f"--config={REPO / 'configs/digits_uvit.py'}", *TINY_UVIT,
                            f"--out={tmp_path / 'g.png'}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "weights_only" not in err and "Traceback" not in err
        assert "expected a state_dict" in err or "safetensors" in expected

    capsys.readouterr()  # weights of another architecture: the keys that do not fit are named
    assert sample.main([f"--ckpt={ckpt}", "--config.model.embed_dim=48", f"--out={tmp_path / 'g.png'}"]) == 2
    assert "does not fit the configured UViT" in capsys.readouterr().err


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_a_failed_save_is_one_clear_error_and_keeps_earlier_checkpoints(base_run, tmp_path):
    work = copy_run(base_run, tmp_path)
    before = (work / "checkpoints" / "step_00000002" / "meta.json").read_text()
    proc = subprocess.run([*TRAIN_PY, "--config.train.steps=4", "--config.train.ckpt_every=2", f"--workdir={work}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert f"could not write checkpoint {work / 'checkpoints' / 'step_00000004'}" in err and "Traceback" not in err
    assert "the disk (or quota) is full" in err and "earlier checkpoints are intact (newest: step_00000002)" in err
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["step_00000002"]  # no .tmp left
    verify_checkpoint(work / "checkpoints" / "step_00000002")
    assert (work / "checkpoints" / "step_00000002" / "meta.json").read_text() == before


# ----------------------------------------------------------------------------------------------------------
# Unreadable images
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, Path]:
    """ImageFolder train/{a,b}/ with three images each and one truncated JPEG (the fourth of class b)."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                tmp_path / "images" / "train" / cls / f"{i}.png")
    bad = tmp_path / "images" / "train" / "b" / "3_truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(bad, format="JPEG")
    truncate(bad)
    return tmp_path / "images", bad


IMAGES = ["--config.data.name=imagenet", "--config.data.split=train", "--config.data.image_size=8",
          "--config.model.in_chans=3", "--config.model.num_classes=3", "--config.model.null_label=2",
          "--config.train.batch_size=4", "--config.train.log_every=2"]


def test_unreadable_images_are_replaced_deterministically_and_counted(image_folder, tmp_path, capsys):
    root, bad = image_folder
    cfg = tiny(*IMAGES, f"--config.data.root={root}")
    items = StreamItems(build_dataset(cfg.data), seed=0)
    bad_index = 6  # ImageFolder order: a/0..2, b/0..2, b/3_truncated
    replaced = items[(5, bad_index)]
    assert str(bad) in replaced["skipped"] and torch.equal(replaced["x"], items[(5, 0)]["x"])
    assert torch.equal(items[(9, 1)]["x"], items[(9, 1)]["x"]) and items[(9, 1)]["skipped"] == ""

    code, err = main_train(capsys, *IMAGES, f"--config.data.root={root}", "--config.train.steps=4",
                           "--config.train.ckpt_every=4", f"--workdir={tmp_path / 'run'}")
    assert code == 0, err
    skipped = int(re.search(r"(\d+) unreadable images were skipped", err).group(1))
    assert skipped >= 2 and err.count(f"skipped an unreadable image, the next readable one took its place: "
                                      f"cannot read image file {bad}") == skipped  # 16 draws from 7 items
    assert f"{skipped} unreadable images skipped so far" in (tmp_path / "run" / "log.txt").read_text()

    code, err = main_train(capsys, *IMAGES, f"--config.data.root={root}", "--config.train.steps=4",
                           "--config.data.on_corrupt=error", f"--workdir={tmp_path / 'strict'}")
    assert code == 2 and f"cannot read image file {bad}" in err and "--config.data.on_corrupt=skip" in err
    assert "Traceback" not in err and checkpoint_dirs(tmp_path / "strict") == []


# ----------------------------------------------------------------------------------------------------------
# World-size invariance
# ----------------------------------------------------------------------------------------------------------


def test_two_processes_of_b_equal_one_process_of_2b(tmp_path):
    """torchrun, gloo, one thread per process: per-process batch 16 x 2 == batch 32, and only rank 0 writes."""
    steps = ["--config.train.steps=10", "--config.train.ckpt_every=10"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--config=configs/digits_uvit.py", *COMMON, *steps,
                           f"--workdir={tmp_path / 'two'}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny(*steps), tmp_path / "one")
    assert_same_weights(tmp_path / "two" / "checkpoints" / "step_00000010",
                        tmp_path / "one" / "checkpoints" / "step_00000010", atol=1e-6)
    two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert len(two) == len(one) == 2 and np.allclose(two, one, rtol=1e-5)  # the global mean, not / world size
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 process(es), micro-batch 16 x 1 accum" in log and log.count("step 10 loss") == 1

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert files(tmp_path / "two") == files(tmp_path / "one")  # nothing from rank 1, no lock left behind


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    steps = ["--config.train.steps=5", "--config.train.ckpt_every=5"]
    train(tiny(*steps, "--config.train.grad_accum_steps=2"), tmp_path / "accum")
    train(tiny(*steps), tmp_path / "big")
    assert_same_weights(tmp_path / "accum" / "checkpoints" / "step_00000005",
                        tmp_path / "big" / "checkpoints" / "step_00000005", atol=1e-6)
