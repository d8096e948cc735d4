"""REPA in the trainer (diffusion/training/repa.py): a tiny SiT on the 8x8 digits aligned with a tiny randomly
initialised DINOv2 saved the way released weights are (a timm state dict, loaded through the real loader): the loss
terms are logged, the projectors are trained and saved beside (never inside) the weights, resume is bit-identical,
the encoder stays frozen, sample.py ignores the projectors, and the settings REPA cannot run are refused."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoint import load_train_state
from diffusion.config.cli import parse_command_line
from diffusion.errors import ConfigError
from diffusion.training.data import stream_batches
from diffusion.training.loop import Window, train, train_step
from diffusion.training.repa import images_to_uint8
from diffusion.training.run import start_run
from tests.helpers import REPO, TINY_DIT, make_tiny_dinov2

pytestmark = pytest.mark.filterwarnings("ignore::diffusion.pretrained.vision_encoders.EncoderSizeWarning")


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.pth")


def repa_sit(weights, *overrides, config: str = "configs/digits_sit.py"):
    cfg, _ = parse_command_line([f"--config={REPO / config}", *TINY_DIT, "--config.repa.encoders=dinov2-vit-s",
                                 f"--config.repa.encoder_weights={weights}", "--config.repa.layer=1",
                                 "--config.repa.projector_dim=16", *overrides])
    return cfg


def logged(workdir, name: str) -> list[float]:
    return [float(m) for m in re.findall(rf" {name} (-?[0-9.]+)", (workdir / "log.txt").read_text())]


def test_repa_trains_logs_its_terms_and_saves_the_projectors_apart(dinov2_file, tmp_path):
    final = train(repa_sit(dinov2_file, "--config.train.steps=6", "--config.train.ckpt_every=6",
                           "--config.train.log_every=3", "--config.train.sample_every=6"), tmp_path / "repa")
    assert (tmp_path / "repa" / "samples" / "step_00000006.png").is_file()  # previews as without REPA
    loss, denoise, proj = (logged(tmp_path / "repa", n) for n in ("loss", "denoise", "proj"))
    assert len(loss) == len(denoise) == len(proj) == 2
    assert all(-1.0 <= p <= 1.0 for p in proj) and all(d > 0 for d in denoise)
    for total, d, p in zip(loss, denoise, proj):  # loss = denoise + 0.5 x proj
        assert abs(total - (d + 0.5 * p)) < 2e-5
    projectors = load_file(final / "projectors.safetensors")
    assert sorted(projectors) == sorted(f"0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias"))
    assert projectors["0.0.weight"].shape == (16, 32) and projectors["0.4.weight"].shape == (64, 16)
    assert projectors["0.0.bias"].abs().max() > 0  # trained (REPA's init has zero biases)
    # The weights files are the plain backbone's: the same keys as a run without REPA.
    plain = train(repa_sit(dinov2_file, "--config.repa.encoders=", "--config.train.steps=1",
                           "--config.train.ckpt_every=1"), tmp_path / "plain")
    assert not (plain / "projectors.safetensors").exists()
    for name in ("model.safetensors", "ema.safetensors"):
        assert load_file(final / name).keys() == load_file(plain / name).keys()
    n_backbone = len(load_train_state(plain)["optimizer"]["state"])
    assert len(load_train_state(final)["optimizer"]["state"]) == n_backbone + len(projectors)
    # sample.py reads the EMA weights and ignores the projectors.
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "repa"), "--out", str(out),
                           "--labels", "3,1", "--per_class", "2", "--steps", "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0


def test_repa_resume_is_bit_identical_with_legacy_drop_and_stop(dinov2_file, tmp_path):
    """6 + 6 steps equal 12 straight: weights, EMA, projectors, optimizer state and every logged term; legacy's
    second label drop and stop_at_step=9 are on (from step 9 the logged loss is the denoising term alone)."""
    common = ["--config.train.ckpt_every=6", "--config.train.log_every=3", "--config.repa.legacy=True",
              "--config.repa.stop_at_step=9", "--config.train.global_noise=True"]
    train(repa_sit(dinov2_file, "--config.train.steps=12", *common), tmp_path / "straight")
    train(repa_sit(dinov2_file, "--config.train.steps=6", *common), tmp_path / "resumed")
    train(repa_sit(dinov2_file, "--config.train.steps=12", *common), tmp_path / "resumed")
    assert "resuming from" in (tmp_path / "resumed" / "log.txt").read_text()
    a, b = (tmp_path / run / "checkpoints" / "step_00000012" for run in ("straight", "resumed"))
    for name in ("model.safetensors", "ema.safetensors", "projectors.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    oa, ob = load_train_state(a)["optimizer"], load_train_state(b)["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in ("exp_avg",
                                                                                                 "exp_avg_sq"))
    for name in ("loss", "denoise", "proj"):
        assert logged(tmp_path / "straight", name)[-2:] == logged(tmp_path / "resumed", name)[-2:]
    loss, denoise = logged(tmp_path / "straight", "loss"), logged(tmp_path / "straight", "denoise")
    assert loss[-1] == denoise[-1] and loss[0] != denoise[0]


def test_encoder_gets_no_gradient_stays_eval_and_outside_the_trained_modules(dinov2_file, tmp_path):
    cfg = repa_sit(dinov2_file, "--config.train.steps=1", "--config.optim.warmup_steps=0")
    run, progress = start_run(cfg, tmp_path)
    encoder = run.repa.encoders[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    projectors_before = [p.detach().clone() for p in run.repa.projectors.parameters()]
    trained = {id(p) for p in run.model.parameters()}
    assert not any(id(p) in trained for p in encoder.parameters())
    assert not any(m is encoder for m in run.net.modules()) and not any(m is encoder for m in run.ema.modules())
    assert all(id(p) in trained for p in run.repa.projectors.parameters())
    batches = stream_batches(run.data.dataset, cfg.seed, run.micro_batch, 0, run.device)
    window = Window(loss_sum=torch.zeros(()), terms_sum=torch.zeros(2))
    run.model.train()
    train_step(run, batches, progress, window)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert not any(m.training for m in encoder.modules())
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(run.repa.projectors.parameters(), projectors_before))
    assert torch.isfinite(window.terms_sum).all() and window.terms_sum[1] != 0
    run.repa.tap.remove()


def test_images_go_back_to_the_datasets_uint8():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = u.float() / 127.5 - 1.0  # datasets._to_tensor
    back = images_to_uint8(x)
    assert back.shape == (1, 3, 16, 16) and torch.equal(back[:, :1], u) and torch.equal(back[:, 2:], u)


@pytest.mark.parametrize("overrides, message", [
    (["--config.diffusion.kind=vp"], "needs diffusion.kind=transport"),
    (["--config.data.name=latents", "--config.data.root=nowhere"], "REPA needs the images"),
    (["--config.train.fsdp=full_shard"], "train.fsdp"),
])
def test_refusals(dinov2_file, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(repa_sit(dinov2_file, *overrides), tmp_path)
