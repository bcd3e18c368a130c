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
# # 05a · Attention: the operation every DiT is built on
#
# The Diffusion Transformer (Peebles & Xie, *Scalable Diffusion Models with Transformers*, 2023)
# replaced the U-Net of latent diffusion with a plain Vision Transformer:
#
# 1. **Patchify** the noisy latent $(B, C, H, W)$ into $T = HW/p^2$ tokens of width $D$ and add
#    fixed 2D sin-cos position embeddings (chapter 03).
# 2. Run $N$ transformer **blocks** (self-attention + MLP) whose LayerNorms are **modulated** by
#    $c$ = timestep embedding + class embedding (**adaLN-Zero**).
# 3. A **final layer** turns each token back into a $p \times p$ patch of $C$ (or $2C$, with
#    learned variance) channels; **unpatchify** reassembles the latent.
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
# Chapter 05 takes two sittings. This one, 05a, builds the one operation every block runs,
# attention, first as a few lines of plain PyTorch and then as the exported version (backends,
# masks, QK-norm), asserted equal. It exports `tinydit.attention`; 05b builds the DiT around it.

# %%
# | default_exp attention
# %%
import os

import torch


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)

# %% [markdown]
# ## 1. Attention
#
# Scaled dot-product attention (Vaswani et al., 2017) over heads of width $d$:
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt d} + M\right) V .$$
#
# Each query takes an average of the values, weighted by how well it matches each key. Without
# the mask $M$ it is three lines:

# %%
import math


def naive_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T_q, T_k)
    weights = scores.softmax(dim=-1)  # (B, heads, T_q, T_k), every row sums to 1
    return weights @ v  # (B, heads, T_q, d)


q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)  # (B=2, heads=4, T=16, d=8) each
assert naive_attention(q, k, v).shape == (2, 4, 16, 8)

# %% [markdown]
# The exported `attention()` adds the mask and a choice of kernel. The mask is boolean, **True =
# may attend**: `(B, T_k)` key padding (1 = real token, as text encoders return it), `(B, T_q, T_k)`
# per sample (shared by the heads), or `(B, heads, T_q, T_k)`. Float masks are refused: an additive
# mask (0 = attend, −∞ = ignore) cast to bool means the opposite. The kernels: `math` writes the
# formula out (the $T \times T$ score matrix we need to *look* at attention); `sdpa` is PyTorch's
# `scaled_dot_product_attention`, which on a GPU never builds that matrix; `flash` is the
# `flash_attn` package (CUDA fp16/bf16, no mask); `auto` picks `flash` when valid, else `sdpa`.
# First the checks, as small helpers:

# %%
# | export attention
"""Attention over (B, heads, T, head_dim) with interchangeable backends (math / sdpa / flash)."""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.validation import check_choice, check_int


BACKENDS = ("auto", "sdpa", "flash", "math")


def flash_available(q: torch.Tensor) -> bool:
    """True when the flash_attn package is installed and `q` is a CUDA fp16/bf16 tensor."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and importlib.util.find_spec("flash_attn") is not None)

# %%
# | export attention
def _check_qkv(q, k, v) -> None:
    """q (B, heads, T_q, d), k (B, heads, T_k, d), v (B, heads, T_k, d_v), or a ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name}: expected a (B, heads, T, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: shapes do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need equal B and heads, equal T for k and v, equal "
                         "head_dim for q and k)")

# %%
# | export attention
def _as_attention_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       check_rows: bool = True) -> torch.Tensor:
    """A boolean mask broadcastable to (B, heads, T_q, T_k); True = may attend. 2-D (B, T_k): key
    padding; 3-D (B, T_q, T_k): one mask per sample, shared by the heads; 4-D: used as given.
    `check_rows`: refuse a query with no key to attend to (a value check: a device sync, skipped
    under torch.compile; models check their masks once per call and pass False)."""
    check_rows = check_rows and not torch.compiler.is_compiling()
    B, heads, Tq, _ = q.shape
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
        if check_rows and not mask.any(dim=1).all():
            raise ValueError("mask: every sample needs at least one real (True) key; got a row of "
                             "padding only")
        return mask[:, None, None, :]  # (B, 1, 1, T_k)
    full = mask[:, None] if mask.ndim == 3 else mask  # (B, 1, T_q, T_k): per sample, not per head
    try:
        fits = full.ndim == 4 and torch.broadcast_shapes(full.shape, (B, heads, Tq, Tk)) == (B, heads, Tq, Tk)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask: expected (B, T_k) = {(B, Tk)}, (B, T_q, T_k) = {(B, Tq, Tk)} or a mask "
                         f"broadcastable to (B, heads, T_q, T_k) = {(B, heads, Tq, Tk)}, got {tuple(mask.shape)}")
    if check_rows and not full.any(dim=-1).all():  # softmax over no keys: NaN in one backend, 0 in another
        raise ValueError("mask: every query needs at least one key it may attend to; got a row of False")
    return full

# %%
# | export attention
def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      scale: float | None = None, check_rows: bool = True) -> torch.Tensor:
    """softmax(q kᵀ · scale + M): the (B, heads, T_q, T_k) attention map, written out."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~_as_attention_mask(mask, q, k, check_rows), float("-inf"))
    return scores.softmax(dim=-1)  # (B, heads, T_q, T_k)

# %%
# | export attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto", scale: float | None = None, check_rows: bool = True) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017) over (B, heads, T, head_dim) tensors.

    `mask`: None, a (B, T_k) key-padding mask, a (B, T_q, T_k) mask per sample, or a boolean mask
    broadcastable to (B, heads, T_q, T_k); True / 1 = may attend. `backend`: "auto", "sdpa",
    "flash" or "math". `check_rows=False` skips the check that every query has a key (models do it
    once per forward, not once per block). Returns (B, heads, T_q, head_dim).
    """
    check_choice("backend", backend, BACKENDS)
    _check_qkv(q, k, v)
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
        attn_mask = None if mask is None else _as_attention_mask(mask, q, k, check_rows)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return attention_weights(q, k, mask, scale, check_rows) @ v  # (B, heads, T_q, head_dim)

# %% [markdown]
# Both CPU backends compute the teaching version's numbers, and masks mean what they say: with
# key padding, a sample's queries ignore its padding tokens; a `(B, T_q, T_k)` mask applies per sample.

# %%
import re


pad = torch.ones(2, 16, dtype=torch.bool)
pad[1, 10:] = False  # sample 1: its last 6 tokens are padding
near = (torch.arange(16)[:, None] - torch.arange(16)).abs() <= 2  # (T_q, T_k): near neighbours only
per_sample = torch.stack([near, ~near | torch.eye(16, dtype=torch.bool)])  # (B, T_q, T_k): far only for sample 1
scores = q @ k.transpose(-2, -1) / math.sqrt(8)  # (B, heads, T_q, T_k): the masked reference
expect = scores.masked_fill(~per_sample[:, None], float("-inf")).softmax(-1) @ v  # (B, heads, T_q, d)
for backend in ("math", "sdpa"):
    torch.testing.assert_close(attention(q, k, v, backend=backend), naive_attention(q, k, v))
    torch.testing.assert_close(attention(q, k, v, pad, backend=backend)[1:],
                               naive_attention(q[1:], k[1:, :, :10], v[1:, :, :10]))
    torch.testing.assert_close(attention(q, k, v, per_sample, backend=backend), expect)
try:
    attention(q, k, v, pad.float())
except ValueError as e:
    assert re.search("boolean", str(e)), e
    print("refused:", e)
else:
    raise AssertionError("a float mask was accepted")
print("auto on this machine ->", "flash" if flash_available(q) else "sdpa")

# %% [markdown]
# The `Attention` module wraps it: one fused `qkv` linear, a split into heads, `attention`, and an
# output projection `proj` (timm's and the original DiT's names). Optional **QK-norm** (RMSNorm on
# queries and keys, as in SD3 and Flux) keeps attention logits bounded in large models, with
# $\operatorname{RMSNorm}(x) = x / \sqrt{\operatorname{mean}(x^2) + \epsilon} \cdot g$.

# %%
# | export attention
class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms).to(x.dtype) * self.weight

# %%
# | export attention
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm / original DiT names).

    `forward(x, mask=None)`: x (B, T, D) -> (B, T, D). Parameters `qkv`, `proj`, and with
    `qk_norm=True` the RMSNorms `q_norm`, `k_norm` (per head, as SD3 / Flux).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        dim, num_heads = check_int("dim", dim, minimum=1), check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        check_choice("backend", backend, BACKENDS)
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
# **Looking at it.** The weights of one head for a random example whose last three keys are padding:
# every row is a probability distribution over the keys, and the masked columns get exactly 0.

# %%
import matplotlib.pyplot as plt


qd, kd = torch.randn(2, 1, 1, 8, 16, generator=torch.Generator().manual_seed(3)).unbind(0)  # (1, 1, 8, 16) each
keep = torch.tensor([[True] * 5 + [False] * 3])  # (B=1, T_k=8): True = a real key
w = attention_weights(qd, kd, keep)[0, 0]  # (8, 8)
assert torch.allclose(w.sum(-1), torch.ones(8)) and bool((w[:, 5:] == 0).all())
plt.figure(figsize=(4, 3.2))
plt.imshow(w, cmap="viridis", vmin=0)
plt.colorbar(label="weight")
plt.gca().set(xlabel="key (5, 6, 7: padding)", ylabel="query", title="attention weights of one head")
plt.show()

# %% [markdown]
# ## Summary
#
# - **Built** `tinydit.attention`: `attention(q, k, v, mask, backend)` with `math`, `sdpa` and
#   optional `flash` backends; key-padding, per-sample and full boolean masks; `RMSNorm`; the
#   fused-qkv `Attention` module with optional QK-norm; each checked against the few-line version.
#
# Next, 05b builds the DiT around it: patchify, adaLN-Zero blocks, the model and its presets.
#
# ## Exercises
#
# 1. Build a `(B, T_q, T_k)` mask that lets each token of a 4×4 grid attend only to its 3×3
#    neighbourhood; check that `math` and `sdpa` agree and draw the weights with `attention_weights`.
