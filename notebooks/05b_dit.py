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
# # 05b · The DiT core: patchify, adaLN-Zero, the model
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
# 05a built the attention the blocks run. Each piece here appears first as a few lines of plain
# PyTorch, then as the exported version, with an assert that the two compute the same thing. The
# chapter exports `tinydit.dit`; parameter names follow the original facebookresearch DiT code, so
# the released `DiT-XL-2-256x256.pt` loads without renaming.

# %%
# | default_exp dit
# %%
import os
import re

import torch

from tinydit.attention import RMSNorm
from tinydit.attention import attention as naive_attention  # 05a's lesson version equals it
from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)

# %% [markdown]
# ## 2. Patchify and unpatchify
#
# Cut the latent into non-overlapping $p \times p$ patches and flatten each into $C p^2$ numbers;
# one shared linear map then takes every patch to width $D$ (ViT's patch embedding).

# %%
def naive_patchify(x, p):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p): patches in row-major grid order
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, T, C*p*p)


lat = torch.randn(3, 4, 8, 8)  # (B, C, H, W): book-sized latents
patches = naive_patchify(lat, 2)
assert patches.shape == (3, 16, 16)  # 16 tokens, each a flattened 4×2×2 patch

# %% [markdown]
# A $p \times p$ convolution with stride $p$ computes the same linear map, faster; the exported
# `PatchEmbed` (like the original DiT, whose weight names we keep) writes it that way.
# `unpatchify` is the inverse reshaping for the output tokens.

# %%
# | export
"""The Diffusion Transformer (Peebles & Xie 2023): patchify, adaLN-Zero blocks, label conditioning,
presets, and loaders for the original facebookresearch DiT and diffusers checkpoint layouts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tinydit.attention import BACKENDS, Attention
from tinydit.checkpoint import (
    load_model,
    load_state_dict,
    resolve_dtype,
    resolve_pretrained,
    unwrap_state_dict,
)
from tinydit.embeddings import TimestepEmbedder, sincos_pos_embed_2d
from tinydit.loading import (
    convert_diffusers_dit,
    diffusers_weights_file,
    read_config_json,
    transformer_kind,
)
from tinydit.validation import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    unknown_fields,
)


# %%
# | export
class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) with one p×p, stride-p convolution (ViT's patchify)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D), row-major over the patch grid

# %%
# | export
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
linear = nn.Linear(16, 32)  # the teaching map: a linear layer on flattened patches
with torch.no_grad():
    linear.weight.copy_(pe.proj.weight.reshape(32, 16))  # conv weight (D, C, p, p) -> (D, C*p*p)
    linear.bias.copy_(pe.proj.bias)
    torch.testing.assert_close(pe(lat), linear(patches))
# output tokens hold (p, p, C) per patch, as the final layer writes them; unpatchify inverts that
out_tokens = patches.reshape(3, 16, 4, 2, 2).permute(0, 1, 3, 4, 2).reshape(3, 16, 16)  # (B, T, p*p*C)
assert torch.equal(unpatchify(out_tokens, 2, 4, 4), lat)

# %% [markdown]
# ## 3. Conditioning: timesteps and labels
#
# The timestep goes through chapter 03's `TimestepEmbedder` (sinusoid → MLP); class labels go
# through a table with one extra row, the **null class** (index `num_classes`). In training each
# label becomes the null class with probability `class_dropout_prob` (10 % in DiT), so the same
# network also learns the *unconditional* model that classifier-free guidance needs (chapter 11).
# The conditioning vector is $c = e_t + e_y$.

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
# A pre-norm transformer block adds $\operatorname{Attn}(\operatorname{LN}(x))$, then
# $\operatorname{MLP}(\operatorname{LN}(x))$, to $x$. DiT injects the conditioning by *modulating*
# those LayerNorms (adaptive LayerNorm, as in FiLM and StyleGAN): a linear map of
# $\operatorname{SiLU}(c)$ gives a shift $\beta$, a scale $\gamma$ and a gate $\alpha$ for each
# branch,
#
# $$x \leftarrow x + \alpha_1 \odot \operatorname{Attn}\big(\operatorname{LN}(x)\,(1 + \gamma_1) + \beta_1\big),\qquad
#   x \leftarrow x + \alpha_2 \odot \operatorname{MLP}\big(\operatorname{LN}(x)\,(1 + \gamma_2) + \beta_2\big).$$
#
# The **Zero**: that map starts at zero, so every gate is $0$ and **every block starts as the
# identity**; each block then learns its residual gradually. Peebles & Xie found this the best of
# the conditioning schemes they tried (in-context tokens, cross-attention, adaLN, adaLN-Zero).
# The "1 +" keeps the LayerNorm's scale at 1 when $\gamma = 0$.

# %%
class NaiveBlock(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(D, 6 * D)  # SiLU(c) -> shift, scale, gate for each branch
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))

    def attn(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, T, d)
        return self.proj(naive_attention(q, k, v).transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # (B, 1, D)
        norm = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no learned affine: adaLN gives it
        x = x + gate1 * self.attn(norm(x) * (1 + scale1) + shift1)  # (B, T, D)
        return x + gate2 * self.mlp(norm(x) * (1 + scale2) + shift2)  # (B, T, D)


naive = NaiveBlock(32, heads=4)
xs, cs = torch.randn(2, 16, 32), torch.randn(2, 32)  # tokens (B, T, D), conditioning (B, D)
assert naive(xs, cs).shape == xs.shape

# %% [markdown]
# The exported block has the same arithmetic with the original DiT's names; the final layer is one
# more modulated LayerNorm and a linear map from each token to a $p \times p \times C_\text{out}$ patch.

# %%
# | export
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) scaled by (1 + scale) and shifted by shift, both (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

# %%
# | export
class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU (tanh approximation, as DiT) -> Linear (timm names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

# %%
# | export
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

# %%
# | export
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
# Copy a `DiTBlock`'s weights into the teaching block: same outputs. Zero the modulation
# (adaLN-Zero) and the block is exactly the identity, whatever the tokens and conditioning.

# %%
torch.testing.assert_close(RMSNorm(32)(xs), xs / xs.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())  # QK-norm
blk = DiTBlock(hidden_size=32, num_heads=4)
sd = blk.state_dict()
names = {"ada": "adaLN_modulation.1", "qkv": "attn.qkv", "proj": "attn.proj", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
naive.load_state_dict({f"{n}.{s}": sd[f"{o}.{s}"] for n, o in names.items() for s in ("weight", "bias")})
with torch.no_grad():
    torch.testing.assert_close(blk(xs, cs), naive(xs, cs))
    blk.adaLN_modulation[1].weight.zero_()
    blk.adaLN_modulation[1].bias.zero_()
    assert torch.equal(blk(xs, cs), xs)

# %% [markdown]
# ## 5. The model and its presets
#
# `TransformerConfig` holds the backbone every latent transformer here shares (chapter 07's text
# DiT too), each field with the reason it exists; `DiTConfig` adds the labels. The paper's presets
# are S / B / L / XL (width and depth) × patch size /2 /4 /8; `book` is ours: a few million
# parameters for the book's 4×8×8 latents, with 18 classes (colour × shape, chapter 01).

# %%
# | export
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads


@dataclass
class TransformerConfig:
    """The backbone every latent diffusion transformer here shares (DiT; chapter 07's text DiT)."""

    input_size: int = 32  # latent side the position table is built for (256 px / VAE factor 8)
    patch_size: int = 2  # p: tokens = (input_size / p)^2; smaller p = more tokens = more GFLOPs
    in_channels: int = 4  # latent channels of the VAE
    hidden_size: int = 1152  # D, the token width
    depth: int = 28  # number of blocks
    num_heads: int = 16  # attention heads (head_dim = D / heads)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    learn_sigma: bool = True  # also predict the variance: 2 * in_channels outputs (improved DDPM)
    frequency_embedding_size: int = 256  # width of the sinusoidal timestep features
    freq_shift: float = 0.0  # timestep sinusoid downscale_freq_shift: 0 in the original code, 1 in diffusers' port
    norm_eps: float = 1e-6  # LayerNorm epsilon inside the blocks (original DiT)
    qk_norm: bool = False  # RMSNorm on queries and keys (SD3 / Flux); the released DiTs have none
    attn_backend: str = "auto"  # "auto", "sdpa", "flash" or "math"

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                     "frequency_embedding_size"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.mlp_ratio = check_float("mlp_ratio", self.mlp_ratio, minimum=0, min_inclusive=False)
        self.freq_shift = check_float("freq_shift", self.freq_shift)
        self.norm_eps = check_float("norm_eps", self.norm_eps, minimum=0, min_inclusive=False)
        self.learn_sigma, self.qk_norm = check_bool("learn_sigma", self.learn_sigma), check_bool("qk_norm", self.qk_norm)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size: must be divisible by patch_size={self.patch_size}, got {self.input_size}")
        check_choice("attn_backend", self.attn_backend, BACKENDS)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)

# %%
# | export
@add_to_class(TransformerConfig)
@classmethod
def from_dict(cls, d: dict):
    if not isinstance(d, dict):
        raise TypeError(f"config: expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
    unknown = unknown_fields(d, cls)
    if unknown:
        raise ValueError(f"config: unknown {cls.__name__} fields {unknown}")
    return cls(**d)

# %%
# | export
@dataclass
class DiTConfig(TransformerConfig):
    """Architecture of a class-conditional DiT. Presets: `DiTConfig.preset("DiT-XL/2")`, `"book"`."""

    num_classes: int = 1000  # label vocabulary; the table has one more row, the null class
    class_dropout_prob: float = 0.1  # label -> null during training, for classifier-free guidance

    def __post_init__(self):
        super().__post_init__()
        self.num_classes = check_int("num_classes", self.num_classes, minimum=1)
        check_float("class_dropout_prob", self.class_dropout_prob, minimum=0.0, maximum=1.0, max_inclusive=False)

    @classmethod
    def preset_names(cls) -> list[str]:
        return [f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8)] + ["book"]

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        """A named architecture, optionally with some fields overridden."""
        if name == "book":
            base = cls(input_size=8, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=6,
                       num_classes=18, learn_sigma=False)
        else:
            size, _, patch = str(name).removeprefix("DiT-").partition("/")
            if not str(name).startswith("DiT-") or size not in DIT_SIZES or patch not in ("2", "4", "8"):
                raise ValueError(f"name: unknown DiT preset {name!r}; expected one of {cls.preset_names()}")
            depth, width, heads = DIT_SIZES[size]
            base = cls(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(patch))
        return replace(base, **overrides)

# %% [markdown]
# The whole forward pass, built from a model's own parts (we run it once the model exists):

# %%
def naive_dit_forward(m, x, t, y):
    B, C, H, W = x.shape
    p = m.config.patch_size
    tokens = m.x_embedder(x) + m.pos_embed  # (B, T, D); a full-size latent uses the whole table
    c = m.t_embedder(t) + m.y_embedder(y)  # (B, D): which noise level, which class
    for block in m.blocks:
        tokens = block(tokens, c)  # (B, T, D)
    out = m.final_layer(tokens, c)  # (B, T, p*p*C_out)
    out = out.reshape(B, H // p, W // p, p, p, -1)  # (B, h, w, p, p, C_out)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)  # (B, C_out, H, W)

# %% [markdown]
# The exported model adds checks and loaders around those lines. What it shares with chapter 07's
# text-conditioned model (position table, initialisation, saving) lives in the base class
# `LatentTransformer`. Shape checks are free (metadata only); value checks (label range, NaN) cost a
# device sync, so they run once per eager call and are skipped inside `torch.compile`.

# %%
# | export
def check_latents(x: torch.Tensor, t, config: TransformerConfig, fixed_table: bool = True) -> torch.Tensor:
    """Validate latents x (B, C, H, W) and timesteps (shapes only: free, no device sync); returns
    t as a (B,) tensor on x's device. `fixed_table=False`: the model rebuilds its position table
    for any grid (PixArt), so grids larger than `input_size` are allowed."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != config.in_channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected latents of shape (B, {config.in_channels}, H, W), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected floating-point latents, got dtype {x.dtype}")
    B, _, H, W = x.shape
    p = config.patch_size
    if B == 0:
        raise ValueError("x: expected a batch of at least one latent, got batch size 0")
    if H % p or W % p:
        raise ValueError(f"x: H and W must be divisible by patch_size={p}, got {H}x{W}")
    if fixed_table and (H > config.input_size or W > config.input_size):
        raise ValueError(f"x: {H}x{W} is larger than the position table allows "
                         f"(input_size={config.input_size}); build the model with a larger input_size")
    if isinstance(t, (str, bytes)) or t is None:
        raise TypeError(f"t: expected numeric timesteps (a scalar or a ({B},) tensor), got {type(t).__name__}")
    t = torch.as_tensor(t, device=x.device)
    if t.dtype == torch.bool:
        raise TypeError("t: expected numeric timesteps, got a boolean tensor")
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t: expected a scalar or shape ({B},) to match the batch, got {tuple(t.shape)}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():  # on the CPU a value check costs no sync
        check_timestep_range(t)
    return t

# %%
# | export
MAX_TIMESTEP = 1000  # DiT, PixArt and the SD3 / Flux transformers read t in [0, 1000]


def check_timestep_range(t: torch.Tensor) -> None:
    """Timesteps in [0, MAX_TIMESTEP]: outside it, the sinusoidal embedding is one the model never saw."""
    check_finite("t", t)  # NaN / inf: named as such first
    lo, hi = float(t.min()), float(t.max())
    if lo < 0 or hi > MAX_TIMESTEP:
        raise ValueError(f"t: expected timesteps in [0, {MAX_TIMESTEP}] (the range these models are trained on), "
                         f"got values from {lo:.4g} to {hi:.4g}")

# %%
# | export
class LatentTransformer(nn.Module):
    """What DiT and chapter 07's TextDiT share: a fixed position table, the DiT initialisation of
    linears and patch embedding, parameter counting, and tinydit's own save format."""

    config: TransformerConfig

    def init_linears_and_patch_embed(self) -> None:
        """Xavier-uniform every linear (zero bias) and the patch embedding, seen as a linear map."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    @classmethod
    def position_table(cls, cfg: TransformerConfig) -> torch.Tensor:
        """The fixed sin-cos table (1, T, D) of `cfg`'s grid; loaders recompute it, never trust the file."""
        return sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None]  # (1, T, D)

    @classmethod
    def from_weights(cls, cfg: TransformerConfig, sd: dict[str, torch.Tensor], what: str, dtype=None):
        """`cls(cfg)` filled from `sd` with the position table recomputed; `dtype` as in `load_model`."""
        return load_model(lambda: cls(cfg), {**sd, "pos_embed": cls.position_table(cfg)}, what=what, dtype=dtype)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h×w patch grid: the top-left corner of the stored table."""
        g = self.config.input_size // self.config.patch_size
        table = self.pos_embed.reshape(g, g, -1)[:h, :w]  # (h, w, D)
        return table.reshape(1, h * w, -1)  # (1, T, D)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` (with `_class`) and `model.safetensors`: tinydit's own layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class": type(self).__name__, **self.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

# %%
# | export
class DiT(LatentTransformer):
    """Diffusion Transformer with adaLN-Zero conditioning on timestep and class label.

    `model(x, t, y=None)`: x (B, C, H, W) noisy latents, t (B,) or scalar timesteps, y (B,) labels
    (None or `num_classes` = the null class). Returns the raw network output (B, C_out, H, W):
    epsilon, followed by the variance interpolation channels when `learn_sigma`.
    """

    config_class = DiTConfig  # what its own layout's config.json holds
    diffusers_class = "DiTTransformer2DModel"  # the diffusers model `from_pretrained` reads

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else DiTConfig()
        if not isinstance(cfg, DiTConfig):
            raise TypeError(f"config: expected a DiTConfig, got {type(cfg).__name__}")
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size,
                                           flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # fixed (not learned) sin-cos table; a buffer so checkpoints carry it under "pos_embed"
        self.register_buffer("pos_embed", self.position_table(cfg))  # (1, T, D)
        self.blocks = nn.ModuleList([
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attn_backend, cfg.norm_eps)
            for _ in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and final layer."""
        self.init_linears_and_patch_embed()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

# %%
# | export
@add_to_class(DiT)
@classmethod
def config_from_diffusers(cls, config: dict, **overrides) -> DiTConfig:
    """The DiTConfig of a diffusers DiTTransformer2DModel config.json (the reader: the appendix)."""
    return config_from_diffusers(config, **overrides)

# %%
# | export
@add_to_class(DiT)
@staticmethod
def convert_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers DiT weights -> ours (the key map: chapter 17a)."""
    return convert_diffusers_dit(sd)

# %%
# | export
@add_to_class(DiT)
def labels_for(self, y, batch_size: int, device) -> torch.Tensor:
    """Labels as a (B,) long tensor; None means the null class (shape and dtype checks only)."""
    if y is None:
        return torch.full((batch_size,), self.config.num_classes, device=device, dtype=torch.long)
    y = torch.as_tensor(y, device=device)
    if y.shape != (batch_size,) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y: expected integer labels of shape ({batch_size},), got {tuple(y.shape)} {y.dtype}")
    return y.long()

# %%
# | export
@add_to_class(DiT)
def check_values(self, x: torch.Tensor, t, y=None) -> None:
    """Value checks (label range, finite inputs), run by entry points once per call rather
    than inside `forward`, where each would cost a device sync and a compile graph break."""
    check_finite("x", x)
    check_finite("t", torch.as_tensor(t).float())
    if y is not None:
        y = torch.as_tensor(y)
        if y.numel() and (y.min() < 0 or y.max() > self.config.num_classes):
            raise ValueError(f"y: labels must be in [0, {self.config.num_classes}] ({self.config.num_classes} "
                             f"= null class), got values in [{int(y.min())}, {int(y.max())}]")

# %%
# | export
@add_to_class(DiT)
def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The conditioning vector c = timestep embedding + label embedding, (B, D)."""
    return self.t_embedder(t) + self.y_embedder(y)  # (B, D)

# %%
# | export
@add_to_class(DiT)
def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
    t = check_latents(x, t, self.config)  # (B,)
    x = x.to(self.x_embedder.proj.weight.dtype)  # float64 / fp16 input follows the model's dtype
    y = self.labels_for(y, x.shape[0], x.device)  # (B,)
    if not torch.compiler.is_compiling():  # eager calls get value checks; compiled graphs stay whole
        self.check_values(x, t, y)
    B, _, H, W = x.shape
    h, w = H // self.config.patch_size, W // self.config.patch_size
    tokens = self.x_embedder(x) + self.pos_embed_for(h, w).to(x.dtype)  # (B, T, D)
    c = self.condition(t, y).to(tokens.dtype)  # (B, D)
    for block in self.blocks:
        tokens = block(tokens, c)  # (B, T, D)
    out = self.final_layer(tokens, c)  # (B, T, p*p*C_out)
    return unpatchify(out, self.config.patch_size, h, w)  # (B, C_out, H, W)

# %%
# | export
@add_to_class(DiT)
@classmethod
def from_original(cls, path: str | Path, num_heads: int | None = None, dtype=None, **overrides) -> DiT:
    """Load a facebookresearch DiT checkpoint (`.pt` via torch.load(weights_only=True), or
    `.safetensors`); the config is read from the weights (see the appendix). `dtype` ("bf16",
    "fp16", a torch dtype; None = float32) converts the weights while reading."""
    sd = unwrap_state_dict(load_state_dict(path, resolve_dtype(dtype)))
    if "t_block.1.weight" in sd:
        raise ValueError(f"path: {Path(path).name} holds a PixArt (text-conditioned) checkpoint; load it with "
                         "tinydit.textdit.TextDiT.from_original, or tinydit.textdit.load_transformer")
    cfg = infer_config_from_original(sd, num_heads=num_heads, **overrides)
    return cls.from_weights(cfg, sd, f"DiT checkpoint {Path(path).name}", dtype)

# %%
# | export
@add_to_class(LatentTransformer)
@classmethod
def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None, dtype=None, **overrides):
    """Load this family's diffusers folder (`cls.diffusers_class`: DiTTransformer2DModel for DiT,
    PixArtTransformer2DModel for TextDiT) or tinydit's own layout, from a local path or hub id.
    `dtype` ("bf16", "fp16", a torch dtype; None = float32) converts the weights while reading."""
    dtype = resolve_dtype(dtype)
    folder = resolve_pretrained(path_or_id, subfolder)
    config = read_config_json(folder)
    kind = transformer_kind(config)
    if kind == cls.__name__:  # tinydit's own save_pretrained layout
        cfg = cls.config_class.from_dict({**{k: v for k, v in config.items() if k != "_class"}, **overrides})
        sd = load_state_dict(folder / "model.safetensors", dtype)
    elif kind == cls.diffusers_class:
        cfg = cls.config_from_diffusers(config, **overrides)
        sd = cls.convert_diffusers(load_state_dict(diffusers_weights_file(folder), dtype))
    else:
        family = {"DiTTransformer2DModel": "DiT", "PixArtTransformer2DModel": "TextDiT"}.get(kind, kind)
        module = {"DiT": "tinydit.dit", "TextDiT": "tinydit.textdit"}.get(family)
        use = f"load it with {module}.{family}.from_pretrained, or" if module else "use"
        raise ValueError(f"path_or_id: {folder} holds a {kind} model, not a {cls.__name__}; {use} "
                         "tinydit.textdit.load_transformer (which reads any transformer folder)")
    return cls.from_weights(cfg, sd, f"{cls.__name__} weights in {folder}", dtype)
# %% [markdown]
# A fresh book model predicts exactly zero (its final layer starts at zero). With random weights
# everywhere, the exported `forward` and the teaching version agree; bad inputs are refused by name.

# %%
model = DiT(DiTConfig.preset("book")).eval()
x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 18, (4,))
print(f"book DiT: {model.num_params / 1e6:.2f} M parameters; {tuple(x.shape)} -> {tuple(model(x, t, y).shape)}")
assert (model(x, t, y) == 0).all()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.05)
    torch.testing.assert_close(model(x, t, y), naive_dit_forward(model, x, t, y))
for bad, pattern in ((lambda: model(x[:, :3], t, y), r"x: expected latents of shape \(B, 4"),
                     (lambda: model(x, t, y + 100), r"y: labels must be in \[0, 18\]"),
                     (lambda: model(torch.randn(1, 4, 16, 16), 10), "larger than the position table")):
    try:
        bad()
    except ValueError as e:
        assert re.search(pattern, str(e)), e
        print("ValueError:", e)
    else:
        raise AssertionError(f"bad input accepted (expected {pattern!r})")

# %% [markdown]
# **Looking at it.** What the fixed position table tells a token about its place: the cosine
# similarity of token (3, 3)'s embedding to every token of an 8×8 grid. Neighbours look alike and
# far tokens do not, so attention can tell near from far without ever being told the grid.

# %%
import matplotlib.pyplot as plt
import torch.nn.functional as F

from tinydit.embeddings import sincos_pos_embed_2d


table = F.normalize(sincos_pos_embed_2d(192, 8), dim=-1)  # (64, 192): an 8x8 grid of tokens
sim = (table @ table[3 * 8 + 3]).reshape(8, 8)  # (8, 8)
assert sim[3, 3] > 0.999 and sim[3, 4] > sim[3, 7] and sim[4, 3] > sim[7, 3]
plt.figure(figsize=(3.8, 3.2))
plt.imshow(sim, cmap="viridis")
plt.colorbar(label="cosine similarity")
plt.title("position table: token (3, 3) vs the grid")
plt.show()

# %% [markdown]
# ## Summary
#
# - **Built** `tinydit.dit`: `PatchEmbed` / `unpatchify`, `LabelEmbedder` with the null class,
#   `DiTBlock` with adaLN-Zero, `FinalLayer`, `TransformerConfig` / `DiTConfig` with the paper's
#   presets and `book`, the `LatentTransformer` base that chapter 07 reuses, `DiT`, and loaders for the original and
#   diffusers checkpoint layouts (their key maps: chapter 17).
# - **Checked** every exported piece against a few-line teaching version: patchify as a reshape, the adaLN-Zero block, the whole forward pass.
# - **Measured** (the cost and the verification loop: 05c): diffusers parity to $10^{-5}$ once its timestep frequency shift matches ours, ~1.6 off with its own.
#
# Next, 05c measures the DiT; chapter 06 gives the model words instead of class labels: text encoders.
#
# ## Exercises
#
# 1. Change `naive_dit_forward` so that it also works for a 4×6 latent, as `DiT.forward` does
#    (hint: `pos_embed_for`), and assert that the two still agree.

# %% [markdown]
# ## Appendix: loading real checkpoints
#
# `DiT.from_original` reads facebookresearch's `DiT-XL-2-256x256.pt` and `DiT.from_pretrained`
# diffusers' `DiTTransformer2DModel` folders. Their configs are read here: from the weights (width,
# patch, depth, channels, classes; the head count only for the paper's presets, never guessed) or from
# diffusers' config.json. The key maps and the parity with diffusers (including the
# `downscale_freq_shift` its port changed) are in chapter 17, the loading appendix.

# %%
# | export
# Released checkpoints whose head count is known (the paper's presets): (depth, width) -> heads.
KNOWN_HEADS = {(depth, width): heads for depth, width, heads in DIT_SIZES.values()}



def heads_for(depth: int, hidden: int, num_heads: int | None) -> int:
    """The head count: the caller's, else the paper's for a released (depth, width); never a guess."""
    if num_heads is not None:
        heads = check_int("num_heads", num_heads, minimum=1)
        if hidden % heads:
            raise ValueError(f"num_heads: must divide the checkpoint's width {hidden}, got {heads}")
        return heads
    if (depth, hidden) in KNOWN_HEADS:
        return KNOWN_HEADS[(depth, hidden)]
    raise ValueError(f"num_heads: the checkpoint does not store its number of attention heads and depth {depth}, "
                     f"width {hidden} is not a released preset; pass num_heads= (it must divide {hidden})")

# %%
# | export
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
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"checkpoint: final layer gives {out_ch} channels for {in_ch} input channels; "
                         "expected the same or twice as many")
    cfg = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p, in_channels=in_ch,
               hidden_size=hidden, depth=depth, num_heads=heads_for(depth, hidden, num_heads),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
               num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, learn_sigma=out_ch == 2 * in_ch,
               frequency_embedding_size=sd["t_embedder.mlp.0.weight"].shape[1],
               qk_norm="blocks.0.attn.q_norm.weight" in sd)
    return DiTConfig(**{**cfg, **overrides})

# %%
# | export
def config_from_diffusers(d: dict, **overrides) -> DiTConfig:
    """DiTConfig from a diffusers DiTTransformer2DModel config.json (original DiT numerics)."""
    if transformer_kind(d) not in (None, "DiTTransformer2DModel"):
        raise ValueError(f"config: expected a DiTTransformer2DModel config, got {d.get('_class_name')!r} "
                         f"(norm_type={d.get('norm_type')!r})")
    unsupported = {k: d.get(k) for k, ok in (("norm_type", "ada_norm_zero"), ("norm_elementwise_affine", False),
                                            ("attention_bias", True), ("activation_fn", "gelu-approximate"))
                   if d.get(k, ok) != ok}
    if unsupported:
        raise ValueError(f"config: DiT options tinydit does not implement: {unsupported}")
    missing = [k for k in ("num_attention_heads", "attention_head_dim") if k not in d]
    if missing:
        raise ValueError(f"config: the diffusers DiT config.json lacks {missing}; cannot tell the width")
    heads = check_int("config.num_attention_heads", d["num_attention_heads"], minimum=1)
    head_dim = check_int("config.attention_head_dim", d["attention_head_dim"], minimum=1)
    in_ch = d.get("in_channels", 4)
    out_ch = d.get("out_channels") or in_ch
    cfg = dict(input_size=d.get("sample_size", 32), patch_size=d.get("patch_size", 2), in_channels=in_ch,
               hidden_size=heads * head_dim, depth=d.get("num_layers", 28), num_heads=heads,
               num_classes=d.get("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch)
    return DiTConfig(**{**cfg, **overrides})
