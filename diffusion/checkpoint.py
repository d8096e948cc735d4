"""Self-describing checkpoints (weights files of the original repositories and the strict state-dict loader:
:mod:`diffusion.weights`; the run directory's lock: :mod:`diffusion.training.stopping`).

A checkpoint written by the trainer is one directory per step::

    WORKDIR/checkpoints/step_00003000/
        model.safetensors   raw (trained) weights
        ema.safetensors     EMA weights, fp32: what sampling uses
        config.json         the resolved config of the run
        train_state.pt      what resume needs: optimizer, grad scaler, step, samples consumed (weights_only load)
        projectors.safetensors  REPA runs only: the alignment projectors (training only; sampling never reads it)
        phema.safetensors   ema.kind=power only: the power-function EMAs' current state, "SIGMA_REL/name" -> fp32
                            (what resume needs; the snapshots that post-hoc EMA reconstructs from are in WORKDIR/phema)
        meta.json           step, model class and constructor kwargs, class names, versions, and the sha256 and
                            size of each file above, so that damage is detected rather than trained or sampled on

It is written to ``step_XXXXXXXX.tmp`` (files fsync'ed) and renamed when complete, so a crash mid-save never
leaves a directory that looks finished; a failed save removes its ``.tmp`` and leaves earlier checkpoints as they
were. Released checkpoints are single files, read by :func:`diffusion.weights.read_weights_file`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion.config.loading import config_from_json, config_to_json
from diffusion.errors import (
    CheckpointError,
    CheckpointSaveError,
    InputNotFoundError,
)

CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "config.json", "train_state.pt")
OPTIONAL_FILES = ("projectors.safetensors", "phema.safetensors")  # verified and read when meta.json records them
_STEP_DIR = re.compile(r"step_(\d+)")


# ----------------------------------------------------------------------------------------------------------
# Finding, writing and verifying checkpoints
# ----------------------------------------------------------------------------------------------------------


def checkpoint_dirs(workdir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (``.tmp`` directories of interrupted saves are not)."""
    root = Path(workdir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(done, key=lambda p: int(p.name[len("step_"):]))


def latest_checkpoint(workdir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(workdir)
    return dirs[-1] if dirs else None


def remove_stale_tmp(workdir: str | Path) -> list[Path]:
    """Delete ``.tmp`` directories left by saves that never finished (a killed run); returns them."""
    root = Path(workdir) / CHECKPOINTS
    stale = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_for_safetensors(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _write_files(tmp: Path, model_state: dict, ema_state: dict, config, meta: dict, train_state: dict,
                 projectors_state: dict | None = None, phema_state: dict | None = None) -> dict:
    save_file(_state_for_safetensors(model_state), tmp / "model.safetensors")
    save_file(_state_for_safetensors(ema_state), tmp / "ema.safetensors")
    (tmp / "config.json").write_text(config_to_json(config))
    torch.save(train_state, tmp / "train_state.pt")
    names = CHECKPOINT_FILES
    if projectors_state is not None:
        save_file(_state_for_safetensors(projectors_state), tmp / "projectors.safetensors")
        names = (*names, "projectors.safetensors")
    if phema_state is not None:
        save_file(_state_for_safetensors(phema_state), tmp / "phema.safetensors")
        names = (*names, "phema.safetensors")
    files = {}
    for name in names:
        _fsync(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    return files


def save_checkpoint(workdir: str | Path, step: int, *, model_state: dict, ema_state: dict, config, meta: dict,
                    train_state: dict, keep: int = 0, projectors_state: dict | None = None,
                    phema_state: dict | None = None) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically; ``keep > 0`` then deletes all but the newest ``keep``.
    ``projectors_state``: a REPA run's projectors, written to ``projectors.safetensors`` beside the weights;
    ``phema_state``: the power-function EMAs of ema.kind=power, written to ``phema.safetensors``.

    Any failure while writing (a full disk raises OSError in Python, RuntimeError in torch.save, SafetensorError in
    safetensors) removes the ``.tmp`` and raises CheckpointSaveError; finished checkpoints are never touched."""
    root = Path(workdir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = final.with_suffix(".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = _write_files(tmp, model_state, ema_state, config, meta, train_state, projectors_state, phema_state)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "files": files}, indent=2))
        _fsync(tmp / "meta.json")
    except Exception as err:  # noqa: BLE001 -- whatever failed, the half-written directory must go; a full disk
        # is named by its message: OSError, torch's RuntimeError and safetensors' error all carry the strerror
        shutil.rmtree(tmp, ignore_errors=True)
        full = any(os.strerror(code) in str(err) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
        hint = "the disk (or quota) is full: free space" if full else "check the disk"
        older = latest_checkpoint(workdir)
        raise CheckpointSaveError(
            f"could not write checkpoint {final} ({type(err).__name__}: {err}); {hint} under {root} and rerun the "
            f"same command. The partial {tmp.name} was removed; earlier checkpoints are intact"
            f"{f' (newest: {older.name})' if older else ''}.") from err
    if final.exists():  # re-saving the same step (e.g. after a resume at that step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(workdir)[:-keep]:
            shutil.rmtree(old)
    return final


def save_sampling_checkpoint(path: str | Path, *, ema_state: dict, config, meta: dict) -> Path:
    """A checkpoint directory that sampling loads like a trainer's (``ema.safetensors``, ``config.json``,
    ``meta.json`` with their checksums) but that does not resume (no optimizer state): a post-hoc EMA
    reconstruction. Written to ``PATH.tmp`` and renamed over an earlier one; CheckpointSaveError on failure."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_state_for_safetensors(ema_state), tmp / "ema.safetensors")
        (tmp / "config.json").write_text(config_to_json(config))
        files = {}
        for name in ("ema.safetensors", "config.json"):
            _fsync(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2))
        _fsync(tmp / "meta.json")
    except Exception as err:  # noqa: BLE001 -- whatever failed, the half-written directory must go
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(f"could not write {path} ({type(err).__name__}: {err}); check the disk") from err
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def verify_checkpoint(path: str | Path, names: tuple[str, ...] = CHECKPOINT_FILES) -> dict:
    """meta.json of checkpoint ``path``, after checking size and sha256 of the files ``names`` against it (with the
    default ``names``, also of each of ``OPTIONAL_FILES`` that meta.json records).

    Raises CheckpointError naming the first missing, truncated or damaged file."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'meta.json'} is unreadable ({err}): the checkpoint is incomplete") from None
    records = meta.get("files", {})
    if names == CHECKPOINT_FILES:
        names = (*names, *(name for name in OPTIONAL_FILES if name in records))
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
        if name not in records:
            raise CheckpointError(f"{path / 'meta.json'} records no size and sha256 of {name}: the checkpoint is "
                                  f"incomplete")
        size, expected = file.stat().st_size, records[name]
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} is truncated or damaged: {size} bytes, meta.json records "
                                  f"{expected['bytes']}")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is damaged: its sha256 differs from the one recorded in meta.json")
    return meta


@dataclass
class Checkpoint:
    """Everything a trainer checkpoint holds, read and verified."""

    path: Path
    model: dict
    ema: dict
    train_state: dict
    config: object
    meta: dict
    projectors: dict | None = None  # a REPA run's projectors (projectors.safetensors), None when absent
    phema: dict | None = None  # an ema.kind=power run's power EMAs (phema.safetensors), None when absent


def _read(file: Path, reader):
    try:
        return reader(file)
    except Exception as err:  # noqa: BLE001 -- any reader's failure means the same thing: this file is unusable
        raise CheckpointError(f"{file} is unreadable ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Verify (unless another process just did) and read every file of a trainer checkpoint; CheckpointError names
    the file that is not usable."""
    path = Path(path)
    meta = verify_checkpoint(path) if verify else json.loads((path / "meta.json").read_text())
    projectors, phema = path / "projectors.safetensors", path / "phema.safetensors"
    return Checkpoint(path=path, model=_read(path / "model.safetensors", load_file),
                      ema=_read(path / "ema.safetensors", load_file),
                      train_state=_read(path / "train_state.pt", _torch_load),
                      config=_read(path / "config.json", lambda f: config_from_json(f.read_text())), meta=meta,
                      projectors=_read(projectors, load_file) if "projectors.safetensors" in meta.get("files", {})
                      else None,
                      phema=_read(phema, load_file) if "phema.safetensors" in meta.get("files", {}) else None)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself (it holds meta.json) or, for a run directory, its newest
    finished checkpoint; an InputNotFoundError when it is neither."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise InputNotFoundError(f"{path} is neither a checkpoint directory (with meta.json) nor a run directory "
                                 f"with finished checkpoints under {CHECKPOINTS}/")
    return latest


def load_checkpoint_dir(path: str | Path, weights: str = "ema"):
    """-> (state_dict, config, meta) of a trainer checkpoint directory (or a run directory: its newest), after
    verifying the weights and config files against the checksums in its meta.json."""
    path = resolve_checkpoint_dir(path)
    try:
        meta = verify_checkpoint(path, (f"{weights}.safetensors", "config.json"))
    except CheckpointError as err:
        others = [p for p in checkpoint_dirs(path.parent.parent) if p != path]  # run/checkpoints/step_X
        hint = f"; pass another checkpoint directory, e.g. --ckpt={others[-1]}" if others else ""
        raise CheckpointError(f"{err}{hint}") from None
    state = _read(path / f"{weights}.safetensors", load_file)
    return state, config_from_json((path / "config.json").read_text()), meta


def _torch_load(file: Path):
    return torch.load(file, map_location="cpu", weights_only=True)


def load_train_state(path: str | Path) -> dict:
    return _torch_load(Path(path) / "train_state.pt")
