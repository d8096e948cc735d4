"""DINOv2 weights for REPA's encoders: torch.hub's key layout -> timm's, and the timm model built from a state dict.

REPA loads DINOv2 with ``torch.hub.load("facebookresearch/dinov2", ...)``; its weight files
(``dinov2_vitb14_pretrain.pth``, ...) use that repository's key layout. timm's DINOv2 models
(``vit_base_patch14_dinov2``, the ``_reg4`` variants) hold the same network under other names:

=================================  =============================================================================
torch.hub (facebookresearch)        timm
=================================  =============================================================================
``blocks.N.mlp.w12`` / ``w3``       ``blocks.N.mlp.fc1`` / ``fc2`` (ViT-g's fused SwiGLU; timm's ``SwiGLUPacked``
                                    splits ``fc1``'s output the same way, first half gated by SiLU)
``blocks.C.N.*`` (block chunks)     ``blocks.N.*`` (chunk C holds the blocks under their global index N)
``mask_token``, ``head.*``          dropped (masked-image training only; the head is an identity)
``register_tokens``                 ``reg_token``
``pos_embed`` (1, 1 + G*G, D)       with registers: ``pos_embed[:, 1:]``, and ``cls_token + pos_embed[:, :1]`` as
                                    ``cls_token`` (timm's register models add no position to prefix tokens; the
                                    hub model adds ``pos_embed[:, 0]`` to the class token only, the same sum)
everything else                     the same name (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``ls1.gamma``, ...)
=================================  =============================================================================

The architecture is read off the weights (width, depth, MLP width, SwiGLU or GELU MLP, registers, layer scale);
the heads are 64 wide in every DINOv2. The position embedding is resampled once, at load, to the token grid of
the encoder's input as REPA does (``timm.layers.resample_abs_pos_embed``: bicubic, antialiased, prefix tokens
untouched), so the model never interpolates during a forward.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from diffusion.errors import CheckpointError
from diffusion.weights import load_state_strict

HEAD_DIM = 64  # every DINOv2 (S/14: 6 heads of 384, B: 12 of 768, L: 16 of 1024, g: 24 of 1536)
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")


def is_hub_layout(state: dict[str, Tensor]) -> bool:
    """Whether ``state`` is in facebookresearch/dinov2's layout (its files always hold ``mask_token``)."""
    return ("mask_token" in state or "register_tokens" in state
            or any(_CHUNKED.match(k) or ".mlp.w12." in k for k in state))


def hub_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """facebookresearch/dinov2's state dict -> timm's, exactly (see the module docstring for the mapping)."""
    out = {}
    for key, value in state.items():
        if key == "mask_token" or key.startswith("head."):
            continue
        key = _CHUNKED.sub(r"blocks.\1.", key)
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out["reg_token" if key == "register_tokens" else key] = value
    if "reg_token" in out and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def check_timm_state(state: dict[str, Tensor], source) -> None:
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{source} does not hold DINOv2 weights in torch.hub's (facebookresearch/dinov2) or "
                              f"timm's key layout: no {', '.join(missing)} (it has {', '.join(list(state)[:6])}"
                              f"{' ...' if len(state) > 6 else ''})")


def architecture(state: dict[str, Tensor]) -> dict:
    """timm ``VisionTransformer`` keyword arguments for the DINOv2 weights ``state`` (timm layout)."""
    from timm.layers import Mlp, SwiGLUPacked

    dim = state["patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    fc1_out = state["blocks.0.mlp.fc1.weight"].shape[0]
    swiglu = state["blocks.0.mlp.fc2.weight"].shape[1] * 2 == fc1_out
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    return dict(
        embed_dim=dim, depth=depth, num_heads=max(dim // HEAD_DIM, 1),
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        mlp_ratio=(fc1_out + 0.5) / dim,  # timm builds int(dim * mlp_ratio) features: exactly fc1_out
        mlp_layer=SwiGLUPacked if swiglu else Mlp, act_layer=nn.SiLU if swiglu else nn.GELU,
        reg_tokens=registers, no_embed_class=registers > 0,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,  # layer scale present (its value is loaded)
        num_classes=0,
    )


def resample_pos_embed(pos_embed: Tensor, grid: int, num_prefix_tokens: int) -> Tensor:
    """A square (1, prefix + g*g, D) table -> (1, prefix + grid*grid, D), as REPA's ``load_encoders``."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, [grid, grid], num_prefix_tokens=num_prefix_tokens)


def build_timm_dinov2(arch_name: str, state: dict[str, Tensor], input_size: int, source) -> nn.Module:
    """timm's ``arch_name`` with the shapes of ``state`` (timm layout), for ``input_size`` px inputs, weights loaded
    strictly with the position embedding resampled to the input's token grid."""
    import timm

    kwargs = architecture(state)
    if input_size % kwargs["patch_size"]:
        raise CheckpointError(f"{source}: patch size {kwargs['patch_size']} does not divide the {input_size} px input")
    model = timm.create_model(arch_name, pretrained=False, img_size=input_size, **kwargs)
    state = dict(state)
    prefix = 0 if kwargs["no_embed_class"] else 1
    state["pos_embed"] = resample_pos_embed(state["pos_embed"].float(), input_size // kwargs["patch_size"], prefix)
    load_state_strict(model, state, source, what=f"timm {arch_name}")
    return model


def resample_transformers_pos_embed(model: nn.Module, input_size: int) -> None:
    """transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``: the same one-time resampling, in place (its
    forward then uses the table as it is: the token count matches)."""
    embeddings = model.embeddings
    grid = input_size // model.config.patch_size
    table = embeddings.position_embeddings.data
    embeddings.position_embeddings = nn.Parameter(resample_pos_embed(table.float(), grid, 1).to(table.dtype),
                                                  requires_grad=False)
    model.config.image_size = input_size


@torch.no_grad()
def patch_tokens_timm(model: nn.Module, pixels: Tensor) -> Tensor:
    """``x_norm_patchtokens``: the final norm's output at the patch positions (no class or register tokens)."""
    return model.forward_features(pixels)[:, model.num_prefix_tokens:]
