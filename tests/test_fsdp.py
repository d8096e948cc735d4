"""train.fsdp: 2 processes on the CPU over gloo (torch's FSDP2 runs there too), held to DDP.

Sharded training must be the same run as DDP (fp32: equal to rounding), and its checkpoints the same full state dicts
(model, EMA, optimizer), so that they load into the bare network and resume across ``train.fsdp`` either way.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoint import checkpoint_dirs, load_checkpoint_dir, load_train_state
from diffusion.errors import ConfigError
from diffusion.registry import build_model
from diffusion.training.loop import train
from tests.helpers import TINY_DIT, TINY_UVIT, launch_train, tiny_config

RUN = ["--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.log_every=2",
       "--config.train.grad_clip=0.05", "--config.train.ema_warmup=True", "--config.train.grad_accum_steps=2"]
UVIT = ["--config=configs/digits_uvit.py", *TINY_UVIT, *RUN]
DIT = ["--config=configs/digits_dit.py", *TINY_DIT, *RUN]


def assert_close(a: dict, b: dict, what: str, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        scale = b[k].abs().max().clamp(min=1e-8)
        assert (a[k] - b[k]).abs().max() <= rtol * scale, (what, k, ((a[k] - b[k]).abs().max() / scale).item())


def assert_same_checkpoint(a, b) -> None:
    """Weights, EMA and AdamW moments of two checkpoints, equal to fp32 rounding."""
    for name in ("model.safetensors", "ema.safetensors"):
        assert_close(load_file(a / name), load_file(b / name), name)
    oa, ob = load_train_state(a)["optimizer"], load_train_state(b)["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert float(oa["state"][i]["step"]) == float(ob["state"][i]["step"])
        assert_close({k: oa["state"][i][k] for k in ("exp_avg", "exp_avg_sq")},
                     {k: ob["state"][i][k] for k in ("exp_avg", "exp_avg_sq")}, f"optimizer state {i}")


def test_fsdp_trains_like_ddp_and_checkpoints_resume_across_it(tmp_path):
    """4 steps of a 2-process run with gradient accumulation and clipping: FSDP (full_shard) ends where DDP does;
    its checkpoints hold the full keys and load into the bare network; DDP's step-2 checkpoint resumed with FSDP
    ends there too."""
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    launch_train(ddp, *UVIT)
    launch_train(fsdp, *UVIT, "--config.train.fsdp=full_shard")
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ddp / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = launch_train(resumed, *UVIT, "--config.train.fsdp=full_shard")
    assert "config changes since step_00000002: train.fsdp: '' -> 'full_shard'" in proc.stderr

    assert "2 process(es), micro-batch" in (ddp / "log.txt").read_text()
    assert "2 process(es) sharded (full_shard), micro-batch" in (fsdp / "log.txt").read_text()
    a, b, c = (checkpoint_dirs(d)[-1] for d in (ddp, fsdp, resumed))
    assert a.name == b.name == c.name == "step_00000004"
    assert_same_checkpoint(b, a)
    assert_same_checkpoint(c, a)
    ema = load_file(b / "ema.safetensors")
    assert not torch.equal(ema["decoder_pred.weight"], load_file(b / "model.safetensors")["decoder_pred.weight"])
    state, config, _ = load_checkpoint_dir(b, weights="ema")
    net = build_model(config.model)
    assert net.load_state_dict(state, strict=True).missing_keys == []
    assert state.keys() == net.state_dict().keys()


def test_fsdp_dit_blocks_with_bf16(tmp_path):
    """DiT's blocks as the FSDP units, bf16 autocast over bf16-gathered weights: the run trains and its checkpoint
    keeps fp32 full weights that load into the bare DiT."""
    launch_train(tmp_path, *DIT, "--config.train.fsdp=shard_grad_op", "--config.train.mixed_precision=bf16")
    assert "2 process(es) sharded (shard_grad_op)" in (tmp_path / "log.txt").read_text()
    final = checkpoint_dirs(tmp_path)[-1]
    state, config, _ = load_checkpoint_dir(final, weights="model")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    build_model(config.model).load_state_dict(state, strict=True)


def test_fsdp_mode_is_checked_and_one_process_trains_unsharded(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown train.fsdp 'zero3'"):
        train(tiny_config("--config.train.fsdp=zero3"), tmp_path)
    final = train(tiny_config("--config.train.steps=2", "--config.train.fsdp=full_shard"), tmp_path)
    assert "train.fsdp=full_shard needs a multi-process launch; training unsharded" in capsys.readouterr().err
    assert load_train_state(final)["step"] == 2
