"""scripts/ablation.py: the variant table, the commands it prints, and one real training step of every variant."""

import json
import re
import runpy
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusion.config.cli import parse_command_line
from diffusion.registry import build_model
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_UVIT
from uvit import UViT

ABLATION = runpy.run_path(str(REPO / "scripts" / "ablation.py"))
VARIANTS = ABLATION["VARIANTS"]
EVAL = ["--config.eval.every=50000", "--config.eval.n_samples=10000"]


def _script(*args):
    return subprocess.run([sys.executable, "scripts/ablation.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_table_covers_the_five_design_choices():
    switches = {k: v for variant in VARIANTS.values() for k, v in variant.model.items()}
    assert set(switches) == {"skip_mode", "time_cond", "conv_position", "conv", "patch_embed", "pos_embed"}
    assert VARIANTS["baseline"].model == {}
    assert {v.model.get("skip_mode") for v in VARIANTS.values()} - {None} == {"add", "add_linear_skip", "linear_add",
                                                                             "none"}
    assert {v.model.get("pos_embed") for v in VARIANTS.values()} - {None} == {"sincos", "none"}
    assert len({tuple(v.model.items()) for v in VARIANTS.values()}) == len(VARIANTS), "two variants are the same run"


def test_list_prints_every_variant_with_its_overrides_and_finding():
    proc = _script("--list")
    assert proc.returncode == 0, proc.stderr
    blocks = dict(re.findall(r"^(\S+)\n((?:  .*\n?)+)", proc.stdout, flags=re.M))
    assert list(blocks) == list(VARIANTS)
    for name, variant in VARIANTS.items():
        flags = re.search(r"overrides: (.*)", blocks[name]).group(1).split()
        assert flags == EVAL + [f"--config.model.{k}={v}" for k, v in variant.model.items()], name
        assert f"paper: {variant.finding}" in blocks[name]
    assert "--config.model.pos_embed=none" in blocks["pos_none"] and "meaningful" in blocks["pos_none"]


def test_dry_run_prints_the_single_process_command():
    proc = _script("pos_sincos", "--dry-run", "--config.train.steps=20")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd == [sys.executable, "train.py", "--config=configs/cifar10_uvit_s2.py", *EVAL,
                   "--config.model.pos_embed=sincos", "--config.train.steps=20", "--workdir=runs/ablation/pos_sincos"]


def test_dry_run_multi_gpu_uses_accelerate_and_an_absolute_workdir(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ablation.py"), "conv_none", "--num_processes", "8",
                           "--workdir", "mine", "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert "--num_processes=8" in cmd[:cmd.index("train.py")]
    assert cmd[cmd.index("train.py") + 1:] == ["--config=configs/cifar10_uvit_s2.py", *EVAL,
                                               "--config.model.conv=False", f"--workdir={tmp_path / 'mine'}"]


@pytest.mark.parametrize("args, message", [(["nope"], "unknown variant 'nope'"), ([], "unknown variant None"),
                                           (["skip_add", "--lr=3"], "--config.key=value"),
                                           (["skip_add", "--num_processes", "0"], ">= 1")])
def test_bad_arguments_are_one_clear_error(args, message):
    proc = _script(*args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_command_builds_the_intended_s2_model(name):
    """The exact flags the script hands to train.py parse into the CIFAR-10 config of the named variant."""
    cmd = ABLATION["build_command"](name)
    config, flags = parse_command_line(cmd[cmd.index("train.py") + 1:], {"workdir": None})
    assert flags["workdir"] == f"runs/ablation/{name}"
    assert (config.eval.every, config.eval.n_samples, config.train.steps) == (50_000, 10_000, 500_000)
    with torch.device("meta"):
        model = build_model(config.model)
    assert isinstance(model, UViT) and model.embed_dim == 512 and model.num_classes == -1
    sd = model.state_dict()
    expected = {"skip_mode": lambda v: model.out_blocks[0].skip_mode == v,
                "time_cond": lambda v: model.time_cond == v,
                "conv_position": lambda v: "decoder_conv.weight" in sd and "final_layer.weight" not in sd,
                "conv": lambda v: not any(k.startswith(("final_layer", "decoder_conv")) for k in sd),
                "patch_embed": lambda v: "patch_embed.stem.0.weight" in sd,
                "pos_embed": lambda v: "pos_embed" not in sd}
    for key, value in VARIANTS[name].model.items():
        assert expected[key](value), (name, key)
    if name == "baseline":  # the released U-ViT-S/2 layout
        assert {"pos_embed", "final_layer.weight", "out_blocks.5.skip_linear.weight"} <= set(sd)
        assert "patch_embed.stem.0.weight" not in sd and model.time_cond == "token"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_a_step_through_the_trainer(name, tmp_path):
    switches = [f"--config.model.{k}={v}" for k, v in VARIANTS[name].model.items()]
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_uvit.py'}", *TINY_UVIT, "--config.train.steps=1",
                                 "--config.train.log_every=1", "--config.sample.steps=2", *switches])
    final = train(cfg, tmp_path)
    losses = [float(m) for m in re.findall(r"loss ([0-9.naif]+)", (tmp_path / "log.txt").read_text())]
    assert len(losses) == 1 and 0 < losses[0] < 10, losses
    meta = json.loads((final / "meta.json").read_text())
    for key, value in VARIANTS[name].model.items():
        assert str(meta["model_kwargs"][key]) == value
    model = UViT(**meta["model_kwargs"])
    model.load_state_dict(load_file(final / "ema.safetensors"), strict=True)  # what sample.py does


def test_the_study_runs_under_flow_matching_with_the_fm_recipe(tmp_path):
    """--recipe configs/cifar10_uvit_s2_fm.py: the same variants on the U-ViT flow-matching recipe (the transport
    objective), and a variant of it trains a step through the trainer; a non-U-ViT recipe is refused."""
    proc = _script("time_adaln", "--recipe", "configs/cifar10_uvit_s2_fm.py", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    config, _ = parse_command_line(cmd[cmd.index("train.py") + 1:], {"workdir": None})
    assert cmd[cmd.index("train.py") + 1] == "--config=configs/cifar10_uvit_s2_fm.py"
    assert (config.diffusion.kind, config.model.time_cond, config.eval.every) == ("transport", "adaln", 50_000)
    cfg, _ = parse_command_line([f"--config={REPO / 'configs/digits_uvit.py'}", *TINY_UVIT, "--config.train.steps=1",
                                 "--config.train.log_every=1", "--config.sample.steps=2",
                                 "--config.model.time_cond=adaln"])
    cfg.diffusion = config.diffusion  # the recipe's objective on the digits
    cfg.sample.update(sampler="euler", clip_denoised=None)
    final = train(cfg, tmp_path)
    losses = [float(m) for m in re.findall(r"loss ([0-9.naif]+)", (tmp_path / "log.txt").read_text())]
    assert len(losses) == 1 and 0 < losses[0] < 10, losses
    assert json.loads((final / "meta.json").read_text())["model_kwargs"]["time_cond"] == "adaln"
    refused = _script("skip_add", "--recipe", "configs/digits_dit.py", "--dry-run")
    assert refused.returncode == 2 and "give a U-ViT config" in refused.stderr
