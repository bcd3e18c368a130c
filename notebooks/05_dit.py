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
# # 05 · The DiT core: patchify, attention, adaLN-Zero
#
# The Diffusion Transformer (Peebles & Xie, *Scalable Diffusion Models with Transformers*, 2023)
# replaced the U-Net of latent diffusion with a plain Vision Transformer. Its recipe is short:
#
# 1. **Patchify** the noisy latent $(B, C, H, W)$ into $T = (H/p)(W/p)$ tokens of width $D$ and add
#    fixed 2D sin-cos position embeddings.
# 2. Run $N$ transformer **blocks** (self-attention + MLP) whose LayerNorms are **modulated** by
#    the conditioning $c$ = timestep embedding + class embedding (**adaLN-Zero**).
# 3. A **final layer** (one more modulated LayerNorm and a linear map) turns each token back into a
#    $p \times p$ patch of $C$ (or $2C$, with learned variance) channels; **unpatchify** reassembles
#    the image.
#
# | tensor | shape | book model | DiT-XL/2 at 256² |
# |---|---|---|---|
# | latent `x` | $(B, C, H, W)$ | $(B, 4, 8, 8)$ | $(B, 4, 32, 32)$ |
# | tokens after patchify | $(B, T, D)$, $T = HW/p^2$ | $(B, 16, 192)$ | $(B, 256, 1152)$ |
# | conditioning `c` | $(B, D)$ | $(B, 192)$ | $(B, 1152)$ |
# | per-block modulation | $(B, 6D)$ | $(B, 1152)$ | $(B, 6912)$ |
# | attention q, k, v | $(B, \text{heads}, T, D/\text{heads})$ | $(B, 6, 16, 32)$ | $(B, 16, 256, 72)$ |
# | output | $(B, C_\text{out}, H, W)$ | $(B, 4, 8, 8)$ | $(B, 8, 32, 32)$ |
#
# This chapter exports two modules: `tinydit.attention` (attention with interchangeable backends)
# and `tinydit.dit` (the model, its presets and its checkpoint loaders). Parameter names follow the
# original facebookresearch DiT code, so the released `DiT-XL-2-256x256.pt` loads without renaming.

# %%
# | default_exp dit

# %%
import os
import time

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)

# %% [markdown]
# ## 1. Attention, three ways
#
# Scaled dot-product attention (Vaswani et al., 2017) over $h$ heads of width $d$:
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt d} + M\right) V,$$
#
# where the mask $M$ is $0$ where a query may look and $-\infty$ where it may not (padding tokens of
# a caption, in the next chapter). The *maths* is one line; the *speed* is all in the kernel.
# `attention()` takes `(B, heads, T, head_dim)` tensors and one of three backends:
#
# - `math`: the formula above, written out. It materialises the $T \times T$ score matrix, which is
#   what we want when we teach (and when we want to *look* at the attention map).
# - `sdpa`: PyTorch's `scaled_dot_product_attention`, which on a GPU dispatches to FlashAttention or
#   memory-efficient kernels that never build the score matrix.
# - `flash`: the `flash_attn` package (Dao et al., FlashAttention-2), only when it is installed, the
#   tensors are on CUDA in fp16/bf16, and there is no mask. It is never imported unless asked for.
#
# `auto` picks `flash` when it is valid, else `sdpa`.
#
# Masks are boolean with **True = may attend**. A `(B, T_k)` mask is a key-padding mask (1 = real
# token), the form text encoders return; a mask broadcastable to `(B, heads, T_q, T_k)` is used as is.
#
# Optional **QK-norm** (RMSNorm on queries and keys, as in SD3 and Flux) keeps attention logits
# from growing without bound in large models; RMSNorm is
# $\operatorname{RMSNorm}(x) = x / \sqrt{\operatorname{mean}(x^2) + \epsilon} \cdot g$.

# %%
# | export attention
"""Attention over (B, heads, T, head_dim) with interchangeable backends (math / sdpa / flash)."""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "flash", "math")


def flash_available(q: torch.Tensor) -> bool:
    """True when the flash_attn package is installed and `q` is a CUDA fp16/bf16 tensor."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and importlib.util.find_spec("flash_attn") is not None)


def _as_attention_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A boolean mask broadcastable to (B, heads, T_q, T_k); True = may attend."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    if mask.dtype.is_floating_point:  # an additive 0/-inf mask would silently mean the opposite
        raise ValueError("mask: expected a boolean or 0/1 integer mask (True = may attend), got a "
                         f"{mask.dtype} tensor; convert an additive mask with `mask == 0`")
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.ndim == 2:  # key-padding mask (B, T_k), as text encoders return
        if mask.shape != (B, Tk):
            raise ValueError(f"mask: a 2-D mask must be a key-padding mask of shape (B, T_k) = "
                             f"{(B, Tk)}, got {tuple(mask.shape)}")
        if not mask.any(dim=1).all():
            raise ValueError("mask: every sample needs at least one real (True) key; got a row of "
                             "padding only")
        return mask[:, None, None, :]  # (B, 1, 1, T_k)
    try:
        torch.broadcast_shapes(mask.shape, (B, q.shape[1], Tq, Tk))
    except RuntimeError:
        raise ValueError(f"mask: expected (B, T_k) = {(B, Tk)} or a mask broadcastable to "
                         f"(B, heads, T_q, T_k) = {(B, q.shape[1], Tq, Tk)}, got {tuple(mask.shape)}") from None
    if not mask.any(dim=-1).all():  # softmax over no keys: NaN in one backend, 0 in another
        raise ValueError("mask: every query needs at least one key it may attend to; got a row of False")
    return mask


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + M): the (B, heads, T_q, T_k) attention map, written out."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~_as_attention_mask(mask, q, k), float("-inf"))
    return scores.softmax(dim=-1)  # (B, heads, T_q, T_k)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017) over (B, heads, T, head_dim) tensors.

    `mask`: None, a (B, T_k) key-padding mask, or a boolean mask broadcastable to
    (B, heads, T_q, T_k); True / 1 = may attend. `backend`: "auto", "sdpa", "flash" or "math".
    Returns (B, heads, T_q, head_dim).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name}: expected a (B, heads, T, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: shapes do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need equal B and heads, equal T for k and v, equal "
                         "head_dim for q and k)")
    if backend == "auto":
        backend = "flash" if mask is None and flash_available(q) else "sdpa"
    if backend == "flash":
        if mask is not None or not flash_available(q):
            raise ValueError("backend: 'flash' needs the flash_attn package, CUDA fp16/bf16 tensors "
                             "with head_dim <= 256, and no mask; use 'sdpa' or 'auto'")
        from flash_attn import flash_attn_func  # optional dependency, imported only here

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scale)  # (B, T_q, heads, head_dim)
        return out.transpose(1, 2)  # (B, heads, T_q, head_dim)
    if backend == "sdpa":
        attn_mask = None if mask is None else _as_attention_mask(mask, q, k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return attention_weights(q, k, mask, scale) @ v  # (B, heads, T_q, head_dim)


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm / original DiT names).

    `forward(x, mask=None)`: x (B, T, D) -> (B, T, D). Parameters `qkv`, `proj`, and with
    `qk_norm=True` the RMSNorms `q_norm`, `k_norm` (per head, as SD3 / Flux).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, hd)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv_heads(x)  # (B, heads, T, hd) each
        out = attention(q, k, v, mask=mask, backend=self.backend)  # (B, heads, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

# %% [markdown]
# The three backends must agree. On this CPU `flash` is not available, so we compare `math` and
# `sdpa`, with and without a key-padding mask (the test suite does the same).

# %%
q, k, v = torch.randn(3, 2, 5, 16, 8).unbind(0)  # (B=2, heads=5, T=16, head_dim=8) each
pad = torch.ones(2, 16, dtype=torch.bool)
pad[1, 10:] = False  # the second sample has 6 padding tokens
for m in (None, pad):
    diff = (attention(q, k, v, m, backend="math") - attention(q, k, v, m, backend="sdpa")).abs().max()
    print(f"mask={'none' if m is None else 'key-padding'}: max |math - sdpa| = {diff:.2e}")
    assert diff < 1e-5
w = attention_weights(q, k, pad)
assert torch.allclose(w.sum(-1), torch.ones(2, 5, 16)) and (w[1, :, :, 10:] == 0).all()
print("auto on this machine ->", "flash" if flash_available(q) else "sdpa")

# %% [markdown]
# ## 2. Patchify and unpatchify
#
# A $p \times p$ convolution with stride $p$ is the same as cutting the image into non-overlapping
# $p \times p$ patches, flattening each, and multiplying by one shared matrix: it *is* the linear
# patch embedding of ViT, written as a convolution because that is fast. `unpatchify` is the exact
# inverse reshaping for the output tokens.
#
# The tokens then get fixed 2D sin-cos position embeddings (chapter 03): the first half of each
# vector encodes the column, the second half the row. They are not learned, so a smaller grid
# simply uses the top-left corner of the table.

# %%
# | export
"""The Diffusion Transformer (Peebles & Xie 2023): patchify, adaLN-Zero blocks, label conditioning,
presets, and loaders for the original facebookresearch DiT and diffusers checkpoint layouts."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.attention import BACKENDS, Attention
from tinydit.checkpoint import (
    check_and_load,
    load_state_dict,
    resolve_pretrained,
    unwrap_state_dict,
)
from tinydit.embeddings import TimestepEmbedder, sincos_pos_embed_2d


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) with one p×p, stride-p convolution (ViT's patchify)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D), row-major over the patch grid


def unpatchify(x: torch.Tensor, patch_size: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image; the inverse of patchify's reshaping."""
    B, T, PPC = x.shape
    p = patch_size
    c = PPC // (p * p)
    x = x.reshape(B, h, w, p, p, c)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(B, c, h * p, w * p)  # (B, C, H, W)

# %%
pe = PatchEmbed(patch_size=2, in_channels=4, hidden_size=32)
lat = torch.randn(3, 4, 8, 8)  # (B, C, H, W)
tokens = pe(lat)
print("latent", tuple(lat.shape), "-> tokens", tuple(tokens.shape))
assert tokens.shape == (3, 16, 32)
# unpatchify inverts the patch reshaping exactly: cut patches by hand, then reassemble
patches = lat.reshape(3, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, 2 * 2 * 4)  # (B, T, p*p*C)
assert torch.equal(unpatchify(patches, 2, 4, 4), lat)
# the convolution is the linear patch embedding
lin = patches.reshape(3, 16, 2, 2, 4).permute(0, 1, 4, 2, 3).reshape(3, 16, 16) @ pe.proj.weight.reshape(32, 16).T + pe.proj.bias
assert torch.allclose(lin, tokens, atol=1e-5)

# %% [markdown]
# ## 3. Conditioning: timesteps and labels
#
# The timestep goes through the `TimestepEmbedder` of chapter 03 (sinusoid → MLP). Class labels go
# through a `LabelEmbedder`: a table with one extra row, the **null class** (index `num_classes`).
# During training each label is replaced by the null class with probability `class_dropout_prob`
# (10 % in DiT), so the same network also learns the *unconditional* model that classifier-free
# guidance (chapter 09) needs. The conditioning vector is the sum $c = e_t + e_y$.

# %%
# | export
class LabelEmbedder(nn.Module):
    """Class labels -> (B, D) vectors; row `num_classes` is the null class, used for label dropout
    during training and for the unconditional branch of classifier-free guidance (Ho & Salimans)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device)
            labels = torch.where(drop < self.dropout_prob, self.num_classes, labels)
        return self.embedding_table(labels)  # (B, D)

# %% [markdown]
# ## 4. The DiT block and adaLN-Zero
#
# A pre-norm transformer block computes $x \leftarrow x + \operatorname{Attn}(\operatorname{LN}(x))$
# and $x \leftarrow x + \operatorname{MLP}(\operatorname{LN}(x))$. DiT injects the conditioning by
# *modulating* those LayerNorms (adaptive LayerNorm, from StyleGAN and FiLM). A linear layer maps
# $\operatorname{SiLU}(c)$ to six vectors $(\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2)$:
#
# $$x \leftarrow x + \alpha_1 \odot \operatorname{Attn}\big(\operatorname{LN}(x)\,(1 + \gamma_1) + \beta_1\big),\qquad
#   x \leftarrow x + \alpha_2 \odot \operatorname{MLP}\big(\operatorname{LN}(x)\,(1 + \gamma_2) + \beta_2\big).$$
#
# The **Zero** in adaLN-Zero: the modulation layer is initialised to zero, so at initialisation every
# gate $\alpha$ is $0$ and **every block is the identity function**. A freshly built 28-block DiT is
# then a well-behaved shallow network (patch embed → final layer), and each block learns to add its
# residual gradually. Peebles & Xie found this the best of the conditioning schemes they tried
# (in-context tokens, cross-attention, adaLN, adaLN-Zero), at the lowest cost. The final layer is
# zero-initialised too, so the untrained model predicts exactly zero.
#
# Note the "1 +" in front of $\gamma$: with $\gamma = 0$ the LayerNorm's scale is $1$, not $0$.

# %%
# | export
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) scaled by (1 + scale) and shifted by shift, both (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU (tanh approximation, as DiT) -> Linear (timm names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Self-attention + MLP, both modulated and gated by adaLN-Zero (Peebles & Xie 2023, fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 attn_backend: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to a p×p×C_out patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)

# %% [markdown]
# A block with zero-initialised modulation must be the identity, whatever the input and the
# conditioning:

# %%
blk = DiTBlock(hidden_size=32, num_heads=4)
nn.init.zeros_(blk.adaLN_modulation[1].weight)
nn.init.zeros_(blk.adaLN_modulation[1].bias)
xs, cs = torch.randn(2, 16, 32), torch.randn(2, 32)
assert torch.equal(blk(xs, cs), xs)
print("a zero-initialised DiT block is the identity: True")

# %% [markdown]
# ## 5. The model and its presets
#
# `DiTConfig` holds every choice, each with the reason it exists. The paper's presets are
# S / B / L / XL (width and depth) × patch size /2 /4 /8; `book` is ours: a few million parameters
# for the book's 4×8×8 latents, with 18 classes (one per colour × shape pair of chapter 01).

# %%
# | export
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads


@dataclass
class DiTConfig:
    """Architecture of a DiT. Presets: `DiTConfig.preset("DiT-XL/2")`, `..."DiT-S/8"`, `"book"`."""

    input_size: int = 32  # latent side the position table is built for (256 px / VAE factor 8)
    patch_size: int = 2  # p: tokens = (input_size / p)^2; smaller p = more tokens = more GFLOPs
    in_channels: int = 4  # latent channels of the VAE
    hidden_size: int = 1152  # D, the token width
    depth: int = 28  # number of DiT blocks
    num_heads: int = 16  # attention heads (head_dim = D / heads)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    num_classes: int = 1000  # label vocabulary; the table has one more row, the null class
    class_dropout_prob: float = 0.1  # label -> null during training, for classifier-free guidance
    learn_sigma: bool = True  # also predict the variance: 2 * in_channels outputs (improved DDPM)
    frequency_embedding_size: int = 256  # width of the sinusoidal timestep features
    freq_shift: float = 0.0  # timestep sinusoid downscale_freq_shift: 0 in the original code, 1 in diffusers' port
    norm_eps: float = 1e-6  # LayerNorm epsilon inside the blocks (original DiT)
    qk_norm: bool = False  # RMSNorm on queries and keys (SD3 / Flux); the released DiTs have none
    attn_backend: str = "auto"  # "auto", "sdpa", "flash" or "math"

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                     "num_classes", "frequency_embedding_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size: must be divisible by patch_size={self.patch_size}, got {self.input_size}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob: expected a value in [0, 1), got {self.class_dropout_prob}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend: expected one of {BACKENDS}, got {self.attn_backend!r}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @classmethod
    def preset_names(cls) -> list[str]:
        return [f"DiT-{s}/{p}" for s in _SIZES for p in (2, 4, 8)] + ["book"]

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        """A named architecture, optionally with some fields overridden."""
        if name == "book":
            base = cls(input_size=8, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=6,
                       num_classes=18, learn_sigma=False)
        else:
            size, _, patch = name.removeprefix("DiT-").partition("/")
            if not name.startswith("DiT-") or size not in _SIZES or patch not in ("2", "4", "8"):
                raise ValueError(f"name: unknown DiT preset {name!r}; expected one of {cls.preset_names()}")
            depth, width, heads = _SIZES[size]
            base = cls(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(patch))
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown DiTConfig fields {unknown}")
        return cls(**d)

# %% [markdown]
# The model ties the pieces together. `forward(x, t, y)` validates its inputs first, so a wrong shape
# fails with a sentence rather than a stack of torch internals.

# %%
# | export
class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero conditioning on timestep and class label.

    `model(x, t, y=None)`: x (B, C, H, W) noisy latents, t (B,) or scalar timesteps, y (B,) labels
    (None or `num_classes` = the null class). Returns the raw network output (B, C_out, H, W):
    epsilon, followed by the variance interpolation channels when `learn_sigma`.
    """

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else DiTConfig()
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size,
                                           flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        grid = cfg.input_size // cfg.patch_size
        # fixed (not learned) sin-cos table; a buffer so checkpoints carry it under "pos_embed"
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.hidden_size, grid)[None])  # (1, T, D)
        self.blocks = nn.ModuleList([
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attn_backend, cfg.norm_eps)
            for _ in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def _init_linears_and_patch_embed(self) -> None:
        """Xavier-uniform every linear (zero bias) and the patch embedding, seen as a linear map."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and final layer."""
        self._init_linears_and_patch_embed()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def _check_latents(self, x: torch.Tensor, t, fixed_table: bool = True) -> torch.Tensor:
        """Validate latents x (B, C, H, W) and timesteps; returns t as a (B,) tensor."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected latents of shape (B, {cfg.in_channels}, H, W), got {got}")
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"x: H and W must be divisible by patch_size={p}, got {H}x{W}")
        if fixed_table and (H > cfg.input_size or W > cfg.input_size):
            raise ValueError(f"x: {H}x{W} is larger than the position table allows "
                             f"(input_size={cfg.input_size}); build the model with a larger input_size")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t: expected a scalar or shape ({B},) to match the batch, got {tuple(t.shape)}")
        return t

    def _check_inputs(self, x: torch.Tensor, t, y) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        t = self._check_latents(x, t)
        B = x.shape[0]
        if y is None:
            y = torch.full((B,), cfg.num_classes, device=x.device, dtype=torch.long)  # null class
        y = torch.as_tensor(y, device=x.device)
        if y.shape != (B,) or y.dtype.is_floating_point:
            raise ValueError(f"y: expected integer labels of shape ({B},), got {tuple(y.shape)} {y.dtype}")
        if y.min() < 0 or y.max() > cfg.num_classes:
            raise ValueError(f"y: labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return t, y.long()

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h×w patch grid: the top-left corner of the stored table."""
        g = self.config.input_size // self.config.patch_size
        table = self.pos_embed.reshape(g, g, -1)[:h, :w]  # (h, w, D)
        return table.reshape(1, h * w, -1)  # (1, T, D)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The conditioning vector c = timestep embedding + label embedding, (B, D)."""
        return self.t_embedder(t) + self.y_embedder(y)  # (B, D)

    def forward(self, x: torch.Tensor, t, y=None, context=None, context_mask=None) -> torch.Tensor:
        if context is not None or context_mask is not None:
            raise ValueError("context: this DiT is class-conditioned (no cross-attention); pass labels "
                             "y, or use a text-conditioned model (chapter 06's TextDiT)")
        t, y = self._check_inputs(x, t, y)
        B, _, H, W = x.shape
        h, w = H // self.config.patch_size, W // self.config.patch_size
        tokens = self.x_embedder(x) + self.pos_embed_for(h, w).to(x.dtype)  # (B, T, D)
        c = self.condition(t, y).to(tokens.dtype)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)  # (B, T, D)
        out = self.final_layer(tokens, c)  # (B, T, p*p*C_out)
        return unpatchify(out, self.config.patch_size, h, w)  # (B, C_out, H, W)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (tinydit's own layout)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_class": "DiT", **self.config.to_dict()}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

# %% [markdown]
# Build the book model and run it: the output has the input's shape, and because the final layer
# starts at zero, an untrained model predicts exactly zero.

# %%
cfg = DiTConfig.preset("book")
model = DiT(cfg)
x = torch.randn(4, 4, 8, 8)  # (B, C, H, W) book latents
t = torch.randint(0, 1000, (4,))
y = torch.randint(0, 18, (4,))
out = model(x, t, y)
print(f"book DiT: {model.num_params / 1e6:.2f} M parameters; {tuple(x.shape)} -> {tuple(out.shape)}")
assert out.shape == x.shape and (out == 0).all()
assert 1e6 < model.num_params < 10e6
for bad in (lambda: model(torch.randn(4, 3, 8, 8), t, y), lambda: model(x, t[:2], y),
            lambda: model(x, t, y + 100), lambda: model(torch.randn(4, 4, 9, 9), t, y),
            lambda: model(torch.randn(1, 4, 16, 16), 10, None)):
    try:
        bad()
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError("bad input was accepted")

# %% [markdown]
# ## 6. Parameters and GFLOPs of every preset
#
# Counting a forward pass by hand, per sample, in multiply-accumulates (the unit of the DiT paper's
# "Gflops", as fvcore counts them). With $T$ tokens of width $D$, each block costs
#
# $$\underbrace{3TD^2}_{qkv} + \underbrace{2T^2D}_{QK^\top,\ AV} + \underbrace{TD^2}_{proj}
#   + \underbrace{2\,r\,TD^2}_{MLP} + \underbrace{6D^2}_{adaLN},$$
#
# with MLP ratio $r = 4$; add the patch embedding ($T\,p^2C\,D$), the timestep MLP
# ($FD + D^2$), and the final layer ($2D^2 + T D p^2 C_\text{out}$). `dit_macs` computes exactly
# this, and we check it against PyTorch's own FLOP counter (which counts 2 FLOPs per MAC) before
# trusting it for the big presets, which we build on the `meta` device: shapes without memory.

# %%
# | export
def dit_macs(config: DiTConfig, input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass for one sample (the DiT paper's 'GFLOPs' x 1e9)."""
    c = config
    side = (input_size or c.input_size) // c.patch_size
    T, D, p = side * side, c.hidden_size, c.patch_size
    block = 3 * T * D * D + 2 * T * T * D + T * D * D + 2 * int(c.mlp_ratio * D) * T * D + 6 * D * D
    embed = T * p * p * c.in_channels * D + c.frequency_embedding_size * D + D * D
    final = 2 * D * D + T * D * p * p * c.out_channels
    return c.depth * block + embed + final

# %%
from torch.utils.flop_counter import FlopCounterMode

# the "math" backend: torch's counter sees its matmuls (it does not count CPU sdpa kernels)
small = DiT(DiTConfig.preset("DiT-S/4", input_size=16, attn_backend="math"))
with FlopCounterMode(display=False) as counter:
    small(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([3]))
measured, formula = counter.get_total_flops() / 2, dit_macs(small.config)
print(f"DiT-S/4 @16: torch counts {measured:,.0f} MACs, the formula says {formula:,}")
assert abs(measured - formula) / measured < 1e-3

# %%
PAPER = {"DiT-S/8": (33, 0.36), "DiT-S/4": (33, 1.41), "DiT-S/2": (33, 6.06),
         "DiT-B/8": (130, 1.42), "DiT-B/4": (130, 5.56), "DiT-B/2": (130, 23.01),
         "DiT-L/8": (458, 5.01), "DiT-L/4": (458, 19.70), "DiT-L/2": (458, 80.71),
         "DiT-XL/8": (675, 7.39), "DiT-XL/4": (675, 29.05), "DiT-XL/2": (675, 118.64)}
rows = []
for name in DiTConfig.preset_names():
    c = DiTConfig.preset(name)
    with torch.device("meta"):
        n_params = DiT(c).num_params
    gflops = dit_macs(c) / 1e9
    paper = PAPER.get(name)
    rows.append((name, n_params, gflops, paper))
    print(f"{name:10s} tokens {(c.input_size // c.patch_size) ** 2:5d}  params {n_params / 1e6:8.2f} M"
          f"  GFLOPs {gflops:8.3f}" + (f"   paper: {paper[0]} M, {paper[1]} GFLOPs" if paper else ""))
for name, n_params, gflops, paper in rows:
    if paper:
        assert abs(n_params / 1e6 - paper[0]) / paper[0] < 0.02, name
        assert abs(gflops - paper[1]) / paper[1] < 0.02, name

# %% [markdown]
# Patch size is the cheapest knob in the paper: halving $p$ quadruples the tokens and roughly
# quadruples the compute while *adding no parameters* (only the patch embedding and final layer
# change size). Peebles & Xie show that FID tracks GFLOPs, not parameters: DiT-XL/2 wins because it
# spends the most compute per image.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for size, marker in zip(("S", "B", "L", "XL"), "os^D"):
    pts = [(DiTConfig.preset(f"DiT-{size}/{p}"), p) for p in (8, 4, 2)]
    ax.plot([(c.input_size // p) ** 2 for c, p in pts], [dit_macs(c) / 1e9 for c, _ in pts],
            marker=marker, label=f"DiT-{size}")
ax.set(xscale="log", yscale="log", xlabel="tokens per image (patch 8, 4, 2)", ylabel="GFLOPs",
       title="Smaller patches: 4x the tokens, ~4x the compute")
ax.legend()
plt.show()

# %% [markdown]
# ## 7. Loading real checkpoints
#
# Two on-disk layouts hold DiT weights:
#
# - **The original** facebookresearch `DiT-XL-2-256x256.pt`: a plain state dict with exactly our
#   parameter names. `DiT.from_original(path)` reads it (`torch.load(weights_only=True)`, or a
#   `.safetensors` file) and **infers the config from the weights**: width, patch size and input
#   channels from `x_embedder.proj.weight`, depth from the block count, `learn_sigma` from the final
#   layer's size, the number of classes from the label table (minus the null row), the input size
#   from the position table. The number of heads is not in the weights; the documented rule is the
#   paper's presets (width 384 → 6, 768 → 12, 1024 → 16, 1152 → 16 heads), else `width // 64`, and
#   `num_heads=` overrides it.
# - **diffusers'** `DiTTransformer2DModel` folder (`config.json` +
#   `diffusion_pytorch_model.safetensors`). It splits `qkv` into `to_q/to_k/to_v`, renames
#   everything, and keeps a *copy* of the shared timestep and label embedders inside every block
#   (`transformer_blocks.N.norm1.emb.*`). `DiT.from_pretrained` converts it, after checking that
#   all copies are identical (as in a converted checkpoint); if they are not, one set of shared
#   embedders cannot represent the model, and it says so.
#
# ### A convention to check: `downscale_freq_shift`
#
# The sinusoidal timestep features use frequencies $\omega_i = 10000^{-i/(F/2 - s)}$. The original
# DiT code, which **trained the released weights**, uses $s = 0$. diffusers' port embeds DiT
# timesteps with $s = 1$ (its DDPM default), so the same weights see slightly different
# frequencies, and the outputs differ by a large margin (the cell below prints it: of order 1 on
# random weights). With its `time_proj.downscale_freq_shift` set to 0, diffusers agrees with the
# original to $10^{-5}$.
# tinydit follows the code that trained the weights in both layouts, and keeps the shift as a
# config field (`freq_shift`) for anyone who wants diffusers' numbers. (diffusers also uses
# LayerNorm $\epsilon = 10^{-5}$ before the MLP where the original uses $10^{-6}$; we keep
# `norm_eps=1e-6`.) The lesson: a port can run, load the weights, make plausible pictures — and
# still not compute what the weights were trained to compute. Check conventions against the code
# that trained the weights.

# %%
# | export
_HEADS_BY_WIDTH = {w: h for _, w, h in _SIZES.values()}


def infer_config_from_original(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                               **overrides) -> DiTConfig:
    """Infer a DiTConfig from a state dict in the original facebookresearch DiT layout."""
    needed = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight", "blocks.0.mlp.fc1.weight", "pos_embed")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"checkpoint: not a DiT checkpoint in the original layout; missing {missing} "
                         f"(first keys found: {sorted(sd)[:5]})")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    grid = math.isqrt(sd["pos_embed"].shape[1])
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    cfg = dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
               num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
               num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
               learn_sigma=out_ch == 2 * in_ch,
               frequency_embedding_size=sd["t_embedder.mlp.0.weight"].shape[1],
               qk_norm="blocks.0.attn.q_norm.weight" in sd)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"checkpoint: final layer gives {out_ch} channels for {in_ch} input channels; "
                         "expected the same or twice as many")
    return DiTConfig(**{**cfg, **overrides})


def convert_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel state dict -> original DiT names (checks the embedder copies)."""
    if "pos_embed.proj.weight" not in sd or "transformer_blocks.0.attn1.to_q.weight" not in sd:
        raise ValueError("checkpoint: not a diffusers DiTTransformer2DModel state dict (no "
                         "'pos_embed.proj.weight' / 'transformer_blocks.0.attn1.to_q.weight')")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
              "class_embedder.embedding_table": "y_embedder.embedding_table"}
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"]}
    for src, dst in shared.items():
        for suffix in ("weight", "bias"):
            key0 = emb.format(0) + f"{src}.{suffix}"
            if key0 not in sd:
                continue
            for n in range(1, depth):
                other = sd[emb.format(n) + f"{src}.{suffix}"]
                if not torch.equal(other, sd[key0]):
                    diff = (other.float() - sd[key0].float()).abs().max().item()
                    raise ValueError(
                        f"checkpoint: block {n}'s copy of the shared embedder '{src}.{suffix}' differs from "
                        f"block 0's (max abs diff {diff:.3g}); tinydit's DiT has one shared timestep/label "
                        "embedder, as the original DiT, so it cannot represent this model exactly")
            out[f"{dst}.{suffix}"] = sd[key0]
    for n in range(depth):
        b, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([sd[b + f"attn1.to_{x}.{suffix}"] for x in "qkv"])
            out[o + f"attn.proj.{suffix}"] = sd[b + f"attn1.to_out.0.{suffix}"]
            out[o + f"mlp.fc1.{suffix}"] = sd[b + f"ff.net.0.proj.{suffix}"]
            out[o + f"mlp.fc2.{suffix}"] = sd[b + f"ff.net.2.{suffix}"]
            out[o + f"adaLN_modulation.1.{suffix}"] = sd[b + f"norm1.linear.{suffix}"]
        for x in "qk":
            if b + f"attn1.norm_{x}.weight" in sd:
                out[o + f"attn.{x}_norm.weight"] = sd[b + f"attn1.norm_{x}.weight"]
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = sd[f"proj_out_1.{suffix}"]
        out[f"final_layer.linear.{suffix}"] = sd[f"proj_out_2.{suffix}"]
    known = re.compile(r"pos_embed\.(proj\.(weight|bias)|pos_embed)|proj_out_[12]\.(weight|bias)|"
                       r"transformer_blocks\.\d+\.(norm1\.(emb\..*|linear\..*)|attn1\.(to_[qkv]|to_out\.0|norm_[qk])\..*|"
                       r"ff\.net\.(0\.proj|2)\..*)")
    unknown = sorted(k for k in sd if not known.fullmatch(k))
    if unknown:  # weights we would silently drop: refuse rather than load a different model
        raise ValueError(f"checkpoint: diffusers DiT keys tinydit does not use: {unknown[:10]}"
                         + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out


def diffusers_transformer_class(d: dict) -> str | None:
    """The diffusers class a transformer config.json describes. Hub repos converted before diffusers
    split its classes (e.g. facebook/DiT-XL-2-256, the PixArt repos) still say
    "Transformer2DModel"; diffusers then picks the class by `norm_type`, and so do we."""
    name = d.get("_class_name")
    if name == "Transformer2DModel":
        return {"ada_norm_zero": "DiTTransformer2DModel",
                "ada_norm_single": "PixArtTransformer2DModel"}.get(d.get("norm_type"), name)
    return name


def config_from_diffusers(d: dict, **overrides) -> DiTConfig:
    """DiTConfig from a diffusers DiTTransformer2DModel config.json (original DiT numerics)."""
    if diffusers_transformer_class(d) not in (None, "DiTTransformer2DModel"):
        raise ValueError(f"config: expected a DiTTransformer2DModel config, got {d.get('_class_name')!r} "
                         f"(norm_type={d.get('norm_type')!r})")
    unsupported = {k: d.get(k) for k, ok in (("norm_type", "ada_norm_zero"), ("norm_elementwise_affine", False),
                                            ("attention_bias", True), ("activation_fn", "gelu-approximate"))
                   if d.get(k, ok) != ok}
    if unsupported:
        raise ValueError(f"config: DiT options tinydit does not implement: {unsupported}")
    in_ch = d.get("in_channels", 4)
    out_ch = d.get("out_channels") or in_ch
    cfg = dict(input_size=d.get("sample_size", 32), patch_size=d.get("patch_size", 2), in_channels=in_ch,
               hidden_size=d["num_attention_heads"] * d["attention_head_dim"], depth=d.get("num_layers", 28),
               num_heads=d["num_attention_heads"], num_classes=d.get("num_embeds_ada_norm", 1000),
               learn_sigma=out_ch == 2 * in_ch)
    return DiTConfig(**{**cfg, **overrides})


def _from_original(cls, path: str | Path, num_heads: int | None = None, state_dict: dict | None = None,
                   **overrides) -> DiT:
    """Load a facebookresearch DiT checkpoint (`.pt` via torch.load(weights_only=True), or `.safetensors`).

    `state_dict`: the file's tensors when the caller has already read them (saves a second read)."""
    sd = state_dict if state_dict is not None else unwrap_state_dict(load_state_dict(path))
    model = cls(infer_config_from_original(sd, num_heads=num_heads, **overrides))
    sd = {**sd, "pos_embed": model.pos_embed}  # the fixed table is recomputed, not trusted from disk
    check_and_load(model, sd, what=f"DiT checkpoint {Path(path).name}")
    return model


def _from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None, **overrides) -> DiT:
    """Load a diffusers `DiTTransformer2DModel` folder (local path or hub id) or a tinydit folder."""
    folder = resolve_pretrained(path_or_id, subfolder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class") == "DiT":  # tinydit's own save_pretrained layout
        config.pop("_class")
        model = cls(DiTConfig.from_dict({**config, **overrides}))
        sd = load_state_dict(folder / "model.safetensors")
    else:
        model = cls(config_from_diffusers(config, **overrides))
        weights = next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"path_or_id: no diffusion_pytorch_model.safetensors (or .bin) in {folder}")
        sd = convert_diffusers_dit(load_state_dict(weights))
    sd = {**sd, "pos_embed": model.pos_embed}
    check_and_load(model, sd, what=f"DiT weights in {folder}")
    return model


DiT.from_original = classmethod(_from_original)
DiT.from_pretrained = classmethod(_from_pretrained)

# %% [markdown]
# ### Parity with diffusers, measured
#
# We build a small random `DiTTransformer2DModel` with diffusers, copy block 0's embedders into
# every block (as a converted checkpoint has them), save it in diffusers' own folder format, and load
# that folder with `DiT.from_pretrained`. First we compare with diffusers as shipped
# (`downscale_freq_shift = 1`), then with the shift set to the original code's 0. (This cell needs
# `diffusers`, which the `dev` extra installs.)

# %%
import tempfile

try:
    import diffusers
except ImportError:
    diffusers = None
    print("diffusers is not installed (pip install -e '.[dev]'); skipping the live comparison")
if diffusers is not None:
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                          out_channels=8, num_layers=2 if FAST else 12, sample_size=32,
                                          patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
    with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
        for p in ref.parameters():
            p.normal_(0, 0.05)
        for blk_ref in ref.transformer_blocks[1:]:
            blk_ref.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = DiT.from_pretrained(tmp).eval()
    xp, tp, yp = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 700.0]), torch.tensor([3, 1000])
    with torch.no_grad():
        shipped = ref(xp, timestep=tp, class_labels=yp).sample
        for blk_ref in ref.transformer_blocks:
            blk_ref.norm1.emb.time_proj.downscale_freq_shift = 0
        fixed = ref(xp, timestep=tp, class_labels=yp).sample
        mine = ours(xp, tp, yp)
    print(f"max |diffusers (shift 1) - tinydit| = {(shipped - mine).abs().max():.3f}")
    print(f"max |diffusers (shift 0) - tinydit| = {(fixed - mine).abs().max():.2e}")
    assert (fixed - mine).abs().max() < 1e-5 < (shipped - mine).abs().max()

# %% [markdown]
# ## 8. The verification loop: overfit one batch
#
# Before spending minutes of CPU on real training (chapter 07), a cheap test that catches most
# wiring bugs: can the model **memorise one fixed batch**? We take 8 images from chapter 01, encode
# them with the book VAE of chapter 02 into 4×8×8 latents, label each with its first object's
# (colour, shape) pair (18 classes), and train a small DiT with the $\epsilon$-prediction loss of
# DDPM (Ho et al., 2020):
#
# $$\mathcal L = \mathbb E_{t,\epsilon}\,\big\|\epsilon_\theta(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\ t,\ y) - \epsilon\big\|^2 .$$
#
# Fresh noise and timesteps are drawn every step, so the loss cannot reach zero by memorising
# noise; it can only fall if the network learns the 8 latents well enough to tell the noise apart
# from the signal at every noise level. A broken attention, modulation or patchify would stall it
# near the variance of the noise, 1.

# %%
# | export
def overfit_single_batch(model: DiT, x0: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor,
                         steps: int = 600, lr: float = 1e-3, seed: int = 0,
                         disable: bool | None = None) -> list[float]:
    """Train `model` on one fixed batch with the DDPM epsilon loss; returns the loss of every step.

    The verification loop of DiT-style training code: if the loss does not fall far below 1 (the
    variance of the noise), something is wired wrong.
    """
    from tqdm.auto import tqdm

    from tinydit.schedules import add_noise

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="overfit one batch", disable=disable):
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=g)  # (B,)
        x_t, eps = add_noise(x0, t, alphas_cumprod, generator=g)  # (B, C, H, W) each
        loss = F.mse_loss(model(x_t, t, y), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses

# %%
from tinydit import schedules, vae
from tinydit.data import COLORS, SHAPES, ShapesDataset

book_vae = vae.load_book_vae()
batch_ds = ShapesDataset(8, seed=0)
images = torch.stack([batch_ds[i][0] for i in range(8)])  # (8, 3, 32, 32)
labels = torch.tensor([list(COLORS).index(a[0]["color"]) * len(SHAPES) + SHAPES.index(a[0]["shape"])
                       for a in (batch_ds.attributes(i) for i in range(8))])  # (8,) in [0, 18)
with torch.no_grad():
    latents = book_vae.to_latent(images)  # (8, 4, 8, 8)
print("latents", tuple(latents.shape), f"std {latents.std():.2f}", "labels", labels.tolist())

ab = schedules.alphas_cumprod(schedules.make_betas("linear"))
torch.manual_seed(0)
tiny = DiT(DiTConfig.preset("book", hidden_size=96, depth=2, num_heads=4, class_dropout_prob=0.0))
OVERFIT_STEPS, OVERFIT_THRESHOLD = 800, 0.1  # mean loss of the last 100 steps must end below this
t0 = time.perf_counter()
losses = overfit_single_batch(tiny, latents, labels, ab, steps=OVERFIT_STEPS, lr=2e-3, seed=0)
seconds = time.perf_counter() - t0
final = sum(losses[-100:]) / 100
print(f"{OVERFIT_STEPS} steps in {seconds:.1f} s; loss {losses[0]:.3f} -> {final:.4f} (mean of last 100)")
plt.figure(figsize=(6, 3))
plt.semilogy(losses, lw=0.8)
plt.axhline(OVERFIT_THRESHOLD, color="red", ls="--", label=f"threshold {OVERFIT_THRESHOLD}")
plt.xlabel("step")
plt.ylabel("epsilon MSE")
plt.title("A 2-block DiT memorises one batch of 8 latents")
plt.legend()
plt.show()
assert final < OVERFIT_THRESHOLD and seconds < 60

# %% [markdown]
# ## 9. What attention looks at
#
# The memorising model has learned something about where things are. For one latent we take the
# last block's queries and keys and draw, for each head, the attention of the centre token over the
# 4×4 grid of patches (each patch covers 8×8 image pixels).

# %%
with torch.no_grad():
    t_vis = torch.tensor([100])
    x_vis, _ = schedules.add_noise(latents[:1], t_vis, ab, generator=torch.Generator().manual_seed(1))
    tok = tiny.x_embedder(x_vis) + tiny.pos_embed_for(4, 4)  # (1, 16, D)
    c_vis = tiny.condition(t_vis, labels[:1])
    for blk_vis in tiny.blocks[:-1]:
        tok = blk_vis(tok, c_vis)
    last = tiny.blocks[-1]
    shift, scale = last.adaLN_modulation(c_vis).chunk(6, dim=1)[:2]
    qv, kv, _ = last.attn.qkv_heads(modulate(last.norm1(tok), shift, scale))  # (1, heads, 16, hd)
    amap = attention_weights(qv, kv)  # (1, heads, 16, 16)
query = 5  # row 1, column 1 of the 4x4 grid
fig, axes = plt.subplots(1, tiny.config.num_heads + 1, figsize=(2.2 * (tiny.config.num_heads + 1), 2.4))
axes[0].imshow(((images[0] + 1) / 2).permute(1, 2, 0))
axes[0].add_patch(plt.Rectangle((8 * (query % 4) - 0.5, 8 * (query // 4) - 0.5), 8, 8, fill=False, ec="k", lw=2))
axes[0].set_title("image, query patch", fontsize=8)
for hd in range(tiny.config.num_heads):
    axes[hd + 1].imshow(amap[0, hd, query].reshape(4, 4), cmap="viridis")
    axes[hd + 1].set_title(f"head {hd}", fontsize=8)
for a in axes:
    a.axis("off")
plt.show()
assert torch.allclose(amap.sum(-1), torch.ones(1, tiny.config.num_heads, 16), atol=1e-5)

# %% [markdown]
# ## What we built
#
# - `tinydit.attention`: `attention(q, k, v, mask, backend)` with `math`, `sdpa` and optional
#   `flash` backends; `RMSNorm`; the fused-qkv `Attention` module with optional QK-norm.
# - `tinydit.dit`: `PatchEmbed` / `unpatchify`, `LabelEmbedder` with the null class, `DiTBlock`
#   with adaLN-Zero, `FinalLayer`, `DiTConfig` with the paper's presets and `book`, `dit_macs`,
#   `DiT.from_original` (facebookresearch layout) and `DiT.from_pretrained` (diffusers layout), and
#   the single-batch verification loop.
#
# Next, chapter 06 gives the DiT words instead of class labels: text encoders and cross-attention.
