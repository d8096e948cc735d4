"""The run's log: log.txt, wandb and notices on stderr."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

log = logging.getLogger("diffusion.train")


def setup_logging(workdir: Path, is_main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_main:
        handler = logging.FileHandler(workdir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)


class WandbLogger:
    """wandb, offline unless the config says online: a run needs no account. ``mode="disabled"`` skips it.

    Offline, wandb itself is silenced (its start banner and the ~20 lines of run history and sync hints it prints at
    the end); one line of ours says where the run is and how to upload it."""

    def __init__(self, config, workdir: Path, is_main: bool):
        self.run = None
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

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def report(is_main: bool, text: str) -> None:
    """A notice for the user on stderr and in log.txt (rank 0: ``is_main``)."""
    if is_main:
        log.warning("%s", text)
        print(f"[train] {text}", file=sys.stderr)
