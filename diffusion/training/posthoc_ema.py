"""Post-hoc EMA (Karras et al., CVPR 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
section 3 and appendix): power-function EMAs tracked during training, their snapshots, and the least-squares
reconstruction of the EMA of any length from those snapshots after training (``scripts/reconstruct_ema.py``).

A power-function EMA with exponent gamma averages the weights of times tau <= t with the profile
``p(tau) = (gamma + 1) / t * (tau / t)^gamma``, whose relative width (standard deviation / t) is ``sigma_rel``. The
per-step update is ``avg <- beta avg + (1 - beta) theta`` with ``beta = (1 - 1/t)^(gamma + 1)``, t the optimizer
steps done after the step (EDM2 counts images; with the constant batch of a run, steps give the same beta), so the
first step has beta = 0. Step tau's weights then get exactly the profile's mass on ``(tau - 1, tau]``: the tracked
average is the continuous power-function average of the piecewise constant trajectory, and reconstruction is a
least-squares problem in the space of profiles, with the exact inner product of two profiles.

Snapshots: every ``ema.snapshot_every`` steps each tracked profile is written to
``WORKDIR/phema/phema-SIGMA-STEP.safetensors`` (a full state dict, ``ema.snapshot_dtype``; step, sigma_rel and gamma
in the metadata) atomically. Each checkpoint carries the profiles' current fp32 state (``phema.safetensors``), so a
resumed run continues bit-identically. With FSDP the averages are shards placed like the parameters (the update is
local); gathering them for a snapshot or a checkpoint is a collective every process joins in the same order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from diffusion import checkpoint as ckpt
from diffusion.config.loading import config_from_json
from diffusion.config.schema import SIGMA_REL_MAX, SNAPSHOT_DTYPES
from diffusion.errors import CheckpointError, ConfigError, InputError, InputNotFoundError
from diffusion.files import write_atomic
from diffusion.training.distributed import full_state, shard_tensor_like

SNAPSHOTS = "phema"  # WORKDIR/phema/: the snapshots, and the reconstructions by default
TORCH_DTYPES = dict(zip(SNAPSHOT_DTYPES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


# ----------------------------------------------------------------------------------------------------------
# The mathematics (float64)
# ----------------------------------------------------------------------------------------------------------


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma`` (EDM2, eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of ``sigma_rel`` in (0, 1/sqrt(12)): the largest real root of
    ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)``, the cubic that ``gamma_to_sigma_rel(g) = s`` is."""
    check_sigma_rel(sigma_rel)
    s2 = sigma_rel ** -2
    coefficients = (1.0, 7.0, 16.0 - s2, 12.0 - s2)
    roots = np.roots(coefficients)
    g = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r))))
    for _ in range(3):  # Newton on the cubic: the companion-matrix roots to full float64 precision
        value = ((g + 7.0) * g + 16.0 - s2) * g + 12.0 - s2
        g -= value / ((3.0 * g + 14.0) * g + 16.0 - s2)
    return g


def check_sigma_rel(sigma_rel: float) -> None:
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (the uniform average over the whole run "
                          f"is 1/sqrt(12) = {SIGMA_REL_MAX:.4f}; EDM2 uses 0.01-0.25), got {sigma_rel!r}")


def power_beta(t: int, gamma: float) -> float:
    """The decay of the update that brings the power-function average to time ``t`` (steps done, >= 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """The inner product (integral over tau of the product) of the power-function profiles (t_a, gamma_a) and
    (t_b, gamma_b), elementwise over broadcast arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
            / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)))


def solve_coefficients(ts, gammas, t_out: float, gamma_out: float) -> tuple[np.ndarray, float]:
    """(x, residual): the least-squares combination sum_i x_i p_i of the profiles (ts[i], gammas[i]) closest to the
    profile (t_out, gamma_out), normalised to sum to 1, and its relative residual ||target - sum x_i p_i|| /
    ||target|| (computed from the same inner products)."""
    ts, gammas = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_dot(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    target = profile_dot(ts, gammas, t_out, gamma_out)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    x = x / x.sum()
    norm2 = float(profile_dot(t_out, gamma_out, t_out, gamma_out))
    error2 = norm2 - 2.0 * float(x @ target) + float(x @ gram @ x)
    return x, math.sqrt(max(error2, 0.0) / norm2)


# ----------------------------------------------------------------------------------------------------------
# Tracking during training
# ----------------------------------------------------------------------------------------------------------


class PowerEMA:
    """One power-function EMA per ``sigma_rels`` of ``net``'s parameters (fp32, plain or sharded like them), with
    ``template`` (the run's unsharded EMA module) giving the state dict's names and order; snapshots every
    ``snapshot_every`` steps (0: none) stored as ``snapshot_dtype``."""

    def __init__(self, net: torch.nn.Module, template: torch.nn.Module, sigma_rels, snapshot_every: int = 0,
                 snapshot_dtype: str = "fp32"):
        self.net, self.template = net, template
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = [name for name, _ in template.named_parameters()]
        self.snapshot_every, self.snapshot_dtype = snapshot_every, snapshot_dtype
        self.averages = []
        self.reset()

    @torch.no_grad()
    def reset(self, which: tuple[int, ...] | None = None) -> None:
        """Start the averages (all, or the indices ``which``) at the network's current weights."""
        params = list(self.net.parameters())
        if len(params) != len(self.names):
            raise ValueError(f"the network has {len(params)} parameters, its EMA template {len(self.names)}")
        fresh = [[p.detach().float().clone() for p in params] for _ in self.gammas]
        self.averages = fresh if which is None else [fresh[k] if k in which else avg
                                                     for k, avg in enumerate(self.averages)]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Bring every average to time ``t`` (the steps done, counting the one just taken)."""
        params = [p.detach().float() for p in self.net.parameters()]
        for gamma, avg in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(avg, params, 1.0 - power_beta(t, gamma))

    def states(self) -> list[dict[str, torch.Tensor]]:
        """Each profile's full state dict on the CPU (parameters averaged, buffers the network's). A collective
        with FSDP: every process calls it."""
        template = self.template.state_dict()
        index = {name: i for i, name in enumerate(self.names)}
        buffers = dict(self.net.named_buffers())
        out = []
        for avg in self.averages:
            state = full_state({k: avg[index[k]] if k in index else buffers.get(k, template[k]) for k in template})
            out.append({k: v.detach().cpu() for k, v in state.items()})
        return out

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The averages for a checkpoint's ``phema.safetensors``: ``"SIGMA_REL/name"`` -> fp32 (a collective)."""
        return {f"{s!r}/{k}": v for s, state in zip(self.sigma_rels, self.states(), strict=True)
                for k, v in state.items() if k in self.names}

    @torch.no_grad()
    def load_checkpoint_state(self, saved: dict[str, torch.Tensor] | None) -> list[float]:
        """Restore the averages from a checkpoint's state; returns the sigma_rels it lacked (those start at the
        network's current weights)."""
        params = list(self.net.parameters())
        missing = [k for k, s in enumerate(self.sigma_rels)
                   if saved is None or any(f"{s!r}/{name}" not in saved for name in self.names)]
        self.reset(tuple(missing))
        for k, s in enumerate(self.sigma_rels):
            if k not in missing:
                self.averages[k] = [shard_tensor_like(saved[f"{s!r}/{name}"].to(p.device).float().clone(), p)
                                    for name, p in zip(self.names, params, strict=True)]
        return [self.sigma_rels[k] for k in missing]

    def maybe_snapshot(self, step: int, workdir: Path, is_main: bool) -> list[Path]:
        """Write every profile's snapshot when ``step`` is a snapshot step (a collective then)."""
        if self.snapshot_every <= 0 or step % self.snapshot_every:
            return []
        states, paths = self.states(), []
        if is_main:
            for s, gamma, state in zip(self.sigma_rels, self.gammas, states, strict=True):
                paths.append(write_snapshot(Path(workdir) / SNAPSHOTS, state, step, s, gamma, self.snapshot_dtype))
        return paths


def build_power_ema(ema_config, net: torch.nn.Module, template: torch.nn.Module) -> PowerEMA | None:
    """The run's power-function EMAs when ``ema.kind`` is "power", else None."""
    if ema_config.kind != "power":
        return None
    return PowerEMA(net, template, ema_config.sigma_rels, ema_config.snapshot_every, ema_config.snapshot_dtype)


# ----------------------------------------------------------------------------------------------------------
# Snapshot files
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: which profile, at which step, stored how."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    dtype: str


def snapshot_path(folder: Path, sigma_rel: float, step: int) -> Path:
    return Path(folder) / f"phema-{sigma_rel:g}-{step:08d}.safetensors"


def write_snapshot(folder: Path, state: dict, step: int, sigma_rel: float, gamma: float, dtype: str) -> Path:
    """``state`` (a full state dict) stored as ``dtype`` in ``folder``, written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = snapshot_path(folder, sigma_rel, step)
    tensors = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in state.items()}
    meta = {"step": str(step), "sigma_rel": repr(float(sigma_rel)), "gamma": repr(float(gamma)), "dtype": dtype,
            "time_unit": "optimizer steps"}
    data = safetensors.torch.save(tensors, metadata=meta)
    write_atomic(path, lambda f: f.write(data))
    return path


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots in ``folder`` (their headers only), by step then sigma_rel."""
    found = []
    for path in sorted(Path(folder).glob("phema-*.safetensors")):
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            found.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]),
                                  meta.get("dtype", "fp32")))
        except Exception as err:  # noqa: BLE001 -- any failure to read the header means this file is unusable
            raise CheckpointError(f"{path} is not a post-hoc EMA snapshot ({type(err).__name__}: {err}): move it "
                                  f"out of {folder}") from None
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


# ----------------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------------


def reconstruct_state(snapshots: list[Snapshot], step: int,
                      sigma_rel: float) -> tuple[dict, float, list[tuple[Snapshot, float]]]:
    """(state dict, relative residual, (snapshot, coefficient) of each snapshot used): the EMA profile (step,
    sigma_rel) as the least-squares combination of the ``snapshots`` with 0 < step_i <= ``step``, accumulated in
    fp32."""
    used = [s for s in snapshots if 0 < s.step <= step]
    if not used:
        raise InputError(f"no post-hoc EMA snapshot at or before step {step}")
    x, residual = solve_coefficients([s.step for s in used], [s.gamma for s in used], step,
                                     sigma_rel_to_gamma(sigma_rel))
    total: dict[str, torch.Tensor] = {}
    for snapshot, weight in zip(used, x.tolist(), strict=True):
        state = safetensors.torch.load_file(snapshot.path)
        if total and state.keys() != total.keys():
            raise InputError(f"{snapshot.path} holds other weights than {used[0].path}: snapshots of two runs in one "
                             f"folder?")
        for k, v in state.items():
            term = v.float() * weight
            total[k] = total[k] + term if k in total else term
    return total, residual, list(zip(used, x.tolist(), strict=True))


def run_checkpoint(run_dir: Path, step: int) -> Path:
    """The run's checkpoint at ``step`` if there is one, else its newest: where the config and meta come from."""
    exact = run_dir / ckpt.CHECKPOINTS / f"step_{step:08d}"
    found = exact if exact.is_dir() else ckpt.latest_checkpoint(run_dir)
    if found is None:
        raise InputNotFoundError(f"{run_dir} has no checkpoint under {ckpt.CHECKPOINTS}/ to take the model's config "
                                 f"and description from")
    return found


def reconstruct_checkpoint(run_dir, sigma_rel: float, step: int | None = None,
                           out=None) -> tuple[Path, float]:
    """Reconstruct the EMA of relative width ``sigma_rel`` at ``step`` (default: the newest snapshot's) of the run in
    ``run_dir`` from its snapshots, saved as a checkpoint directory that sampling loads like a trainer's (``out``,
    default ``RUN/phema/ema-SIGMA-step_STEP``); returns (its path, the fit's relative residual)."""
    run_dir = Path(run_dir)
    check_sigma_rel(float(sigma_rel))
    snapshots = list_snapshots(run_dir / SNAPSHOTS)
    if not snapshots:
        raise InputNotFoundError(f"{run_dir} has no post-hoc EMA snapshots under {run_dir / SNAPSHOTS}: train with "
                                 f"--config.ema.kind=power --config.ema.snapshot_every=N")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else int(step)
    if not steps[0] <= step <= steps[-1]:
        raise InputError(f"--step {step} is outside the snapshots of {run_dir} (steps {steps[0]} to {steps[-1]})")
    state, residual, weights = reconstruct_state(snapshots, step, float(sigma_rel))
    source = run_checkpoint(run_dir, step)
    meta = ckpt.verify_checkpoint(source, ("config.json",))
    config = config_from_json((source / "config.json").read_text())
    record = {"sigma_rel": float(sigma_rel), "gamma": sigma_rel_to_gamma(float(sigma_rel)), "step": step,
              "residual": residual, "description_from": str(source),
              "snapshots": [{"file": s.path.name, "coefficient": c} for s, c in weights]}
    meta = {k: v for k, v in meta.items() if k != "files"} | {"step": step, "posthoc_ema": record}
    out = Path(out) if out else run_dir / SNAPSHOTS / f"ema-{float(sigma_rel):g}-step_{step:08d}"
    ckpt.save_sampling_checkpoint(out, ema_state=state, config=config, meta=json.loads(json.dumps(meta)))
    return out, residual
