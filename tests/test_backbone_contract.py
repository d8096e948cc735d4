"""The backbone contract (diffusion.registry.Backbone): a third backbone defined here and nowhere else -- a few
pre-norm transformer blocks over label, time and patch tokens -- registered by one call, is trained, sampled through
sample.py (a grid and an .npz job), tapped for REPA (trained with the alignment loss) and benchmarked, with no file
of the package edited. U-ViT and DiT declare the same contract."""

from __future__ import annotations

import math

import ml_collections
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config.cli import parse_command_line
from diffusion.objectives.repa import register_tap
from diffusion.registry import (
    Backbone,
    attention_paths,
    block_class,
    build_model,
    describe,
    register_backbone,
    set_attention,
    tap_blocks,
)
from diffusion.tools.benchmark import Setup, Variant, Workload
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_RUN, logged_losses, make_tiny_dinov2, run_sample

pytestmark = pytest.mark.filterwarnings("ignore::diffusion.pretrained.vision_encoders.EncoderSizeWarning")


class ToyBlock(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.attention_path = heads, "auto"
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention_path == "math":
            a = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ToyBackbone(nn.Module):
    """[label, time, patches] through ``depth`` blocks, patches back to pixels; a null label row for guidance."""

    BLOCK_CLASS = ToyBlock
    ATTENTION_PATHS = ("auto", "sdpa", "math")

    def __init__(self, img_size=8, patch_size=2, in_chans=1, dim=32, depth=2, heads=2, num_classes=10):
        super().__init__()
        self.p, self.c, self.grid = patch_size, in_chans, img_size // patch_size
        self.dim, self.classes, self.size = dim, num_classes, img_size
        self.embed = nn.Linear(in_chans * patch_size**2, dim)
        self.pos = nn.Parameter(torch.randn(1, 2 + self.grid**2, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)
        self.layers = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, in_chans * patch_size**2)

    # the contract
    conditioning, label_dropout, context_shape = "class", None, None
    num_labels = property(lambda self: self.classes)
    null_label = property(lambda self: self.classes)
    input_shape = property(lambda self: (self.c, self.size, self.size))
    hidden_size = property(lambda self: self.dim)
    token_grid = property(lambda self: self.grid)

    def tap_blocks(self):
        return list(self.layers), 2, None

    def forward(self, x, t, y=None):
        b, g, p = x.shape[0], self.grid, self.p
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, g * g, -1)
        t = t.reshape(-1).expand(b).float()[:, None] / 1000
        h = torch.cat([self.label(y)[:, None], self.time(t)[:, None], self.embed(patches)], 1) + self.pos
        for layer in self.layers:
            h = layer(h)
        out = self.out(h[:, 2:]).view(b, g, g, self.c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, self.c, g * p, g * p)


TOY_MODEL = {"name": "toy", "preset": "Toy-S", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_backbone("toy", ToyBackbone, {"Toy-S": dict(dim=32, depth=2, heads=2)})


def toy_config(*overrides, config: str = "configs/digits_sit.py"):
    cfg, _ = parse_command_line([f"--config={REPO / config}", *TINY_RUN, "--config.train.steps=30",
                                 "--config.train.log_every=10", "--config.train.ckpt_every=30",
                                 "--config.optim.warmup_steps=0", "--config.sample.steps=5", *overrides])
    cfg.model = ml_collections.ConfigDict(TOY_MODEL)
    cfg.cond.p_uncond = 0.1
    return cfg


def test_the_backbones_declare_the_contract():
    with torch.device("meta"):
        uvit = build_model({"name": "uvit", "preset": "U-ViT-H/2"})
        dit = build_model({"name": "dit", "preset": "DiT-XL/2"})
        toy = build_model(TOY_MODEL)
    for net in (uvit, dit, toy):
        assert isinstance(net, Backbone)
    u, d, t = describe(uvit), describe(dit), describe(toy)
    assert (u.conditioning, u.num_labels, u.null_label, u.input_shape, u.hidden_size, u.token_grid) == (
        "class", 1000, 1000, (4, 32, 32), 1152, 16)
    assert (d.conditioning, d.num_labels, d.null_label, d.label_dropout, d.input_shape, d.hidden_size,
            d.token_grid) == ("class", 1000, 1000, 0.1, (4, 32, 32), 1152, 16)
    assert (t.conditioning, t.num_labels, t.input_shape, t.hidden_size, t.token_grid) == ("class", 10, (1, 8, 8),
                                                                                          32, 4)
    assert [block_class(n) for n in ("uvit", "dit", "toy")] == ["Block", "DiTBlock", "ToyBlock"]
    assert len(tap_blocks(uvit)[0]) == 29 and tap_blocks(dit)[1:] == (0, 256)
    with torch.device("meta"):
        t2i = build_model({"name": "uvit", "preset": "U-ViT-S/2-T2I"})
    assert (describe(t2i).conditioning, describe(t2i).context_shape, describe(t2i).num_labels) == ("text", (77, 768), 0)
    assert "math" in attention_paths()
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = toy
    assert describe(wrapped) == t  # seen through a DDP-style wrapper
    with pytest.raises(TypeError, match="lacks BLOCK_CLASS"):
        register_backbone("bad", nn.Linear)


def test_a_toy_backbone_trains_samples_taps_and_benchmarks(tmp_path):
    torch.manual_seed(0)
    workdir = tmp_path / "toy"
    train(toy_config(), workdir)
    losses = logged_losses(workdir)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # sample.py: a labelled grid and a resumable .npz job, by the run directory
    code, out, err = run_sample(f"--ckpt={workdir}", "--labels=1,7", "--per_class=2", f"--out={tmp_path / 'g.png'}")
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    code, out, err = run_sample(f"--ckpt={workdir}", "--n_samples=4", "--guidance=1.5", f"--out={tmp_path / 's.npz'}")
    assert code == 0, err
    with __import__("numpy").load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (4, 8, 8, 3) and len(npz["arr_1"]) == 4
    # attention paths: a speed choice, the same function
    net = build_model(TOY_MODEL).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])
    fast, slow = net(x, t, y), set_attention(net, "math")(x, t, y)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    with register_tap(tap_blocks(net), 2) as tap, torch.no_grad():
        net(x, t, y)
    assert tap.features.shape == (2, 16, 32)  # the patch tokens after the label and time tokens


def test_a_toy_backbone_trains_with_repa_and_is_benchmarked(tmp_path):
    weights = make_tiny_dinov2(tmp_path / "dinov2_tiny.pth")
    torch.manual_seed(0)
    cfg = toy_config("--config.train.steps=4", "--config.train.ckpt_every=4", "--config.train.log_every=2",
                     "--config.repa.encoders=dinov2-vit-s", f"--config.repa.encoder_weights={weights}",
                     "--config.repa.layer=1", "--config.repa.projector_dim=16")
    final = train(cfg, tmp_path / "repa")
    assert (final / "projectors.safetensors").is_file()
    text = (tmp_path / "repa" / "log.txt").read_text()
    assert " proj " in text and " denoise " in text
    # the benchmark's workload (its worker runs this in a process of its own; here in the test's, where "toy" lives)
    path = tmp_path / "toy_config.py"
    path.write_text("from diffusion.config.schema import base_config\n\n\ndef get_config():\n"
                    "    config = base_config()\n"
                    f"    config.model.update({TOY_MODEL!r})\n"
                    "    config.diffusion.update(kind='transport')\n"
                    "    config.sample.update(sampler='euler', steps=3, guidance_scale=2.0)\n"
                    "    return config\n")
    for task in ("train", "sample"):
        work = Workload(Setup(config_path=str(path), task=task, batch=2), Variant(name="fp32"))
        result = work.repeat()
        assert result["seconds"] > 0 and result["network_calls"] >= 1, (task, result)
        assert work.flops > 0
