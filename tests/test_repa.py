"""REPA's regulariser (diffusion/objectives/repa.py) against the official code (tests/fixtures/repa_loss.pt; see
tests/fixtures/README.md, "REPA") and against hand computations: the projector, the alignment loss and its
reduction, the time direction, the legacy double label drop, the tap on DiT and U-ViT, token resizing, gradients,
and the config section."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.config.loading import config_from_json, config_to_json
from diffusion.config.schema import base_config, check_values
from diffusion.errors import ConfigError
from diffusion.objectives.guidance import drop_labels
from diffusion.objectives.paths import PATHS
from diffusion.objectives.repa import (
    Projectors,
    alignment_loss,
    alignment_loss_per_sample,
    build_projector,
    legacy_label_drop,
    match_tokens,
    register_tap,
    repa_training_losses,
    split_repa_state_dict,
)
from diffusion.objectives.transport import build_transport
from diffusion.registry import tap_blocks
from dit import DiT
from dit.model import timestep_embedding as dit_timestep_embedding
from tests.helpers import load_fixture, rel_err
from uvit import UViT
from uvit.model import timestep_embedding as uvit_timestep_embedding

REPA_PATHS = {"linear": "linear", "cosine": "gvp"}  # REPA's path names -> ours (the same paths, time reversed)
NULL = 1000  # REPA's hard-coded null label (num_classes = 1000 in the fixture)


@functools.cache
def repa_model():
    """(our DiT with REPA's backbone weights, Projectors with its projector weights, the fixture)."""
    fx = load_fixture("repa_loss")
    cfg = fx["config"]
    assert cfg["decoder_hidden_size"] == cfg["hidden_size"]
    dit = DiT(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
              hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
              mlp_ratio=cfg["mlp_ratio"], class_dropout_prob=cfg["class_dropout_prob"],
              num_classes=cfg["num_classes"], learn_sigma=False).eval()
    backbone, projector = split_repa_state_dict(fx["state_dict"])
    dit.load_state_dict(backbone, strict=True)
    projectors = Projectors(cfg["hidden_size"], cfg["z_dims"], cfg["projector_dim"])
    projectors.load_state_dict(projector, strict=True)
    return dit, projectors, fx


def repa_case(i: int, legacy: bool | None = None):
    """REPA's loss of fixture case i recomputed here: REPA's draws replayed in our time (t_ours = 1 - t_repa), the
    model's label drop done by the trainer's ``drop_labels`` (our backbones never drop), the legacy drop by the
    regulariser; the network in REPA's time through the objective's ``time_direction="repa"``. Returns (our terms,
    the labels the network saw, the fixture's inputs and outputs)."""
    dit, projectors, fx = repa_model()
    inp, out = fx["inputs"]["cases"][i], fx["output"]["cases"][i]
    legacy = inp["legacy"] if legacy is None else legacy
    draws = [d["value"] for d in out["draws"]]
    cond = {"y": inp["y"]}
    if inp["mode"] == "train":  # the model's own drop: REPA's last draw, the trainer's p_uncond here
        cond = {"y": drop_labels(inp["y"], inp["cfg_prob"], NULL, draws[-1])}
    legacy_kw = dict(legacy_p=inp["cfg_prob"], null_label=NULL, legacy_uniform=draws[0]) if legacy else {}
    objective = build_transport(path=REPA_PATHS[inp["path_type"]], prediction="velocity", time_direction="repa")
    seen = legacy_label_drop(cond, legacy_kw.get("legacy_p", 0.0), NULL, legacy_kw.get("legacy_uniform"))["y"]
    with register_tap(tap_blocks(dit), fx["config"]["encoder_depth"]) as tap, torch.no_grad():
        terms = repa_training_losses(objective, dit, inp["images"], cond, inp["zs"], projectors, tap,
                                     inp["proj_coeff"], t=1 - out["time_input"], noise=out["noises"], **legacy_kw)
    return terms, seen, inp, out


# ----------------------------------------------------------------------------------------------------------------
# Parity with REPA's SILoss and train.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(5), ids=["linear", "cosine", "lognormal", "train_legacy", "train"])
def test_losses_match_repa(i):
    terms, seen, inp, out = repa_case(i)
    assert torch.equal(seen, out["labels_seen_by_model"])
    assert rel_err(-terms["pred"], out["model_output"]) < 1e-5  # REPA's velocity is minus ours
    assert len(terms["projected"]) == len(out["zs_tilde"]) == 1
    assert rel_err(terms["projected"][0], out["zs_tilde"][0]) < 1e-5
    assert rel_err(terms["denoise"], out["denoising_loss"]) < 1e-5
    assert rel_err(terms["proj"], out["proj_loss_per_sample"]) < 1e-5
    assert rel_err(terms["proj"].mean(), out["proj_loss"]) < 1e-5
    assert rel_err(alignment_loss(terms["projected"], inp["zs"]), out["proj_loss"]) < 1e-5
    assert rel_err(terms["loss"], out["denoising_loss"] + inp["proj_coeff"] * out["proj_loss_per_sample"]) < 1e-5
    assert rel_err(terms["loss"].mean(), out["total_loss"]) < 1e-5
    assert terms["loss"].shape == terms["denoise"].shape == terms["proj"].shape == (inp["images"].shape[0],)


def test_legacy_double_label_drop_matches_repa():
    """Case 4 (--legacy): train.py's own drop hits row 0, the model's row 2; both rows reach the network as the null
    label (p(null) = 1 - 0.9^2). Without the second drop row 0 keeps its label and the losses differ."""
    terms, seen, inp, out = repa_case(3)
    assert out["draw_fns"] == ["rand", "rand", "randn_like", "rand"]
    assert torch.equal(out["labels_after_script_drop"], torch.where(out["draws"][0]["value"] < 0.1, NULL, inp["y"]))
    assert seen.tolist() == out["labels_seen_by_model"].tolist() == [NULL, inp["y"][1], NULL, inp["y"][3]]
    single, seen_single, _, _ = repa_case(3, legacy=False)
    assert seen_single[0] == inp["y"][0] != NULL
    assert rel_err(single["loss"].mean(), out["total_loss"]) > 1e-4
    with pytest.raises(ValueError, match="null label"):
        legacy_label_drop({"y": inp["y"]}, 0.1, None)
    with pytest.raises(ValueError, match="class labels"):
        legacy_label_drop({"context": torch.zeros(2, 3, 4)}, 0.1, NULL)
    assert legacy_label_drop({"y": inp["y"]}, 0.0, None)["y"] is inp["y"]


def test_time_direction_is_reversed():
    """REPA's x_t and target in its time are ours at t = 1 - t_repa, with the velocity's sign flipped; its lognormal
    draw is our logit_normal(0, 1) on the linear path."""
    fx = repa_model()[2]
    for inp, out in zip(fx["inputs"]["cases"], fx["output"]["cases"]):
        path = PATHS[REPA_PATHS[inp["path_type"]]]()
        t_ours = 1 - out["time_input"]
        alpha, sigma, d_alpha, d_sigma = path.coefficients(t_ours)
        torch.testing.assert_close(alpha, out["alpha_t"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sigma, out["sigma_t"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_alpha, -out["d_alpha_t"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_sigma, -out["d_sigma_t"], rtol=1e-6, atol=1e-6)
        x_t, u_t = path.plan(t_ours, out["noises"], inp["images"])
        assert rel_err(x_t, out["model_input"]) < 1e-6
        assert rel_err(-u_t, out["model_target"]) < 1e-6
        if inp["weighting"] == "lognormal":
            n = out["draws"][0]["value"].flatten()
            torch.testing.assert_close(torch.sigmoid(-n), t_ours, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# The projector and the alignment loss
# ----------------------------------------------------------------------------------------------------------------


def test_projector_is_repas_mlp():
    torch.manual_seed(0)
    mlp = build_projector(16, 24, 8)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, torch.nn.Linear)] == [(16, 24), (24, 24),
                                                                                                  (24, 8)]
    for linear in (mlp[0], mlp[2], mlp[4]):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))  # xavier-uniform
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(mlp(h), mlp[4](F.silu(mlp[2](F.silu(mlp[0](h))))))
    projectors = Projectors(16, [8, 12], projector_dim=24)
    assert [tuple(z.shape) for z in projectors(h)] == [(2, 5, 8), (2, 5, 12)]
    _, _, fx = repa_model()
    repa_keys = sorted(k for k in fx["state_dict"] if k.startswith("projectors."))
    assert sorted(f"projectors.{k}" for k in Projectors(64, [32], 128).state_dict()) == repa_keys
    with pytest.raises(ValueError, match="at least one encoder"):
        Projectors(16, [])


def test_alignment_loss_bounds():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 8, generator=g)
    assert alignment_loss([z.clone()], [z]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss([2.5 * z], [z]).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free: cosines
    assert alignment_loss([-z], [z]).item() == pytest.approx(1.0, abs=1e-6)
    a = torch.zeros(2, 4, 8)
    b = torch.zeros(2, 4, 8)
    a[..., :4], b[..., 4:] = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    assert alignment_loss([a], [b]).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(alignment_loss_per_sample([a, z[:2, :4]], [b, z[:2, :4]]), torch.full((2,), -0.5))


def test_alignment_reduction_is_repas():
    """Two encoders of different widths and token counts: REPA's sum over (encoder, sample) of the token mean of
    -cos, divided by encoders x batch; per sample, the mean over encoders."""
    g = torch.Generator().manual_seed(1)
    projected = [torch.randn(3, 16, 8, generator=g), torch.randn(3, 4, 5, generator=g)]
    targets = [torch.randn(3, 16, 8, generator=g), torch.randn(3, 4, 5, generator=g)]
    cos = [F.cosine_similarity(p, z, dim=-1, eps=1e-12) for p, z in zip(projected, targets)]  # (B, T_i)
    total = sum(-cos[i][j].mean() for i in range(2) for j in range(3)) / (2 * 3)
    per_sample = torch.stack([-(cos[0][j].mean() + cos[1][j].mean()) / 2 for j in range(3)])
    torch.testing.assert_close(alignment_loss(projected, targets), total)
    torch.testing.assert_close(alignment_loss_per_sample(projected, targets), per_sample)
    with pytest.raises(ValueError, match="one projector per encoder"):
        alignment_loss(projected, targets[:1])
    with pytest.raises(ValueError, match="batch or feature width"):
        alignment_loss([projected[0][..., :7]], targets[:1])


def test_match_tokens_resizes_the_grid():
    squares = (torch.arange(8.0) ** 2).repeat(8).reshape(1, 64, 1)  # 8 x 8 grid, value = column^2
    down = match_tokens(squares, 4)  # 2 x 2: box means over each 4 x 4 block of backbone patches
    assert down.shape == (1, 4, 1) and down.flatten().tolist() == [3.5, 31.5, 3.5, 31.5]
    two = torch.tensor([0.0, 1.0]).repeat(2).reshape(1, 4, 1)
    up = match_tokens(two, 16)  # bilinear, pixel centres aligned (align_corners=False), edges clamped
    assert up.reshape(4, 4)[0].tolist() == [0.0, 0.25, 0.75, 1.0]
    const = torch.full((2, 64, 3), 0.7)
    for tokens in (16, 256, 36):
        torch.testing.assert_close(match_tokens(const, tokens), torch.full((2, tokens, 3), 0.7))
    z = torch.randn(2, 16, 3)
    assert match_tokens(z, 16) is z
    with pytest.raises(ValueError, match="square grids"):
        match_tokens(z, 15)
    # in the loss: a 8 x 8 backbone grid against a 4 x 4 encoder grid, differentiable through the resize
    projected = torch.randn(2, 64, 5, requires_grad=True)
    target = torch.randn(2, 16, 5)
    pooled = F.avg_pool2d(projected.transpose(1, 2).reshape(2, 5, 8, 8), 2).flatten(2).transpose(1, 2)
    loss = alignment_loss([projected], [target])
    torch.testing.assert_close(loss, alignment_loss([pooled], [target]))
    loss.backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# The tap
# ----------------------------------------------------------------------------------------------------------------


def noisy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Spread the weights (DiT's init zeroes every adaLN layer, so each block would start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def dit_truncated(m: DiT, x, t, y, layer: int) -> torch.Tensor:
    """DiT's forward by hand, stopped after ``layer`` blocks, patch tokens only."""
    h = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    t_emb = m.t_embedder.mlp(dit_timestep_embedding(t, 256))
    y_emb = m.y_embedder.embedding_table(y)
    c, context, patches = t_emb + y_emb, None, h.shape[1]
    if m.block_type == "in_context":
        h = torch.cat([h, t_emb[:, None], y_emb[:, None]], dim=1)
    elif m.block_type == "cross_attn":
        context = torch.stack([t_emb, y_emb], dim=1)
    for block in m.blocks[:layer]:
        h = block(h, c, context)
    return h[:, :patches]


@pytest.mark.parametrize("block_type", ["adaln_zero", "in_context", "cross_attn"])
def test_tap_is_the_truncated_dit(block_type):
    m = noisy(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=5,
                  learn_sigma=False, block_type=block_type))
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 5])
    previous = None
    for layer in range(1, 5):
        with register_tap(tap_blocks(m), layer) as tap, torch.no_grad():
            m(x, t, y)
            expected = dit_truncated(m, x, t, y, layer)
        assert tap.features.shape == (3, 16, 32)
        torch.testing.assert_close(tap.features, expected, rtol=1e-5, atol=1e-6)
        assert previous is None or (tap.features - previous).abs().max() > 1e-3
        previous = tap.features
    assert not m.blocks[3]._forward_hooks  # removed on leaving the with block
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        register_tap(tap_blocks(m), 5)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        register_tap(tap_blocks(m), 0)


def uvit_truncated(m: UViT, x, t, layer: int, extras: int, y=None, context=None) -> torch.Tensor:
    """U-ViT's forward by hand through its first ``layer`` blocks (in, mid, out), dropping ``extras`` tokens."""
    h = m.patch_embed(x)
    time_emb = m.time_embed(uvit_timestep_embedding(t, m.embed_dim))
    tokens = [time_emb[:, None]] if m.time_cond == "token" else []
    if context is not None:
        tokens.append(m.context_embed(context))
    if y is not None:
        tokens.insert(0, m.label_emb(y)[:, None])
    h = torch.cat([*tokens, h], dim=1) + m.pos_embed
    half, skips = len(m.in_blocks), []
    for i, block in enumerate([*m.in_blocks, m.mid_block, *m.out_blocks][:layer]):
        if i < half:
            h = block(h, time_emb=time_emb)
            skips.append(h)
        elif i == half:
            h = block(h, time_emb=time_emb)
        else:
            h = block(h, skips.pop(), time_emb=time_emb)
    return h[:, extras:]


UVIT_VARIANTS = {  # name -> (constructor keywords, extra tokens counted by hand, conditioning)
    "label_time_tokens": (dict(num_classes=6, null_label=5), 2, "y"),
    "time_token": (dict(), 1, None),
    "text": (dict(clip_dim=12, num_clip_token=5), 1 + 5, "context"),
    "adaln_label": (dict(num_classes=6, time_cond="adaln"), 1, "y"),
}


@pytest.mark.parametrize("variant", sorted(UVIT_VARIANTS))
def test_tap_is_the_truncated_uvit(variant):
    kwargs, extras, cond_key = UVIT_VARIANTS[variant]
    m = noisy(UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, **kwargs))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8, generator=g), 999 * torch.rand(2, generator=g)
    cond = {}
    if cond_key == "y":
        cond["y"] = torch.tensor([1, 5])
    elif cond_key == "context":
        cond["context"] = torch.randn(2, 5, 12, generator=g)
    for layer in range(1, 6):  # in, in, mid, out, out
        with register_tap(tap_blocks(m), layer) as tap, torch.no_grad():
            m(x, t, **cond)
            expected = uvit_truncated(m, x, t, layer, extras, **cond)
        assert tap.features.shape == (2, 16, 32)
        torch.testing.assert_close(tap.features, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        register_tap(tap_blocks(m), 6)


def test_tap_rejects_other_networks_and_reports_a_silent_tap():
    with pytest.raises(TypeError, match="does not satisfy the backbone contract"):
        register_tap(tap_blocks(torch.nn.Linear(2, 2)), 1)
    dit, projectors, fx = repa_model()
    other = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=1000,
                learn_sigma=False).eval()
    inp = fx["inputs"]["cases"][0]
    with register_tap(tap_blocks(other), 2) as tap, pytest.raises(RuntimeError, match="did not fire"), \
            torch.no_grad():
        repa_training_losses(build_transport(), dit, inp["images"], {"y": inp["y"]}, inp["zs"], projectors, tap)


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


def tiny_setup(use_checkpoint: bool = False):
    torch.manual_seed(0)
    m = noisy(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=5,
                  learn_sigma=False, use_checkpoint=use_checkpoint)).train()
    projectors = Projectors(32, [6, 10], projector_dim=16)
    encoder = torch.nn.Linear(4 * 2 * 2, 6)  # a stand-in encoder with weights of its own
    g = torch.Generator().manual_seed(3)
    x1, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.rand(2, generator=g)
    patches = F.pixel_unshuffle(x1, 2).flatten(2).transpose(1, 2)  # (B, 16, 16)
    targets = [encoder(patches), torch.randn(2, 4, 10, generator=g, requires_grad=True)]  # 16 and 4 tokens
    return m, projectors, encoder, targets, dict(x1=x1, cond={"y": torch.tensor([1, 3])}, t=t, noise=noise)


def test_only_backbone_and_projectors_get_gradients():
    m, projectors, encoder, targets, batch = tiny_setup()
    with register_tap(tap_blocks(m), 2) as tap:
        terms = repa_training_losses(build_transport(), m, batch["x1"], batch["cond"], targets, projectors, tap, 0.5,
                                     t=batch["t"], noise=batch["noise"])
        terms["loss"].mean().backward()
    assert all(p.grad is None for p in encoder.parameters()) and targets[1].grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projectors.parameters())
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)

    m.zero_grad(set_to_none=True)
    projectors.zero_grad(set_to_none=True)
    with register_tap(tap_blocks(m), 2) as tap:
        terms = repa_training_losses(build_transport(), m, batch["x1"], batch["cond"], targets, projectors, tap, 0.5,
                                     t=batch["t"], noise=batch["noise"])
        terms["proj"].mean().backward()  # the alignment term reaches only what lies before the tap
    assert all(p.grad is None for p in [*m.blocks[2:].parameters(), *m.final_layer.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.blocks[:2].parameters())
    assert m.x_embedder.proj.weight.grad.abs().sum() > 0 and m.y_embedder.embedding_table.weight.grad is not None


def test_tap_gradients_survive_activation_checkpointing():
    grads = []
    for use_checkpoint in (False, True):
        m, projectors, _, targets, batch = tiny_setup(use_checkpoint)
        with register_tap(tap_blocks(m), 3) as tap:
            terms = repa_training_losses(build_transport(), m, batch["x1"], batch["cond"], targets, projectors, tap,
                                         0.5, t=batch["t"], noise=batch["noise"])
            terms["loss"].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in [*m.blocks[0].parameters(), *projectors.parameters()]]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# The config section
# ----------------------------------------------------------------------------------------------------------------


def test_repa_config_section():
    config = base_config()
    assert config.repa.to_dict() == dict(encoders="", layer=8, projector_dim=2048, coeff=0.5, stop_at_step=0,
                                         legacy=False, encoder_weights="")
    check_values(config)
    for key, value in (("layer", 0), ("projector_dim", 0), ("coeff", -0.1), ("stop_at_step", -1)):
        bad = base_config()
        bad.repa[key] = value
        with pytest.raises(ConfigError, match=rf"repa\.{key}"):
            check_values(bad)
    bad = base_config()
    bad.repa.update(layer=0, coeff=-1.0)
    with pytest.raises(ConfigError, match=r"repa\.layer.*repa\.coeff"):
        check_values(bad)
    saved = json.loads(config_to_json(base_config()))
    del saved["repa"]  # a config saved before the section existed gets its defaults
    assert config_from_json(json.dumps(saved)).repa.to_dict() == base_config().repa.to_dict()
