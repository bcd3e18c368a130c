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
#    tokens (as MAE did); later models such as Flux and Lumina *rotate* queries and keys instead
#    (rotary position embeddings, RoPE; Su et al. 2021), which makes attention depend on relative
#    offsets.
#
# Each idea first appears as a short teaching version run on tiny tensors; then we export the
# production version (argument checks, dtypes, every layout real checkpoints use) and check that
# the two agree. `tests/test_embeddings.py` compares the production versions with diffusers.
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

# %%
import math
import re

import matplotlib.pyplot as plt
import torch
from torch import nn


# %% [markdown]
# ## Sinusoidal timestep embeddings
#
# For a time $t$ and an embedding of $d$ dimensions with $h = \lfloor d/2 \rfloor$ frequencies,
#
# $$\omega_i = P^{-\,i/(h - s)}, \qquad i = 0, \dots, h-1, \qquad
#   e(t) = \big[\cos(\omega_0 t), \dots, \cos(\omega_{h-1} t),\ \sin(\omega_0 t), \dots, \sin(\omega_{h-1} t)\big]$$
#
# with the *max period* $P = 10000$. The frequencies fall geometrically from $1$ (period $2\pi$, a
# few timesteps) to about $1/P$ (period $2\pi P$, longer than the whole schedule), so nearby times
# differ in the fast coordinates and far-apart times in the slow ones. Here is the idea in five
# lines, in DiT's layout (cosines first, shift $s = 0$):

# %%
def simple_timestep_embedding(t, dim, shift=0, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half) / (half - shift))  # (half,)
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)  # (B, dim): cos | sin


t_tiny = torch.tensor([0.0, 1.0, 10.0, 999.0])  # (4,)
e_tiny = simple_timestep_embedding(t_tiny, 8)  # (4, 8)
print(e_tiny.round(decimals=3))
assert e_tiny.shape == (4, 8)

# %% [markdown]
# Real models differ in two small details, and a checkpoint only works with the layout it was
# trained with:
#
# | model | order | shift $s$ |
# |---|---|---|
# | DDPM (Ho et al.; diffusers' default `flip_sin_to_cos=False, downscale_freq_shift=1`) | sin, cos | 1 |
# | SD 1.x/2.x and SDXL UNets (`flip_sin_to_cos: true, freq_shift: 0`), original DiT (facebookresearch), PixArt | cos, sin | 0 |
# | diffusers' `DiTTransformer2DModel` | cos, sin | 1 |
#
# The shift changes the denominator $h - s$: with $s = 1$ the slowest frequency is exactly $1/P$.
# (diffusers' DiT port uses $s = 1$ while the original DiT code uses $s = 0$; the difference is small
# but real, and we measure it below.) The production version covers every layout, pads an odd $d$
# with one zero, accepts a scalar $t$, and refuses NaN or infinite times with a clear error rather
# than returning an embedding full of NaN.

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

from tinydit.validation import check_finite, check_float, check_int, check_tensor


def _as_1d_times(t, name: str = "t") -> torch.Tensor:
    """A scalar or a 1-D sequence of finite times (or positions) as a 1-D tensor (B,)."""
    if isinstance(t, (str, bytes)) or (not isinstance(t, torch.Tensor) and t is None):
        raise TypeError(f"{name}: expected numbers (a scalar or a 1-D tensor), got {type(t).__name__}")
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected numbers (a scalar or a 1-D tensor), got {type(t).__name__} ({e})") from None
    if t.dtype == torch.bool:
        raise TypeError(f"{name}: expected numbers, got a boolean tensor")
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D tensor of times (B,), got shape {tuple(t.shape)}")
    if torch.compiler.is_compiling():  # a value check is a device sync and a graph break; eager calls keep it
        return t
    return check_finite(name, t)

# %%
# | export
def _check_frequencies(dim, downscale_freq_shift, max_period, dim_name: str = "dim") -> int:
    """The embedding width as an int >= 2, and a finite shift below dim // 2 and max_period > 1."""
    dim = check_int(dim_name, dim, minimum=2)
    shift = check_float("downscale_freq_shift", downscale_freq_shift)
    if dim // 2 - shift <= 0:
        raise ValueError(f"downscale_freq_shift: expected a value below {dim_name} // 2 = {dim // 2}, got {shift!r}")
    check_float("max_period", max_period, minimum=1, min_inclusive=False)
    return dim

# %%
# | export
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
    the DDPM layout (Ho et al. 2020, after Vaswani et al. 2017); the SD UNet / original DiT / PixArt
    layout is `flip_sin_to_cos=True, downscale_freq_shift=0`. Matches diffusers' `get_timestep_embedding`.
    NaN or infinite times are refused.
    """
    t = _as_1d_times(t)  # (B,)
    dim = _check_frequencies(dim, downscale_freq_shift, max_period)
    scale = check_float("scale", scale)
    half = dim // 2
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
# The teaching version and the production version compute the same thing in DiT's layout; the
# layouts really differ; odd widths get a zero pad; bad input names the argument.

# %%
torch.testing.assert_close(timestep_embedding(t_tiny, 8, flip_sin_to_cos=True, downscale_freq_shift=0),
                           simple_timestep_embedding(t_tiny, 8))
torch.testing.assert_close(timestep_embedding(t_tiny, 8, True, 1), simple_timestep_embedding(t_tiny, 8, shift=1))
dit0 = timestep_embedding(t_tiny, 256, True, 0)  # (4, 256): original DiT, PixArt, SD UNets
dit1 = timestep_embedding(t_tiny, 256, True, 1)  # (4, 256): diffusers' DiT port
gap = float((dit0 - dit1).abs().max())
print(f"shift 0 vs shift 1, 256 dims: max difference {gap:.3f}")
assert gap > 0.5  # measured 1.94 (at t = 999); a layout mix-up is not a rounding error
odd = timestep_embedding(t_tiny, 7)  # (4, 7)
assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)
for bad, pattern in [(dict(dim=1), r"^dim: expected an integer >= 2"),
                     (dict(dim=2, downscale_freq_shift=1), r"^downscale_freq_shift: expected a value below"),
                     (dict(t=torch.zeros(2, 2)), r"^t: expected a scalar or a 1-D tensor"),
                     (dict(t=torch.tensor([1.0, float("nan")])), r"^t: expected finite values, got 1 NaN"),
                     (dict(t=torch.tensor([float("inf")])), r"^t: expected finite values, got 0 NaN and 1 inf")]:
    try:
        timestep_embedding(**{"t": t_tiny, "dim": 8, **bad})
    except ValueError as e:
        print("ValueError:", e)
        assert re.search(pattern, str(e)), str(e)
    else:
        raise AssertionError(f"{bad} should have raised")

# %% [markdown]
# Each row below is one timestep $t \in \{0, \dots, 999\}$, each column one coordinate of its
# 256-dimensional DiT embedding. The left columns (cosines of fast frequencies) oscillate every few
# steps; the right ones barely move over the whole schedule. On the right: nearby times have
# similar embeddings, distant ones do not.

# %%
t_all = torch.arange(1000)  # (1000,)
E = timestep_embedding(t_all, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # (1000, 256)
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
axes[0].imshow(E.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
axes[0].set(title="DiT timestep embedding (cos | sin)", xlabel="coordinate", ylabel="t")
for i in (0, 16, 64, 127):
    axes[1].plot(t_all, E[:, i], label=f"cos(ω_{{{i}}} t)")
axes[1].set(title="a few coordinates over t", xlabel="t")
axes[1].legend(fontsize=8)
En = nn.functional.normalize(E, dim=1)  # (1000, 256)
sim = En @ En.T  # (1000, 1000)
axes[2].imshow(sim.numpy(), cmap="viridis")
axes[2].set(title="cosine similarity e(t)·e(t')", xlabel="t'", ylabel="t")
plt.tight_layout()
plt.show()
print(f"similarity of t=500 to 501, 600, 999: {sim[500, 501]:.3f}, {sim[500, 600]:.3f}, {sim[500, 999]:.3f}")
assert sim[500, 501] > sim[500, 600] > sim[500, 999]

# %% [markdown]
# ## The `TimestepEmbedder`
#
# DiT feeds the 256-dimensional sinusoid to a two-layer MLP, $\mathrm{Linear} \to \mathrm{SiLU}
# \to \mathrm{Linear}$, whose output (the width of the transformer) conditions every block through
# adaLN. The idea:

# %%
class SimpleTimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):  # t (B,)
        return self.mlp(simple_timestep_embedding(t, self.freq_dim))  # (B, hidden)


simple_temb = SimpleTimestepEmbedder(16, freq_dim=32)
assert simple_temb(t_tiny).shape == (4, 16)

# %% [markdown]
# The production version keeps the original parameter names (`mlp.0`, `mlp.2`), so a
# facebookresearch DiT or PixArt checkpoint's `t_embedder.*` weights load with a plain
# `load_state_dict`; it starts the MLP weights from $\mathcal{N}(0, 0.02^2)$ as DiT does, exposes
# the frequency layout, and casts the sinusoid to the weights' dtype (for fp16 / bf16 models).

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
        hidden_size = check_int("hidden_size", hidden_size, minimum=2)
        self.frequency_embedding_size = _check_frequencies(frequency_embedding_size, downscale_freq_shift,
                                                           max_period, "frequency_embedding_size")
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_embedding_size, hidden_size, bias=True),
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

# %% [markdown]
# The teaching module's weights load into the production one unchanged (same names, same shapes),
# and then both give the same output.

# %%
temb = TimestepEmbedder(16, frequency_embedding_size=32)
temb.load_state_dict(simple_temb.state_dict())  # strict: any name or shape mismatch raises
print({k: tuple(v.shape) for k, v in temb.state_dict().items()})
torch.testing.assert_close(temb(t_tiny), simple_temb(t_tiny))
assert temb(torch.tensor(5)).shape == (1, 16)  # a scalar time is a batch of one
try:
    TimestepEmbedder(0)
except ValueError as e:
    print("ValueError:", e)
    assert re.search(r"^hidden_size: expected an integer >= 2, got 0", str(e))
else:
    raise AssertionError("hidden_size=0 should have raised")

# %% [markdown]
# ## 2D sin-cos position embeddings (MAE, DiT, PixArt)
#
# A $h \times w$ grid of patches gets a fixed table of $h w$ vectors. Half of each vector is the 1D
# sin-cos embedding (frequencies $10000^{-2i/D'}$, $D' = D/2$) of the patch's column, the other half
# that of its row (the column comes first: MAE's `meshgrid(w, h)` quirk, kept so that checkpoints
# match):

# %%
def simple_sincos_1d(dim, pos):  # pos (M,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim)


def simple_sincos_2d(dim, h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    return torch.cat([simple_sincos_1d(dim // 2, cols.flatten()),
                      simple_sincos_1d(dim // 2, rows.flatten())], dim=1).float()  # (h*w, dim)


pos_tiny = simple_sincos_2d(8, 2, 3)  # (6, 8)
assert pos_tiny.shape == (6, 8)

# %% [markdown]
# DiT and MAE use raw indices. diffusers adds a *base size* $b$ and PixArt an *interpolation
# scale* $\iota$: positions become
#
# $$p(r, c) = \big[\,e_{D/2}(c\,/\,\kappa_w),\ e_{D/2}(r\,/\,\kappa_h)\,\big], \qquad
#   \kappa_h = \frac{h}{b}\,\iota,\ \ \kappa_w = \frac{w}{b}\,\iota ,$$
#
# so every grid side is stretched to span $[0, b/\iota)$. PixArt sets $b$ to the grid side itself
# and picks $\iota$ by resolution (0.5 at 256 px, 1 at 512, 2 at 1024), so positions are
# $r/\iota$: a 1024 px model (64×64 grid, $\iota = 2$) sees the position range $[0, 32)$ of its
# 512 px parent (32×32 grid, $\iota = 1$), twice as densely. The production version adds these two
# knobs and checks its arguments.

# %%
# | export
def _check_multiple(name: str, value, multiple: int, why: str = "") -> int:
    """`value` as a positive integer multiple of `multiple` (an even width, two halves, ...)."""
    value = check_int(name, value, minimum=1)
    if value % multiple:
        raise ValueError(f"{name}: expected a positive multiple of {multiple}{why}, got {value}")
    return value

# %%
# | export
def _grid_sides(grid_size) -> tuple[int, int]:
    """An int side or an (h, w) pair -> two integers >= 1."""
    if isinstance(grid_size, Sequence) and not isinstance(grid_size, str):
        if len(grid_size) != 2:
            raise ValueError(f"grid_size: expected an int or an (h, w) pair, got {grid_size!r}")
        h, w = grid_size
    else:
        h = w = grid_size
    return check_int("grid_size", h, minimum=1), check_int("grid_size", w, minimum=1)

# %%
# | export
def sincos_embed_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding of positions `pos` (M,) -> (M, embed_dim): `[sin | cos]`, frequencies
    `10000 ** (-2i / embed_dim)` (Vaswani et al. 2017; MAE's `get_1d_sincos_pos_embed_from_grid`)."""
    embed_dim = _check_multiple("embed_dim", embed_dim, 2)
    pos = check_finite("pos", torch.as_tensor(pos))
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)  # (D/2,)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()  # (M, D)

# %%
# | export
def sincos_pos_embed_2d(embed_dim: int, grid_size: int | Sequence[int], base_size: float | None = None,
                        interpolation_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2D sin-cos position table (MAE, DiT; PixArt's resolution scaling) -> (h*w, embed_dim).

    Row-major over the `(h, w)` grid. The first half of each vector embeds the column, the second
    half the row. With `base_size=None` positions are the raw indices (DiT/MAE); otherwise they are
    `index / (size / base_size) / interpolation_scale` (PixArt-alpha/Sigma; diffusers'
    `get_2d_sincos_pos_embed`, whose `base_size` defaults to 16).
    """
    embed_dim = _check_multiple("embed_dim", embed_dim, 4, " (two sin-cos halves)")
    h, w = _grid_sides(grid_size)
    interpolation_scale = check_float("interpolation_scale", interpolation_scale, minimum=0, min_inclusive=False)
    rows = torch.arange(h, dtype=torch.float32)  # (h,)
    cols = torch.arange(w, dtype=torch.float32)  # (w,)
    if base_size is not None:
        base_size = check_float("base_size", base_size, minimum=0, min_inclusive=False)
        rows = rows / (h / base_size) / interpolation_scale
        cols = cols / (w / base_size) / interpolation_scale
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    return torch.cat([sincos_embed_1d(embed_dim // 2, cc), sincos_embed_1d(embed_dim // 2, rr)], dim=1)  # (h*w, D)

# %%
for grid in [(2, 3), (5, 4), (16, 16)]:
    torch.testing.assert_close(sincos_pos_embed_2d(32, grid), simple_sincos_2d(32, *grid), rtol=0, atol=0)
try:
    sincos_pos_embed_2d(30, 4)
except ValueError as e:
    print("ValueError:", e)
    assert re.search(r"^embed_dim: expected a positive multiple of 4", str(e))
else:
    raise AssertionError("embed_dim=30 should have raised")

# %% [markdown]
# The similarity of one patch's vector to every other patch's: it peaks at the patch itself and
# falls off with distance in both directions, which is all the transformer needs to learn locality.
# On the right, PixArt's scaling: a 32×32 grid at $\iota = 2$ covers the same position range as a
# 16×16 grid at $\iota = 1$, so its even cells reuse the coarse table exactly.

# %%
P = sincos_pos_embed_2d(64, 16)  # (256, 64)
Pn = nn.functional.normalize(P, dim=1)  # (256, 64)
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
assert int((Pn @ Pn[8 * 16 + 8]).argmax()) == 8 * 16 + 8
torch.testing.assert_close(fine.reshape(32, 32, 64)[::2, ::2].reshape(256, 64), coarse, rtol=0, atol=1e-6)

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
# rotated by the row, the other by the column (axial 2D RoPE). With complex numbers the idea is
# literally a multiplication:

# %%
def simple_rope(x, pos, theta=10000.0):  # x (..., N, d), pos (N,)
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = pos.double()[:, None] * freqs[None, :]  # (N, d/2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2))  # (..., N, d/2) complex
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)  # (..., N, d/2): times e^{i m θ}
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (..., N, d)


def simple_rope_2d(x, h, w):  # x (..., h*w, d), tokens row-major
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    d = x.shape[-1]
    return torch.cat([simple_rope(x[..., : d // 2], rows.flatten()),  # first half turns with the row
                      simple_rope(x[..., d // 2 :], cols.flatten())], dim=-1)  # (..., h*w, d)


x_tiny = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))  # (B, heads, N, d)
assert simple_rope(x_tiny, torch.arange(6)).shape == simple_rope_2d(x_tiny, 2, 3).shape == (2, 3, 6, 8)

# %% [markdown]
# The production version avoids complex tensors (which some backends and `torch.compile` paths
# handle poorly): it precomputes real `(N, d)` cos and sin tables once per sequence, each angle
# repeated for its pair (the *interleaved pairs* layout of RoFormer, Flux and Lumina), and rotates
# with $x \cos + \mathrm{rot}(x) \sin$, where $\mathrm{rot}(x_{2i}, x_{2i+1}) = (-x_{2i+1}, x_{2i})$.
# `rope_axial` builds the multi-axis tables Flux uses (three axes: a text index, rows and columns,
# `axes_dim = (16, 56, 56)`, $\Theta = 10000$).

# %%
# | export
def _check_rope_inputs(x, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x (..., N, D) with even D, and cos, sin tables of shape (N, D)."""
    check_tensor("x", x, floating=True)
    if x.ndim < 2 or x.shape[-1] % 2 or x.shape[-2:] != cos.shape or cos.shape != sin.shape:
        raise ValueError(f"x, cos, sin: expected x (..., N, D) with even D and cos, sin (N, D), got "
                         f"x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")

# %%
# | export
def rope_frequencies(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for 1D RoPE (Su et al. 2021) at positions `pos` (N,) -> two (N, dim).

    Angle of pair i at position m is `m * theta ** (-2i / dim)`; each angle is repeated twice
    (interleaved pairs, as RoFormer, Flux and diffusers' `get_1d_rotary_pos_embed(use_real=True,
    repeat_interleave_real=True)`). Computed in float64, returned in float32.
    """
    dim = _check_multiple("dim", dim, 2)
    theta = check_float("theta", theta, minimum=0, min_inclusive=False)
    pos = _as_1d_times(pos, "pos")  # (N,)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    angles = torch.outer(pos.double(), inv_freq)  # (N, dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()  # (N, dim)
    sin = angles.sin().repeat_interleave(2, dim=1).float()  # (N, dim)
    return cos, sin

# %%
# | export
def rope_axial(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial RoPE tables for multi-axis positions `ids` (N, n_axes) -> cos, sin (N, sum(axes_dim)).

    Axis a rotates its own `axes_dim[a]` coordinates by `ids[:, a]`; the tables are concatenated in
    axis order (Flux's `EmbedND` / diffusers' `FluxPosEmbed`).
    """
    check_tensor("ids", ids)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"ids: expected shape (N, {len(axes_dim)}) for axes_dim={tuple(axes_dim)}, "
                         f"got {tuple(ids.shape)}")
    tables = [rope_frequencies(ids[:, a].double(), d, theta) for a, d in enumerate(axes_dim)]
    return torch.cat([c for c, _ in tables], dim=1), torch.cat([s for _, s in tables], dim=1)  # (N, D) each

# %%
# | export
def rope_2d(h: int, w: int, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2D axial RoPE tables for a row-major `h` x `w` grid of tokens -> cos, sin (h*w, dim).

    The first `dim // 2` coordinates rotate with the row, the rest with the column.
    """
    dim = _check_multiple("dim", dim, 4, " (two axes of pairs)")
    h, w = check_int("h", h, minimum=1), check_int("w", w, minimum=1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    ids = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)  # (h*w, 2)
    return rope_axial(ids, (dim // 2, dim // 2), theta)

# %%
# | export
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys `x` (..., N, D) by RoPE tables `cos`, `sin` (N, D) (Su et al. 2021).

    Interleaved pairs `(x[2i], x[2i+1])` are rotated by their angle; computed in float32 and
    returned in `x`'s dtype (diffusers' `apply_rotary_emb` with `use_real_unbind_dim=-1`).
    """
    _check_rope_inputs(x, cos, sin)
    x_even, x_odd = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (..., N, D/2) each
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)  # (..., N, D)
    return (x.float() * cos.to(x.device) + rotated * sin.to(x.device)).to(x.dtype)  # (..., N, D)

# %%
pos6 = torch.arange(6)
torch.testing.assert_close(apply_rope(x_tiny, *rope_frequencies(pos6, 8)), simple_rope(x_tiny, pos6))
torch.testing.assert_close(apply_rope(x_tiny, *rope_2d(2, 3, 8)), simple_rope_2d(x_tiny, 2, 3))
try:
    rope_2d(4, 4, 30)
except ValueError as e:
    print("ValueError:", e)
    assert re.search(r"^dim: expected a positive multiple of 4", str(e))
else:
    raise AssertionError("dim=30 should have raised")

# %% [markdown]
# ### The relative-position property, seen and checked
#
# Take one query vector $q$ and one key vector $k$, put them at positions $m$ and $n$, and compute
# the score $\langle R_m q, R_n k\rangle$ for all pairs. Every diagonal of the matrix (constant
# $m - n$) is constant. In 2D the score depends only on the offset (Δrow, Δcol).

# %%
g = torch.Generator().manual_seed(0)
d, N = 32, 64
q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)  # (d,) each
cos, sin = rope_frequencies(torch.arange(N), d)  # (N, d) each
S = apply_rope(q.expand(N, d), cos, sin) @ apply_rope(k.expand(N, d), cos, sin).T  # (N, N): query m, key n
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].imshow(S.numpy(), cmap="RdBu")
axes[0].set(title="⟨R_m q, R_n k⟩", xlabel="n (key position)", ylabel="m (query position)")
offsets = torch.arange(-N + 1, N)
axes[1].plot(offsets, [S.diagonal(-int(o)).mean() for o in offsets])
axes[1].set(title="score against offset m − n", xlabel="m − n")
h2, w2 = 8, 8
cos2, sin2 = rope_2d(h2, w2, d)  # (64, d) each
S2 = apply_rope(q.expand(h2 * w2, d), cos2, sin2) @ apply_rope(k.expand(h2 * w2, d), cos2, sin2).T  # (64, 64)
axes[2].imshow(S2[3 * w2 + 4].reshape(h2, w2).numpy(), cmap="RdBu")
axes[2].plot(4, 3, "k+", ms=12)
axes[2].set(title="2D: query at (3, 4), keys everywhere")
plt.tight_layout()
plt.show()
diag_spread = max(float(S.diagonal(o).std()) for o in range(-N + 2, N - 1))
print(f"largest spread of the score along a diagonal (constant m - n): {diag_spread:.2e}")
assert diag_spread < 1e-4  # measured 1.4e-06 (float32 rounding) on scores up to 10
S2g = S2.reshape(h2, w2, h2, w2)  # (row_q, col_q, row_k, col_k)
torch.testing.assert_close(S2g[3, 4, 1, 2], S2g[5, 6, 3, 4])  # same offset (2, 2)
torch.testing.assert_close(S[0, 0], q @ k)  # position 0 is the identity rotation
torch.testing.assert_close(apply_rope(q.expand(N, d), cos, sin).norm(dim=1), q.norm().expand(N))  # rotations

# %% [markdown]
# ## Try it: the timestep embedding as a barcode
# Move the slider: the fast coordinates (left) change at every step, the slow ones (right) only
# over hundreds of steps. (In a static page the widget does not move; run the notebook in JupyterLab.)

# %%
import ipywidgets as W
from IPython.display import display


def show_embedding(t=500, layout="DiT / SD (cos, sin; s=0)"):
    flip, shift = {"DiT / SD (cos, sin; s=0)": (True, 0), "DDPM (sin, cos; s=1)": (False, 1)}[layout]
    e = timestep_embedding(torch.tensor([float(t)]), 256, flip, shift)  # (1, 256)
    fig, ax = plt.subplots(figsize=(10, 1.4))
    ax.imshow(e.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax.set(title=f"t = {t}", yticks=[])
    plt.show()


display(W.interactive(show_embedding, t=W.IntSlider(500, 0, 999),
                      layout=W.Dropdown(options=["DiT / SD (cos, sin; s=0)", "DDPM (sin, cos; s=1)"])))

# %% [markdown]
# ## Summary
#
# - **Built** (in `tinydit.embeddings`): `timestep_embedding` (every layout: DDPM's sin-first with
#   shift 1; SD UNets', original DiT's and PixArt's cos-first with shift 0; diffusers' DiT port's
#   shift 1), `TimestepEmbedder` (DiT parameter names, loads a checkpoint's `t_embedder`),
#   `sincos_embed_1d` / `sincos_pos_embed_2d` (with PixArt's base size and interpolation scale), and
#   RoPE: `rope_frequencies`, `rope_axial` (Flux), `rope_2d`, `apply_rope`. Non-finite times and
#   positions, and widths that cannot be split, are refused with the argument's name.
# - **Checked here**: each teaching version agrees with its production version; shift 0 and
#   shift 1 differ by up to 1.94 in a 256-dim DiT embedding (not a rounding error); a 32×32 PixArt
#   grid at $\iota = 2$ reuses the 16×16 table on its even cells; RoPE scores are constant along
#   every diagonal $m - n$ to about $10^{-6}$ and depend only on (Δrow, Δcol) in 2D.
# - **Checked in `tests/test_embeddings.py`** against diffusers, to $10^{-6}$:
#   `get_timestep_embedding`, `Timesteps` + `TimestepEmbedding` (PixArt's path),
#   `CombinedTimestepLabelEmbeddings` (its DiT port), `get_2d_sincos_pos_embed`,
#   `get_1d_rotary_pos_embed` / `apply_rotary_emb` (real and Lumina's complex form) and `FluxPosEmbed`.
#
# Next, chapter 04 builds the noise schedules that decide which $t$ means how much noise.
#
# ## Exercises
#
# 1. Load the same `TimestepEmbedder` weights into a model built with `downscale_freq_shift=1` and
#    compare the outputs for $t = 0, 500, 999$. At which $t$ is the difference largest, and why is
#    it zero at $t = 0$?
# 2. Plot the cosine similarity $e(t) \cdot e(t')$ for `max_period` $= 100$ and $= 10^6$. What goes
#    wrong at each extreme for a schedule of 1000 steps?
# 3. Replace the 2D sin-cos table by `simple_sincos_1d` over the flattened patch index $rw + c$.
#    Which pairs of far-apart patches now have similar positions?
# 4. Give an *additive* 1D sin-cos embedding the same test as RoPE: compute
#    $\langle q + p_m, k + p_n \rangle$ for all $m, n$ and measure the spread along each diagonal.
#    Why does adding positions not make the score depend on $m - n$ alone?
# 5. Extend `simple_rope_2d` to three axes and check it against `rope_axial` in Flux's layout
#    (ids `(0, row, column)` for image tokens, `axes_dim = (4, 6, 6)`). What do the text tokens'
#    ids `(0, 0, 0)` do to their queries and keys?
