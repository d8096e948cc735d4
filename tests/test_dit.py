"""DiT backbone: parity with the official code (fixtures), checkpoint layout, sizes and FLOPs of the paper's
models, the four conditioning designs, guidance."""

from __future__ import annotations

import functools

import pytest
import torch

from diffusion.config.schema import base_config
from diffusion.objectives.guidance import guided_model
from diffusion.objectives.iddpm import build_iddpm
from diffusion.tools.flops import forward_flops
from dit import BLOCK_TYPES, PRESETS, DiT, count_params
from tests.helpers import fixture_network, load_fixture, rel_err

# docs/originals.md#dit-presets / paper Table 4: GFLOPs (multiply-accumulates) at 256x256, to two decimals.
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
PAPER_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-L/2": 458.1, "DiT-XL/2": 675.1}
# Block-design ablation (paper Fig. 5), DiT-XL/2 GFLOPs.
PAPER_ABLATION_GFLOPS = {"in_context": 119.4, "cross_attn": 137.6, "adaln": 118.6, "adaln_zero": 118.6}

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4)



@functools.cache
def fixture_model() -> tuple[DiT, dict]:
    return fixture_network("dit_cond", DiT)


@functools.cache
def gflops(preset: str, block_type: str = "adaln_zero") -> float:
    """Forward multiply-accumulates / 1e9 at batch 1, as the paper counts them (FLOPs / 2)."""
    config = base_config()
    config.model.update(name="dit", preset=preset, block_type=block_type)
    return forward_flops(config) / 2 / 1e9


# ----------------------------------------------------------------------------------------------------------
# Parity with the official DiT
# ----------------------------------------------------------------------------------------------------------


def test_state_dict_layout_equals_official():
    fx = load_fixture("dit_cond")
    ours = DiT(**fx["config"]).state_dict()
    assert list(ours) == list(fx["state_dict"])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in fx["state_dict"].items()}


def test_init_reproduces_official_init():
    """Same module creation order and init: the official seed plus the fixture's noise gives its exact weights."""
    fx = load_fixture("dit_cond")
    torch.manual_seed(5)
    model = DiT(**fx["config"])
    noise = torch.Generator().manual_seed(1005)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p += 0.06 * torch.randn(p.shape, generator=noise)
    for name, value in model.state_dict().items():
        assert torch.equal(value, fx["state_dict"][name]), name


def test_pos_embed_equals_official():
    fx = load_fixture("dit_cond")
    model = DiT(**fx["config"])
    assert torch.equal(model.pos_embed.detach(), fx["state_dict"]["pos_embed"])
    assert not model.pos_embed.requires_grad


def test_forward_parity():
    model, fx = fixture_model()
    inp = fx["inputs"]
    with torch.no_grad():
        out = model(inp["x"], inp["t"], y=inp["y"])
    assert rel_err(out, fx["output"]) < 1e-5


def test_forward_with_cfg_parity_three_channels():
    model, fx = fixture_model()
    cfg = fx["inputs"]["cfg"]
    with torch.no_grad():
        out = model.forward_with_cfg(cfg["x"], cfg["t"], cfg["y"], cfg["cfg_scale"], channels=3)
    assert rel_err(out, fx["output_cfg"]) < 1e-5


def test_forward_with_cfg_all_channels_from_two_plain_forwards():
    model, fx = fixture_model()
    cfg = fx["inputs"]["cfg"]
    x, t, y, s = cfg["x"], cfg["t"], cfg["y"], cfg["cfg_scale"]
    half = len(x) // 2
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, s, channels="all")
        cond = model(x[:half], t[:half], y=y[:half])
        uncond = model(x[:half], t[half:], y=y[half:])  # the second half of x is ignored
    eps = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    expected = torch.cat([torch.cat([eps, cond[:, 4:]], 1), torch.cat([eps, uncond[:, 4:]], 1)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Guidance channels and labels
# ----------------------------------------------------------------------------------------------------------


def test_three_channel_guidance_leaves_channel_3_and_variance_unguided():
    model, fx = fixture_model()
    cfg = fx["inputs"]["cfg"]
    x, t, y = cfg["x"], cfg["t"], cfg["y"]
    with torch.no_grad():
        three = model.forward_with_cfg(x, t, y, 4.0, channels=3)
        full = model.forward_with_cfg(x, t, y, 4.0, channels="all")
        plain = model(torch.cat([x[:2], x[:2]]), t, y=y)
    torch.testing.assert_close(three[:, :3], full[:, :3])
    torch.testing.assert_close(three[:, 3:], plain[:, 3:])  # eps channel 3 and v from each half
    torch.testing.assert_close(full[:, 4:], plain[:, 4:])
    assert not torch.allclose(three[:, 3], full[:, 3])
    # scale 1 is plain conditional sampling in the first half
    with torch.no_grad():
        one = model.forward_with_cfg(x, t, y, 1.0, channels="all")
    torch.testing.assert_close(one[:2], plain[:2])


@pytest.mark.parametrize("channels", [3, "all"])
def test_guided_model_equals_forward_with_cfg_first_half(channels):
    """The project's batched guidance reproduces the guided half of the original's forward_with_cfg."""
    model, fx = fixture_model()
    cfg = fx["inputs"]["cfg"]
    x, t, y = cfg["x"][:2], cfg["t"][:2], cfg["y"][:2]
    null = torch.full_like(y, model.null_label)
    net = guided_model(model, {"y": y}, {"y": null}, 4.0, eps_channels=4, channels=channels)
    with torch.no_grad():
        ours = net(x, t)
        ref = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0, channels)
    assert torch.equal(ours, ref[:2])


def test_labels_are_never_dropped_by_the_model():
    model, fx = fixture_model()
    inp = fx["inputs"]
    assert model.null_label == fx["null_label"] == 10
    model.train()
    try:
        with torch.no_grad():
            runs = [model(inp["x"], inp["t"], y=inp["y"]) for _ in range(3)]
    finally:
        model.eval()
    assert all(torch.equal(r, runs[0]) for r in runs)
    no_null = DiT(**TINY, class_dropout_prob=0.0)
    assert no_null.null_label is None and no_null.y_embedder.embedding_table.num_embeddings == 4
    assert DiT(**TINY).y_embedder.embedding_table.num_embeddings == 5


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="block_type"):
        DiT(**TINY, block_type="film")
    with pytest.raises(ValueError, match="pass y"):
        DiT(**TINY)(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Sizes and FLOPs of the paper's models (meta device: nothing is allocated)
# ----------------------------------------------------------------------------------------------------------


def test_xl2_checkpoint_layout_and_sizes():
    with torch.device("meta"):
        xl = DiT(**PRESETS["DiT-XL/2"])
    assert len(xl.state_dict()) == 292
    assert count_params(xl) == 675_129_632
    assert count_params("DiT-S/2") == 32_963_360
    assert len(PRESETS) == 24


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_sit_presets_are_dits_networks(size, patch):
    """SiT's twelve models (its Table 1) are DiT's networks: the same constructor keywords, so the same keys and
    shapes; what differs is the objective feeding them t in [0, 1]."""
    assert PRESETS[f"SiT-{size}/{patch}"] == PRESETS[f"DiT-{size}/{patch}"]


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS_M))
def test_preset_params_match_paper(preset):
    assert abs(count_params(preset) / 1e6 - PAPER_PARAMS_M[preset]) / PAPER_PARAMS_M[preset] < 0.005


@pytest.mark.parametrize("preset", list(PAPER_GFLOPS))
def test_preset_gflops_match_paper(preset):
    ours, paper = gflops(preset), PAPER_GFLOPS[preset]
    # within 0.5%, or within the table's rounding to two decimals (S/8: 0.358 prints as 0.36)
    assert abs(ours - paper) / paper < 0.005 or abs(ours - paper) <= 0.005, (preset, ours, paper)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_design_gflops_match_paper_ablation(block_type):
    ours, paper = gflops("DiT-XL/2", block_type), PAPER_ABLATION_GFLOPS[block_type]
    assert abs(ours - paper) / paper < 0.005, (block_type, ours, paper)


# ----------------------------------------------------------------------------------------------------------
# Behaviour of the four block designs
# ----------------------------------------------------------------------------------------------------------


def test_adaln_zero_outputs_exactly_zero_at_init():
    model = DiT(**TINY)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), y=torch.tensor([0, 3, 4]))
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_design_trains_with_hybrid_loss(block_type):
    torch.manual_seed(0)
    model = DiT(**TINY, block_type=block_type)
    diffusion = build_iddpm()
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(16) % 4
    x0 = (0.5 * torch.randn(4, 4, 8, 8, generator=gen))[y]  # one fixed pattern per class
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        t = torch.randint(0, 1000, (16,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = diffusion.training_losses(model, x0, {"y": y}, t=t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (block_type, first, last)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_design_shapes_and_bf16(block_type):
    model = DiT(**TINY, block_type=block_type, learn_sigma=False)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 4])
    assert model(x, t, y=y).shape == (2, 4, 8, 8)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, y=y)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 8, 8)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = DiT(**TINY)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = DiT(**TINY, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 4])
    for m in (plain, ckpt):
        m.train()
        m(x, t, y=y).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
