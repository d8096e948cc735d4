"""Weights files and strict loading: :func:`read_weights_file` reads a released or original-format weights file
without unpickling arbitrary objects, and :func:`load_state_strict` loads a state dict into a module or an optimizer
with one error that says what does not fit.

Released checkpoints are single files: U-ViT ``.pth`` (a plain state_dict), DiT ``.pt`` (a plain EMA state_dict, or
the training format ``{"model", "ema", "opt", "args"}``); ``.safetensors`` files hold a plain state_dict.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion.errors import CheckpointError, ConfigError, InputNotFoundError, UnsafeWeightsError

# ----------------------------------------------------------------------------------------------------------
# Loading a state dict strictly, with one error that says what does not fit
# ----------------------------------------------------------------------------------------------------------


def _listing(name: str, keys: list[str]) -> str:
    return f"{name} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"


def _module_mismatches(module: torch.nn.Module, state: dict) -> str:
    """The keys and shapes of ``state`` that do not fit ``module``, listed; empty when everything fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    return "; ".join(_listing(name, keys) for name, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches (file vs model)", shapes)) if keys)


def load_state_strict(target, state: dict, source: str | Path, what: str = "model", hint: str = "") -> None:
    """``target.load_state_dict(state)`` for a module or an optimizer, strictly. What does not fit is one
    ConfigError, ``"{source} does not fit the configured {what}: {findings}{hint}"``: for a module the missing,
    unexpected and mis-shaped keys; otherwise (an optimizer) torch's own findings. No raw traceback."""
    findings = _module_mismatches(target, state) if isinstance(target, torch.nn.Module) else ""
    if not findings:
        try:
            target.load_state_dict(state)
            return
        except (RuntimeError, ValueError, KeyError) as err:
            findings = "; ".join(line.strip() for line in str(err).splitlines()[-3:] if line.strip())
    raise ConfigError(f"{source} does not fit the configured {what}: {findings}{hint}")


# ----------------------------------------------------------------------------------------------------------
# Released and original-format weights
# ----------------------------------------------------------------------------------------------------------

EXPECTED_WEIGHTS = ("expected a state_dict of tensors (.safetensors, or a U-ViT/DiT .pth/.pt), or DiT's training "
                    "checkpoint {'model', 'ema', 'opt', 'args'}")


def read_weights_file(path: str | Path, prefer: str = "ema") -> dict:
    """A released or original-format weights file -> state_dict, never unpickling arbitrary objects.

    ``.safetensors`` directly; ``.pt``/``.pth`` with ``torch.load(weights_only=True)``, allowing only
    ``argparse.Namespace`` (DiT's training checkpoints pickle their args as one). From a training-format dict
    ``{"model", "ema", ...}`` the ``prefer`` entry is returned. Unreadable, truncated and foreign files raise
    CheckpointError naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError: the file is not usable either way
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); a truncated download or "
                                  f"copy? Fetch it again") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, KeyError, EOFError
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the class or function it refused
        if found:
            raise UnsafeWeightsError(f"{path} is not a weights file: it pickles {found.group(1)}, which is never "
                                     f"unpickled here; {EXPECTED_WEIGHTS}") from None
        unpickler = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))  # not torch's advice, only its reason
        reason = unpickler.group(1).strip() if unpickler else str(err).split(". ")[0] or type(err).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); a truncated download or "
                              f"a file of another kind? {EXPECTED_WEIGHTS}") from None
    if isinstance(obj, dict) and prefer in obj and isinstance(obj[prefer], dict):
        return obj[prefer]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if prefer != "ema":  # a plain state_dict is one set of weights (the released files: EMA); say so, not "raw"
            raise CheckpointError(f"{path} is a plain state_dict, one set of weights: choosing {prefer!r} weights "
                                  f"applies to training checkpoints {{'model', 'ema', ...}} only; drop --ema false")
        return obj
    raise CheckpointError(f"{path} holds no weights ({EXPECTED_WEIGHTS}; top-level "
                          f"{f'keys: {list(obj)[:8]}' if isinstance(obj, dict) else type(obj).__name__})")
