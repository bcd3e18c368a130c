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
# # 03 · Embeddings: telling a transformer *when* and *where*
#
# A diffusion transformer sees a bag of patch tokens and a noise level. Attention is blind to order
# and a linear layer is blind to scale, so we must hand the network two extra facts as vectors:
#
# 1. **When**: the diffusion time $t$ (how noisy the input is). A single number is a poor input
#    for an MLP, so we spread it over many sinusoids of different frequencies (Vaswani et al. 2017,
#    reused by Ho et al. 2020 for DDPM) and let a small MLP read them: the `TimestepEmbedder` of
#    DiT and PixArt.
# 2. **Where**: the position of each patch. DiT and PixArt *add* a fixed 2D sin-cos table to the
#    tokens (as MAE did); SD3's successors Flux and Lumina *rotate* queries and keys instead (rotary
#    position embeddings, RoPE; Su et al. 2021), which makes attention depend on relative offsets.
#
# Every function here is checked against the reference implementation the real models use
# (diffusers), in `tests/test_embeddings.py`, to $10^{-6}$.
#
# | what | shape |
# |---|---|
# | `timestep_embedding(t, dim)` | `(B,)` → `(B, dim)` |
# | `TimestepEmbedder(hidden)(t)` | `(B,)` → `(B, hidden)` |
# | `sincos_pos_embed_2d(dim, (h, w))` | → `(h·w, dim)` |
# | `rope_2d(h, w, dim)` → `apply_rope(q, cos, sin)` | `(B, heads, h·w, dim)` → same |

# %%
# | default_exp embeddings

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %% [markdown]
# ## Sinusoidal timestep embeddings
#
# For a time $t$ and an embedding of $d$ dimensions with $h = \lfloor d/2 \rfloor$ frequencies,
#
# $$\omega_i = P^{-\,i/(h - s)}, \qquad i = 0, \dots, h-1, \qquad
#   e(t) = \big[\sin(\omega_0 t), \dots, \sin(\omega_{h-1} t),\ \cos(\omega_0 t), \dots, \cos(\omega_{h-1} t)\big]$$
#
# with the *max period* $P = 10000$. The frequencies fall geometrically from $1$ (period $2\pi$, a
# few timesteps) to about $1/P$ (period $2\pi P$, longer than the whole schedule), so nearby times
# differ in the fast coordinates and far-apart times in the slow ones. Real models differ in two
# small details, and a checkpoint only works with the layout it was trained with:
#
# | model | order | shift $s$ |
# |---|---|---|
# | DDPM (Ho et al.), SD UNets (`flip_sin_to_cos=True`) | sin, cos / cos, sin | 1 |
# | original DiT (facebookresearch), PixArt | cos, sin | 0 |
# | diffusers' `DiTTransformer2DModel` | cos, sin | 1 |
#
# The shift changes the denominator $h - s$: with $s = 1$ the slowest frequency is exactly $1/P$.
# (diffusers' DiT port uses $s = 1$ while the original DiT code uses $s = 0$; the difference is small
# but real, and we show it below.) An odd $d$ gets one zero pad at the end.

# %%
# | export
"""Time and position embeddings for diffusion transformers.

Sinusoidal timestep embeddings (Vaswani et al. 2017; Ho et al. 2020), the DiT `TimestepEmbedder`
(Peebles & Xie 2023), 2D sin-cos position tables (MAE / DiT / PixArt) and rotary position
embeddings, 1D and 2D axial (Su et al. 2021, RoFormer; as in Flux and Lumina).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _as_1d_times(t, name: str = "t") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D tensor of times (B,), got shape {tuple(t.shape)}")
    return t


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times `t` (B,) -> (B, dim).

    Frequencies `max_period ** (-i / (dim // 2 - downscale_freq_shift))`, `sin` half then `cos`
    half (`flip_sin_to_cos=True` puts `cos` first); an odd `dim` is zero-padded by one. Defaults are
    the DDPM layout (Ho et al. 2020, after Vaswani et al. 2017); the original DiT / PixArt layout is
    `flip_sin_to_cos=True, downscale_freq_shift=0`. Matches diffusers' `get_timestep_embedding`.
    """
    t = _as_1d_times(t)  # (B,)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim: expected an integer >= 2, got {dim!r}")
    half = dim // 2
    if half - downscale_freq_shift <= 0:
        raise ValueError(
            f"downscale_freq_shift: expected a value below dim // 2 = {half}, got {downscale_freq_shift!r}"
        )
    if max_period <= 1:
        raise ValueError(f"max_period: expected a number > 1, got {max_period!r}")
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = scale * (t[:, None].float() * freqs[None, :])  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # (B, 2*half): cos, sin
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))  # (B, dim)
    return emb

# %% [markdown]
# Each row below is one timestep $t \in \{0, \dots, 999\}$, each column one coordinate of its
# 256-dimensional DiT embedding. The left columns (cosines of fast frequencies) oscillate every few
# steps; the right ones barely move over the whole schedule.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

t_all = torch.arange(1000)  # (1000,)
E = timestep_embedding(t_all, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # (1000, 256)
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
axes[0].imshow(E.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
axes[0].set(title="DiT timestep embedding (cos | sin)", xlabel="coordinate", ylabel="t")
for i in (0, 16, 64, 127):
    axes[1].plot(t_all, E[:, i], label=f"cos(ω_{{{i}}} t)")
axes[1].set(title="a few coordinates over t", xlabel="t")
axes[1].legend(fontsize=8)
En = torch.nn.functional.normalize(E, dim=1)
axes[2].imshow((En @ En.T).numpy(), cmap="viridis")
axes[2].set(title="cosine similarity e(t)·e(t')", xlabel="t'", ylabel="t")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Claims, checked
# The formula above, computed by hand in float64; the layouts differ; nearby times are more similar
# than distant ones; odd dims are padded; bad input names the argument.

# %%
def by_hand(t, dim, flip, shift, P=10000.0):
    half = dim // 2
    w = np.array([P ** (-i / (half - shift)) for i in range(half)])
    a = np.outer(np.asarray(t, dtype=np.float64), w)
    e = np.concatenate([np.cos(a), np.sin(a)] if flip else [np.sin(a), np.cos(a)], axis=1)
    return np.pad(e, ((0, 0), (0, dim % 2)))


t_check = torch.tensor([0.0, 1.0, 17.5, 999.0])
for dim, flip, shift in [(256, True, 0), (320, False, 1), (7, True, 1)]:
    err = np.abs(timestep_embedding(t_check, dim, flip, shift).numpy() - by_hand(t_check, dim, flip, shift)).max()
    print(f"dim={dim} flip={flip} shift={shift}: max |ours - formula| = {err:.2e}")
    assert err < 1e-4  # float32 sin of arguments up to 999
dit0 = timestep_embedding(t_check, 256, True, 0)
dit1 = timestep_embedding(t_check, 256, True, 1)
print(f"original DiT (s=0) vs diffusers' DiT port (s=1): max difference {(dit0 - dit1).abs().max():.3f}")
assert (dit0 - dit1).abs().max() > 0.1
sim = En @ En.T  # (1000, 1000)
assert sim[500, 501] > sim[500, 600] > sim[500, 999]
assert timestep_embedding(t_check, 7).shape == (4, 7) and torch.all(timestep_embedding(t_check, 7)[:, -1] == 0)
for bad in (dict(dim=1), dict(dim=2, downscale_freq_shift=1), dict(t=torch.zeros(2, 2))):
    try:
        timestep_embedding(**{"t": t_check, "dim": 8, **bad})
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError(f"{bad} should have raised")

# %% [markdown]
# ## The `TimestepEmbedder`
#
# DiT feeds the 256-dimensional sinusoid to a two-layer MLP, $\mathrm{Linear} \to \mathrm{SiLU}
# \to \mathrm{Linear}$, whose output (width of the transformer) conditions every block through
# adaLN. We keep the original parameter names (`mlp.0`, `mlp.2`), so a facebookresearch DiT or
# PixArt checkpoint's `t_embedder.*` weights load with a plain `load_state_dict`. The MLP weights
# start from $\mathcal{N}(0, 0.02^2)$ as in DiT.

# %%
# | export
class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep embedding followed by an MLP (Peebles & Xie 2023, DiT; PixArt's `t_embedder`).

    `forward(t)`: times `(B,)` (integer or fractional) -> `(B, hidden_size)`. Parameter names
    `mlp.0.*` and `mlp.2.*` follow the original facebookresearch DiT so its checkpoints load as is.
    The default frequency layout is the original DiT's (`cos` first, shift 0); diffusers'
    `DiTTransformer2DModel` uses `downscale_freq_shift=1`.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, flip_sin_to_cos: bool = True,
                 downscale_freq_shift: float = 0.0, max_period: float = 10000):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("frequency_embedding_size", frequency_embedding_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name}: expected an integer >= 2, got {value!r}")
        self.frequency_embedding_size = frequency_embedding_size
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.flip_sin_to_cos,
                                    self.downscale_freq_shift, max_period=self.max_period)  # (B, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, hidden)

# %%
temb = TimestepEmbedder(64)
out = temb(torch.tensor([0, 250, 999]))  # (3, 64)
print(temb)
print({k: tuple(v.shape) for k, v in temb.state_dict().items()})
assert out.shape == (3, 64)
assert list(temb.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
assert torch.allclose(out, temb.mlp(timestep_embedding(torch.tensor([0, 250, 999]), 256, True, 0)))

# %% [markdown]
# ## 2D sin-cos position embeddings (MAE, DiT, PixArt)
#
# A $h \times w$ grid of patches gets a fixed table of $h w$ vectors. Half of each vector is the 1D
# sin-cos embedding (frequencies $10000^{-2i/D'}$, $D' = D/2$) of the patch's column, the other half
# that of its row:
#
# $$p(r, c) = \big[\,e_{D/2}(c\,/\,\kappa_w),\ e_{D/2}(r\,/\,\kappa_h)\,\big], \qquad
#   \kappa_h = \frac{h}{b}\,\iota,\ \ \kappa_w = \frac{w}{b}\,\iota .$$
#
# DiT and MAE use raw indices ($\kappa = 1$). diffusers adds a *base size* $b$: every grid side is
# stretched to span $[0, b/\iota)$. PixArt sets $b$ to the grid side itself and picks the
# *interpolation scale* $\iota$ by resolution (0.5 at 256 px, 1 at 512, 2 at 1024), so positions are
# $r/\iota$: a 1024 px model (64×64 grid, $\iota = 2$) sees the position range $[0, 32)$ of its
# 512 px parent (32×32 grid, $\iota = 1$), twice as densely.
# (The column comes first: MAE's `meshgrid(w, h)` quirk, kept so that checkpoints match.)

# %%
# | export
def sincos_embed_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding of positions `pos` (M,) -> (M, embed_dim): `[sin | cos]`, frequencies
    `10000 ** (-2i / embed_dim)` (Vaswani et al. 2017; MAE's `get_1d_sincos_pos_embed_from_grid`)."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 2 or embed_dim % 2:
        raise ValueError(f"embed_dim: expected a positive even integer, got {embed_dim!r}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)  # (D/2,)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()  # (M, D)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | Sequence[int], base_size: float | None = None,
                        interpolation_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2D sin-cos position table (MAE, DiT; PixArt's resolution scaling) -> (h*w, embed_dim).

    Row-major over the `(h, w)` grid. The first half of each vector embeds the column, the second
    half the row. With `base_size=None` positions are the raw indices (DiT/MAE); otherwise they are
    `index / (size / base_size) / interpolation_scale` (PixArt-alpha/Sigma; diffusers'
    `get_2d_sincos_pos_embed`, whose `base_size` defaults to 16).
    """
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 4 or embed_dim % 4:
        raise ValueError(f"embed_dim: expected a positive multiple of 4 (two sin-cos halves), got {embed_dim!r}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if min(h, w) < 1:
        raise ValueError(f"grid_size: expected sides >= 1, got {grid_size!r}")
    if interpolation_scale <= 0:
        raise ValueError(f"interpolation_scale: expected a positive number, got {interpolation_scale!r}")
    if base_size is not None and base_size <= 0:
        raise ValueError(f"base_size: expected a positive number or None, got {base_size!r}")
    rows = torch.arange(h, dtype=torch.float32)  # (h,)
    cols = torch.arange(w, dtype=torch.float32)  # (w,)
    if base_size is not None:
        rows = rows / (h / base_size) / interpolation_scale
        cols = cols / (w / base_size) / interpolation_scale
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    return torch.cat([sincos_embed_1d(embed_dim // 2, cc), sincos_embed_1d(embed_dim // 2, rr)], dim=1)  # (h*w, D)

# %% [markdown]
# The similarity of one patch's vector to every other patch's: it peaks at the patch itself and
# falls off with distance in both directions, which is all the transformer needs to learn locality.
# On the right, PixArt's scaling: a 32×32 grid at $\iota = 2$ covers the same position range as a
# 16×16 grid at $\iota = 1$, so its even cells reuse the coarse table exactly.

# %%
P = sincos_pos_embed_2d(64, 16)  # (256, 64)
Pn = torch.nn.functional.normalize(P, dim=1)
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, (r, c) in zip(axes[:3], [(0, 0), (8, 8), (3, 12)]):
    ax.imshow((Pn @ Pn[r * 16 + c]).reshape(16, 16).numpy(), cmap="viridis")
    ax.plot(c, r, "r+", ms=12)
    ax.set_title(f"similarity to patch (row {r}, col {c})", fontsize=9)
coarse = sincos_pos_embed_2d(64, 16, base_size=16, interpolation_scale=1.0)  # (256, 64)
fine = sincos_pos_embed_2d(64, 32, base_size=32, interpolation_scale=2.0)  # (1024, 64)
axes[3].imshow(fine.reshape(32, 32, 64)[:, :, 36].numpy(), cmap="RdBu")
axes[3].set_title("PixArt: 32×32 grid, ι=2, one coordinate", fontsize=9)
plt.tight_layout()
plt.show()
print(P.shape, fine.shape)
assert P.shape == (256, 64)
assert int((Pn @ Pn[8 * 16 + 8]).argmax()) == 8 * 16 + 8
assert torch.allclose(fine.reshape(32, 32, 64)[::2, ::2].reshape(256, 64), coarse, atol=1e-6)
assert torch.allclose(P[: 16, :32], sincos_embed_1d(32, torch.arange(16.0)))  # first row: columns 0..15

# %% [markdown]
# ## Rotary position embeddings (RoPE)
#
# Instead of adding a position vector to the token, RoPE (Su et al. 2021) *rotates* the query and
# key of the token at position $m$. Pairs of coordinates $(x_{2i}, x_{2i+1})$ are treated as a
# complex number and multiplied by $e^{\mathrm{i}\, m \theta_i}$, with $\theta_i = \Theta^{-2i/d}$
# ($\Theta = 10000$):
#
# $$R_m x = \begin{pmatrix} x_{2i}\cos m\theta_i - x_{2i+1}\sin m\theta_i \\
#                           x_{2i}\sin m\theta_i + x_{2i+1}\cos m\theta_i \end{pmatrix}_i .$$
#
# Rotations compose: $\langle R_m q, R_n k \rangle = \mathrm{Re}\sum_i q_i \bar k_i\,
# e^{\mathrm{i}(m-n)\theta_i}$, so the attention score depends on the positions **only through the
# offset $m - n$**. For images (Flux, Lumina) the head dimension is split between axes: one part is
# rotated by the row, the other by the column (axial 2D RoPE); Flux uses three axes (a text-index
# axis, rows and columns, `axes_dim = (16, 56, 56)`, $\Theta = 10000$).
#
# We use the *interleaved pairs* layout of RoFormer, Flux and Lumina, and precompute the cosines and
# sines once per sequence as `(N, d)` tables with each frequency repeated twice.

# %%
# | export
def rope_frequencies(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for 1D RoPE (Su et al. 2021) at positions `pos` (N,) -> two (N, dim).

    Angle of pair i at position m is `m * theta ** (-2i / dim)`; each angle is repeated twice
    (interleaved pairs, as RoFormer, Flux and diffusers' `get_1d_rotary_pos_embed(use_real=True,
    repeat_interleave_real=True)`). Computed in float64, returned in float32.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim: expected a positive even integer, got {dim!r}")
    pos = _as_1d_times(pos, "pos")  # (N,)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    angles = torch.outer(pos.double(), inv_freq)  # (N, dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()  # (N, dim)
    sin = angles.sin().repeat_interleave(2, dim=1).float()  # (N, dim)
    return cos, sin


def rope_axial(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial RoPE tables for multi-axis positions `ids` (N, n_axes) -> cos, sin (N, sum(axes_dim)).

    Axis a rotates its own `axes_dim[a]` coordinates by `ids[:, a]`; the tables are concatenated in
    axis order (Flux's `EmbedND` / diffusers' `FluxPosEmbed`).
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"ids: expected shape (N, {len(axes_dim)}) for axes_dim={tuple(axes_dim)}, "
                         f"got {tuple(ids.shape)}")
    tables = [rope_frequencies(ids[:, a].double(), d, theta) for a, d in enumerate(axes_dim)]
    return torch.cat([c for c, _ in tables], dim=1), torch.cat([s for _, s in tables], dim=1)  # (N, D) each


def rope_2d(h: int, w: int, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2D axial RoPE tables for a row-major `h` x `w` grid of tokens -> cos, sin (h*w, dim).

    The first `dim // 2` coordinates rotate with the row, the rest with the column.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4 or dim % 4:
        raise ValueError(f"dim: expected a positive multiple of 4 (two axes of pairs), got {dim!r}")
    if h < 1 or w < 1:
        raise ValueError(f"h, w: expected grid sides >= 1, got h={h!r}, w={w!r}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    ids = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)  # (h*w, 2)
    return rope_axial(ids, (dim // 2, dim // 2), theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys `x` (..., N, D) by RoPE tables `cos`, `sin` (N, D) (Su et al. 2021).

    Interleaved pairs `(x[2i], x[2i+1])` are rotated by their angle; computed in float32 and
    returned in `x`'s dtype (diffusers' `apply_rotary_emb` with `use_real_unbind_dim=-1`).
    """
    if x.shape[-1] % 2 or x.shape[-2:] != cos.shape or cos.shape != sin.shape:
        raise ValueError(f"x, cos, sin: expected x (..., N, D) with even D and cos, sin (N, D), got "
                         f"x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    x_even, x_odd = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (..., N, D/2) each
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)  # (..., N, D)
    return (x.float() * cos.to(x.device) + rotated * sin.to(x.device)).to(x.dtype)  # (..., N, D)

# %% [markdown]
# ### The relative-position property, seen and checked
#
# Take one query vector $q$ and one key vector $k$, put them at positions $m$ and $n$, and compute
# the score $\langle R_m q, R_n k\rangle$ for all pairs. Every diagonal of the matrix (constant
# $m - n$) is constant. In 2D the score depends only on the offset (Δrow, Δcol).

# %%
g = torch.Generator().manual_seed(0)
d, N = 32, 64
q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
cos, sin = rope_frequencies(torch.arange(N), d)  # (N, d)
Q = apply_rope(q.expand(N, d), cos, sin)  # (N, d): q at every position
K = apply_rope(k.expand(N, d), cos, sin)  # (N, d)
S = Q @ K.T  # (N, N): score of query at m with key at n
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].imshow(S.numpy(), cmap="RdBu")
axes[0].set(title="⟨R_m q, R_n k⟩", xlabel="n (key position)", ylabel="m (query position)")
offsets = torch.arange(-N + 1, N)
axes[1].plot(offsets, [S.diagonal(-int(o)).mean() for o in offsets])
axes[1].set(title="score against offset m − n", xlabel="m − n")
h2, w2 = 8, 8
cos2, sin2 = rope_2d(h2, w2, d)  # (64, d)
S2 = apply_rope(q.expand(h2 * w2, d), cos2, sin2) @ apply_rope(k.expand(h2 * w2, d), cos2, sin2).T  # (64, 64)
axes[2].imshow(S2[3 * w2 + 4].reshape(h2, w2).numpy(), cmap="RdBu")
axes[2].plot(4, 3, "k+", ms=12)
axes[2].set(title="2D: query at (3, 4), keys everywhere")
plt.tight_layout()
plt.show()
diag_spread = max(float(S.diagonal(o).std()) for o in range(-N + 2, N - 1))
print(f"largest spread of the score along a diagonal (constant m - n): {diag_spread:.2e}")
assert diag_spread < 1e-4
S2g = S2.reshape(h2, w2, h2, w2)  # (row_q, col_q, row_k, col_k)
assert torch.allclose(S2g[3, 4, 1, 2], S2g[5, 6, 3, 4], atol=1e-5)  # same offset (2, 2)
assert torch.allclose(S[0, 0], q @ k, atol=1e-5)  # position 0 is the identity rotation
assert torch.allclose(apply_rope(q.expand(N, d), cos, sin).norm(dim=1), q.norm().expand(N), atol=1e-5)  # rotations
try:
    rope_2d(4, 4, 30)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## Try it: the timestep embedding as a barcode
# Move the slider: the fast coordinates (left) change at every step, the slow ones (right) only
# over hundreds of steps. (In a static page the widget does not move; run the notebook in JupyterLab.)

# %%
import ipywidgets as W
from IPython.display import display


def show_embedding(t=500, layout="DiT (cos, sin; s=0)"):
    flip, shift = {"DiT (cos, sin; s=0)": (True, 0), "DDPM (sin, cos; s=1)": (False, 1)}[layout]
    e = timestep_embedding(torch.tensor([float(t)]), 256, flip, shift)  # (1, 256)
    fig, ax = plt.subplots(figsize=(10, 1.4))
    ax.imshow(e.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax.set(title=f"t = {t}", yticks=[])
    plt.show()


display(W.interactive(show_embedding, t=W.IntSlider(500, 0, 999),
                      layout=W.Dropdown(options=["DiT (cos, sin; s=0)", "DDPM (sin, cos; s=1)"])))

# %% [markdown]
# ## What we built, and what it was compared against
#
# `tinydit.embeddings` holds `timestep_embedding`, `TimestepEmbedder`, `sincos_embed_1d`,
# `sincos_pos_embed_2d`, `rope_frequencies`, `rope_axial`, `rope_2d` and `apply_rope`.
# `tests/test_embeddings.py` compares them with the references, to $10^{-6}$:
#
# | ours | reference |
# |---|---|
# | `timestep_embedding` (all flip / shift / scale / period options, odd dims) | diffusers `get_timestep_embedding` |
# | `TimestepEmbedder`, DiT layout | diffusers `Timesteps(256, True, 0)` + `TimestepEmbedding` (PixArt's `t_embedder` path) with copied weights |
# | `TimestepEmbedder(downscale_freq_shift=1)` | diffusers `CombinedTimestepLabelEmbeddings` (its DiT port) |
# | `sincos_pos_embed_2d` (DiT; PixArt base size and interpolation scale; non-square) | diffusers `get_2d_sincos_pos_embed` |
# | `rope_frequencies`, `apply_rope` | diffusers `get_1d_rotary_pos_embed`, `apply_rotary_emb`, and the complex-number form (Lumina) |
# | `rope_axial` | diffusers `FluxPosEmbed` |
#
# and test the relative-position property of RoPE in 1D and 2D. Next, chapter 04 builds the noise
# schedules that decide which $t$ means how much noise.
