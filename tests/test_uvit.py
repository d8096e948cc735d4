"""U-ViT: parity with the official implementation, presets, checkpoint keys and the ablation switches."""

import math

import pytest
import torch

from tests.helpers import load_fixture
from uvit import PRESETS, UViT
from uvit.model import sincos_2d_pos_embed, unpatchify


def _run(model, inputs):
    kwargs = {k: inputs[k] for k in ("y", "context") if k in inputs}
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], **kwargs)


@pytest.mark.parametrize("name", ["uvit_pixel_uncond", "uvit_latent_cond", "uvit_variant_p4_mlptime", "uvit_t2i"])
def test_parity_with_official_fixture(name):
    fx = load_fixture(name)
    model = UViT(**fx["config"]).eval()
    assert list(model.state_dict()) == list(fx["state_dict"]), "key names and order must equal the original's"
    model.load_state_dict(fx["state_dict"], strict=True)
    out = _run(model, fx["inputs"])
    assert out.shape == fx["output"].shape
    assert (out - fx["output"]).abs().max().item() < 1e-5


# Parameter counts from the paper (docs/originals.md#u-vit-presets): exact where it gives them, else to 0.01M.
EXPECTED_PARAMS = {
    "U-ViT-S/2": 44_255_328, "U-ViT-H/2": 500_832_016,
    "U-ViT-S/4": 44.29, "U-ViT-M/4": 130.94, "U-ViT-L/4": 286.83, "U-ViT-L/2": 286.76,
    "U-ViT-L/4-512": 286.86, "U-ViT-H/4-512": 500.94, "U-ViT-S/2-T2I": 44.69, "U-ViT-S/2-Deep-T2I": 58.35,
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        model = UViT(**PRESETS[preset])
    n = sum(p.numel() for p in model.parameters())
    expected = EXPECTED_PARAMS[preset]
    if isinstance(expected, int):
        assert n == expected
    else:
        assert round(n / 1e6, 2) == expected


def test_every_paper_model_has_a_preset():
    assert set(PRESETS) == set(EXPECTED_PARAMS)


def test_h2_checkpoint_layout():
    with torch.device("meta"):
        sd = UViT(**PRESETS["U-ViT-H/2"]).state_dict()
    assert not any(k.startswith("final_layer") for k in sd), "U-ViT-H uses conv=False: no final_layer keys"
    assert sd["label_emb.weight"].shape == (1001, 1152)
    assert sd["out_blocks.13.skip_linear.weight"].shape == (1152, 2304)
    assert sd["in_blocks.0.attn.qkv.weight"].shape == (3456, 1152) and "in_blocks.0.attn.qkv.bias" not in sd


def _tiny(**kw):
    base = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    return UViT(**(base | kw))


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = _tiny().eval()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = _tiny().eval()
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 4])
    assert torch.equal(a(x, t, y), b(x, t, y))


@pytest.mark.parametrize("skip_mode", ["concat_linear", "add", "add_linear_skip", "linear_add", "none"])
@pytest.mark.parametrize("time_cond", ["token", "adaln"])
def test_ablation_variants_train(skip_mode, time_cond):
    torch.manual_seed(0)
    model = _tiny(skip_mode=skip_mode, time_cond=time_cond)
    keys = model.state_dict().keys()
    assert any("skip_linear" in k for k in keys) == (skip_mode not in ("add", "none"))
    assert model.extras == (2 if time_cond == "token" else 1)
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4) * 999, torch.tensor([0, 1, 2, 3])
    out = model(x, t, y)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    if time_cond == "adaln":  # time must reach the network through the modulation layers
        assert model.in_blocks[0].adaln[1].weight.grad.abs().sum() > 0
        t2 = t + 100
        assert not torch.allclose(model(x, t2, y), out)


def test_skip_mode_changes_output():
    torch.manual_seed(0)
    a = _tiny(skip_mode="add").eval()
    b = _tiny(skip_mode="none").eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    assert not torch.allclose(a(x, t, y), b(x, t, y))


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    plain = _tiny()
    ckpt = _tiny(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 4])
    for m in (plain, ckpt):
        m.train()
        m(x, t, y).square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_bf16_forward_stays_bf16():
    model = _tiny().to(torch.bfloat16).eval()
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="null_label"):
        _tiny(null_label=5)
    with pytest.raises(ValueError, match="pass y"):
        _tiny()(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="divisible"):
        UViT(img_size=10, patch_size=4)


# ----------------------------------------------------------------------------------------------------------
# The design-space switches of Fig. 2 added beyond the original code: conv_position, patch_embed, pos_embed
# ----------------------------------------------------------------------------------------------------------

# Keys and shapes of _tiny(depth=2) as the original code (and this one with default switches) builds it.
_TINY_KEYS = (
    [("pos_embed", (1, 18, 32)), ("patch_embed.proj.weight", (32, 3, 2, 2)), ("patch_embed.proj.bias", (32,)),
     ("label_emb.weight", (5, 32))]
    + [(f"{blk}.{k}", s) for blk in ("in_blocks.0", "mid_block", "out_blocks.0") for k, s in [
        ("norm1.weight", (32,)), ("norm1.bias", (32,)), ("attn.qkv.weight", (96, 32)), ("attn.proj.weight", (32, 32)),
        ("attn.proj.bias", (32,)), ("norm2.weight", (32,)), ("norm2.bias", (32,)), ("mlp.fc1.weight", (128, 32)),
        ("mlp.fc1.bias", (128,)), ("mlp.fc2.weight", (32, 128)), ("mlp.fc2.bias", (32,))]]
    + [("out_blocks.0.skip_linear.weight", (32, 64)), ("out_blocks.0.skip_linear.bias", (32,)), ("norm.weight", (32,)),
       ("norm.bias", (32,)), ("decoder_pred.weight", (12, 32)), ("decoder_pred.bias", (12,)),
       ("final_layer.weight", (3, 3, 3, 3)), ("final_layer.bias", (3,))]
)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3.0, 500.0]), torch.tensor([1, 4])


def test_default_switches_keep_keys_init_rng_and_outputs():
    """Fingerprint of the code before the switches existed: same keys, same weights from the same seed, same RNG
    state afterwards (so everything built after the model is unchanged too) and the same output."""
    torch.manual_seed(0)
    model = _tiny(depth=2, conv_position="after", patch_embed="linear", pos_embed="learned").eval()
    assert torch.rand(()).item() == 0.4204801321029663
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _TINY_KEYS
    assert sum(v.double().abs().sum().item() for v in sd.values()) == pytest.approx(1063.0504808202431, rel=1e-9)
    with torch.no_grad():
        out = model(*_inputs()).double()
    assert out.sum().item() == pytest.approx(6.5431619845330715, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(55.458279225975275, rel=1e-5)


def _switched_vs_default(**switch):
    """(default model, switched model with every shared weight copied from it, their outputs on the same input)."""
    torch.manual_seed(0)
    base = _tiny().eval()
    torch.manual_seed(0)
    other = _tiny(**switch).eval()
    theirs = other.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
    other.load_state_dict(shared, strict=False)
    with torch.no_grad():
        return base, other, base(*_inputs()), other(*_inputs())


@pytest.mark.parametrize("switch, removed, added", [
    (dict(conv_position="before"), {"final_layer.weight": (3, 3, 3, 3), "final_layer.bias": (3,)},
     {"decoder_conv.weight": (32, 32, 3, 3), "decoder_conv.bias": (32,)}),
    (dict(patch_embed="conv"), {"patch_embed.proj.weight": (32, 3, 2, 2)},
     {"patch_embed.stem.0.weight": (32, 3, 3, 3), "patch_embed.stem.1.weight": (32,), "patch_embed.stem.1.bias": (32,),
      "patch_embed.stem.1.running_mean": (32,), "patch_embed.stem.1.running_var": (32,),
      "patch_embed.stem.1.num_batches_tracked": (), "patch_embed.proj.weight": (32, 32, 1, 1)}),
    (dict(pos_embed="sincos"), {"pos_embed": (1, 18, 32)}, {}),
    (dict(pos_embed="none"), {"pos_embed": (1, 18, 32)}, {}),
])
def test_switch_changes_keys_and_output(switch, removed, added):
    base, other, out_base, out_other = _switched_vs_default(**switch)
    a = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    assert {k: s for k, s in a.items() if b.get(k) != s} == removed
    assert {k: s for k, s in b.items() if a.get(k) != s} == added
    assert out_other.shape == out_base.shape and torch.isfinite(out_other).all()
    assert not torch.allclose(out_other, out_base, atol=1e-3)
    other.train()  # and it trains: gradients reach every parameter
    other(*_inputs()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())


def test_sincos_table_layout():
    d, grid, extras = 32, 4, 2
    table = sincos_2d_pos_embed(grid, d, extras)
    assert table.shape == (extras + grid * grid, d) and table.dtype == torch.float32
    assert torch.equal(table[:extras], torch.zeros(extras, d))  # extras tokens: no position
    w = lambda k: 10000 ** (-k / (d // 4))  # noqa: E731
    for i, j, k in [(0, 0, 0), (1, 2, 0), (3, 1, 5), (2, 3, 7)]:
        row = table[extras + i * grid + j]  # row-major: patch (i, j)
        assert row[k].item() == pytest.approx(math.sin(i * w(k)), abs=1e-6)
        assert row[d // 4 + k].item() == pytest.approx(math.cos(i * w(k)), abs=1e-6)
        assert row[d // 2 + k].item() == pytest.approx(math.sin(j * w(k)), abs=1e-6)
        assert row[3 * d // 4 + k].item() == pytest.approx(math.cos(j * w(k)), abs=1e-6)
    model = _tiny(pos_embed="sincos")  # 2 extras (label, time), 4x4 grid
    assert "pos_embed" not in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.pos_embed, table[None])
    assert model.to(torch.bfloat16).pos_embed.dtype == torch.bfloat16  # a buffer: follows .to()
    with pytest.raises(ValueError, match="divisible by 4"):
        _tiny(embed_dim=30, num_heads=3, pos_embed="sincos")


def test_no_position_embedding_is_blind_to_patch_order():
    """Without position embedding (and without the extra conv) every patch is processed alike: shifting the image by
    whole patches shifts the prediction. The learned embedding breaks this, as position information should."""
    x, t, y = _inputs()
    for pos_embed, equivariant in [("none", True), ("learned", False)]:
        torch.manual_seed(0)
        model = _tiny(pos_embed=pos_embed, conv=False).eval()
        with torch.no_grad():
            shifted_out = model(torch.roll(x, 2, dims=-1), t, y)
            out_shifted = torch.roll(model(x, t, y), 2, dims=-1)
        assert torch.allclose(shifted_out, out_shifted, atol=1e-5) == equivariant, pos_embed


def test_conv_before_decoder_works_on_the_token_grid():
    """With a 3x3 kernel that copies the right-hand neighbour, patch (i, j) is decoded from token (i, j + 1): the
    output equals the no-conv model's shifted left by one patch, and the last patch column is the decoder bias."""
    torch.manual_seed(0)
    plain = _tiny(conv=False).eval()
    model = _tiny(conv_position="before").eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        model.decoder_conv.weight.zero_()
        model.decoder_conv.bias.zero_()
        model.decoder_conv.weight[:, :, 1, 2] = torch.eye(32)
        out, ref = model(*_inputs()), plain(*_inputs())
    assert torch.allclose(out[..., :-2], ref[..., 2:], atol=1e-5)
    bias_image = unpatchify(model.decoder_pred.bias.detach().expand(2, 16, 12), 3)  # every token decoded to the bias
    assert torch.allclose(out[..., -2:], bias_image[..., -2:])


def test_conv_patch_embed_stem():
    model = _tiny(img_size=16, patch_size=4, patch_embed="conv")
    stem = model.patch_embed.stem  # two stride-2 convolutions, C -> D/2 -> D, then the 1x1 projection
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem) == 2
    assert model.patch_embed.proj.kernel_size == (1, 1)
    assert model.patch_embed(torch.randn(2, 3, 16, 16)).shape == (2, 16, 32)
    assert model.patch_embed.stem[1].num_batches_tracked == 1  # BatchNorm in training mode: running statistics
    with pytest.raises(ValueError, match="power of two"):
        _tiny(img_size=12, patch_size=3, patch_embed="conv")


def test_switch_errors():
    with pytest.raises(ValueError, match="needs conv=True"):
        _tiny(conv=False, conv_position="before")
    for bad in (dict(conv_position="middle"), dict(patch_embed="mlp"), dict(pos_embed="rope")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _tiny(**bad)
