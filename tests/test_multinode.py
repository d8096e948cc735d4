"""Training past one machine as SLURM launches it (scripts/slurm/, docs/multinode.md): the torchrun arguments taken
from SLURM's variables, two "nodes" on this machine equal to one process with the global batch, each process on its
own rank, device and data shard, and the time-limit warning saving, requeueing and resuming bit-identically.
SLURM itself is faked: scontrol, srun and scancel on PATH, recording their calls; tasks are processes here."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoint import checkpoint_dirs, load_train_state, verify_checkpoint
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_UVIT, logged_losses, one_thread, tiny_config

STEPS = 100  # long enough for the warning to land mid-run (it stops within a step or two; ~10 ms a step here)
ARGS = [*TINY_UVIT, "--config.data.num_workers=0", "--config.data.random_flip=True", "--config.train.log_every=5",
        f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={STEPS}"]
TRAIN_ARGS = ["--config=configs/digits_uvit.py", *ARGS]

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM/calls"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; fi
"""
# One task per node, all on this machine, each in its own session: the process group scancel signals.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM/calls"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 setsid "$@" &
    pids+=("$!")
    echo "$!" >> "$FAKE_SLURM/tasks"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
sig=TERM
for arg; do case $arg in --signal=*) sig=${arg#--signal=} ;; esac; done
while read -r group; do kill -s "$sig" -- "-$group" 2>/dev/null; done < "$FAKE_SLURM/tasks"
"""
# train.py, recording what this process was given and what it chose: the launch variables, its rank and device, the
# process holding the workdir lock, and the training-stream positions it read.
PROBE = """import json, os, sys
sys.path.insert(0, {repo!r})
import train
from diffusion.data.stream import StreamItems
from diffusion.training import loop

record = {{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                                          "MASTER_PORT")}}
positions = record["positions"] = []
read = StreamItems.__getitem__
StreamItems.__getitem__ = lambda self, key: positions.append(key[0]) or read(self, key)
train_loop = loop.train_loop

def probed_loop(run, progress, stop):
    lock = run.workdir / "train.lock"
    record.update(rank=run.rank, local_rank=run.accelerator.local_process_index, world=run.world,
                  device=str(run.device), device_ids=getattr(run.model, "device_ids", None), pid=os.getpid(),
                  lock_pid=json.loads(lock.read_text())["pid"])
    return train_loop(run, progress, stop)

loop.train_loop = probed_loop
code = train.main(sys.argv[1:])
with open(os.path.join(os.environ["PROBE_DIR"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(record, f)
sys.exit(code)
"""


def fake_slurm(root: Path, nodes: int, job_id: int, hosts: str = "localhost localhost") -> dict:
    """The environment of a SLURM job of ``nodes`` nodes with fake SLURM commands first on PATH (calls recorded in
    ``root/calls``); one process per node, one torch thread each."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (root / "tasks").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NPROC", "PET_"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_SLURM": str(root), "FAKE_HOSTS": hosts,
            "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_SUBMIT_DIR": str(REPO), "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60",
            "CUDA_VISIBLE_DEVICES": ""}  # both "nodes" share this machine: DDP over gloo, not two ranks on one GPU


def calls(env: dict) -> list[str]:
    path = Path(env["FAKE_SLURM"]) / "calls"
    return path.read_text().splitlines() if path.is_file() else []


def free_job_id() -> int:
    """A job id whose derived port (15000 + id % 15000, launch_env.sh) is free now."""
    for _ in range(100):
        port = random.randrange(15000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 15000 * 40 + port - 15000
    raise RuntimeError("no free port in 15000-29999")


def stop_leftovers(env: dict, *processes: subprocess.Popen) -> None:
    """After a failure: end the fake srun's tasks (torchrun ends its processes on SIGTERM) and ``processes``."""
    for group in (Path(env["FAKE_SLURM"]) / "tasks").read_text().split():
        try:
            os.killpg(int(group), signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys()
        diff = max((sa[k] - sb[k]).abs().max().item() for k in sa)
        assert diff <= atol, (name, diff)


# ----------------------------------------------------------------------------------------------------------
# The torchrun arguments of a node, from SLURM's variables
# ----------------------------------------------------------------------------------------------------------


def torchrun_args(root: Path, **variables) -> subprocess.CompletedProcess:
    env = {**fake_slurm(root, 4, 123456, hosts="gpu07 gpu08 gpu09 gpu10"), "SLURM_NODEID": "1", **variables}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(["bash", "-c", ". scripts/slurm/launch_env.sh && slurm_torchrun_args"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("variables, expected", [
    ({"NPROC_PER_NODE": None, "SLURM_GPUS_ON_NODE": "8"}, "--nproc_per_node=8 --master_addr=gpu07 --master_port=18456"),
    ({"NPROC_PER_NODE": None, "SLURM_GPUS_PER_NODE": "h100:4"}, "--nproc_per_node=4 --master_addr=gpu07"),
    ({"NPROC_PER_NODE": None, "SLURM_NTASKS_PER_NODE": "2"}, "--nproc_per_node=2 --master_addr=gpu07"),
    ({"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}, "--nproc_per_node=1 --master_addr=10.0.0.7 "
                                                          "--master_port=29500"),
], ids=["gpus-on-node", "gpus-per-node-typed", "tasks-per-node", "given-address"])
def test_a_nodes_torchrun_arguments_come_from_slurms_variables(tmp_path, variables, expected):
    proc = torchrun_args(tmp_path, **variables)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--nnodes=4 --node_rank=1 ") and expected in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("--max_restarts=0")
    asked = [c for c in calls({"FAKE_SLURM": str(tmp_path)}) if c.startswith("scontrol")]
    assert asked == ([] if "MASTER_ADDR" in variables else ["scontrol show hostnames node[01-02]"])


@pytest.mark.parametrize("variables, message", [
    ({"SLURM_NODEID": None}, "SLURM_NODEID is not set: run this inside a SLURM job"),
    ({"NPROC_PER_NODE": "h100"}, "cannot tell the processes per node from 'h100': set NPROC_PER_NODE"),
    ({"FAKE_HOSTS": ""}, "'scontrol show hostnames node[01-02]' printed no host name"),
])
def test_a_launch_outside_a_job_or_without_hosts_is_one_clear_error(tmp_path, variables, message):
    proc = torchrun_args(tmp_path, **variables)
    assert proc.returncode == 2 and f"[slurm] {message}" in proc.stderr and proc.stdout == "", proc.stderr


# ----------------------------------------------------------------------------------------------------------
# Two nodes on this machine
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """node.sh run twice as srun runs it on two nodes (SLURM_NODEID 0 and 1, the first node's address from the fake
    scontrol, the port from the job id), training the probe: (workdir, environment, each rank's record)."""
    root = tmp_path_factory.mktemp("two_nodes")
    env = {**fake_slurm(root / "slurm", 2, free_job_id()), "PROBE_DIR": str(root),
           "TRAIN_SCRIPT": str(root / "probe.py")}
    (root / "probe.py").write_text(PROBE.format(repo=str(REPO)))
    cmd = ["bash", "scripts/slurm/node.sh", *TRAIN_ARGS, f"--workdir={root / 'run'}"]
    with open(root / "node0.err", "w") as err:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(cmd, cwd=REPO, env={**env, "SLURM_NODEID": "0"}, stdout=subprocess.DEVNULL,
                                 stderr=err)
        try:
            second = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_NODEID": "1"}, capture_output=True,
                                    text=True, timeout=240)
            first.wait(timeout=60)
        except BaseException:
            stop_leftovers(env, first)
            raise
    assert first.returncode == 0 and second.returncode == 0, ((root / "node0.err").read_text()[-3000:],
                                                              second.stderr[-3000:])
    records = [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)]
    return root / "run", env, records


def test_two_nodes_of_one_process_equal_one_process_with_the_global_batch(two_nodes, tmp_path):
    workdir, env, records = two_nodes
    port = str(15000 + int(env["SLURM_JOB_ID"]) % 15000)
    for node, record in enumerate(records):
        assert (record["MASTER_ADDR"], record["MASTER_PORT"], record["GROUP_RANK"]) == ("localhost", port, str(node))
    assert calls(env) == ["scontrol show hostnames node[01-02]"] * 2  # each node asked for the first host
    with one_thread():
        train(tiny_config(*ARGS), tmp_path / "one")
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_weights(workdir / final, tmp_path / "one" / final, atol=1e-6)
    assert np.allclose(logged_losses(workdir), logged_losses(tmp_path / "one"), rtol=1e-5)
    assert "2 process(es), micro-batch 16 x 1 accum" in (workdir / "log.txt").read_text()

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert files(workdir) == files(tmp_path / "one")  # rank 1 wrote nothing; no lock left behind


def test_each_node_trains_on_its_own_rank_device_and_data_shard(two_nodes):
    """LOCAL_RANK is 0 on both nodes and RANK 0 and 1: a process that took its device index from the global rank
    (DiT's ``device_ids=[rank]``: accelerate's local process index is the GPU index), its data shard from the local
    rank, or the workdir lock on every node's first process would fail here."""
    _, _, records = two_nodes
    for rank, record in enumerate(records):
        assert (record["RANK"], record["LOCAL_RANK"], record["WORLD_SIZE"]) == (str(rank), "0", "2")
        assert (record["rank"], record["local_rank"], record["world"]) == (rank, 0, 2)
        # accelerate's device index is the local process index modulo the node's devices: cuda:LOCAL_RANK on a
        # GPU node, cpu:0 here (CPU DDP wraps the model without device_ids)
        assert record["device"] == "cpu:0" and record["device_ids"] is None
        assert record["lock_pid"] == records[0]["pid"] != records[1]["pid"]  # rank 0 alone holds the lock
        # the sampler deals rank r the global stream positions r, r + 2, ...: 16 per step
        assert record["positions"] == list(range(rank, 32 * STEPS, 2))


# ----------------------------------------------------------------------------------------------------------
# The time-limit warning: save, requeue, resume
# ----------------------------------------------------------------------------------------------------------


def test_the_warning_signal_saves_requeues_and_the_requeued_job_resumes_bit_identically(two_nodes, tmp_path):
    """SIGUSR1 to the batch shell (sbatch --signal=B:USR1@120) -> SIGTERM to every node's torchrun -> every process
    saves at the same step; the script requeues the job, whose second run (same command) ends where the two nodes'
    run that never stopped ended."""
    uninterrupted, _, _ = two_nodes
    env = fake_slurm(tmp_path / "slurm", 2, free_job_id())
    job = env["SLURM_JOB_ID"]
    workdir = tmp_path / "run"
    # run from elsewhere, as sbatch runs its copy of the script: the script finds the repository by SLURM_SUBMIT_DIR
    cmd = ["bash", str(REPO / "scripts/slurm/train.sbatch"), *TRAIN_ARGS, f"--workdir={workdir}"]
    stderr = tmp_path / "job.err"
    with open(stderr, "w") as out:
        batch = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=out)
        try:
            log = workdir / "log.txt"
            deadline = time.monotonic() + 120
            while not (log.is_file() and "step 5 loss" in log.read_text()):
                assert batch.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
                time.sleep(0.02)
            batch.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@120 sends, to the batch shell alone
            batch.wait(timeout=120)
        except BaseException:
            stop_leftovers(env, batch)
            raise
    err = stderr.read_text()
    assert batch.returncode == 0, err[-3000:]
    (saved,) = checkpoint_dirs(workdir)
    step = int(saved.name[len("step_"):])
    assert 5 <= step < STEPS, "the run ended before the warning reached it"
    assert f"[train] stopped by SIGTERM at step {step}: checkpoint saved in {saved}" in err
    assert f"[slurm] stopped on SIGUSR1 (srun exit 1): requeueing job {job}" in err
    verify_checkpoint(saved)
    assert load_train_state(saved)["samples_seen"] == 32 * step and not (workdir / "train.lock").exists()
    srun, scancel, requeue = calls(env)[1:]
    assert srun.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash scripts/slurm/")
    assert (scancel, requeue) == (f"scancel --signal=TERM {job}", f"scontrol requeue {job}")

    (tmp_path / "slurm" / "tasks").write_text("")
    requeued = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                              text=True, timeout=240)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"[slurm] job {job} (restart 1): 2 node(s) x 1 process(es)" in requeued.stderr
    assert f"resuming from {saved} (step {step})" in requeued.stderr
    assert not [c for c in calls(env) if "requeue" in c][1:]  # a finished run is not requeued
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_weights(workdir / final, uninterrupted / final, atol=0.0)
    oa, ob = load_train_state(workdir / final)["optimizer"], load_train_state(uninterrupted / final)["optimizer"]
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in ("exp_avg",
                                                                                               "exp_avg_sq"))
