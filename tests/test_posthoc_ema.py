"""Post-hoc EMA (EDM2, section 3): the sigma_rel <-> gamma formulas, the power-function update and its profile, the
exact profile inner product, reconstruction from snapshots (of a tracked profile, and of a third one tracked directly
during the run), exact resume, FSDP's sharded power EMAs (uneven shards) against the unsharded ones, and
scripts/reconstruct_ema.py's checkpoint loaded by sample.py."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion.config.schema import SIGMA_REL_MAX, check_values
from diffusion.errors import ConfigError
from diffusion.registry import build_model
from diffusion.training.loop import train
from diffusion.training.posthoc_ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    power_beta,
    profile_dot,
    reconstruct_state,
    sigma_rel_to_gamma,
    solve_coefficients,
    write_snapshot,
)
from scripts import reconstruct_ema
from tests.helpers import REPO, TINY_UVIT, launch_train, tiny_config

STEPS = ["--config.train.steps=40", "--config.train.ckpt_every=20", "--config.train.log_every=20"]
POWER = ["--config.ema.kind=power", "--config.ema.snapshot_every=4"]
THREE = "--config.ema.sigma_rels=(0.05,0.1,0.075)"


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
    """40 steps tracking 0.05, 0.10 and 0.075, snapshots every 4 steps, checkpoints at 20 and 40."""
    workdir = tmp_path_factory.mktemp("power_run")
    train(tiny_config(*STEPS, *POWER, THREE), workdir)
    return workdir


def max_rel(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b|."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_sigma_rel_and_gamma_are_the_papers_formulas():
    for sigma, gamma in ((0.05, 16.97), (0.10, 6.94), (0.13, 4.60)):  # EDM2's values
        assert sigma_rel_to_gamma(sigma) == pytest.approx(gamma, abs=0.005)
    for sigma in np.linspace(0.005, 0.28, 56):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-12)
    for gamma in (0.5, 3.0, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)
    # sigma_rel is the profile's standard deviation over t: check against the moments of (g+1)/t (tau/t)^g
    gamma, tau = 6.5, np.linspace(0, 1, 2_000_001)
    p = (gamma + 1) * tau ** gamma
    mean = np.trapezoid(tau * p, tau)
    assert math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau)) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(SIGMA_REL_MAX)  # the uniform average: the widest profile
    for bad in (0.0, SIGMA_REL_MAX, 0.5, -0.1):
        with pytest.raises(ConfigError, match="sigma_rel must lie in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_product_is_the_integral_of_the_product():
    for (ta, ga), (tb, gb) in (((1.0, 6.9), (0.6, 17.0)), ((0.3, 2.0), (1.0, 10.3)), ((0.8, 4.6), (0.8, 4.6))):
        tau = np.linspace(0, min(ta, tb), 1_000_001)  # the product is 0 past the shorter profile's end
        product = (ga + 1) / ta * (tau / ta) ** ga * (gb + 1) / tb * (tau / tb) ** gb
        assert profile_dot(ta, ga, tb, gb) == pytest.approx(np.trapezoid(product, tau), rel=1e-8)
        assert profile_dot(ta, ga, tb, gb) == pytest.approx(profile_dot(tb, gb, ta, ga), rel=1e-12)
    # the time unit cancels out of the coefficients: images = steps x a constant batch give the same fit
    x1, r1 = solve_coefficients([10, 20, 10, 20], [6.9, 6.9, 17.0, 17.0], 20, 10.3)
    x2, r2 = solve_coefficients([320, 640, 320, 640], [6.9, 6.9, 17.0, 17.0], 640, 10.3)
    assert np.allclose(x1, x2, rtol=1e-9) and r1 == pytest.approx(r2, rel=1e-9) and x1.sum() == pytest.approx(1)


def test_the_update_gives_each_step_the_profiles_mass_on_its_interval():
    """beta = (1 - 1/t)^(g+1), t counted after the step: step 1 has beta 0 and step tau ends up with weight
    ((tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)), the power profile's integral over (tau - 1, tau]."""
    assert power_beta(1, 16.97) == 0.0
    net = torch.nn.Linear(3, 2)
    tracker = PowerEMA(net, torch.nn.Linear(3, 2), (0.05, 0.10))
    thetas = []
    for t in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
        thetas.append([p.detach().double().clone() for p in net.parameters()])
        tracker.update(t)
        if t == 1:
            assert all(torch.equal(a, p) for a, p in zip(tracker.averages[0], net.parameters(), strict=True))
    for gamma, avg in zip(tracker.gammas, tracker.averages, strict=True):
        w = [(tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 30 ** (gamma + 1) for tau in range(1, 31)]
        for i, a in enumerate(avg):
            expected = sum(wi * th[i] for wi, th in zip(w, thetas, strict=True))
            assert torch.allclose(a.double(), expected, atol=1e-6)


def test_a_tracked_profile_reconstructs_to_itself(power_run):
    snapshots = list_snapshots(power_run / "phema")
    assert len(snapshots) == 30 and {s.step for s in snapshots} == set(range(4, 41, 4))
    for step, sigma in ((40, 0.05), (20, 0.10), (36, 0.075)):
        state, residual, x = reconstruct_state(snapshots, step, sigma)
        direct = load_file(power_run / "phema" / f"phema-{sigma:g}-{step:08d}.safetensors")
        assert residual < 1e-6 and max_rel(state, direct) < 1e-6, (step, sigma, residual, max_rel(state, direct))


def test_an_untracked_profile_is_reconstructed_from_the_other_two(power_run):
    """0.075 tracked during the run against its reconstruction from the 0.05 and 0.10 snapshots alone (10 each).
    Measured (tiny U-ViT, 40 steps, snapshots every 4): the profiles' relative residual 0.0084 at step 40 (0.026 at
    step 20, from 5 snapshots each); the reconstructed weights off by 0.19% of the distance between the 0.05 and
    0.10 EMAs at step 40 (2.2% at step 20), at most 2e-4 of any tensor's largest entry. Asserted with 5x margin."""
    both = [s for s in list_snapshots(power_run / "phema") if s.sigma_rel in (0.05, 0.10)]
    folder = power_run / "phema"
    for step, residual_measured, tolerance in ((40, 0.00844, 0.01), (20, 0.0262, 0.11)):
        state, residual, _ = reconstruct_state(both, step, 0.075)
        assert residual == pytest.approx(residual_measured, rel=1e-2)  # the profiles alone: no weights involved
        direct, short, long = (load_file(folder / f"phema-{sigma}-{step:08d}.safetensors")
                               for sigma in ("0.075", "0.05", "0.1"))
        gap = math.sqrt(sum(((short[k] - long[k]) ** 2).sum().item() for k in direct))
        error = math.sqrt(sum(((state[k] - direct[k]) ** 2).sum().item() for k in direct))
        assert error < tolerance * gap, (step, error / gap)
    just_one = [s for s in both if s.sigma_rel == 0.05]  # one profile alone cannot make another: residual 0.19
    assert reconstruct_state(just_one, 40, 0.075)[1] > 10 * 0.00844


def test_resuming_a_power_ema_run_is_bit_identical(power_run, tmp_path):
    train(tiny_config(*STEPS[1:], "--config.train.steps=20", *POWER, THREE), tmp_path)
    train(tiny_config(*STEPS, *POWER, THREE), tmp_path)
    assert "resuming from" in (tmp_path / "log.txt").read_text()
    for name in ("phema.safetensors", "ema.safetensors", "model.safetensors"):
        a, b = (load_file(d / "checkpoints" / "step_00000040" / name) for d in (power_run, tmp_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    phema = load_file(tmp_path / "checkpoints" / "step_00000040" / "phema.safetensors")
    assert {k.split("/")[0] for k in phema} == {"0.05", "0.1", "0.075"}
    for path in sorted((power_run / "phema").glob("phema-*.safetensors")):
        a, b = load_file(path), load_file(tmp_path / "phema" / path.name)
        assert all(torch.equal(a[k], b[k]) for k in a), path.name


def test_the_ema_section_is_checked_and_snapshots_store_their_dtype(tmp_path):
    bad = tiny_config("--config.ema.kind=powr", "--config.ema.sigma_rels=(0.05,0.4)", "--config.ema.snapshot_every=-1",
                      "--config.ema.snapshot_dtype=fp8")
    with pytest.raises(ConfigError) as err:
        check_values(bad)
    for text in ("unknown ema.kind 'powr'", "ema.sigma_rels must be distinct", "ema.snapshot_every must be",
                 "unknown ema.snapshot_dtype 'fp8'"):
        assert text in str(err.value)
    check_values(tiny_config())  # the default: fixed, as before
    state = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    path = write_snapshot(tmp_path, state, 8, 0.1, sigma_rel_to_gamma(0.1), "bf16")
    with safe_open(path, "pt") as f:
        assert f.metadata()["step"] == "8" and float(f.metadata()["gamma"]) == sigma_rel_to_gamma(0.1)
        assert f.get_tensor("w").dtype == torch.bfloat16
    (snapshot,) = list_snapshots(tmp_path)
    combined, _, _ = reconstruct_state([snapshot], 8, 0.1)
    assert combined["w"].dtype == torch.float32 and torch.equal(combined["w"], state["w"].bfloat16().float())


def test_reconstruct_ema_writes_a_checkpoint_that_sample_py_loads(power_run, tmp_path, capsys):
    out = tmp_path / "ema_0.06"
    assert reconstruct_ema.main([str(power_run), "--sigma_rel", "0.06", "--step", "32", "--out", str(out)]) == 0
    assert f"checkpoint {out}" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 32 and meta["posthoc_ema"]["sigma_rel"] == 0.06 and meta["model_name"] == "uvit"
    assert {s["file"] for s in meta["posthoc_ema"]["snapshots"]} == {
        f"phema-{s}-{t:08d}.safetensors" for s in ("0.05", "0.1", "0.075") for t in range(4, 33, 4)}
    grid = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out), "--out", str(grid), "--labels", "3,1",
                           "--per_class", "2", "--steps", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and grid.is_file(), proc.stderr[-2000:]
    for argv, message in (([str(power_run), "--sigma_rel", "0.3"], "sigma_rel must lie in"),
                          ([str(tmp_path), "--sigma_rel", "0.1"], "no post-hoc EMA snapshots"),
                          ([str(power_run), "--sigma_rel", "0.1", "--step", "44"], "outside the snapshots")):
        assert reconstruct_ema.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_sharded_power_emas_equal_the_unsharded_ones(tmp_path):
    """FSDP over 2 CPU processes (a label table of 11 rows and a qkv of 3 x 33: uneven shards) against one
    unsharded process of the same global batch, and the unsharded step-2 checkpoint resumed with FSDP: the power
    EMAs of the checkpoints and the snapshots agree to fp32 rounding (measured: 1.1e-6 of each tensor's scale)."""
    model = ["--config.model.embed_dim=33", "--config.model.num_heads=3"]
    run = [*model, "--config.train.steps=4", "--config.train.ckpt_every=2", "--config.ema.kind=power",
           "--config.ema.snapshot_every=2"]
    net = build_model(tiny_config(*run).model)
    assert any(p.shape[0] % 2 for p in net.parameters())
    fsdp = ["--config=configs/digits_uvit.py", *TINY_UVIT, *run, "--config.train.fsdp=full_shard"]
    launch_train(tmp_path / "fsdp", *fsdp)
    train(tiny_config(*run), tmp_path / "single")
    shutil.copytree(tmp_path / "single" / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    launch_train(tmp_path / "resumed", *fsdp)
    for d in ("fsdp", "resumed"):
        assert "sharded (full_shard)" in (tmp_path / d / "log.txt").read_text()
    assert "resuming from" in (tmp_path / "resumed" / "log.txt").read_text()
    single = tmp_path / "single"
    for d, steps in (("fsdp", (2, 4)), ("resumed", (4,))):
        for step in steps:
            phema = f"checkpoints/step_{step:08d}/phema.safetensors"
            assert max_rel(load_file(tmp_path / d / phema), load_file(single / phema)) < 1e-5, (d, step)
            for sigma in ("0.05", "0.1"):
                name = f"phema/phema-{sigma}-{step:08d}.safetensors"
                assert max_rel(load_file(tmp_path / d / name), load_file(single / name)) < 1e-5, (d, name)


def test_power_ema_without_snapshots_says_so(tmp_path, capsys):
    """Tracking without snapshots leaves nothing to reconstruct from: the run says so once, and writes none."""
    train(tiny_config("--config.train.steps=2", "--config.train.ckpt_every=2", "--config.ema.kind=power"), tmp_path)
    assert "ema.snapshot_every=0: the power EMAs are tracked but no snapshot is written" in capsys.readouterr().err
    assert not list(tmp_path.glob("phema/phema-*.safetensors"))
