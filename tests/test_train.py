"""The training loop end to end on the bundled digits: learning, checkpoints, exact resume, sampling, errors."""

import io
import json
import os
import platform
import re
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from diffusion.checkpoint import checkpoint_dirs, load_train_state
from diffusion.config.cli import parse_command_line
from diffusion.errors import ConfigError
from diffusion.registry import build_model
from diffusion.training import run as training_run
from diffusion.training.loop import Window, off_the_clock, train
from diffusion.training.pieces import learning_rate
from diffusion.training.speed import cpu_has_native_bf16
from tests.helpers import REPO, TINY_UVIT, logged_losses, tiny_config


def test_loss_decreases_and_checkpoint_is_self_describing(tmp_path):
    final = train(tiny_config("--config.train.steps=120", "--config.train.log_every=20",
                              "--config.train.ckpt_every=60"), tmp_path)
    losses = logged_losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000060", "step_00000120"]
    assert final == tmp_path / "checkpoints" / "step_00000120"
    assert {p.name for p in final.iterdir()} >= {"model.safetensors", "ema.safetensors", "config.json", "meta.json",
                                                  "train_state.pt"}
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 120 and meta["model_name"] == "uvit" and meta["image_shape"] == [1, 8, 8]
    assert meta["model_kwargs"]["embed_dim"] == 32 and meta["class_names"] == [str(i) for i in range(10)]
    state = load_train_state(final)  # weights_only=True
    assert state["step"] == 120 and state["optimizer"]["state"][0]["step"] == 120
    ema, raw = load_file(final / "ema.safetensors"), load_file(final / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert not torch.equal(ema["decoder_pred.weight"], raw["decoder_pred.weight"])  # EMA lags the raw weights
    assert (tmp_path / "samples" / "step_00000120.png").is_file()


def test_resume_continues_exactly(tmp_path):
    """A run stopped at step 10 and restarted with the same command ends bit-identical to an unbroken run."""
    common = ["--config.train.ckpt_every=10", "--config.train.log_every=5"]
    train(tiny_config("--config.train.steps=20", *common), tmp_path / "straight")
    train(tiny_config("--config.train.steps=10", *common), tmp_path / "resumed")
    assert "starting from scratch" in (tmp_path / "resumed" / "log.txt").read_text()
    train(tiny_config("--config.train.steps=20", *common), tmp_path / "resumed")
    assert "resuming from" in (tmp_path / "resumed" / "log.txt").read_text()
    a = tmp_path / "straight" / "checkpoints" / "step_00000020"
    b = tmp_path / "resumed" / "checkpoints" / "step_00000020"
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    oa, ob = load_train_state(a)["optimizer"], load_train_state(b)["optimizer"]
    assert ob["state"][0]["step"] == 20
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_resume_refuses_a_different_model(tmp_path):
    train(tiny_config("--config.train.steps=2", "--config.train.ckpt_every=2"), tmp_path)
    with pytest.raises(ValueError, match="different model"):
        train(tiny_config("--config.train.steps=4", "--config.model.embed_dim=64"), tmp_path)


@pytest.mark.parametrize("global_noise", [True, False])
def test_gradient_accumulation_matches_big_batch(tmp_path, global_noise):
    base = ["--config.train.steps=3", "--config.train.ckpt_every=3", "--config.optim.warmup_steps=0",
            f"--config.train.global_noise={global_noise}"]
    train(tiny_config(*base), tmp_path / "one")
    train(tiny_config(*base, "--config.train.grad_accum_steps=4"), tmp_path / "four")
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000003" / "model.safetensors")
    b = load_file(tmp_path / "four" / "checkpoints" / "step_00000003" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    if global_noise:  # the same data and the same draws per sample: equal up to float summation order
        assert diff < 1e-5
    else:  # each micro-batch draws its own noise and times: close, not equal
        assert 0 < diff < 5e-2


def test_sample_py_writes_labelled_grid(tmp_path):
    train(tiny_config("--config.train.steps=5", "--config.train.ckpt_every=5"), tmp_path)
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "sample.py", "--ckpt", str(tmp_path), "--out", str(out), "--labels", "3,1,4",
           "--per_class", "5", "--steps", "3", "--seed", "7"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    cell = 48 + 2  # 8x8 digits upscaled to 48 px, 2 px padding
    assert image.size[1] == 3 * cell + 2 and image.size[0] > 5 * cell  # 3 rows, 5 columns + label margin
    first = out.read_bytes()
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.read_bytes() == first  # same seed, same grid
    bad = subprocess.run(cmd[:6] + ["--labels", "12"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "out of range" in bad.stderr


def test_missing_dataset_is_one_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/cifar10_uvit_s2.py",
                           f"--config.data.root={tmp_path / 'nowhere'}", "--config.train.mixed_precision=no",
                           "--config.wandb.mode=disabled", f"--workdir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(tmp_path / "nowhere") in proc.stderr
    assert "download" in proc.stderr


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = tiny_config("--config.train.steps=50", "--config.train.log_every=5", "--config.optim.lr=1e30",
                      "--config.optim.warmup_steps=0")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train(cfg, tmp_path)
    assert checkpoint_dirs(tmp_path) == []


def test_decay_groups():
    from diffusion.training.pieces import param_groups
    from uvit import UViT

    model = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    assert len(param_groups(model, 0.03, decay_all=True)) == 1
    decay, no_decay = param_groups(model, 0.03, decay_all=False)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "label_emb.weight", "norm.weight", "norm.bias", "decoder_pred.bias"} <= skipped
    assert "decoder_pred.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.long
def test_short_quickstart_draws_the_requested_digits(tmp_path):
    """The quickstart config, shortened to 1,200 steps: an independent classifier fit on the real digits must
    recognise the requested class far above chance (10%); measured 58% here, the full 3,000-step run ~99%."""
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_uvit.py'}", "--config.train.steps=1200",
                                 "--config.train.sample_every=0", "--config.train.ckpt_every=1200",
                                 "--config.wandb.mode=disabled", "--config.eval.per_class=30",
                                 "--config.eval.every=400", "--config.eval.n_samples=200"])
    final = train(cfg, tmp_path)
    accuracy = json.loads((final / "eval.json").read_text())["digits_accuracy"]
    assert accuracy > 0.3, accuracy
    # FID during training (digits classifier features, the guided evaluation sampler) logs a falling curve
    fids = json.loads((tmp_path / "fid.json").read_text())["scores"]
    assert list(fids) == ["400", "800", "1200"] and fids["1200"] < fids["400"], fids
    logged = re.findall(r"FID-200 [0-9.]+ \(dpm_solver\+\+2m, 50 steps, guidance 2", (tmp_path / "log.txt").read_text())
    assert len(logged) == 3


def test_fid_during_training_keeps_the_best_checkpoint_and_scores_it_in_full(tmp_path):
    """Every eval.every steps a checkpoint and an FID; at the end the best step is scored with final_n_samples."""
    final = train(tiny_config("--config.train.steps=6", "--config.train.ckpt_every=6", "--config.train.log_every=3",
                              "--config.eval.every=3", "--config.eval.n_samples=40", "--config.eval.batch_size=20",
                              "--config.eval.final_n_samples=60", "--config.eval.feature_extractor=digits"), tmp_path)
    history = json.loads((tmp_path / "fid.json").read_text())
    assert list(history["scores"]) == ["3", "6"] and all(v > 0 for v in history["scores"].values())
    best = history["best_step"]
    assert history["best_fid"] == min(history["scores"].values())
    assert history["final"]["step"] == best and history["final"]["n_samples"] == 60
    assert history["final"]["fid"] != history["scores"][str(best)]  # another sample count, another estimate
    assert (tmp_path / "checkpoints" / f"step_{best:08d}").is_dir()
    assert json.loads((final / "eval.json").read_text())["best_fid60"] == history["final"]["fid"]
    # the time each FID took is reported in its line, apart from the training rate
    assert len(re.findall(r"FID-40 [0-9.]+ \(.*; [0-9.]+ s, not in the training rate\)",
                          (tmp_path / "log.txt").read_text())) == 2


def test_bf16_autocast_with_clipping_keeps_fp32_master_weights(tmp_path):
    final = train(tiny_config("--config.train.steps=20", "--config.train.ckpt_every=20", "--config.train.log_every=5",
                              "--config.train.mixed_precision=bf16", "--config.train.grad_clip=1.0"), tmp_path)
    losses = logged_losses(tmp_path)
    assert all(0 < v < 2 for v in losses)
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(v.dtype == torch.float32 for v in load_file(final / name).values())


def test_emulated_bf16_is_announced_once_at_start(tmp_path, monkeypatch, capsys):
    """On a CPU without native bf16 the run says so, once, before training: on stderr and in log.txt."""
    notice = "train.mixed_precision=bf16: this CPU has no native bf16 instructions"
    config = tiny_config("--config.train.steps=2", "--config.train.ckpt_every=1", "--config.train.log_every=1",
                         "--config.train.mixed_precision=bf16")
    for native in (False, True):
        monkeypatch.setattr(training_run, "cpu_has_native_bf16", lambda native=native: native)
        train(config, tmp_path / str(native))
        err, log = capsys.readouterr().err, (tmp_path / str(native) / "log.txt").read_text()
        if native:  # nothing to say
            assert notice not in err + log
        else:
            assert err.count(notice) == 1 and log.count(notice) == 1
            assert log.index(notice) < log.index("starting from scratch") < log.index("step 1 loss")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 /proc/cpuinfo flags")
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    for flags, native in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16", True)):
        cpuinfo = tmp_path / f"{native}_{len(flags)}"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is True  # cannot tell: claims nothing


def test_wandb_offline_needs_no_account_and_says_one_line(tmp_path, monkeypatch, capfd):
    """Offline wandb's own banner and end-of-run summary (~20 lines) are silenced; one line of ours says where the
    run is and how to upload it."""
    for name in ("WANDB_API_KEY", "WANDB_SILENT", "WANDB_QUIET", "WANDB_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    train(tiny_config("--config.train.steps=2", "--config.train.ckpt_every=2", "--config.wandb.mode=offline"),
          tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (tmp_path / "wandb_id.txt").read_text().strip() in runs[0].name
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if "wandb" in line.replace(str(tmp_path), "").lower()]
    assert len(lines) <= 2, lines
    assert f"[train] wandb (offline): {runs[0]}; upload it with `wandb sync {runs[0]}`" in lines, lines


def test_warm_up_is_uvits(tmp_path):
    """U-ViT's LambdaLR, stepped after each update: update k (from 0) has lr base * min(k / W, 1), so the first
    update changes nothing and update W has the full rate; DiT and SiT have none (W = 0)."""
    assert [learning_rate(k, 1e-3, 4) for k in (0, 1, 4, 5)] == [0.0, 2.5e-4, 1e-3, 1e-3]
    assert [learning_rate(k, 1e-3, 0) for k in (0, 1)] == [1e-3, 1e-3]
    cfg = tiny_config("--config.train.steps=4", "--config.train.ckpt_every=1", "--config.train.log_every=1",
                      "--config.optim.warmup_steps=2", "--config.optim.lr=1e-3")
    train(cfg, tmp_path)
    logged = re.findall(r"step (\d) loss \S+ lr (\S+)", (tmp_path / "log.txt").read_text())
    assert [(int(k), float(lr)) for k, lr in logged] == [(1, 0.0), (2, 5e-4), (3, 1e-3), (4, 1e-3)]
    torch.manual_seed(cfg.seed)  # the run's initial weights: update 0 (lr 0) leaves them as they were
    initial = build_model(cfg.model).state_dict()
    after_first = load_file(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors")
    assert all(torch.equal(after_first[k], initial[k]) for k in after_first)
    after_second = load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert not torch.equal(after_second["decoder_pred.weight"], initial["decoder_pred.weight"])


def test_evaluation_time_is_left_out_of_the_training_rate():
    """A checkpoint, FID or preview between steps pauses the bar's clocks: its rate, elapsed time and ETA (and the
    next log line's images/s) are those of the training steps alone."""
    bar = tqdm(total=100, file=io.StringIO(), mininterval=0)
    window = Window(loss_sum=torch.zeros(()))
    for _ in range(5):
        time.sleep(0.01)
        bar.update(1)
    with off_the_clock(bar, window):
        time.sleep(1.0)  # an evaluation
    time.sleep(0.01)
    bar.update(1)
    stats = bar.format_dict
    assert stats["elapsed"] < 0.5 and stats["rate"] > 5, stats
    assert time.perf_counter() - window.start < 0.5
    bar.close()


def test_two_process_ddp_on_cpu(tmp_path):
    """accelerate launch with 2 processes on a CPU-only machine (DDP over gloo): the global batch is split, only
    rank 0 writes checkpoints, and FID during training (collectives on every process) neither hangs nor diverges."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "train.py", "--config=configs/digits_uvit.py", *TINY_UVIT,
           "--config.train.steps=6", "--config.train.ckpt_every=3", "--config.train.log_every=3",
           "--config.eval.every=3", "--config.eval.n_samples=40", "--config.eval.batch_size=10",
           "--config.eval.final_n_samples=40", f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "2 process(es), micro-batch 16 x 1 accum" in log
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000006"]
    assert load_train_state(checkpoint_dirs(tmp_path)[-1])["step"] == 6
    history = json.loads((tmp_path / "fid.json").read_text())
    assert list(history["scores"]) == ["3", "6"] and history["final"]["step"] == history["best_step"]
    assert log.count("FID-40 ") == 2


@pytest.mark.parametrize("override, message", [
    ("--config.preview.sampler=ddpm", "unknown sampler 'ddpm'"),
    ("--config.sample.steps=0", "steps must be a positive"),
    ("--config.sample.labels=zipf", "sample.labels='zipf'"),
    ("--config.eval.final_n_samples=50", "eval.every=0 computes none"),
])
def test_sampling_settings_are_checked_before_training(tmp_path, override, message):
    """A sampler setting first used at a preview or FID thousands of steps in is refused at the start."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_config("--config.train.steps=2", override), tmp_path)
    assert checkpoint_dirs(tmp_path) == []


@pytest.mark.parametrize("selection", [False, True])
def test_checkpoint_selection_sampler_and_the_final_score(tmp_path, selection):
    """eval.sampler / steps / guidance_scale draw the in-training scores that pick the checkpoint (U-ViT's unguided
    DPM-Solver); the best one's final score uses the sample section. With as many final samples as selection
    samples, the final score repeats the selection score exactly when both samplers are the same, and differs
    when they are not."""
    from diffusion.evaluation.training import selection_sample_config

    chosen = ["--config.eval.sampler=dpm_solver", "--config.eval.steps=3", "--config.eval.guidance_scale=1.0"]
    config = tiny_config("--config.train.steps=2", "--config.train.ckpt_every=2", "--config.eval.every=2",
                         "--config.eval.n_samples=20", "--config.eval.batch_size=20",
                         "--config.eval.final_n_samples=20", "--config.eval.feature_extractor=digits",
                         "--config.sample.t_end=0.002", *(chosen if selection else []))
    picked = selection_sample_config(config)
    if selection:
        assert (picked.sampler, picked.steps, picked.guidance_scale, picked.t_end) == ("dpm_solver", 3, 1.0, None)
    else:
        assert picked.to_dict() == config.sample.to_dict()
    train(config, tmp_path)
    history = json.loads((tmp_path / "fid.json").read_text())
    log = (tmp_path / "log.txt").read_text()
    expected = "(dpm_solver, 3 steps, guidance 1;" if selection else "(dpm_solver++2m, 4 steps, guidance 2;"
    assert f"FID-20 {history['scores']['2']:.4f} {expected}" in log
    same = history["final"]["fid"] == history["scores"]["2"]
    assert same is not selection
