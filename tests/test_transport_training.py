"""Training with the transport objective (``diffusion.kind=transport``) end to end on the bundled digits: the
flow-matching quickstart (configs/digits_sit.py) shortened, exact resume, and 2 processes (and 2 accumulation steps)
equal to the big batch."""

import json

import torch
from safetensors.torch import load_file

from diffusion.checkpoint import load_train_state
from diffusion.config.cli import parse_command_line
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_DIT, launch_train, logged_losses


def tiny_sit(*overrides):
    """configs/digits_sit.py with the tiny DiT and the quiet short run of the helpers (its name has no "dit")."""
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_sit.py'}", *TINY_DIT, *overrides])
    return cfg


def weights_diff(a, b) -> float:
    diff = 0.0
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys()
        diff = max(diff, max((sa[k] - sb[k]).abs().max().item() for k in sa))
    return diff


def test_short_sit_quickstart_draws_the_requested_digits(tmp_path):
    """configs/digits_sit.py at full size, shortened to 600 steps of 32 and sampled with its Heun ODE on 10 grid
    points: the velocity loss falls and the independent digits classifier recognises the requested class far above
    chance (10%); the full quickstart reaches the README's number."""
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_sit.py'}", "--config.wandb.mode=disabled",
                                 "--config.train.steps=600", "--config.train.batch_size=32",
                                 "--config.train.log_every=100", "--config.train.ckpt_every=600",
                                 "--config.train.sample_every=0", "--config.eval.every=0",
                                 "--config.eval.per_class=20", "--config.sample.steps=10"])
    assert (cfg.diffusion.kind, cfg.diffusion.path, cfg.diffusion.prediction, cfg.sample.sampler) == (
        "transport", "linear", "velocity", "heun2")
    final = train(cfg, tmp_path)
    losses = logged_losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    meta = json.loads((final / "meta.json").read_text())
    assert meta["model_name"] == "dit" and meta["model_kwargs"]["learn_sigma"] is True
    accuracy = json.loads((final / "eval.json").read_text())["digits_accuracy"]
    assert accuracy > 0.4, accuracy
    assert (tmp_path / "samples" / "step_00000600.png").is_file()


def test_transport_resume_continues_exactly(tmp_path):
    """Stopped at step 6 and restarted with the same command: bit-identical to an unbroken run (the times and noise
    of every step are drawn from (seed, step))."""
    common = ["--config.train.ckpt_every=6", "--config.train.log_every=3"]
    train(tiny_sit("--config.train.steps=12", *common), tmp_path / "straight")
    train(tiny_sit("--config.train.steps=6", *common), tmp_path / "resumed")
    train(tiny_sit("--config.train.steps=12", *common), tmp_path / "resumed")
    assert "resuming from" in (tmp_path / "resumed" / "log.txt").read_text()
    a = tmp_path / "straight" / "checkpoints" / "step_00000012"
    b = tmp_path / "resumed" / "checkpoints" / "step_00000012"
    assert weights_diff(a, b) == 0.0
    oa, ob = load_train_state(a)["optimizer"], load_train_state(b)["optimizer"]
    assert ob["state"][0]["step"] == 12
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    assert logged_losses(tmp_path / "straight")[-2:] == logged_losses(tmp_path / "resumed")[-2:]


def test_transport_accumulation_equals_the_big_batch(tmp_path):
    """train.global_noise: 2 micro-batches of 16 draw the rows of the one batch of 32 (the stand-in for 2
    processes of 16): equal up to float summation order."""
    base = ["--config.train.steps=3", "--config.train.ckpt_every=3", "--config.optim.warmup_steps=0",
            "--config.train.global_noise=True"]
    train(tiny_sit(*base), tmp_path / "one")
    train(tiny_sit(*base, "--config.train.grad_accum_steps=2"), tmp_path / "two")
    assert weights_diff(tmp_path / "one" / "checkpoints" / "step_00000003",
                        tmp_path / "two" / "checkpoints" / "step_00000003") < 1e-6


def test_two_processes_equal_one_with_the_global_batch(tmp_path):
    """accelerate launch with 2 CPU processes of 16 (DDP over gloo) and train.global_noise: every process draws its
    rows of the global batch's times and noise, so 3 steps end where 1 process with 32 does, to float summation
    order."""
    base = ["--config.train.steps=3", "--config.train.ckpt_every=3", "--config.optim.warmup_steps=0",
            "--config.train.global_noise=True"]
    train(tiny_sit(*base), tmp_path / "one")
    launch_train(tmp_path / "two", "--config=configs/digits_sit.py", *TINY_DIT, *base)
    assert "2 process(es), micro-batch 16 x 1 accum" in (tmp_path / "two" / "log.txt").read_text()
    assert weights_diff(tmp_path / "one" / "checkpoints" / "step_00000003",
                        tmp_path / "two" / "checkpoints" / "step_00000003") < 1e-6


def test_in_training_fid_sample_py_and_eval_fid_take_a_transport_run_unchanged(tmp_path, capsys, monkeypatch):
    """The evaluation tools know nothing of the objective: FID during training (digits features, the config's Heun
    sampler), the best checkpoint scored in full, sample.py's .npz job from the run, and eval_fid.py on it against
    the flow-matching config's own data."""
    import eval_fid
    import sample

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train(tiny_sit("--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.log_every=2",
                   "--config.eval.every=2", "--config.eval.n_samples=40",
                   "--config.eval.batch_size=20", "--config.eval.final_n_samples=60",
                   "--config.eval.feature_extractor=digits"), tmp_path / "run")
    history = json.loads((tmp_path / "run" / "fid.json").read_text())
    assert list(history["scores"]) == ["2", "4"] and history["final"]["n_samples"] == 60
    assert "(heun2, 4 steps, guidance 2" in (tmp_path / "run" / "log.txt").read_text()
    out = tmp_path / "samples.npz"
    assert sample.main([f"--ckpt={tmp_path / 'run'}", f"--out={out}", "--n_samples=30", "--batch_size=15"]) == 0
    assert eval_fid.main([str(out), str(REPO / "configs" / "digits_sit.py"), "--extractor", "digits",
                          "--num_workers", "0", "--json", str(tmp_path / "fid.json")]) == 0
    scores = json.loads((tmp_path / "fid.json").read_text())
    assert scores["num_samples"] == 30 and scores["fid"] > 0
    assert scores["reference"]["path"].endswith("digits_sit.py (digits)")
    capsys.readouterr()
