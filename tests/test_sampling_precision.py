"""sample.precision and sample.tf32: the network and the decoder under autocast, the sampler in float32, the settings
as sample.py flags and in every .npz job's record (older records without them read as fp32 / no TF32)."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.config.cli import parse_command_line
from diffusion.errors import ConfigError, JobMismatchError
from diffusion.pretrained.autoencoder import Autoencoder
from diffusion.registry import build_model, build_objective
from diffusion.sampling.generate import generate
from diffusion.sampling.jobs import SampleJob
from diffusion.sampling.precision import precision_settings
from tests.helpers import REPO, TINY_MODEL, make_tiny_autoencoder, run_sample

DIT = [f"--config={REPO / 'configs/digits_dit.py'}", *TINY_MODEL["dit"]]
LATENT_DIT = [*DIT, "--config.model.in_channels=4", "--config.model.input_size=4"]  # the tiny VAE's 4x4x4 latents
GUIDED_DDIM = dict(sampler="ddim", steps=4, guidance_scale=2.0)


def tiny_dit(flags=DIT):
    """(a tiny class-conditional DiT with random weights everywhere, its objective, its config)."""
    cfg, _ = parse_command_line(flags)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # DiT's init zeroes its output layers: every sample would be the same
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg.sample.update(**GUIDED_DDIM)
    return model, build_objective(cfg.diffusion), cfg


def record_calls(module: torch.nn.Module) -> list[tuple]:
    """(input dtype, autocast on?, autocast dtype, output dtype) of every forward of ``module``."""
    calls = []

    def hook(_, args, out):
        calls.append((args[0].dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_network_runs_under_autocast_and_the_sampler_in_float32(precision, dtype):
    model, objective, cfg = tiny_dit()
    labels = torch.tensor([3, 1, 4])
    exact = generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=1)
    calls = record_calls(model)
    cfg.sample.precision = precision
    low = generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=1)
    assert len(calls) == 4  # one guided (batched) forward per step
    assert all(call == (torch.float32, True, dtype, dtype) for call in calls), calls  # fp32 state in, low out
    assert not torch.is_autocast_enabled("cpu")  # only inside the forward
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert 0 < (low - exact).abs().max() < 0.1 * exact.abs().max()  # the network's rounding, nothing more
    assert not torch.equal(low.to(dtype).float(), low)  # the sampler's state was never rounded to low precision


def test_fp32_is_unchanged_and_tf32_does_nothing_on_cpu():
    model, objective, cfg = tiny_dit()
    labels = torch.tensor([2, 7])
    calls = record_calls(model)
    plain = generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=2)
    assert all(call[1:] == (False, torch.get_autocast_dtype("cpu"), torch.float32) for call in calls)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    cfg.sample.tf32 = True
    assert torch.equal(generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=2), plain)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == saved


def test_the_decoder_runs_under_autocast(tmp_path):
    ae = Autoencoder.load(str(make_tiny_autoencoder(tmp_path / "vae")), scale_factor=0.18215)
    model, objective, cfg = tiny_dit(LATENT_DIT)
    labels = torch.tensor([5, 6])
    exact = generate(model, objective, cfg.sample, (4, 4, 4), labels=labels, seed=0, decode=ae.decode)
    decoder = record_calls(ae.vae.decoder.conv_in)
    cfg.sample.precision = "bf16"
    images = generate(model, objective, cfg.sample, (4, 4, 4), labels=labels, seed=0, decode=ae.decode)
    assert decoder and all(call[1:] == (True, torch.bfloat16, torch.bfloat16) for call in decoder), decoder
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert 0 < (images - exact).abs().max() < 0.2


def test_unknown_precisions_are_refused():
    assert precision_settings({}) == {"precision": "fp32", "tf32": False}  # configs written before the keys
    with pytest.raises(ConfigError, match="unknown sample.precision 'fp64'.*fp32, fp16, bf16"):
        precision_settings({"precision": "fp64"})


run_main = run_sample  # sample.py in this process


def test_sample_py_flags_reach_the_job_record_and_a_change_is_refused(tmp_path):
    model, _, _ = tiny_dit()
    weights = tmp_path / "tiny_dit.pt"
    torch.save(model.state_dict(), weights)
    job = ["--ckpt", weights, *DIT, "--sampler=ddim", "--steps=2", "--n_samples=2", "--chunk_size=2",
           f"--out={tmp_path / 's.npz'}"]
    code, _, err = run_main(*job, "--precision=bf16", "--tf32=true")
    assert code == 0, err
    sampler = json.loads((tmp_path / "s.job.json").read_text())["settings"]["sampler"]
    assert (sampler["precision"], sampler["tf32"]) == ("bf16", True)
    code, _, err = run_main(*job, "--tf32=true")  # fp32: another job
    assert code == 2 and "changed: sampler.precision" in err and "Traceback" not in err
    code, _, err = run_main(*job, "--precision=fp64")
    assert code == 2 and "unknown sample.precision 'fp64'" in err and "Traceback" not in err


def test_a_record_without_the_precision_keys_reads_as_fp32(tmp_path):
    """Records written before the keys existed: their jobs were drawn in fp32 without TF32, and resume as such."""
    settings = {"sampler": {"sampler": "ddim", "steps": 2, "precision": "fp32", "tf32": False}, "seed": 0}
    SampleJob.open(tmp_path / "j.npz", 4, settings, chunk_size=2).write_record()
    record = json.loads((tmp_path / "j.job.json").read_text())
    for key in ("precision", "tf32"):
        del record["settings"]["sampler"][key]
    (tmp_path / "j.job.json").write_text(json.dumps(record))
    assert SampleJob.open(tmp_path / "j.npz", None, settings).num_samples == 4
    with pytest.raises(JobMismatchError, match=r"changed: sampler.precision\)"):
        SampleJob.open(tmp_path / "j.npz", None, {**settings, "sampler": {**settings["sampler"], "precision": "fp16"}})
