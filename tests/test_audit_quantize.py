"""sample.quantize: the one [-1, 1] -> uint8 helper (diffusion/sampling/pixels.py) against the originals' formulas
(DiT / SiT round half up, REPA truncates), the setting in the configs, as a sample.py flag and in the job record
(older records without it read as round)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion.config.cli import parse_command_line
from diffusion.config.loading import load_config
from diffusion.config.schema import base_config, check_values
from diffusion.errors import ConfigError, JobMismatchError
from diffusion.registry import build_model
from diffusion.sampling.jobs import SampleJob
from diffusion.sampling.pixels import quantize_setting, to_uint8
from diffusion.training.repa import images_to_uint8
from tests.helpers import REPO, TINY_MODEL, run_sample


def uniform_images(n: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    edges = torch.tensor([-1.0, 1.0, -1.5, 1.5, 0.0, 1 - 1e-7, -1 + 1e-7])  # the ends and beyond them
    return torch.cat([x, edges]).view(1, 1, 1, -1)


def test_truncate_is_repas_cast_and_round_is_dits_up_to_float_ties():
    x = uniform_images()
    repa = torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255).to(torch.uint8)  # REPA generate.py, samples in [-1, 1]
    dit = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # DiT and SiT sample_ddp.py
    truncated = to_uint8(x, "truncate", channels_last=False)
    rounded = to_uint8(x, channels_last=False)
    assert torch.equal(truncated, repa)
    differ = (rounded.int() - dit.int()).abs()
    assert differ.max() <= 1 and differ.sum() <= 20  # float32 near-ties only (44 in 10^7)
    gap = (rounded.int() - truncated.int()).flatten()
    assert set(gap.unique().tolist()) == {0, 1}
    assert gap.double().mean().item() == pytest.approx(0.5, abs=0.002)  # the docstring's 0.49998 on 10^7


def test_round_inverts_the_datasets_scaling_and_truncate_does_not():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256)
    x = u.float() / 127.5 - 1.0  # diffusion/data/datasets.py
    assert torch.equal(to_uint8(x, channels_last=False), u)
    assert int((to_uint8(x, "truncate", channels_last=False) != u).sum()) == 63  # as the module docstring says


def test_one_helper_in_every_layout():
    x = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    nhwc = to_uint8(x)
    assert nhwc.shape == (2, 4, 5, 1) and nhwc.dtype == torch.uint8 and nhwc.device.type == "cpu"
    assert torch.equal(nhwc, to_uint8(x, channels_last=False).permute(0, 2, 3, 1))
    assert torch.equal(images_to_uint8(x), to_uint8(x, channels_last=False).repeat(1, 3, 1, 1))  # REPA's encoders
    assert torch.equal(to_uint8(x.half()), to_uint8(x.half().float()))  # computed in float32 whatever comes in
    with pytest.raises(ConfigError, match="unknown quantisation 'floor'"):
        to_uint8(x, "floor")


def test_the_setting_in_the_configs():
    assert base_config().sample.quantize == "round" and quantize_setting({}) == "round"  # older configs: round
    for path in sorted((REPO / "configs").glob("*.py")):
        expected = "truncate" if "repa" in path.name else "round"
        assert load_config(path).sample.quantize == expected, path.name
    config = base_config()
    config.sample.quantize = "trunc"
    with pytest.raises(ConfigError, match="unknown sample.quantize 'trunc'.*did you mean 'truncate'"):
        check_values(config)
    with pytest.raises(ConfigError, match="unknown sample.quantize 'trunc'"):
        quantize_setting(config.sample)


def test_an_old_record_without_the_key_resumes_as_round(tmp_path):
    settings = {"sampler": {"sampler": "ddim", "steps": 2, "precision": "fp32", "tf32": False}, "seed": 0}
    SampleJob.open(tmp_path / "j.npz", 4, settings, chunk_size=2).write_record()
    record = json.loads((tmp_path / "j.job.json").read_text())
    assert record["settings"]["sampler"]["quantize"] == "round"  # a caller without the key: recorded as round
    del record["settings"]["sampler"]["quantize"]
    (tmp_path / "j.job.json").write_text(json.dumps(record))
    rounded = {**settings, "sampler": {**settings["sampler"], "quantize": "round"}}
    assert SampleJob.open(tmp_path / "j.npz", None, rounded).num_samples == 4
    truncated = {**settings, "sampler": {**settings["sampler"], "quantize": "truncate"}}
    with pytest.raises(JobMismatchError, match=r"changed: sampler.quantize\)"):
        SampleJob.open(tmp_path / "j.npz", None, truncated)


def test_sample_py_quantize_flag_reaches_the_pixels_and_the_record(tmp_path):
    flags = [f"--config={REPO / 'configs/digits_dit.py'}", *TINY_MODEL["dit"]]
    cfg, _ = parse_command_line(flags)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # DiT zeroes its output layer: perturb it so that samples are not all grey
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = tmp_path / "tiny_dit.pt"
    torch.save(model.state_dict(), weights)
    arrays = {}
    for mode in ("round", "truncate"):
        out = tmp_path / f"{mode}.npz"
        code, _, err = run_sample("--ckpt", weights, *flags, "--sampler=ddim", "--steps=2", "--n_samples=4",
                                  "--chunk_size=4", f"--quantize={mode}", f"--out={out}")
        assert code == 0, err
        assert json.loads(out.with_suffix(".job.json").read_text())["settings"]["sampler"]["quantize"] == mode
        arrays[mode] = np.load(out)["arr_0"].astype(int)
    gap = arrays["round"] - arrays["truncate"]  # the same samples, quantised two ways
    assert set(np.unique(gap)) <= {0, 1} and gap.any()
    code, _, err = run_sample("--ckpt", weights, *flags, "--sampler=ddim", "--steps=2", "--n_samples=4",
                              "--chunk_size=4", f"--out={tmp_path / 'round.npz'}", "--quantize=truncate")
    assert code == 2 and "changed: sampler.quantize" in err  # the job was rounded: truncating is another job
    code, _, err = run_sample("--ckpt", weights, *flags, "--quantize=floor", f"--out={tmp_path / 'x.npz'}")
    assert code == 2 and "--quantize" in err and "Traceback" not in err
