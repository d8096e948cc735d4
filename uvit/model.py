"""U-ViT: "All are Worth Words: A ViT Backbone for Diffusion Models" (Bao et al., CVPR 2023).

Everything is a token: time, class label (or 77 CLIP text tokens) and image patches go through one
transformer whose shallow and deep halves are joined by long skip connections. Constructor keywords and
``state_dict()`` keys equal the original repository's (github.com/baofff/U-ViT), so released checkpoints
load with ``strict=True``. Options beyond the released configs reproduce the paper's design-space ablation
(Sec. 3.1, Fig. 2, CIFAR-10): ``skip_mode`` (how long skips are combined), ``time_cond`` (time as a token, or
adaptive LayerNorm), ``conv`` / ``conv_position`` (the extra 3x3 convolution after the linear decoder, before it,
or none), ``patch_embed`` (linear or convolutional) and ``pos_embed`` (learned 1-D, 2-D sin-cos, or none). Their
defaults are the paper's choices and leave the released models' keys, initialisation and outputs unchanged.

Data flow, shapes for an image batch x of shape (B, C, H, W), patch size p, width D:
    patches (B, L, D), L = HW/p^2 -> prepend [label?, time | time, context] tokens (B, extras + L, D)
    -> + pos_embed -> in_blocks (push) -> mid_block -> out_blocks (pop, skip) -> norm -> decoder_pred
    -> drop extras -> unpatchify (B, C, H, W) -> optional 3x3 conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The ablation switches; the first of each is the paper's choice and the default.
SKIP_MODES = ("concat_linear", "add", "add_linear_skip", "linear_add", "none")
TIME_CONDS = ("token", "adaln")
CONV_POSITIONS = ("after", "before")
PATCH_EMBEDS = ("linear", "conv")
POS_EMBEDS = ("learned", "sincos", "none")
ATTENTION_PATHS = ("auto", "sdpa", "math")  # see attend(); the Attention modules' attention_path


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str = "auto",
           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, L, head_dim), scale 1/sqrt(head_dim) unless given.

    ``sdpa``: F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU, the fastest fp32 path on CPU).
    ``math``: the explicit product, which autograd differentiates; on CPUs in bf16 it is faster than SDPA in both
    directions (docs/benchmarks.md). ``auto``: math for half precision on CPU, sdpa otherwise. Same values either way.
    """
    if path == "auto":
        path = "math" if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else "sdpa"
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if path != "math":
        raise ValueError(f"unknown attention path {path!r}; known: {', '.join(ATTENTION_PATHS)}")
    weights = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of the raw time value, (B,) -> (B, dim), cos half first (as the original)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, L, p*p*C) tokens, per-token layout (p1, p2, C) -> (B, C, H, W) image, row-major patch grid."""
    b, length, feat = x.shape
    p = int(math.isqrt(feat // channels))
    h = w = int(math.isqrt(length))
    assert p * p * channels == feat and h * w == length, "unpatchify needs a square grid of square patches"
    x = x.reshape(b, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p)


def sincos_2d_pos_embed(grid_size: int, dim: int, extras: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, (extras + grid_size**2, dim), patches row-major.

    The ablation "2-D sinusoidal position embedding" of U-ViT (Sec. 3.1, Fig. 2(e)): the concatenation of sinusoids
    of the row i and the column j of patch (i, j). Channels ``[:dim/2]`` encode i, ``[dim/2:]`` encode j; each half
    is ``[sin(pos * w_k) | cos(pos * w_k)]`` with ``w_k = 10000^(-k / (dim/4))``, k < dim/4 (MAE's and DiT's 1-D
    formula; DiT puts the column first, we follow the paper's (i, j)). The extras tokens (time, label, text) get
    zeros, as the class token in MAE and DiT: they carry their own embeddings and have no place on the grid.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def sinusoid(coord: torch.Tensor) -> torch.Tensor:
        args = coord.reshape(-1, 1) * omega
        return torch.cat([args.sin(), args.cos()], dim=1)

    table = torch.cat([sinusoid(rows), sinusoid(cols)], dim=1)
    return torch.cat([table.new_zeros(extras, dim), table]).float()


# ----------------------------------------------------------------------------------------------------------
# Transformer pieces
# ----------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention in the input dtype (no upcast), through :func:`attend`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale  # None -> SDPA's default 1/sqrt(head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention_path = "auto"  # a speed choice, not a weight: see attend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        # qkv features are laid out [q | k | v], each [heads x head_dim]
        q, k, v = self.qkv(x).reshape(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attend(q, k, v, self.attention_path, self.scale)  # (B, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first merge the long skip (paper Sec. 3.1, Fig. 2)."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, norm_layer, skip_mode=None, adaln=False,
                 use_checkpoint=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_mode = skip_mode
        if skip_mode == "concat_linear":  # Linear(concat(h_main, h_skip)), the paper's choice
            self.skip_linear = nn.Linear(2 * dim, dim)
        elif skip_mode in ("add_linear_skip", "linear_add"):
            self.skip_linear = nn.Linear(dim, dim)
        # Ablation "time via adaptive LayerNorm": norm(x) * (1 + scale) + shift from the time embedding.
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim)) if adaln else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x, skip=None, time_emb=None):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, skip, time_emb, use_reentrant=False)
        return self._forward(x, skip, time_emb)

    def _forward(self, x, skip, time_emb):
        if self.skip_mode == "concat_linear":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # current stream first
        elif self.skip_mode == "add":
            x = x + skip
        elif self.skip_mode == "add_linear_skip":
            x = x + self.skip_linear(skip)
        elif self.skip_mode == "linear_add":
            x = self.skip_linear(x + skip)
        h1, h2 = self.norm1(x), None
        if self.adaln is not None:
            shift1, scale1, shift2, scale2 = self.adaln(time_emb).unsqueeze(1).chunk(4, dim=-1)
            h1 = h1 * (1 + scale1) + shift1
        x = x + self.attn(h1)
        h2 = self.norm2(x)
        if self.adaln is not None:
            h2 = h2 * (1 + scale2) + shift2
        return x + self.mlp(h2)


def conv_stem(patch_size: int, in_chans: int, embed_dim: int) -> nn.Sequential:
    """log2(p) 3x3 stride-2 convolutions, each with BatchNorm and ReLU, channels doubling up to D at the last one:
    (B, C, H, W) -> (B, D, H/p, W/p). The convolutional stem of Xiao et al. 2021 ("Early convolutions help
    transformers see better"), which U-ViT's patch-embedding ablation cites; e.g. p=2: C -> D; p=4: C -> D/2 -> D."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"patch_embed='conv' halves the resolution per 3x3 stride-2 convolution, so the patch "
                         f"size must be a power of two >= 2, got {patch_size}")
    layers, channels = [], in_chans
    for i in range(n):
        out = embed_dim >> (n - 1 - i)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    """Image -> row-major patch tokens (B, L, D).

    ``kind="linear"`` (the paper's and the default): ``proj`` = Conv2d with kernel = stride = p, a linear map of each
    patch. ``kind="conv"``: the ablation "convolutional patch embedding" (Sec. 3.1, Fig. 2(d)), ``stem`` =
    ``conv_stem`` then ``proj`` = a 1x1 convolution to D; the paper found the linear patch embedding better.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kind: str = "linear"):
        super().__init__()
        self.patch_size = patch_size
        if kind == "linear":
            self.stem = nn.Identity()
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.stem = conv_stem(patch_size, in_chans, embed_dim)
            self.proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, L, D), row-major tokens


# ----------------------------------------------------------------------------------------------------------
# U-ViT
# ----------------------------------------------------------------------------------------------------------


class UViT(nn.Module):
    """U-ViT noise-prediction network: ``forward(x, timesteps, y=None, context=None) -> eps``.

    Conditioning: ``num_classes > 0`` adds a label token. For classifier-free guidance one of the classes is the
    "no label" class: ``null_label`` names it explicitly (the released ImageNet 256/512 models use
    ``num_classes=1001, null_label=1000``; ImageNet 64 has ``num_classes=1000`` and no null class). ``clip_dim``
    adds ``num_clip_token`` text tokens (the text-to-image variant). ``depth`` counts in- and out-blocks:
    ``depth // 2`` of each plus one mid block.

    Design-space switches (U-ViT Sec. 3.1, Fig. 2; the defaults are the paper's choices):

    - ``skip_mode``: long skip as ``Linear(concat(h_m, h_s))`` (best), ``h_m + h_s`` (no better than no skip:
      the blocks' residual additions already carry h_s linearly), ``h_m + Linear(h_s)``, ``Linear(h_m + h_s)``, or
      ``none``; ``skip=False`` (the original keyword) means ``none``.
    - ``time_cond``: time as a token (better, and simpler) or ``adaln`` (adaptive LayerNorm in every block).
    - ``conv`` / ``conv_position``: the extra 3x3 convolution ``after`` the linear decoder, on the image (better),
      ``before`` it, on the (H/p, W/p, D) token grid (key ``decoder_conv``), or none (``conv=False``).
    - ``patch_embed``: ``linear`` (better) or ``conv`` (a 3x3 convolutional stem then a 1x1 convolution).
    - ``pos_embed``: ``learned`` 1-D (better), ``sincos`` (fixed 2-D table, a non-persistent buffer: no
      ``pos_embed`` key) or ``none`` (much worse: the paper's model fails to generate meaningful images).
    """

    BLOCK_CLASS = Block  # the repeated block: FSDP's unit, activation checkpointing's unit, REPA's tap
    ATTENTION_PATHS = ATTENTION_PATHS  # the values every attention layer's ``attention_path`` takes

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False,
                 num_classes=-1, use_checkpoint=False, conv=True, skip=True, clip_dim=None, num_clip_token=77,
                 skip_mode="concat_linear", time_cond="token", null_label=None, conv_position="after",
                 patch_embed="linear", pos_embed="learned"):
        super().__init__()
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
        if time_cond not in TIME_CONDS:
            raise ValueError(f"time_cond must be one of {TIME_CONDS}, got {time_cond!r}")
        if conv_position not in CONV_POSITIONS:
            raise ValueError(f"conv_position must be one of {CONV_POSITIONS}, got {conv_position!r}")
        if conv_position == "before" and not conv:
            raise ValueError("conv_position='before' places the extra convolution: it needs conv=True")
        if patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed must be one of {PATCH_EMBEDS}, got {patch_embed!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if clip_dim is not None and num_classes > 0:
            raise ValueError("U-ViT is conditioned on class labels or on text, not both")
        if null_label is not None and not 0 <= null_label < num_classes:
            raise ValueError(f"null_label {null_label} is not one of the {num_classes} classes")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.in_chans = in_chans
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.null_label = null_label
        self.clip_dim = clip_dim
        self.num_clip_token = num_clip_token
        self.time_cond = time_cond

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, kind=patch_embed)
        grid_size = img_size // patch_size
        num_patches = grid_size**2

        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        self.extras = 1 if time_cond == "token" else 0
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras += 1
        if clip_dim is not None:
            self.context_embed = nn.Linear(clip_dim, embed_dim)
            self.extras += num_clip_token
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        elif pos_embed == "sincos":  # fixed: rebuilt at construction, never saved
            self.register_buffer("pos_embed", sincos_2d_pos_embed(grid_size, embed_dim, self.extras)[None],
                                 persistent=False)
        else:
            self.pos_embed = None

        skip_mode = skip_mode if skip else "none"
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                     norm_layer=norm_layer, adaln=time_cond == "adaln", use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip_mode=skip_mode) for _ in range(depth // 2)])

        self.norm = norm_layer(embed_dim)
        self.grid_size = grid_size
        conv_before, conv_after = conv and conv_position == "before", conv and conv_position == "after"
        self.decoder_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1) if conv_before else None
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv_after else nn.Identity()

        if pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    # -- the backbone contract (diffusion.registry.Backbone): what the framework may know of this network --------

    @property
    def conditioning(self) -> str:
        """'text' (caption tokens), 'class' (a label token) or 'none'."""
        return "text" if self.clip_dim is not None else "class" if self.num_classes > 0 else "none"

    @property
    def num_labels(self) -> int:
        """Classes a user may ask for: the null class excluded (ImageNet 256: 1000 of the 1001 rows)."""
        if self.num_classes <= 0:
            return 0
        return self.null_label if self.null_label is not None else self.num_classes

    @property
    def context_shape(self) -> tuple[int, int] | None:
        """(tokens, width) of the text conditioning ``context``; None unless text-conditioned."""
        return (self.num_clip_token, self.clip_dim) if self.clip_dim is not None else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    @property
    def token_grid(self) -> int:
        """Patches per side."""
        return self.grid_size

    label_dropout = None  # U-ViT's label dropout is the trainer's (cond.p_uncond); no constructor keyword sets it

    def tap_blocks(self) -> tuple[list[nn.Module], int, int | None]:
        """The blocks in forward order (in, mid, out), where the patch tokens start in a block's output (after the
        ``extras`` tokens: label, time, text) and how many there are (None: the rest)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks], self.extras, None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, timesteps, y=None, context=None):
        x = self.patch_embed(x)  # (B, L, D)
        b = x.shape[0]
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps
        time_emb = self.time_embed(timestep_embedding(timesteps, self.embed_dim).to(x.dtype))  # (B, D)

        tokens = [time_emb.unsqueeze(1)] if self.time_cond == "token" else []
        if self.clip_dim is not None:
            if context is None:
                raise ValueError("this U-ViT is text-conditioned: pass context of shape (B, tokens, clip_dim)")
            tokens.append(self.context_embed(context.to(x.dtype)))  # [time, context, patches]
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this U-ViT is class-conditional: pass y")
            tokens.insert(0, self.label_emb(y).unsqueeze(1))  # [label, time, patches]
        x = torch.cat([*tokens, x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x, time_emb=time_emb)
            skips.append(x)
        x = self.mid_block(x, time_emb=time_emb)
        for blk in self.out_blocks:
            x = blk(x, skips.pop(), time_emb=time_emb)

        x = self.norm(x)
        if self.decoder_conv is None:
            x = self.decoder_pred(x)[:, self.extras :]  # (B, L, p*p*C)
        else:  # ablation: the 3x3 conv on the (D, H/p, W/p) grid of patch tokens, then the linear decoder
            grid = x[:, self.extras :].transpose(1, 2).reshape(b, self.embed_dim, self.grid_size, self.grid_size)
            x = self.decoder_pred(self.decoder_conv(grid).flatten(2).transpose(1, 2))
        return self.final_layer(unpatchify(x, self.in_chans))


# ----------------------------------------------------------------------------------------------------------
# Presets: every model of the paper (Table 1 / Appendix), keyed by its name in the paper. Each entry holds
# the constructor keywords of the released config; data-dependent keys (img_size, in_chans, num_classes,
# clip_dim) are those of the dataset the paper trained it on and can be overridden.
# ----------------------------------------------------------------------------------------------------------

_S = dict(embed_dim=512, depth=12, num_heads=8)
_M = dict(embed_dim=768, depth=16, num_heads=12)
_L = dict(embed_dim=1024, depth=20, num_heads=16)
_H = dict(embed_dim=1152, depth=28, num_heads=16)
_COMMON = dict(mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_IMAGENET = dict(num_classes=1001, null_label=1000, use_checkpoint=True)  # 256 / 512: trained with CFG

PRESETS: dict[str, dict] = {
    # pixel space
    "U-ViT-S/2": dict(**_S, **_COMMON, img_size=32, patch_size=2, in_chans=3),  # CIFAR-10
    "U-ViT-S/4": dict(**_S, **_COMMON, img_size=64, patch_size=4, in_chans=3),  # CelebA 64
    "U-ViT-M/4": dict(**_M, **_COMMON, num_classes=1000, use_checkpoint=True, img_size=64, patch_size=4,
                      in_chans=3),  # ImageNet 64 (no CFG, no null class)
    "U-ViT-L/4": dict(**_L, **_COMMON, num_classes=1000, use_checkpoint=True, img_size=64, patch_size=4,
                      in_chans=3),  # ImageNet 64
    # ImageNet 256 / 512 on SD-VAE latents (32x32x4 / 64x64x4)
    "U-ViT-L/2": dict(**_L, **_COMMON, **_IMAGENET, img_size=32, patch_size=2, in_chans=4),
    "U-ViT-H/2": dict(**_H, **_COMMON, **_IMAGENET, img_size=32, patch_size=2, in_chans=4, conv=False),
    "U-ViT-L/4-512": dict(**_L, **_COMMON, **_IMAGENET, img_size=64, patch_size=4, in_chans=4),
    "U-ViT-H/4-512": dict(**_H, **_COMMON, **_IMAGENET, img_size=64, patch_size=4, in_chans=4, conv=False),
    # MS-COCO 256 text-to-image on latents, CLIP ViT-L/14 context
    "U-ViT-S/2-T2I": dict(**_S, **_COMMON, img_size=32, patch_size=2, in_chans=4, clip_dim=768, num_clip_token=77),
    "U-ViT-S/2-Deep-T2I": dict(**_S, **_COMMON, img_size=32, patch_size=2, in_chans=4, clip_dim=768,
                               num_clip_token=77) | dict(depth=16),
}
