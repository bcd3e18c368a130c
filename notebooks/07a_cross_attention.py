# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07a · Cross-attention and the text-conditioned block
#
# Chapter 05's DiT draws one of 18 classes. To draw *a big red circle left of a small blue square*,
# the image tokens must read the caption that chapter 06's text encoder turned into tokens. This
# chapter adds the piece that does it, **cross-attention**, builds the two ways real models inject
# the timestep into a text-conditioned block (adaLN-Zero as in DiT and SD3; adaLN-single as in
# PixArt-α). It exports `tinydit.textblock`; 07b assembles the model (`tinydit.textdit`), trains it
# a little to watch where each word looks, and loads PixArt-α/Σ checkpoints.
#
# | tensor | shape | book | PixArt-α XL/2 at 1024² |
# |---|---|---|---|
# | text tokens `context` | $(B, T, D_\text{text})$ | $(B, T, 96)$ | $(B, 120, 4096)$ (T5-XXL) |
# | key-padding `context_mask` | $(B, T)$, True = real token | $(B, T)$ | $(B, 120)$ |
# | pooled text `pooled` | $(B, D_\text{pooled})$ or None | $(B, 64)$ | None |
# | image tokens (queries) | $(B, N, D)$ | $(B, 16, 192)$ | $(B, 4096, 1152)$ |
# | cross-attention map | $(B, \text{heads}, N, T)$ | $(B, 6, 16, T)$ | $(B, 16, 4096, 120)$ |

# %%
# | default_exp textblock
# %%
import os

import torch

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)
from tinydit.text import load_book_text_encoder


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)
book_text = load_book_text_encoder()  # chapter 06's shipped encoder: 96-wide tokens, 64-wide pooled

# %% [markdown]
# ## 1. Cross-attention: image tokens read the caption
#
# In self-attention, queries, keys and values all come from the image tokens. In **cross-attention**
# the queries still come from the $N$ image tokens $x$, but keys and values come from the $T$ text
# tokens $c$:
#
# $$\operatorname{CrossAttn}(x, c) = \operatorname{softmax}\!\Big(\frac{(xW_Q)(cW_K)^\top}{\sqrt d} + M\Big)\, cW_V,
#   \qquad M_{nj} = \begin{cases}0 & \text{token } j \text{ is real}\\ -\infty & \text{padding}\end{cases}$$
#
# Row $n$ of the softmax is a distribution over the caption's words: *which words does image patch
# $n$ read?* The key-padding mask keeps padding out of that distribution, so a caption means the
# same thing whether it is padded to 5 tokens or to 300.

# %% [markdown]
# The idea in a few lines, with no guards: project, split heads, mask the padding, mix the values.

# %%
def cross_attention_lesson(x, c, pad, Wq, Wk, Wv, heads):
    """x (B, N, D) image tokens read c (B, T, Dc) text tokens; pad (B, T) True = real token."""
    B, N, D = x.shape
    q = (x @ Wq).reshape(B, N, heads, -1).transpose(1, 2)  # (B, h, N, d)
    k = (c @ Wk).reshape(B, c.shape[1], heads, -1).transpose(1, 2)  # (B, h, T, d)
    v = (c @ Wv).reshape(B, c.shape[1], heads, -1).transpose(1, 2)  # (B, h, T, d)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, h, N, T)
    scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))  # padding is never read
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)


xs, cs = torch.randn(2, 16, 32), torch.randn(2, 5, 24)  # 16 image tokens, 5 text tokens
pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # the second caption has 2 padding tokens
Wq, Wk, Wv = torch.randn(32, 32) / 6, torch.randn(24, 32) / 5, torch.randn(24, 32) / 5
lesson_out = cross_attention_lesson(xs, cs, pad, Wq, Wk, Wv, heads=4)
assert lesson_out.shape == (2, 16, 32)
# what padding holds must not matter: change it, and the output stays the same
cs2 = cs.clone()
cs2[1, 3:] = 100.0
assert torch.allclose(cross_attention_lesson(xs, cs2, pad, Wq, Wk, Wv, 4), lesson_out)

# %% [markdown]
# The production `CrossAttention` below computes the same thing with chapter 05's `attention()`
# (SDPA / flash backends), $W_K$ and $W_V$ stacked in one `kv_linear`, and an output projection.
# Its parameter names (`q_linear`, `kv_linear`, `proj`) are PixArt's, so original checkpoints load
# without renaming. The blocks' other parts (`Mlp`, `modulate`, `FinalLayer`) come from chapter 05.


# %%
# | export
"""Cross-attention to text tokens and the text-conditioned DiT block (adaLN-Zero or adaLN-single),
with PixArt's parameter names (Chen et al. 2023), so original checkpoints load without renaming."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.attention import BACKENDS, Attention, RMSNorm, attention
from tinydit.dit import Mlp, modulate
from tinydit.validation import check_int


MODULATIONS = ("adaln_single", "adaln_zero")  # the two ways a text-conditioned block is modulated

# %%
# | export
class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from image tokens x (B, N, D), keys and values from text
    tokens (B, T, D_ctx), with a (B, T) key-padding mask (True = real token). Parameter names follow
    PixArt's `MultiHeadCrossAttention` (Chen et al. 2023): `q_linear`, `kv_linear` (k and v stacked),
    `proj`."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        dim, num_heads = check_int("dim", dim, minimum=1), check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.context_dim = context_dim or dim
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(self.context_dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

# %%
# | export
@add_to_class(CrossAttention)
def qkv_heads(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, D = x.shape
    T = context.shape[1]
    if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
        raise ValueError(f"context: expected ({B}, T, {self.context_dim}), got {tuple(context.shape)}")
    q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
    kv = self.kv_linear(context).reshape(B, T, 2, self.num_heads, self.head_dim)  # (B, T, 2, heads, hd)
    k, v = kv.permute(2, 0, 3, 1, 4)  # (B, heads, T, hd) each
    return self.q_norm(q), self.k_norm(k), v

# %%
# | export
@add_to_class(CrossAttention)
def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    B, N, D = x.shape
    q, k, v = self.qkv_heads(x, context)  # (B, heads, N|T, hd)
    # the model checked its mask once per call; a per-block row check would sync the device
    out = attention(q, k, v, mask=mask, backend=self.backend, check_rows=False)  # (B, heads, N, hd)
    return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

# %%
ca = CrossAttention(32, num_heads=4, context_dim=24)
with torch.no_grad():
    ca.q_linear.weight.copy_(Wq.T)
    ca.q_linear.bias.zero_()
    ca.kv_linear.weight.copy_(torch.cat([Wk, Wv], 1).T)
    ca.kv_linear.bias.zero_()
    ca.proj.weight.copy_(torch.eye(32))
    ca.proj.bias.zero_()
    torch.testing.assert_close(ca(xs, cs, pad), lesson_out, atol=1e-5, rtol=1e-5)
print("CrossAttention == the lesson version (max diff "
      f"{(ca(xs, cs, pad) - lesson_out).abs().max():.1e})")

# %% [markdown]
# ## 2. The text-conditioned block
#
# The text-conditioned block puts cross-attention between self-attention and the MLP
# (PixArt-α, fig. 4):
#
# $$x \leftarrow x + g_1 \odot \operatorname{SelfAttn}(\operatorname{mod}_1(x)),\qquad
#   x \leftarrow x + \operatorname{CrossAttn}(x, c),\qquad
#   x \leftarrow x + g_2 \odot \operatorname{MLP}(\operatorname{mod}_2(x)),$$
#
# with $\operatorname{mod}(x) = \operatorname{LN}(x)(1 + \gamma) + \beta$. Where do $\beta, \gamma, g$
# come from? Two answers:
#
# - **adaLN-Zero** (DiT; the book model): each block has its own linear map from the conditioning
#   vector $c = e_t + \operatorname{MLP}(\text{pooled text})$ (SD3 adds the pooled CLIP vector the same
#   way) to the six vectors; $6D^2$ parameters per block. The book block adds a LayerNorm before
#   cross-attention and zero-initialises its output projection, so every block still starts as the
#   identity.
# - **adaLN-single** (PixArt-α, §2.3): **one** shared map $\bar s = W\,\operatorname{SiLU}(e_t)$ for the
#   whole network, and per block only a learned table $E^{(i)} \in \mathbb R^{6 \times D}$ added to it:
#   $(\beta_1, \gamma_1, g_1, \beta_2, \gamma_2, g_2) = \bar s + E^{(i)}$. For DiT-XL that removes
#   $27 \times 6D^2 \approx 215$ M parameters (26 % of the model), which PixArt spends on
#   cross-attention instead. No LayerNorm before cross-attention (as the original code).
#
# PixArt-α at 1024² also embeds the image **resolution** and **aspect ratio** (sinusoid + MLP, each
# $D/3$ wide; 2 + 1 of them fill $D$) and adds them to $e_t$ ("micro-conditions"). Its position table
# is rescaled to the training resolution: positions are $i \,/\, (\text{grid}/\text{base}) \,/\, s$
# with base = the training grid and the interpolation scale $s$ = 0.5, 1, 2 at 256, 512, 1024 px, so
# other grids see positions in the same range.

# %% [markdown]
# The adaLN-single block in a dozen lines: one shared vector `s` (B, 6D) for the whole network, a
# learned (6, D) table per block, LayerNorm without its own scale, and three residual branches.

# %%
def text_block_lesson(x, s, table, ctx, pad, attn, cross, mlp):
    """x (B, N, D) image tokens; s (B, 6D) the shared modulation; table (6, D) this block's own."""
    B, N, D = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = (table + s.reshape(B, 6, D)).unbind(1)  # 6 x (B, D)
    norm = lambda h: torch.nn.functional.layer_norm(h, (D,), eps=1e-6)  # noqa: E731
    h = norm(x) * (1 + scale1[:, None]) + shift1[:, None]  # (B, N, D), modulated
    x = x + gate1[:, None] * attn(h)  # self-attention, gated
    x = x + cross(x, ctx, pad)  # cross-attention: no gate, no norm (PixArt)
    h = norm(x) * (1 + scale2[:, None]) + shift2[:, None]
    return x + gate2[:, None] * mlp(h)  # (B, N, D)


# %%
# | export
class ProjMlp(nn.Module):
    """Linear -> activation -> Linear with its own output width: PixArt's caption projection
    `y_proj` (GELU-tanh) and SD3's pooled-text embedder (SiLU). Names `fc1`, `fc2` (timm's Mlp)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, act: str = "gelu_tanh"):
        super().__init__()
        if act not in ("gelu_tanh", "silu"):
            raise ValueError(f"act: expected 'gelu_tanh' or 'silu', got {act!r}")
        self.act = act
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h, approximate="tanh") if self.act == "gelu_tanh" else F.silu(h)
        return self.fc2(h)

# %%
# | export
class CaptionEmbedder(nn.Module):
    """Text tokens (B, T, D_ctx) -> (B, T, D) with PixArt's `y_proj` MLP; `y_embedding` (T_null,
    D_ctx) is the learned **null caption** for classifier-free guidance (PixArt-α), or absent."""

    def __init__(self, context_dim: int, hidden_size: int, caption_tokens: int = 0):
        super().__init__()
        self.y_proj = ProjMlp(context_dim, hidden_size, hidden_size, act="gelu_tanh")
        if caption_tokens:
            self.register_buffer("y_embedding", torch.randn(caption_tokens, context_dim) / context_dim**0.5)
        else:
            self.y_embedding = None

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.y_proj(context)  # (B, T, D)

# %%
# | export
class TextDiTBlock(nn.Module):
    """Self-attention -> cross-attention -> MLP. `modulation="adaln_single"`: a per-block
    `scale_shift_table` (6, D) added to the shared modulation (PixArt-α, Chen et al. 2023), no norm
    before cross-attention; `"adaln_zero"`: a per-block adaLN-Zero map from c (Peebles & Xie 2023)
    and a LayerNorm before cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, modulation: str = "adaln_single",
                 qk_norm: bool = False, attn_backend: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation: expected one of {MODULATIONS}, got {modulation!r}")
        D = hidden_size
        self.modulation = modulation
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(D, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=attn_backend)
        self.norm_cross = nn.LayerNorm(D, eps=norm_eps) if modulation == "adaln_zero" else nn.Identity()
        self.cross_attn = CrossAttention(D, num_heads, qk_norm=qk_norm, backend=attn_backend)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        if modulation == "adaln_single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def modulation_params(self, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six (B, D) vectors (shift, scale, gate for attention; the same for the MLP). `mod` is the
        shared (B, 6D) vector (adaLN-single) or the conditioning c (B, D) (adaLN-Zero)."""
        if self.modulation == "adaln_single":
            return (self.scale_shift_table[None] + mod.reshape(mod.shape[0], 6, -1)).unbind(1)  # 6 x (B, D)
        return self.adaLN_modulation(mod).chunk(6, dim=1)  # 6 x (B, D)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation_params(mod)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), context, mask)  # (B, N, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x

# %%
# | export
class T2IFinalLayer(nn.Module):
    """PixArt's final layer: LayerNorm modulated by a learned `scale_shift_table` (2, D) plus the
    embedded timestep, then a linear map to p x p x C_out patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)

# %%
torch.manual_seed(0)
blk = TextDiTBlock(32, num_heads=4, modulation="adaln_single")
ctx32, s6 = torch.randn(2, 5, 32), torch.randn(2, 6 * 32)
with torch.no_grad():
    ours = blk(xs, s6, ctx32, pad)
    lesson = text_block_lesson(xs, s6, blk.scale_shift_table, ctx32, pad, blk.attn, blk.cross_attn, blk.mlp)
torch.testing.assert_close(ours, lesson)
print(f"TextDiTBlock (adaLN-single) == the lesson block; {sum(p.numel() for p in blk.parameters()):,} parameters")

# %% [markdown]
# **Looking at it.** A fresh `CrossAttention` reading the book encoder's tokens of one caption: each of
# the 16 image tokens (rows) spreads its attention over the caption's tokens (columns). Untrained, the
# rows are nearly uniform; chapter 07b watches them sharpen on the words that matter.

# %%
import matplotlib.pyplot as plt

from tinydit.attention import attention_weights


caption = "a big red circle left of a small blue square"
emb = book_text([caption])  # tokens (1, T, 96), mask (1, T)
torch.manual_seed(0)
ca = CrossAttention(192, 6, context_dim=emb.tokens.shape[-1])
q, k, _ = ca.qkv_heads(torch.randn(1, 16, 192), emb.tokens)  # (1, 6, 16, hd), (1, 6, T, hd)
maps = attention_weights(q, k, emb.mask).mean(1)[0].detach()  # (16, T), averaged over heads
assert torch.allclose(maps.sum(-1), torch.ones(16), atol=1e-5)
plt.figure(figsize=(7, 3.5))
plt.imshow(maps, aspect="auto", cmap="viridis")
plt.xlabel(f"caption token ({maps.shape[1]}: <bos>, the words, <eos>)")
plt.ylabel("image token")
plt.colorbar(label="weight")
plt.title(f"untrained cross-attention over {caption!r}")
plt.show()

# %% [markdown]
# ## Summary
#
# - **Cross-attention** lets each image token read the caption: queries from the image, keys and
#   values from the text, padding masked out exactly (the lesson version and `CrossAttention` agree).
# - A text-conditioned block is self-attention → cross-attention → MLP, modulated by
#   **adaLN-Zero** (a map per block; the book model, plus the pooled text vector) or
#   **adaLN-single** (one shared map and a per-block table; PixArt). `tinydit.textblock` holds them.
#
# ## Exercises
#
# 1. Remove the key-padding mask in `cross_attention_lesson` and pad one caption with random
#    vectors. How much does its output change? Why does the production code refuse float masks?
