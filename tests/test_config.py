"""Config files, typed command-line overrides and their errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.config import ConfigError, apply_override, config_from_json, config_to_json, parse_command_line

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def test_overrides_keep_types():
    config, flags = parse_command_line([
        "--config=configs/digits_uvit.py", "--config.train.steps=7", "--config.optim.lr=3e-4",
        "--config.data.random_flip=true", "--config.optim.betas=(0.5, 0.6)", "--config.sample.sampler", "ddim",
        "--workdir=/tmp/x"], {"workdir": None})
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.lr == 3e-4 and config.data.random_flip is True
    assert config.optim.betas == (0.5, 0.6) and config.sample.sampler == "ddim"
    assert flags["workdir"] == "/tmp/x"


def test_unknown_key_is_named():
    config, _ = parse_command_line(["--config=configs/digits_uvit.py"])
    with pytest.raises(ConfigError, match=r"'train.stpes'.*Did you mean 'steps'"):
        apply_override(config, "train.stpes", "3")
    with pytest.raises(ConfigError, match="no 'nope'"):
        apply_override(config, "nope.x", "3")
    with pytest.raises(ConfigError, match="expected a int"):
        apply_override(config, "train.steps", "many")
    with pytest.raises(ConfigError, match="is a section"):
        apply_override(config, "train", "3")


def test_bad_command_lines():
    with pytest.raises(ConfigError, match="missing --config"):
        parse_command_line([])
    with pytest.raises(ConfigError, match="unknown flag --wrkdir"):
        parse_command_line(["--config=configs/digits_uvit.py", "--wrkdir=x"], {"workdir": None})
    with pytest.raises(ConfigError, match="config file not found"):
        parse_command_line(["--config=configs/nope.py"])


def test_train_py_reports_unknown_key_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/digits_uvit.py", "--config.train.lr=1",
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.lr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_builds_and_round_trips(path):
    import torch

    from diffusion.registry import build_model, build_objective

    config, _ = parse_command_line([f"--config={path}"])
    assert config_from_json(config_to_json(config)).to_dict() == config.to_dict()
    with torch.device("meta"):
        build_model(config.model)
    build_objective(config.diffusion)
