"""One run per working directory (its lock file, held by rank 0), and stopping on signals after a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusion.errors import WorkdirBusyError

# ----------------------------------------------------------------------------------------------------------
# One run per working directory
# ----------------------------------------------------------------------------------------------------------


class WorkdirLock:
    """``WORKDIR/train.lock``: host, pid and start time of the run using the directory, created atomically
    (O_CREAT | O_EXCL). The holder touches it every ``HEARTBEAT`` seconds from a daemon thread. A lock is stale, and
    taken over, when its process is dead on this host or it has not been touched for ``STALE_AFTER`` seconds (a run
    killed on another machine); two processes racing to take over the same stale lock can both succeed (rare)."""

    NAME = "train.lock"
    HEARTBEAT = 60.0
    STALE_AFTER = 300.0

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / self.NAME
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises WorkdirBusyError."""
        note = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder, stale = self._holder()
                if stale is None or note is not None:
                    raise WorkdirBusyError(
                        f"workdir {self.path.parent} is in use by another run ({holder}; lock file {self.path}). "
                        f"Use another --workdir, or wait for that run to end; if it is dead, delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)
                note = f"took over the stale lock {self.path} of {holder} ({stale})"
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return note

    def _holder(self) -> tuple[str, str | None]:
        """(description of the holder, why its lock is stale or None while it is live)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
            host, pid = holder["host"], int(holder["pid"])
        except FileNotFoundError:
            return "a run that just ended", "the lock is gone"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown run (unreadable lock)", "unreadable lock" if age > 10 else None
        who = f"host {host}, pid {pid}, started {holder.get('started', '?')}"
        if host == socket.gethostname() and not _pid_alive(pid):
            return who, f"process {pid} is not running"
        if age > self.STALE_AFTER:
            return who, f"no heartbeat for {age:.0f} s"
        return who, None

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def workdir_lock(workdir: Path):
    """Rank 0 holds ``workdir/train.lock`` for the whole run, taken before any collective so that a refused run
    ends at once (the other ranks of its launch are then stopped by the launcher)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock = WorkdirLock(workdir)
    note = lock.acquire()
    if note:
        print(f"[train] {note}", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------
# Stopping on signals
# ----------------------------------------------------------------------------------------------------------

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
