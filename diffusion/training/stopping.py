"""One run per working directory, and stopping on signals after a checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusion import checkpoint as ckpt


@contextmanager
def workdir_lock(workdir: Path):
    """Rank 0 holds ``workdir/train.lock`` for the whole run, taken before any collective so that a refused run
    ends at once (the other ranks of its launch are then stopped by the launcher)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock = ckpt.WorkdirLock(workdir)
    note = lock.acquire()
    if note:
        print(f"[train] {note}", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None on processes other than rank 0)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}")


class StopRequest:
    """Handlers for what schedulers send before a time limit or preemption (SIGTERM, SIGUSR1) and for Ctrl-C
    (SIGINT): the first signal asks the loop to save and stop at the next step boundary; another one more than
    ``REPEAT_GRACE`` seconds later exits at once without saving (status 128 + signal number). Repeats within the
    grace period count as the same request: launchers (torchrun, accelerate launch) forward a terminal's Ctrl-C to
    workers that have received it already."""

    REPEAT_GRACE = 2.0

    def __init__(self):
        self.signal_name: str | None = None
        self._first = 0.0
        self._previous: dict = {}
        self._speak = int(os.environ.get("RANK", "0")) == 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self._first = name, time.monotonic()
            self._say(f"{name}: saving a checkpoint at the end of this step (a signal 2 s later or more exits at "
                      f"once, without saving)")
        elif time.monotonic() - self._first > self.REPEAT_GRACE:
            self._say(f"{name} again: exiting now without saving")
            os._exit(128 + signum)

    def _say(self, text: str) -> None:
        if self._speak:  # os.write: a handler may interrupt a print() to the same stream
            os.write(2, f"\n[train] {text}\n".encode())

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop. A collective (max) with several processes, so that all of them
        stop after the same step; one scalar per step."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor(float(self.signal_name is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="max").item() > 0


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the main process. A terminal's Ctrl-C and a scheduler's SIGTERM
    reach the whole process group; a worker killed by one would end the run before its checkpoint is saved."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
