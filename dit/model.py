"""DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023).

A plain ViT over latent patches, conditioned on the timestep and class label through adaptive LayerNorm.
Constructor keywords and ``state_dict()`` keys equal the original repository's
(github.com/facebookresearch/DiT), so the released checkpoints load with ``strict=True`` and give the same
outputs. ``block_type`` adds the other three conditioning designs of the paper's block ablation (Sec. 3.2,
Fig. 5): in-context tokens, cross-attention and adaLN without the zero-initialised gates.

Data flow, shapes for a latent batch x of shape (B, C, H, W), patch size p, width D, L = HW / p^2:
    x_embedder (B, L, D) + pos_embed (fixed 2-D sin-cos)
    t (B,) -> 256-dim sinusoid -> t_embedder MLP (B, D);   y (B,) -> y_embedder table (B, D)
    conditioning: adaLN designs  c = t_emb + y_emb (B, D) regresses per-block shift/scale(/gate)
                  cross_attn     context = [t_emb, y_emb] (B, 2, D), attended by every block
                  in_context     [t_emb, y_emb] appended as tokens (B, L + 2, D), dropped after the last block
    blocks -> final_layer (B, L, p*p*C_out) -> unpatchify (B, C_out, H, W), C_out = 2C with learned sigma
    (channels [0, C) predict eps, [C, 2C) the variance interpolation value v, see diffusion/objectives/iddpm.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attn", "in_context")
ATTENTION_PATHS = ("auto", "sdpa", "math")  # see attend(); the attention modules' attention_path


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str = "auto",
           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, L, head_dim), scale 1/sqrt(head_dim) unless given.

    ``sdpa``: F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU, the fastest fp32 path on CPU).
    ``math``: the explicit product, which autograd differentiates; on CPUs in bf16 it is faster than SDPA in both
    directions (README, Benchmarks). ``auto``: math for half precision on CPU, sdpa otherwise. Same values either way.
    """
    if path == "auto":
        path = "math" if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else "sdpa"
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if path != "math":
        raise ValueError(f"unknown attention path {path!r}; known: {', '.join(ATTENTION_PATHS)}")
    weights = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) scaled by (1 + scale) and shifted, per sample; (1 + .) so that zero means identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of the integer step, (B,) -> (B, dim), cos half first (the pos_embed below is sin first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos table (grid_size^2, dim) over the row-major patch grid, computed in float64.

    Token (row h, col w) gets ``[E(w), E(h)]``: the first half encodes the column (the original builds its
    meshgrid with w first), each half is ``[sin(pos w_k) | cos(pos w_k)]`` with ``w_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, dim/2)
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], dim=1)


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, L, p*p*C) tokens, per-token layout (p, q, C) channel fastest -> (B, C, H, W), row-major patch grid."""
    b, length, feat = x.shape
    p = math.isqrt(feat // channels)
    h = w = math.isqrt(length)
    assert p * p * channels == feat and h * w == length, "unpatchify needs a square grid of square patches"
    x = x.reshape(b, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p)


# ----------------------------------------------------------------------------------------------------------
# Embedders: patches, timesteps, class labels
# ----------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D through one strided conv (``x_embedder.proj``); tokens row-major."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not divisible by the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class TimestepEmbedder(nn.Module):
    """Integer step 0..999 -> 256-dim sinusoid -> Linear-SiLU-Linear (``t_embedder.mlp.{0,2}``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> D. The table has one extra row (the null label, index ``num_classes``) when the model is
    meant for classifier-free guidance. Which labels are dropped to the null row is the training loop's
    business, not the network's (the original dropped them here in train mode)."""

    def __init__(self, num_classes: int, hidden_size: int, with_null_row: bool):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(with_null_row), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (B, D)


# ----------------------------------------------------------------------------------------------------------
# Transformer pieces
# ----------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (qkv with bias, packed [q | k | v]) through :func:`attend` in the compute dtype
    (no upcast)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attention_path = "auto"  # a speed choice, not a weight: see attend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attend(q, k, v, self.attention_path)  # (B, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, length, dim))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to a short conditioning sequence (keys/values): the paper's
    cross-attention design uses the length-2 sequence [t_emb, y_emb]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.attention_path = "auto"

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(b, length, heads, head_dim).transpose(1, 2)  # (B, heads, L, head_dim)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        x = attend(q, k, v, self.attention_path)  # (B, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")  # tanh approximation, as the original
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """One transformer block in one of the paper's four conditioning designs (Fig. 3):

    * ``adaln_zero``: LN (no affine) modulated by shift/scale regressed from c, and each residual branch
      multiplied by a gate alpha, also regressed from c. The regression is zero-initialised, so every block
      starts as the identity (the paper's best design, and the released one).
    * ``adaln``: the same with only shift/scale (4D outputs instead of 6D), no gates. Its regression is also
      zero-initialised (identity modulation), so the gates are the only difference from adaLN-Zero.
    * ``cross_attn``: a standard pre-LN block with a cross-attention sublayer after self-attention.
    * ``in_context``: a standard pre-LN ViT block; the conditioning arrives as tokens in the sequence.
    The two non-adaptive designs use ordinary affine LayerNorms (their only source of a learnable norm scale).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, block_type: str = "adaln_zero"):
        super().__init__()
        self.block_type = block_type
        adaptive = block_type in ("adaln_zero", "adaln")
        norm = dict(elementwise_affine=not adaptive, eps=1e-6)
        self.norm1 = nn.LayerNorm(hidden_size, **norm)
        self.attn = Attention(hidden_size, num_heads)
        if block_type == "cross_attn":
            self.norm_cross = nn.LayerNorm(hidden_size, **norm)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, **norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:
            chunks = 6 if block_type == "adaln_zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); c (B, D) for the adaLN designs; context (B, 2, D) for cross-attention."""
        if self.block_type == "adaln_zero":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.block_type == "adaln":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x))
        if self.block_type == "cross_attn":
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """LN -> (adaLN shift, scale from c, for the adaLN designs) -> Linear(D, p*p*C_out) per token. The paper
    applies "the final layer norm (adaptive if using adaLN)", so the other two designs get a plain affine LN."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        else:
            self.adaLN_modulation = None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)  # (B, L, p*p*C_out)


# ----------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Class-conditional DiT: ``forward(x, t, y) -> (B, C_out, H, W)`` (eps, then v when ``learn_sigma``).

    ``t`` is the integer step 0..T-1 of the original 1000-step process (a respaced sampler maps its indices back
    before calling). ``y`` holds class indices; ``null_label`` (= ``num_classes``) is the unconditional one.

    ``class_dropout_prob`` only decides whether the label table gets that extra null row (it does when > 0),
    as in the original checkpoints. Unlike the original, the network never drops labels itself, in train mode
    or otherwise: the training loop replaces labels by ``model.null_label`` with its configured probability
    (``config.cond.p_uncond``), so the backbone knows nothing of training.
    """

    BLOCK_CLASS = DiTBlock  # the repeated block: FSDP's unit, activation checkpointing's unit, REPA's tap
    ATTENTION_PATHS = ATTENTION_PATHS  # the values every attention layer's ``attention_path`` takes

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 block_type="adaln_zero", use_checkpoint=False):
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.label_dropout = class_dropout_prob  # the contract's: the rate this table was sized for
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.block_type = block_type
        self.use_checkpoint = use_checkpoint
        adaptive = block_type in ("adaln_zero", "adaln")

        # Module creation order equals the original's, so the same seed gives the same initial weights.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, with_null_row=class_dropout_prob > 0)
        num_patches = self.x_embedder.num_patches
        # Fixed, but a (frozen) Parameter so that it sits in the state_dict as in the released checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, block_type) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=adaptive)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's init: xavier-uniform Linears (and patch conv, viewed as a Linear) with zero biases,
        N(0, 0.02) label table and time MLP, and zeros for every adaLN regression and the final linear layer,
        so an untrained adaLN-Zero DiT outputs exactly 0 and each block starts as the identity."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = math.isqrt(self.x_embedder.num_patches)
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, device=self.pos_embed.device)
        self.pos_embed.data.copy_(pos.float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            if hasattr(block, "adaLN_modulation"):
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.adaLN_modulation is not None:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_label(self) -> int | None:
        """Label index meaning "no class" for classifier-free guidance (the extra table row), else None."""
        rows = self.y_embedder.embedding_table.num_embeddings
        return self.num_classes if rows > self.num_classes else None

    # -- the backbone contract (diffusion.registry.Backbone): what the framework may know of this network --------

    conditioning = "class"
    context_shape = None

    @property
    def num_labels(self) -> int:
        """Classes a user may ask for (the null row excluded)."""
        return self.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def token_grid(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    def tap_blocks(self) -> tuple[list[nn.Module], int, int | None]:
        """The blocks in forward order, where the patch tokens start in a block's output (first) and how many
        there are (the in-context design appends its two conditioning tokens after them)."""
        return list(self.blocks), 0, self.x_embedder.num_patches

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("DiT is class-conditional: pass y (use model.null_label for unconditional)")
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        x = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = self.y_embedder(y)  # (B, D)
        c = t_emb + y_emb  # (B, D)
        context = None
        num_patches = x.shape[1]
        if self.block_type == "cross_attn":
            context = torch.stack([t_emb, y_emb], dim=1)  # (B, 2, D)
        elif self.block_type == "in_context":
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)  # (B, L + 2, D)

        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, use_reentrant=False)
            else:
                x = block(x, c, context)

        x = self.final_layer(x[:, :num_patches], c)  # (B, L, p*p*C_out), conditioning tokens dropped
        return unpatchify(x, self.out_channels)  # (B, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         channels: int | str = 3) -> torch.Tensor:
        """The original's guided forward, for its samplers: the batch is [cond; uncond] (uncond half labelled
        ``null_label``); the second half of ``x`` is ignored and replaced by the first, one batched forward, and
        ``eps = eps_u + cfg_scale * (eps_c - eps_u)`` is written into both halves.

        ``channels=3`` guides only channels 0-2, the original's behaviour, needed to reproduce its FID 2.27
        (channel 3 of eps and the variance channels pass through unguided from each half). ``"all"`` guides
        every eps channel (correct). New code should use ``diffusion.objectives.guidance.guided_model`` instead.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2B', C_out, H, W)
        k = self.in_channels if channels == "all" else int(channels)
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Counting parameters without allocating weights (FLOPs: diffusion.tools.flops.forward_flops)
# ----------------------------------------------------------------------------------------------------------


def _as_model(model: DiT | str | dict) -> DiT:
    if isinstance(model, DiT):
        return model
    kwargs = PRESETS[model] if isinstance(model, str) else model
    with torch.device("meta"):
        return DiT(**kwargs)


def count_params(model: DiT | str | dict) -> int:
    """Parameters including the frozen pos_embed (as the paper counts). ``model``: a DiT, a preset name or
    constructor kwargs (built on the meta device, so nothing is allocated)."""
    return sum(p.numel() for p in _as_model(model).parameters())


# ----------------------------------------------------------------------------------------------------------
# Presets: the twelve models of the paper (Table 1), keyed by its names, and SiT's twelve. Data-dependent
# keywords keep the constructor defaults of ImageNet 256 (32x32x4 SD-VAE latents, 1000 classes, learned sigma);
# pass input_size=64 for 512x512.
# ----------------------------------------------------------------------------------------------------------

_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

PRESETS: dict[str, dict] = {
    f"{family}-{size}/{patch}": dict(**cfg, patch_size=patch)
    for family in ("DiT", "SiT") for size, cfg in _SIZES.items() for patch in (2, 4, 8)
}
"""DiT's twelve and SiT's twelve (Ma et al. 2024, Table 1): SiT-X/p is DiT-X/p's network, weight for weight (its
checkpoints load into either name); what makes it SiT is the objective, which feeds it t in [0, 1]
(``diffusion.kind=transport``, ``time_scale=1``) instead of DiT's step index 0..999."""
