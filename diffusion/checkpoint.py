"""Self-describing checkpoints, and loading weights written by the original repositories.

A checkpoint written by the trainer is one directory per step::

    WORKDIR/checkpoints/step_00003000/
        model.safetensors   raw (trained) weights
        ema.safetensors     EMA weights, fp32: what sampling uses
        config.json         the resolved config of the run
        meta.json           step, model class and constructor kwargs, class names, versions
        train_state.pt      what resume needs: optimizer, grad scaler, step, RNG states (torch.load(weights_only=True))

It is written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a crash mid-save never leaves a directory
that looks finished. Released checkpoints are single files: U-ViT ``.pth`` (a plain state_dict), DiT ``.pt``
(a plain EMA state_dict, or the training format ``{"model", "ema", "opt", "args"}``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion.config import config_from_json, config_to_json

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(workdir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(workdir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.suffix != ".tmp"]
    return sorted(done, key=lambda p: int(p.name[len("step_"):]))


def latest_checkpoint(workdir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(workdir)
    return dirs[-1] if dirs else None


def _state_for_safetensors(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(workdir: str | Path, step: int, *, model_state: dict, ema_state: dict, config, meta: dict,
                    train_state: dict, keep: int = 0) -> Path:
    root = Path(workdir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = final.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_for_safetensors(model_state), tmp / "model.safetensors")
    save_file(_state_for_safetensors(ema_state), tmp / "ema.safetensors")
    (tmp / "config.json").write_text(config_to_json(config))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    torch.save(train_state, tmp / "train_state.pt")
    if final.exists():  # re-saving the same step (e.g. after a resume at that step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(workdir)[:-keep]:
            shutil.rmtree(old)
    return final


def load_checkpoint_dir(path: str | Path, weights: str = "ema"):
    """-> (state_dict, config, meta) of a trainer checkpoint directory (or a run directory: its newest)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint directory (with meta.json) nor a run directory "
                                    f"with finished checkpoints under {CHECKPOINTS}/")
        path = latest
    state = load_file(path / f"{weights}.safetensors")
    return state, config_from_json((path / "config.json").read_text()), json.loads((path / "meta.json").read_text())


def load_train_state(path: str | Path) -> dict:
    return torch.load(Path(path) / "train_state.pt", map_location="cpu", weights_only=True)


def read_weights_file(path: str | Path, prefer: str = "ema") -> dict:
    """A released or original-format weights file -> state_dict, never unpickling arbitrary objects.

    ``.safetensors`` directly; ``.pt``/``.pth`` with ``torch.load(weights_only=True)``, allowing only
    ``argparse.Namespace`` (DiT's training checkpoints pickle their args as one). From a training-format dict
    ``{"model", "ema", ...}`` the ``prefer`` entry is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and prefer in obj and isinstance(obj[prefer], dict):
        return obj[prefer]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path} is not a state_dict nor a {{'model', 'ema', ...}} training checkpoint "
                     f"(top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
