"""REPA's frozen vision encoders (diffusion/pretrained/vision_encoders.py, dinov2.py): preprocessing
against REPA's own output, tiny randomly initialised DINOv2 models built by timm and by transformers and a tiny
CLIP vision tower, saved to disk in their real layouts and loaded back through the loader (no network)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffusion.errors import ConfigError, UserError, WeightsNotFoundError
from diffusion.pretrained import dinov2
from diffusion.pretrained.vision_encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSizeWarning,
    VisionEncoder,
    load_vision_encoder,
    load_vision_encoders,
    parse_name,
    preprocess_raw_images,
)
from tests.helpers import load_fixture

# The tiny models are far narrower than the names they load under; that warning is tested once, below.
pytestmark = pytest.mark.filterwarnings("ignore::diffusion.pretrained.vision_encoders.EncoderSizeWarning")

TINY = dict(depth=2, embed_dim=128, num_heads=2)  # 64-wide heads, as every DINOv2
ARCHS = {"plain": "vit_small_patch14_dinov2", "reg": "vit_small_patch14_reg4_dinov2",
         "swiglu": "vit_giant_patch14_dinov2"}
NAMES = {"plain": "dinov2-vit-s", "reg": "dinov2-vit-s-reg", "swiglu": "dinov2-vit-g"}


def spread_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights in which every layer matters (layer scale at 1e-5 would hide the blocks)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if name.endswith(("gamma", "lambda1")) else p + 0.05 * noise)
    return module


def tiny_timm(kind: str, img_size: int = 518, seed: int = 0):
    """A tiny timm DINOv2 with the released models' 37x37 position grid (518 px)."""
    import timm

    return spread_(timm.create_model(ARCHS[kind], pretrained=False, img_size=img_size, num_classes=0, **TINY), seed)


def to_hub(state: dict, swiglu: bool) -> dict:
    """timm's DINOv2 state dict -> facebookresearch/dinov2's layout (what torch.hub's files hold). Register models:
    timm folds the class token's position into cls_token, so the hub's pos_embed[:, 0] is zero here."""
    hub = {}
    for key, value in state.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        hub["register_tokens" if key == "reg_token" else key] = value.clone()
    if "register_tokens" in hub:
        pos = hub["pos_embed"]
        hub["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    hub["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return hub


def images(batch: int = 2, size: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def timm_reference(kind: str, state: dict, images_uint8: torch.Tensor, input_size: int) -> torch.Tensor:
    """The same weights through timm's own loader (``checkpoint_filter_fn`` resamples the position table to the
    model's grid) and forward: patch tokens after the final norm."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(ARCHS[kind], pretrained=False, img_size=input_size, num_classes=0, **TINY).eval()
    model.load_state_dict(checkpoint_filter_fn(dict(state), model))
    pixels = preprocess_raw_images(images_uint8, "dinov2", input_size)
    with torch.no_grad():
        return model.forward_features(pixels)[:, model.num_prefix_tokens:]


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------
def test_preprocess_matches_repa_output():
    fx = load_fixture("repa_preprocess")
    raw, expected = fx["inputs"]["raw_image"], fx["output"]["dinov2"]
    assert fx["inputs"]["enc_type"] == "dinov2-vit-b" and raw.dtype == torch.uint8
    out = preprocess_raw_images(raw, "dinov2", 224)
    assert out.dtype == torch.float32 and out.shape == expected.shape == (1, 3, 224, 224)
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert torch.equal(preprocess_raw_images(raw.float(), "dinov2", 224), out)  # float 0..255 input, same result
    # REPA's order, written with REPA's own calls: normalise first, then resize (bitwise on any machine).
    from torchvision.transforms import Normalize

    recipe = F.interpolate(Normalize(IMAGENET_MEAN, IMAGENET_STD)(raw / 255.0), 224, mode="bicubic")
    assert torch.equal(out, recipe)
    assert not torch.allclose(preprocess_raw_images(raw, "clip", 224), out, atol=1e-2)  # CLIP's constants differ


def test_clip_preprocess_is_repas_recipe():
    from torchvision.transforms import Normalize

    raw = images(1)
    expected = Normalize(CLIP_MEAN, CLIP_STD)(F.interpolate(raw / 255.0, 224, mode="bicubic"))
    assert torch.equal(preprocess_raw_images(raw, "clip", 224), expected)
    with pytest.raises(UserError):
        preprocess_raw_images(raw[:, :1], "clip", 224)


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------
def test_names_as_repa_spells_them():
    assert parse_name("dinov2-vit-b") == parse_name("dinov2-vit-B")
    assert parse_name("dinov2-vit-b-reg") == parse_name("dinov2reg-vit-b")
    spec = parse_name("dinov2-vit-l-reg")
    assert (spec.name, spec.registers, spec.timm_arch, spec.hub_file) == (
        "dinov2-vit-l-reg", True, "vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg4_pretrain.pth")
    assert parse_name("dinov2-vit-g").timm_arch == "vit_giant_patch14_dinov2"
    assert parse_name("clip-vit-L").family == "clip"
    for bad in ("mocov3-vit-b", "dinov2-vit-x", "dinov2-vit-b-foo", "dinov2reg-vit-b-reg", "clip-vit-B", "dinov2"):
        with pytest.raises(ConfigError, match="unknown vision encoder"):
            parse_name(bad)
    assert load_vision_encoders("None") == [] and load_vision_encoders("") == []


# ----------------------------------------------------------------------------------------------------------------
# torch.hub's key layout <-> timm's
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "reg", "swiglu"])
def test_hub_layout_conversion_is_exact(kind):
    model = tiny_timm(kind)
    state = model.state_dict()
    hub = to_hub(state, swiglu=kind == "swiglu")
    assert dinov2.is_hub_layout(hub) and not dinov2.is_hub_layout(state)
    back = dinov2.hub_to_timm(hub)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # Block-chunked hub files (blocks.C.N.*) name the same blocks.
    chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in hub.items()}
    assert all(torch.equal(dinov2.hub_to_timm(chunked)[k], state[k]) for k in state)
    # A hub file whose class token has its own position: the same conversion as timm's own converter.
    from timm.models.vision_transformer import checkpoint_filter_fn

    hub["pos_embed"] = torch.randn_like(hub["pos_embed"])
    ours, timms = dinov2.hub_to_timm(hub), checkpoint_filter_fn(dict(hub), model)
    assert ours.keys() == timms.keys() and all(torch.equal(ours[k], timms[k]) for k in ours)
    from timm.layers import Mlp, SwiGLUPacked

    assert dinov2.architecture(state)["mlp_layer"] is (SwiGLUPacked if kind == "swiglu" else Mlp)


# ----------------------------------------------------------------------------------------------------------------
# Loading tiny DINOv2 weights through timm
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "reg", "swiglu"])
def test_timm_route_features_and_pos_embed_resampling(kind, tmp_path):
    state = tiny_timm(kind).state_dict()
    torch.save(to_hub(state, swiglu=kind == "swiglu"), tmp_path / "hub.pth")
    raw = images(2, 256)
    encoder = load_vision_encoder(NAMES[kind], weights=str(tmp_path / "hub.pth"))
    assert isinstance(encoder, VisionEncoder) and encoder.backend == "timm"
    assert (encoder.name, encoder.embed_dim, encoder.patch_size, encoder.input_size, encoder.num_tokens) == (
        NAMES[kind], 128, 14, 224, 256)
    out = encoder(raw)
    assert out.shape == (2, 256, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out, timm_reference(kind, state, raw, 224), rtol=1e-5, atol=1e-5)
    if kind == "plain":  # REPA's own line: resample_abs_pos_embed(encoder.pos_embed.data, [16, 16]) at load
        from timm.layers import resample_abs_pos_embed

        assert torch.equal(encoder.model.pos_embed, resample_abs_pos_embed(state["pos_embed"], [16, 16]))
    # The same weights in timm's layout (a file in a timm hub folder) give the same features.
    from safetensors.torch import save_file

    (tmp_path / "timm").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "timm" / "model.safetensors")
    again = load_vision_encoder(NAMES[kind], weights=str(tmp_path / "timm"))
    assert torch.equal(again(raw), out)


def test_resolution_512_gives_1024_tokens(tmp_path):
    state = tiny_timm("plain").state_dict()
    torch.save(state, tmp_path / "w.pth")
    encoder = load_vision_encoder("dinov2-vit-s", weights=str(tmp_path / "w.pth"), resolution=512)
    raw = images(1, 512)
    out = encoder(raw)
    assert (encoder.input_size, encoder.num_tokens, out.shape) == (448, 1024, (1, 1024, 128))
    torch.testing.assert_close(out, timm_reference("plain", state, raw, 448), rtol=1e-5, atol=1e-5)


def test_encoder_is_frozen_and_stays_in_eval(tmp_path):
    torch.save(tiny_timm("plain").state_dict(), tmp_path / "w.pth")
    encoder = load_vision_encoder("dinov2-vit-s", weights=str(tmp_path / "w.pth"))
    assert not any(p.requires_grad for p in encoder.parameters())
    returned = encoder.train()
    assert returned is encoder and not any(m.training for m in encoder.modules())
    torch.nn.Sequential(encoder).train()  # a parent module's train() does not wake it either
    assert not any(m.training for m in encoder.modules())
    pixels = images(1).float().requires_grad_()
    out = encoder(pixels)
    assert not out.requires_grad and out.grad_fn is None


def test_registers_must_match_the_name_and_width_is_checked(tmp_path):
    torch.save(tiny_timm("reg").state_dict(), tmp_path / "reg.pth")
    with pytest.raises(ConfigError, match="name the encoder dinov2-vit-s-reg"):
        load_vision_encoder("dinov2-vit-s", weights=str(tmp_path / "reg.pth"))
    with pytest.warns(EncoderSizeWarning, match="128-wide encoder, but dinov2-vit-s-reg is 384 wide"):
        load_vision_encoder("dinov2-vit-s-reg", weights=str(tmp_path / "reg.pth"))


# ----------------------------------------------------------------------------------------------------------------
# transformers' Dinov2Model: the same weights, the same features
# ----------------------------------------------------------------------------------------------------------------
def hf_to_hub(state: dict) -> dict:
    """A transformers Dinov2 / Dinov2WithRegisters file (its on-disk names) -> facebookresearch/dinov2's layout."""
    hub = {"cls_token": state["embeddings.cls_token"], "mask_token": state["embeddings.mask_token"],
           "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    if "embeddings.register_tokens" in state:
        hub["register_tokens"] = state["embeddings.register_tokens"]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for n in range(depth):
        src, dst = f"encoder.layer.{n}.", f"blocks.{n}."
        for part in ("weight", "bias"):
            hub[f"{dst}attn.qkv.{part}"] = torch.cat([state[f"{src}attention.attention.{q}.{part}"]
                                                      for q in ("query", "key", "value")])
            hub[f"{dst}attn.proj.{part}"] = state[f"{src}attention.output.dense.{part}"]
            for same in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hub[f"{dst}{same}.{part}"] = state[f"{src}{same}.{part}"]
        hub[f"{dst}ls1.gamma"] = state[f"{src}layer_scale1.lambda1"]
        hub[f"{dst}ls2.gamma"] = state[f"{src}layer_scale2.lambda1"]
    return hub


@pytest.mark.parametrize("registers", [False, True])
def test_transformers_route_equals_timm_route(registers, tmp_path):
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, image_size=518,
                  patch_size=14)
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)) if registers \
        else Dinov2Model(Dinov2Config(**kwargs))
    spread_(model, seed=1).save_pretrained(tmp_path / "hf")
    name = "dinov2-vit-s-reg" if registers else "dinov2-vit-s"
    hf = load_vision_encoder(name, weights=str(tmp_path / "hf"), resolution=512)
    assert (hf.backend, hf.embed_dim, hf.prefix_tokens) == ("transformers", 128, 5 if registers else 1)
    torch.save(hf_to_hub(load_file(tmp_path / "hf" / "model.safetensors")), tmp_path / "hub.pth")
    via_timm = load_vision_encoder(name, weights=str(tmp_path / "hub.pth"), resolution=512)
    raw = images(2, 512)
    out = hf(raw)
    assert out.shape == (2, 1024, 128) and not any(p.requires_grad for p in hf.parameters())
    torch.testing.assert_close(out, via_timm(raw), rtol=1e-5, atol=2e-5)
    other = "dinov2-vit-s" if registers else "dinov2-vit-s-reg"
    with pytest.raises(ConfigError, match="registers"):
        load_vision_encoder(other, weights=str(tmp_path / "hf"))


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT-L/14's vision tower through transformers
# ----------------------------------------------------------------------------------------------------------------
def test_clip_vision_tower_patch_tokens_as_repa(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=14)
    torch.manual_seed(0)
    spread_(CLIPVisionModel(CLIPVisionConfig(**vision)), seed=2).save_pretrained(tmp_path / "vision")
    full = spread_(CLIPModel(CLIPConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
        bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16)), seed=3).eval()
    full.save_pretrained(tmp_path / "full")  # the layout of openai/clip-vit-large-patch14
    raw = images(2, 256)
    for folder in ("vision", "full"):
        encoder = load_vision_encoder("clip-vit-L", weights=str(tmp_path / folder))
        assert (encoder.family, encoder.embed_dim, encoder.input_size, encoder.backend) == (
            "clip", 64, 224, "transformers")
        out = encoder(raw)
        assert out.shape == (2, 256, 64)
        # REPA's UpdatedVisionTransformer: the last transformer layer's tokens, class token dropped, no ln_post.
        model = CLIPVisionModel.from_pretrained(tmp_path / "vision") if folder == "vision" else full
        tower = getattr(model, "vision_model", model).eval()  # the vision transformer itself
        with torch.no_grad():
            hidden = tower(pixel_values=preprocess_raw_images(raw, "clip", 224), output_hidden_states=True)
        torch.testing.assert_close(out, hidden.hidden_states[-1][:, 1:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, tower.post_layernorm(out), atol=1e-3)
    with pytest.raises(ConfigError, match="DINOv2"):
        load_vision_encoder("clip-vit-L", weights=str(tmp_path / "vision"), resolution=512)
    with pytest.raises(ConfigError, match="transformers folder"):
        load_vision_encoder("clip-vit-L", weights=str(next((tmp_path / "vision").glob("*.safetensors"))))
    with pytest.raises(ConfigError, match="not dinov2-vit-b"):
        load_vision_encoder("dinov2-vit-b", weights=str(tmp_path / "vision"))


# ----------------------------------------------------------------------------------------------------------------
# Where weights are looked for, and the error when they are nowhere
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """torch.hub's and Hugging Face's caches pointed at empty folders (as on a machine that never downloaded)."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_missing_weights_is_one_clear_error(empty_caches):
    with pytest.raises(WeightsNotFoundError) as info:
        load_vision_encoder("dinov2-vit-b")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert str(empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth") in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth" in message
    assert "huggingface-cli download timm/vit_base_patch14_dinov2.lvd142m" in message
    assert "facebook/dinov2-base" in message
    with pytest.raises(WeightsNotFoundError, match="no file or folder 'nowhere/w.pth'"):
        load_vision_encoder("dinov2-vit-b", weights="nowhere/w.pth")
    with pytest.raises(WeightsNotFoundError, match="not in the local cache"):
        load_vision_encoder("dinov2-vit-b", weights="facebook/dinov2-base")
    with pytest.raises(WeightsNotFoundError, match="openai/clip-vit-large-patch14"):
        load_vision_encoder("clip-vit-L")
    with pytest.raises(WeightsNotFoundError, match="holds no weights files"):
        (empty_caches / "empty").mkdir()
        load_vision_encoder("dinov2-vit-b", weights=str(empty_caches / "empty"))


def test_weights_found_in_torch_hub_and_hugging_face_caches(empty_caches):
    state = tiny_timm("plain").state_dict()
    hub_file = empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(to_hub(state, swiglu=False), hub_file)
    from_hub = load_vision_encoder("dinov2-vit-s")
    assert from_hub.source == str(hub_file)
    hub_file.unlink()
    # timm's hub repo, laid out as huggingface_hub caches it: refs/main -> snapshots/<commit>/...
    from safetensors.torch import save_file

    repo = empty_caches / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2"}))
    from_hf = load_vision_encoders("dinov2-vit-s", weights="")[0]
    assert from_hf.source == str(snapshot / "model.safetensors")
    raw = images(1)
    assert torch.equal(from_hf(raw), from_hub(raw))
    # Several encoders, one weights entry each; a cached hub id works as weights too.
    both = load_vision_encoders("dinov2-vit-s,dinov2-vit-s", weights=["timm/vit_small_patch14_dinov2.lvd142m", ""])
    assert [e.name for e in both] == ["dinov2-vit-s", "dinov2-vit-s"]
    with pytest.raises(ConfigError, match="one per encoder"):
        load_vision_encoders("dinov2-vit-s,clip-vit-L", weights="a.pth")
