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
# # 02 · The VAE: pictures into latents and back
#
# A diffusion model that works on pixels spends most of its compute on detail the eye barely
# notices. **Latent diffusion** (Rombach et al., 2022, *High-Resolution Image Synthesis with Latent
# Diffusion Models*) splits the job in two: an autoencoder compresses each image into a small
# *latent* tensor once, and the diffusion model (our DiT, chapter 05) learns to generate latents. A
# decoder turns a generated latent back into pixels. Stable Diffusion 1.x, SDXL, SD3, PixArt and
# Flux all do this, and all of them use the same autoencoder design: the **AutoencoderKL** of the
# LDM paper, a convolutional VAE (Kingma & Welling, 2014, *Auto-Encoding Variational Bayes*) whose
# latent is kept close to a standard normal by a small KL penalty.
#
# This chapter builds that autoencoder from scratch, checks it number-for-number against
# `diffusers`, teaches it to load the real SD / SDXL / SD3 / Flux VAE checkpoints in both the
# diffusers and the original single-file layouts, and trains the book's own tiny VAE:
#
# | | real models (SD 1.x / SDXL) | the book |
# |---|---|---|
# | image | $3 \times 512 \times 512$ (or 1024) | $3 \times 32 \times 32$ |
# | latent | $4 \times 64 \times 64$ (SD3, Flux: 16 channels) | $4 \times 8 \times 8$ |
# | downsampling factor $f$ | 8 | 4 |
# | numbers per image | 786 432 → 16 384 (48×) | 3 072 → 256 (12×) |
#
# ## The maths in one paragraph
#
# The encoder $q_\phi(z \mid x)$ outputs, for every latent element, a mean $\mu$ and a log-variance
# $\log \sigma^2$: a diagonal Gaussian. We sample $z = \mu + \sigma \odot \varepsilon$ with
# $\varepsilon \sim \mathcal N(0, I)$ (the *reparametrisation trick*, so gradients flow through the
# sample), decode $\hat x = D_\theta(z)$, and minimise
#
# $$
# \mathcal L(x) = \underbrace{\lVert x - \hat x \rVert^2}_{\text{reconstruction}}
#   + \beta \, \underbrace{\mathrm{KL}\big(q_\phi(z\mid x)\,\Vert\,\mathcal N(0, I)\big)}_{\text{regulariser}},
# \qquad
# \mathrm{KL} = \tfrac12 \sum_i \big(\mu_i^2 + \sigma_i^2 - 1 - \log \sigma_i^2\big).
# $$
#
# With $\beta = 1$ this is the evidence lower bound of Kingma & Welling. Latent diffusion uses a
# *tiny* $\beta$ (about $10^{-6}$): the KL term only stops the latents from drifting to huge values
# or collapsing their variance; almost all the pressure goes into reconstructing the image well. The
# diffusion model, not the VAE, is the generative model.

# %%
# | default_exp vae

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %% [markdown]
# ## The configuration, and the real families as presets
#
# Every AutoencoderKL in the wild is one architecture with a handful of numbers changed. The
# table below (collected from the diffusers configs of the released models) becomes our presets:
#
# | preset | latent ch. | `block_out_channels` | layers / block | quant convs | scaling | shift |
# |---|---|---|---|---|---|---|
# | `sd1` | 4 | 128, 256, 512, 512 | 2 | yes | 0.18215 | 0 |
# | `sdxl` | 4 | 128, 256, 512, 512 | 2 | yes | 0.13025 | 0 |
# | `sd3` | 16 | 128, 256, 512, 512 | 2 | no | 1.5305 | 0.0609 |
# | `flux` | 16 | 128, 256, 512, 512 | 2 | no | 0.3611 | 0.1159 |
# | `book` | 4 | 16, 32, 64 | 1 | yes | measured below | measured below |
#
# `block_out_channels` has one entry per resolution level; between consecutive levels the encoder
# halves the resolution, so $f = 2^{\,\text{levels}-1}$: 8 for the real models, 4 for the book.

# %%
# | export
"""AutoencoderKL (Kingma & Welling 2014; Rombach et al. 2022, LDM): encoder, diagonal Gaussian
posterior, decoder; loaders for the diffusers and original LDM/SGM layouts; the book's tiny VAE."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tinydit.checkpoint import (
    WeightsMismatchError,
    check_and_load,
    load_state_dict,
    resolve_pretrained,
)


@dataclass
class VAEConfig:
    """Hyper-parameters of an AutoencoderKL; field names follow diffusers' `config.json`."""

    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3  # decoded image channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; f = 2**(levels-1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder uses one more, as LDM)
    latent_channels: int = 4  # channels of z: 4 for SD 1.x/SDXL, 16 for SD3/Flux
    norm_num_groups: int = 32  # GroupNorm groups: normalisation that ignores the batch size
    mid_block_add_attention: bool = True  # one self-attention at the lowest resolution: global context
    use_quant_conv: bool = True  # 1x1 conv on the posterior moments (SD 1.x/SDXL; SD3/Flux drop it)
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder (same families as above)
    scaling_factor: float = 0.18215  # to_latent multiplies by it: unit variance for the diffusion model
    shift_factor: float = 0.0  # to_latent subtracts it first: zero mean (SD3/Flux centre latents)
    sample_size: int = 512  # training resolution; informational only (any multiple of f works)
    force_upcast: bool = True  # keep this VAE in fp32 when the pipeline runs fp16 (SDXL overflows)

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels: expected at least one level, got ()")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels: every width must be divisible by norm_num_groups="
                    f"{self.norm_num_groups}, got {self.block_out_channels}"
                )
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str) -> VAEConfig:
        """A config of a real VAE family ("sd1", "sdxl", "sd3", "flux") or the book's ("book")."""
        if name not in VAE_PRESETS:
            raise ValueError(f"name: unknown VAE preset {name!r}; expected one of {tuple(VAE_PRESETS)}")
        return cls(**VAE_PRESETS[name])

    # -- diffusers config.json <-> VAEConfig -------------------------------------------------------
    def to_diffusers(self) -> dict:
        """The `config.json` dict that diffusers' AutoencoderKL reads."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            **d,
        }

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """Read a diffusers AutoencoderKL `config.json` dict (unknown extra keys are ignored)."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"config: expected an AutoencoderKL config, got _class_name={d['_class_name']!r}")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"config: expected act_fn='silu', got {d['act_fn']!r}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = set(d.get(key, [want]))
            if got != {want}:
                raise ValueError(f"config: expected {key} to hold only {want!r}, got {sorted(got)}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**kw)


_REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VAE_PRESETS: dict[str, dict] = {
    "sd1": dict(_REAL, latent_channels=4, scaling_factor=0.18215, sample_size=512, force_upcast=True),
    "sdxl": dict(_REAL, latent_channels=4, scaling_factor=0.13025, sample_size=1024, force_upcast=True),
    "sd3": dict(_REAL, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
    "flux": dict(_REAL, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
    # The book's VAE: 32x32 -> 4x8x8. Scaling/shift measured on its training latents (chapter 02).
    "book": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 latent_channels=4, scaling_factor=0.7198, shift_factor=-0.2582, sample_size=32,
                 force_upcast=False),
}

# %% [markdown]
# ## The building blocks
#
# Four small modules make up both halves of the autoencoder.
#
# * **ResNet block**: $h = \mathrm{conv}_2(\mathrm{SiLU}(\mathrm{GN}(\mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}(x))))))$,
#   output $x + h$ (with a $1\times1$ conv on $x$ when the channel count changes). GroupNorm
#   normalises over groups of channels within one image, so it behaves the same at batch size 1
#   (sampling) and 64 (training).
# * **Downsample**: a $3\times3$ convolution with stride 2. LDM pads only the right and bottom edge
#   by one pixel first (`F.pad(x, (0, 1, 0, 1))`), an asymmetry we must copy exactly for the real
#   weights to work.
# * **Upsample**: nearest-neighbour ×2 then a $3\times3$ convolution.
# * **Self-attention** (one head, at the lowest resolution only): every latent position looks at every
#   other, which gives the encoder global context (is the background white everywhere?). Its
#   projections are `Linear` layers in diffusers and $1\times1$ convolutions in the original LDM
#   code; the two are the same maths, and the loader converts between them.
#
# Parameter names follow diffusers (`resnets.0.norm1`, `downsamplers.0.conv`, `to_q`, ...), so a
# diffusers checkpoint loads without renaming.

# %%
# | export
class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a skip (1x1 conv when the width changes). LDM's ResnetBlock."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, out, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B, out, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one pixel (LDM's asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list only to match diffusers' names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C), softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet at the lowest resolution (attention optional)."""

    def __init__(self, ch: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)  # (B, C, h, w)
        for attn in self.attentions:
            x = attn(x)  # (B, C, h, w)
        return self.resnets[1](x)  # (B, C, h, w)

# %% [markdown]
# ## Encoder and decoder
#
# The encoder walks down the levels: at level $i$ it applies `layers_per_block` ResNet blocks that
# widen the channels to `block_out_channels[i]`, then (except at the last level) halves the
# resolution. The mid block, a final GroupNorm-SiLU and a $3\times3$ conv produce
# $2 \times$ `latent_channels` maps: the mean and the log-variance of the posterior.
#
# The decoder mirrors it, with one extra ResNet block per level (the LDM design: decoding is the
# harder direction). Its levels run from the widest channels back to the narrowest.

# %%
# | export
class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then a Downsample unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)  # (B, out, H, W)
        for d in self.downsamplers:
            x = d(x)  # (B, out, H/2, W/2)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then an Upsample unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)  # (B, out, h, w)
        for u in self.upsamplers:
            x = u(x)  # (B, out, 2h, 2w)
        return x


class Encoder(nn.Module):
    """Image (B, in, H, W) -> posterior moments (B, 2*latent, H/f, W/f). LDM's Encoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
             for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, ch[i], H/2^i, W/2^i)
        h = self.mid_block(h)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f). LDM's Decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
             for i in range(len(ch))]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch[-1], h, w)
        h = self.mid_block(h)  # (B, ch[-1], h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, reversed ch[i], h*2^i, w*2^i)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, H, W)

# %% [markdown]
# ## The posterior: a diagonal Gaussian
#
# The encoder's $2C$ output channels split into a mean $\mu$ and a log-variance $\log\sigma^2$,
# which is clamped to $[-30, 20]$ exactly as the LDM code does (so $\exp$ never overflows or
# underflows to an exact zero). `sample(generator)` draws $\mu + \sigma\varepsilon$; `mode()` is
# $\mu$; `kl()` is the closed-form KL to $\mathcal N(0, I)$, summed over the latent, one number per
# image.

# %%
# | export
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(std^2)) from the encoder's moments (Kingma & Welling 2014, LDM)."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite and nonzero
        self.std = torch.exp(0.5 * self.logvar)  # (B, C, h, w)
        self.var = torch.exp(self.logvar)  # (B, C, h, w)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. The noise is drawn on the generator's device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar), one value per image: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)})"

# %% [markdown]
# ## AutoencoderKL
#
# Two optional $1\times1$ convolutions sit around the latent: `quant_conv` on the moments and
# `post_quant_conv` on $z$ (left over from VQGAN, where the latent was quantised; SD3 and Flux drop
# them). `decode` takes **raw** latents. The diffusion model, however, works with
#
# $$ z_{\text{diff}} = (\mu - \text{shift}) \cdot \text{scale}, $$
#
# which is what `to_latent` returns and `from_latent` undoes before decoding. Why the scaling exists
# is the subject of a section below.
#
# Bad inputs fail early with a `ValueError` that names the argument and says what is expected,
# including the common mistake of passing a 0–255 image.

# %%
# | export
class AutoencoderKL(nn.Module):
    """The LDM autoencoder (Rombach et al. 2022) with a diagonal-Gaussian posterior (Kingma & Welling).

    `encode(x)` -> DiagonalGaussian; `decode(z)` takes raw latents; `to_latent` / `from_latent`
    apply the shift and scaling the diffusion model expects. Images are (B, 3, H, W) in [-1, 1].
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VAEConfig.preset("book")
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        )

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def _check_image(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsampling_factor
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected an image batch of shape (B, {c}, H, W), got {got}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"x: H and W must be divisible by the downsampling factor {f}, got H={x.shape[2]}, W={x.shape[3]}"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.5 or hi > 1.5:
            raise ValueError(
                f"x: expected pixel values in [-1, 1] (image / 127.5 - 1), got range [{lo:.3g}, {hi:.3g}]"
                + ("; this looks like a 0-255 image" if hi > 2 else "")
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.latent_channels
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != c:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z: expected latents of shape (B, {c}, h, w), got {got}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over raw latents (B, C, H/f, W/f)."""
        self._check_image(x)
        moments = self.encoder(x)  # (B, 2C, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (B, 2C, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents (B, C, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        self._check_latent(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (B, C, h, w)
        return self.decoder(z)  # (B, 3, H, W)

    def to_latent(self, x: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(posterior mean - shift_factor) * scaling_factor: what the diffusion model sees.

        `sample=True` uses a posterior sample instead of the mean.
        """
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mean  # (B, C, h, w)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_latent`, then decode: diffusion-space latents -> image."""
        self._check_latent(z)
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor)  # (B, 3, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct: returns (x_rec, posterior)."""
        post = self.encode(x)
        z = post.sample(generator) if sample_posterior else post.mode()  # (B, C, h, w)
        return self.decode(z), post

# %% [markdown]
# ## Tensor shapes, traced
#
# For the book model (`block_out_channels = (16, 32, 64)`, one ResNet per encoder level) and a
# batch of $B$ images of $32\times32$:
#
# | stage | shape | note |
# |---|---|---|
# | input $x$ | $(B, 3, 32, 32)$ | in $[-1, 1]$ |
# | `encoder.conv_in` | $(B, 16, 32, 32)$ | |
# | `encoder.down_blocks.0` | $(B, 16, 16, 16)$ | ResNet, then downsample |
# | `encoder.down_blocks.1` | $(B, 32, 8, 8)$ | ResNet (16→32), then downsample |
# | `encoder.down_blocks.2` | $(B, 64, 8, 8)$ | last level: no downsample |
# | `encoder.mid_block` | $(B, 64, 8, 8)$ | ResNet, attention over 64 positions, ResNet |
# | `encoder.conv_out` | $(B, 8, 8, 8)$ | $2C$: mean and log-variance |
# | `quant_conv` → posterior | mean, std: $(B, 4, 8, 8)$ | |
# | `post_quant_conv`, `decoder.conv_in` | $(B, 4, 8, 8)$ → $(B, 64, 8, 8)$ | |
# | `decoder.mid_block` | $(B, 64, 8, 8)$ | |
# | `decoder.up_blocks.0` | $(B, 64, 16, 16)$ | 2 ResNets, then upsample |
# | `decoder.up_blocks.1` | $(B, 32, 32, 32)$ | 2 ResNets (64→32), then upsample |
# | `decoder.up_blocks.2` | $(B, 16, 32, 32)$ | 2 ResNets, no upsample |
# | `decoder.conv_out` → $\hat x$ | $(B, 3, 32, 32)$ | |
#
# The cell below records the real shapes with forward hooks and checks them against the table.

# %%
import torch

book = AutoencoderKL(VAEConfig.preset("book")).eval()
TRACE = ["encoder.conv_in", *(f"encoder.down_blocks.{i}" for i in range(3)), "encoder.mid_block",
         "encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_in", "decoder.mid_block",
         *(f"decoder.up_blocks.{i}" for i in range(3)), "decoder.conv_out"]
traced = {}
for name in TRACE:
    book.get_submodule(name).register_forward_hook(
        lambda m, inp, out, name=name: traced.__setitem__(name, tuple(out.shape)))
x = torch.rand(2, 3, 32, 32) * 2 - 1  # (B, 3, 32, 32)
with torch.no_grad():
    x_rec, post = book(x)
print(f"{'module':24s} output shape")
for name in TRACE:
    print(f"{name:24s} {traced[name]}")
print("posterior", post, "-> reconstruction", tuple(x_rec.shape))
n_sd = sum(p.numel() for p in AutoencoderKL(VAEConfig.preset("sd1")).parameters())
print(f"book VAE: {sum(p.numel() for p in book.parameters()):,} parameters; SD VAE: {n_sd:,}")
assert [traced[f"encoder.down_blocks.{i}"] for i in range(3)] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 8, 8)]
assert [traced[f"decoder.up_blocks.{i}"] for i in range(3)] == [(2, 64, 16, 16), (2, 32, 32, 32), (2, 16, 32, 32)]
assert traced["encoder.conv_out"] == traced["quant_conv"] == (2, 8, 8, 8)
assert traced["decoder.conv_in"] == (2, 64, 8, 8) and traced["decoder.conv_out"] == (2, 3, 32, 32)
assert post.mean.shape == post.std.shape == (2, 4, 8, 8) and x_rec.shape == x.shape

# %% [markdown]
# Bad inputs fail with a message that names the argument:

# %%
for bad in (torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 30, 32), torch.full((1, 3, 32, 32), 255.0)):
    try:
        book.encode(bad)
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError("should have raised")
for fn, arg in ((book.decode, torch.zeros(1, 16, 8, 8)), (VAEConfig.preset, "sd4")):
    try:
        fn(arg)
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError("should have raised")

# %% [markdown]
# ## Reading weights safely: `tinydit.checkpoint`
#
# Every loader in the book (this VAE, the DiT, PixArt, the text encoders) needs the same three
# things, so they live in one small module that this chapter exports, `tinydit.checkpoint`:
#
# - **Files.** safetensors first: a flat table of tensors that cannot run code when read. Pickle
#   files (`.pt`, `.pth`, `.ckpt`, `.bin`) are read only with `torch.load(weights_only=True)`, which
#   refuses anything but tensors and plain containers; when it refuses, the error says so rather
#   than falling back to unsafe loading. Training wrappers (`{"state_dict": ...}`, `{"ema": ...}`)
#   are peeled off.
# - **Where.** A local folder, or a Hugging Face hub id fetched with `huggingface_hub` when online.
#   Offline (or unreachable), the error is one line that says how to pass a local folder instead.
# - **Keys.** Loading compares names and shapes first and lists every missing key, unexpected key
#   and shape mismatch in one error, rather than failing on the first one or, worse, silently
#   leaving random weights in the model.

# %%
# | export checkpoint
"""Reading weights safely: safetensors or `torch.load(weights_only=True)`, local folders or hub
ids, and key/shape checks that list everything that does not fit (chapter 02)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
WRAPPER_KEYS = ("state_dict", "ema", "model", "module")  # how training code nests a state dict


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: lists missing / unexpected keys and shape mismatches."""


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Peel training-checkpoint wrappers ({'state_dict': ...}, {'ema': ...}) off a state dict."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"checkpoint: found no tensors; top-level keys are {sorted(obj)[:10]}")
        obj = inner
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning (the original LDM .ckpt files)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file, or a pickle file via `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for files that hold code or custom classes
            raise ValueError(
                f"path: torch.load(weights_only=True) refused {path.name} ({type(e).__name__}); it holds "
                "more than tensors. Convert it to .safetensors with a tool you trust.") from None
        return unwrap_state_dict(obj)
    raise ValueError(f"path: expected a .safetensors file or one of {PICKLE_SUFFIXES}, got {path.name!r}")


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. 'first_stage_model.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(path_or_id: str | os.PathLike, subfolder: str | None = None,
                       filenames: tuple[str, ...] = ("config.json", "*.safetensors", "*.bin")) -> Path:
    """A local folder for `path_or_id`: the folder itself, or a hub snapshot (only `filenames`)."""
    local = Path(path_or_id)
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"path_or_id: expected a folder, got {str(folder)!r}")
        return folder
    repo_id = str(path_or_id)
    if not HUB_ID.match(repo_id):
        raise FileNotFoundError(f"path_or_id: no local folder {repo_id!r}, and it is not a hub id (owner/name)")
    how = ("download it where the Hub is reachable (e.g. `huggingface-cli download "
           f"{repo_id}`) and pass the local folder instead: from_pretrained('/path/to/folder'"
           + (f", subfolder={subfolder!r})" if subfolder else ")"))
    if hub_offline():
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and the Hugging Face Hub is offline "
                      f"(HF_HUB_OFFLINE=1); {how}")
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/{f}" if subfolder else f for f in filenames]
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # no network, unknown or gated repo, ...
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and could not be fetched from the "
                      f"Hugging Face Hub ({type(e).__name__}); {how}") from None
    return root / subfolder if subfolder else root


def check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """`model.load_state_dict(sd, strict=True)`, after one error that lists every problem."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def block(title, items):
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):" + "".join(f"\n    {k}" for k in items[:20]) + more

        raise WeightsMismatchError(
            f"{what} does not fit the model"
            + (block("missing keys", missing) if missing else "")
            + (block("unexpected keys", unexpected) if unexpected else "")
            + (block("shape mismatches", shapes) if shapes else ""))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)

# %% [markdown]
# ## Loading real weights
#
# Real VAEs come in two on-disk layouts.
#
# **The diffusers layout**: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
# (inside a full pipeline repository, the subfolder `vae/`). Our parameter names *are* the diffusers
# names, so loading is: read the config, build the model, check the keys and shapes, copy.
#
# **The original LDM / SGM layout** (the `.safetensors` / `.ckpt` files Stability AI and Black
# Forest Labs publish, and the single-file checkpoints of SD 1.x / SDXL, where the VAE is nested
# under `first_stage_model.`). The same tensors under other names:
#
# | LDM / SGM | diffusers (ours) |
# |---|---|
# | `encoder.down.{i}.block.{j}.nin_shortcut` | `encoder.down_blocks.{i}.resnets.{j}.conv_shortcut` |
# | `encoder.down.{i}.downsample.conv` | `encoder.down_blocks.{i}.downsamplers.0.conv` |
# | `{en,de}coder.mid.block_1`, `block_2` | `mid_block.resnets.0`, `.1` |
# | `{en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}` ($1\times1$ convs) | `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (linear) |
# | `decoder.up.{L-1-i}.block.{j}` | `decoder.up_blocks.{i}.resnets.{j}` |
# | `decoder.up.{L-1-i}.upsample.conv` | `decoder.up_blocks.{i}.upsamplers.0.conv` |
# | `{en,de}coder.norm_out` | `{en,de}coder.conv_norm_out` |
#
# Note the reversed numbering of the decoder levels: LDM numbers them by resolution (0 = full
# size), diffusers in the order they run. The single file carries no config, so the caller names the
# family with `preset=`.
#
# Both loaders are strict: a missing key, an unexpected key or a shape mismatch raises an error that
# lists them all, rather than silently leaving random weights in the model. Pickle files (`.ckpt`,
# `.pt`, `.bin`) are read only with `torch.load(weights_only=True)`, which refuses to run code.

# %%
# | export
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
SINGLE_FILE_PREFIXES = ("first_stage_model.", "vae.")  # where full checkpoints nest the VAE
IGNORED_PREFIXES = ("loss.", "model_ema.")  # training leftovers in some VAE .ckpt files (LPIPS, EMA)


def ldm_to_diffusers(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename an original LDM/SGM VAE state dict (no prefix) to diffusers names (see the table)."""
    out = {}
    for k, v in sd.items():
        n = k
        if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", k):
            n = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)", k):
            n = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", k):
            n = f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)", k):
            n = f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.(.*)", k):
            n = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", k):
            name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m[2]]
            n = f"{m[1]}.mid_block.attentions.0.{name}.{m[3]}"
            if m[2] != "norm" and v.ndim > 2:
                v = v.reshape(v.shape[0], v.shape[1])  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", k):
            n = f"{m[1]}.conv_norm_out.{m[2]}"
        out[n.replace("nin_shortcut", "conv_shortcut")] = v
    return out


def diffusers_to_ldm(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """The inverse of `ldm_to_diffusers`: diffusers names -> original LDM/SGM names (no prefix)."""
    out = {}
    for k, v in sd.items():
        n = k
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            n = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            n = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            n = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            n = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
            n = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k):
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
            n = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
            if name != "norm" and v.ndim == 2:
                v = v[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k):
            n = f"{m[1]}.norm_out.{m[2]}"
        out[n.replace("conv_shortcut", "nin_shortcut")] = v
    return out


def rename_legacy_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers VAE folders (some SD 1.x repos) name the mid-block attention
    `query/key/value/proj_attn`; diffusers renames them on load, and so do we."""
    names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for old, new in names.items():
                k = k.replace(old, new)
        out[k] = v
    return out


def _from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None) -> AutoencoderKL:
    """Load a diffusers-layout AutoencoderKL: a local folder, or a Hugging Face Hub id when online."""
    folder = resolve_pretrained(path_or_id, subfolder, filenames=("config.json", *WEIGHT_NAMES))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} has no config.json (a diffusers AutoencoderKL folder has "
                                "config.json + diffusion_pytorch_model.safetensors; try subfolder='vae')")
    weights = next((folder / w for w in WEIGHT_NAMES if (folder / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} has none of the weight files {WEIGHT_NAMES}")
    config = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    model = cls(config)
    check_and_load(model, rename_legacy_attention(load_state_dict(weights)), what=str(weights))
    return model.eval()


def _from_single_file(cls, path: str | os.PathLike, preset: str = "sdxl",
                      config: VAEConfig | None = None) -> AutoencoderKL:
    """Load an original LDM/SGM-layout VAE (bare, or nested under first_stage_model. / vae.).

    `preset` names the family (the file holds no config); pass `config=` for anything else.
    """
    cfg = config if config is not None else VAEConfig.preset(preset)
    sd = load_state_dict(path)
    for prefix in SINGLE_FILE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    model = cls(cfg)
    try:
        check_and_load(model, ldm_to_diffusers(sd, len(cfg.block_out_channels)), what=str(path))
    except WeightsMismatchError as e:
        hint = "" if config is not None else f" (is preset={preset!r} the right family?)"
        raise WeightsMismatchError(str(e).replace(" does not fit", f" does not fit{hint}", 1)) from None
    return model.eval()


def _save_pretrained(self, folder: str | os.PathLike,
                     weights_name: str = "diffusion_pytorch_model.safetensors") -> Path:
    """Write config.json (diffusers format) and the weights (safetensors) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(self.config.to_diffusers(), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / weights_name))
    return folder


AutoencoderKL.from_pretrained = classmethod(_from_pretrained)
AutoencoderKL.from_single_file = classmethod(_from_single_file)
AutoencoderKL.save_pretrained = _save_pretrained

# %% [markdown]
# ## Parity with diffusers
#
# The test of all of the above (the minGPT habit): build a small *random* AutoencoderKL with
# diffusers, save it in diffusers' real on-disk format, load it with our code, and compare
# numbers. We do it for both families: 4 latent channels with quant convs (SD 1.x / SDXL) and
# 16 channels without (SD3 / Flux). Then we write the same weights in the LDM single-file layout
# nested under `first_stage_model.`, load that too, and check that diffusers' own single-file
# converter maps our LDM names back to exactly the diffusers state dict. (`tests/test_vae.py` does
# the same for `.ckpt` files and more.)

# %%
import tempfile

from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

families = {
    "SD/SDXL-like": dict(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.13025),
    "SD3/Flux-like": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159),
}
x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2, 3, 32, 32)
for family, kw in families.items():
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3, **kw).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = AutoencoderKL.from_pretrained(tmp)
        ldm = {"first_stage_model." + k: v.contiguous() for k, v in diffusers_to_ldm(ref.state_dict(), 3).items()}
        save_file(ldm, f"{tmp}/sd_checkpoint.safetensors")
        ours_ldm = AutoencoderKL.from_single_file(f"{tmp}/sd_checkpoint.safetensors", config=ours.config)
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    same_mapping = converted.keys() == ref.state_dict().keys() and all(
        torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    with torch.no_grad():
        rp = ref.encode(x).latent_dist
        z = rp.mean
        shift = ref.config.shift_factor or 0.0
        errs = {
            "encode mean": (ours.encode(x).mean - rp.mean).abs().max().item(),
            "decode": (ours.decode(z) - ref.decode(z).sample).abs().max().item(),
            "to_latent": (ours.to_latent(x) - (rp.mean - shift) * ref.config.scaling_factor).abs().max().item(),
            "single-file decode": (ours_ldm.decode(z) - ref.decode(z).sample).abs().max().item(),
        }
    print(f"{family:14s}", "  ".join(f"{k}: {v:.1e}" for k, v in errs.items()),
          f"  diffusers converter agrees: {same_mapping}")
    assert max(errs.values()) <= 1e-5 and same_mapping

# %% [markdown]
# ## Training the book's VAE
#
# The objective is the $\beta$-weighted ELBO from the top of the chapter, written per pixel so that
# the numbers do not depend on the image size:
#
# $$ \mathcal L = \frac{1}{N}\lVert x - D(z) \rVert^2 + \beta \, \frac{\mathrm{KL}}{N},
# \qquad z \sim q(z\mid x), \quad N = 3 \cdot 32 \cdot 32, $$
#
# with $\beta = 10^{-6}$ as in the LDM autoencoders (they add a perceptual loss and a patch
# discriminator for photographs; flat-coloured shapes do not need them). Training data are the
# first `n_images` training-split images of `ShapesDataset`, rendered once, with random horizontal
# flips. Adam with a short warm-up and cosine decay. One practical detail: at initialisation the
# encoder's log-variance is about 0, so the decoder first sees latents drowned in unit noise; with
# $\beta = 10^{-6}$ the noise would shrink only as fast as Adam can walk the bias down (thousands of
# steps). We therefore start the log-variance bias at $-6$ ($\sigma \approx 0.05$). Everything is seeded: the same arguments give
# the same weights on the same machine.
#
# After training we **calibrate** the latent scale: encode the training images, measure the mean
# and standard deviation of all latent values, and store `shift_factor = mean`,
# `scaling_factor = 1 / std` in the config (section "Why a scaling factor" explains why).

# %%
# | export
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, C, H, W) batches in [-1, 1], measured on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))  # (B,)


def shapes_images(n: int, seed: int = 0, split: str = "train", size: int = 32) -> torch.Tensor:
    """The first `n` images of `ShapesDataset(n, size, seed, split)` as one (n, 3, size, size) tensor."""
    from tinydit.data import ShapesDataset

    ds = ShapesDataset(n, size=size, seed=seed, split=split)
    return torch.stack([ds[i][0] for i in range(n)])  # (n, 3, size, size)


@torch.no_grad()
def calibrate_latents(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Latent statistics of `images` under `model` (posterior means): global and per channel."""
    model.eval()
    z = torch.cat([model.encode(images[i:i + batch_size]).mean for i in range(0, len(images), batch_size)])
    per_ch = z.transpose(0, 1).flatten(1)  # (C, B*h*w)
    return {
        "mean": z.mean().item(),
        "std": z.std().item(),
        "channel_mean": per_ch.mean(1).tolist(),
        "channel_std": per_ch.std(1).tolist(),
    }


LOGVAR_INIT = -6.0  # initial posterior log-variance: std 0.05 instead of 1 (faster start)


def train_book_vae(steps: int = 4500, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6,
                   n_images: int = 20_000, seed: int = 0, config: VAEConfig | None = None,
                   out_dir: str | os.PathLike | None = None, disable: bool | None = None,
                   ) -> tuple[AutoencoderKL, dict]:
    """Train the book VAE on ShapesDataset (32x32 -> 4x8x8) and calibrate its latent scale.

    Returns `(model, history)`; history holds per-step "rec" (MSE), "kl" (per image) and "loss",
    plus the latent statistics ("latents"). `out_dir` (optional) receives config.json and
    model.safetensors, the layout `load_book_vae` reads.
    """
    for name, v in (("steps", steps), ("batch_size", batch_size), ("n_images", n_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight: expected a number >= 0, got {kl_weight!r}")
    cfg = VAEConfig(**asdict(config)) if config is not None else VAEConfig.preset("book")
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg)
    with torch.no_grad():  # start with a small posterior std (see the note above)
        last = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
        last.bias[cfg.latent_channels:] = LOGVAR_INIT
    images = shapes_images(n_images, seed=seed, split="train", size=cfg.sample_size)  # (n, 3, H, W)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    n_pix = images[0].numel()
    hist: dict = {"rec": [], "kl": [], "loss": []}
    model.train()
    for _ in tqdm(range(steps), desc="train VAE", disable=disable):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]  # (B, 3, H, W)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, H, W)
        post = model.encode(x)
        x_rec = model.decode(post.sample(gen))  # (B, 3, H, W)
        rec = (x_rec - x).pow(2).mean()
        kl = post.kl().mean()
        loss = rec + kl_weight * kl / n_pix
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist["rec"].append(rec.item())
        hist["kl"].append(kl.item())
        hist["loss"].append(loss.item())
    model.eval()
    stats = calibrate_latents(model, images[:4096])
    cfg.shift_factor = round(stats["mean"], 4)
    cfg.scaling_factor = round(1.0 / stats["std"], 4)
    hist["latents"] = stats
    if out_dir is not None:
        model.save_pretrained(out_dir, weights_name="model.safetensors")
    return model, hist


# %%
# | export
def book_vae_path() -> Path:
    """The folder of the book VAE shipped inside the package (config.json + model.safetensors)."""
    return Path(str(resources.files("tinydit") / "assets" / "book_vae"))


def load_book_vae() -> AutoencoderKL:
    """The book's trained tiny VAE (32x32 images <-> 4x8x8 latents), in eval mode."""
    folder = book_vae_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the book VAE is missing from the package ({folder}); regenerate it with "
                                "tinydit.vae.train_book_vae(out_dir=...)")
    return AutoencoderKL.from_pretrained(folder)

# %% [markdown]
# ### Train it
#
# Under `TINYDIT_FAST=1` (CI) this cell trains for a few dozen steps, only to show the loop runs
# and the loss falls. The full setting, `train_book_vae()` with its defaults (4 500 steps of 32
# images, seed 0), is the exact run that produced the weights shipped in
# `tinydit/assets/book_vae/`; it writes them to `outputs/book_vae/`. To regenerate the shipped
# weights, copy that folder over `tinydit/assets/book_vae/`, or call
# `tinydit.vae.train_book_vae(out_dir="tinydit/assets/book_vae")`. On a two-core CPU it takes about
# 13 minutes when the machine is otherwise idle (the shipped run took 50 minutes on a machine shared
# with other jobs); it reaches about 39 dB on the test images.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

train_kw = dict(steps=60, n_images=2_000) if FAST else dict(out_dir="outputs/book_vae")
t0 = time.perf_counter()
trained, history = train_book_vae(**train_kw)
train_seconds = time.perf_counter() - t0
rec = np.array(history["rec"])
smooth = np.convolve(rec, np.ones(10) / 10, mode="valid")
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].semilogy(rec, alpha=0.3, label="per step")
axes[0].semilogy(np.arange(9, len(rec)), smooth, label="10-step mean")
axes[0].set(title="reconstruction MSE", xlabel="step")
axes[0].legend()
axes[1].plot(history["kl"])
axes[1].set(title="KL per image (nats)", xlabel="step")
plt.tight_layout()
plt.show()
print(f"{len(rec)} steps in {train_seconds:.0f} s; MSE {smooth[0]:.4f} -> {smooth[-1]:.4f}")
print("latent statistics:", {k: np.round(v, 4).tolist() for k, v in history["latents"].items()})
print(f"chosen shift_factor = {trained.config.shift_factor}, scaling_factor = {trained.config.scaling_factor}")
assert smooth[-1] < 0.7 * smooth[0]

# %% [markdown]
# ## The shipped book VAE
#
# `load_book_vae()` loads the full-settings weights from the package. The claim of this chapter:
# on 256 held-out images of the **test** split (never seen in training, and containing the
# held-out colour/shape pairs), the reconstruction PSNR is at least 30 dB. PSNR is measured per
# image on the $[0, 1]$ scale, $\mathrm{PSNR} = 10\log_{10}(1/\mathrm{MSE})$, and averaged.

# %%
from tinydit.data import ShapesDataset, image_grid, tensor_to_pil

vae = load_book_vae()
test_x = shapes_images(256, seed=0, split="test")  # (256, 3, 32, 32)
with torch.no_grad():
    test_z = vae.to_latent(test_x)  # (256, 4, 8, 8), diffusion space
    test_rec = vae.from_latent(test_z)  # (256, 3, 32, 32)
scores = psnr(test_rec, test_x)  # (256,)
print(f"PSNR on 256 test images: mean {scores.mean():.2f} dB, worst {scores.min():.2f} dB, "
      f"best {scores.max():.2f} dB")
assert test_z.shape == (256, 4, 8, 8)
assert scores.mean() >= 30.0

# %% [markdown]
# Originals (odd rows) and their reconstructions (even rows), with each reconstruction's PSNR:

# %%
test_ds = ShapesDataset(256, seed=0, split="test")
rows = []
for r in range(2):
    idx = range(8 * r, 8 * r + 8)
    rows += [test_x[i] for i in idx] + [test_rec[i] for i in idx]
caps = []
for r in range(2):
    caps += [test_ds[i][1] for i in range(8 * r, 8 * r + 8)]
    caps += [f"{scores[i]:.1f} dB" for i in range(8 * r, 8 * r + 8)]
image_grid(torch.stack(rows), caps, cols=8, scale=4)

# %% [markdown]
# ### What do the latents look like?
#
# Each image becomes four $8\times8$ maps. They are not a tiny picture: the encoder is free to
# spread colour, shape and position over the channels however helps the decoder. Still, the
# objects' positions show up clearly, because the encoder is convolutional: each latent pixel
# describes its own $4\times4$ patch of the image.

# %%
fig, axes = plt.subplots(5, 6, figsize=(9, 7.5))
for col in range(6):
    axes[0, col].imshow(tensor_to_pil(test_x[col]))
    for ch in range(4):
        axes[ch + 1, col].imshow(test_z[col, ch].numpy(), cmap="RdBu_r", vmin=-2.5, vmax=2.5)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("image")
for ch in range(4):
    axes[ch + 1, 0].set_ylabel(f"channel {ch}")
plt.suptitle("scaled latents (diffusion space), blue < 0 < red")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Why a scaling factor?
#
# Nothing in the VAE objective fixes the *scale* of the latents: with $\beta \approx 0$ the encoder
# can make $\mu$ as large as it likes. The diffusion model, however, assumes its data have roughly
# unit variance: the forward process mixes data and noise as $x_t = \alpha_t x_0 + \sigma_t
# \varepsilon$ with $\varepsilon \sim \mathcal N(0, I)$, and its schedule (where the SNR starts,
# how fast it falls) is designed for $\operatorname{Var}(x_0) \approx 1$. Latents with standard
# deviation 5 would still be clearly visible at noise levels the schedule considers pure noise.
#
# Rombach et al. therefore rescale: they estimate the standard deviation of the latents on a batch
# of training images and multiply by its inverse (for SD's VAE, $1/0.18215 \approx 5.5$ was the
# measured standard deviation). SD3 and Flux also subtract a mean (`shift_factor`). We do the same
# for the book VAE, measured on 4 096 training images:

# %%
train_x = shapes_images(4096, seed=0, split="train")  # (4096, 3, 32, 32)
with torch.no_grad():
    raw = torch.cat([vae.encode(train_x[i:i + 512]).mean for i in range(0, 4096, 512)])  # (4096, 4, 8, 8)
scaled = (raw - vae.config.shift_factor) * vae.config.scaling_factor  # (4096, 4, 8, 8)
per_ch = raw.transpose(0, 1).flatten(1)  # (4, 4096*64)
print("raw latents, per channel:")
for c in range(4):
    print(f"  channel {c}: mean {per_ch[c].mean():+.3f}  std {per_ch[c].std():.3f}")
print(f"all channels: mean {raw.mean():+.3f}  std {raw.std():.3f}")
print(f"shift_factor = {vae.config.shift_factor}, scaling_factor = {vae.config.scaling_factor} "
      f"(= 1 / {1 / vae.config.scaling_factor:.3f})")
print(f"scaled latents: mean {scaled.mean():+.3f}  std {scaled.std():.3f}")
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
for c in range(4):
    ax[0].hist(raw[:, c].flatten().numpy(), bins=80, histtype="step", label=f"ch {c}")
    ax[1].hist(scaled[:, c].flatten().numpy(), bins=80, histtype="step", label=f"ch {c}")
grid = np.linspace(-4, 4, 200)
ax[1].plot(grid, len(scaled[:, 0].flatten()) * (8 / 80) * np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--",
           label="N(0, 1)")
ax[0].set_title("raw latents (what decode takes)")
ax[1].set_title("to_latent: (z - shift) * scale")
ax[1].set_xlim(-4, 4)
ax[1].legend(fontsize=8)
plt.show()
assert abs(scaled.mean()) < 0.05 and abs(scaled.std() - 1) < 0.05

# %% [markdown]
# We use one shift and one scale for all four channels (as SD, SD3 and Flux do) rather than
# per-channel statistics: the channels' spreads are within a factor of a few of each other, and a
# single scalar keeps `to_latent` identical in form to the real families'.

# %% [markdown]
# ## The KL / reconstruction trade-off
#
# What does $\beta$ buy? A larger KL weight pulls every posterior towards $\mathcal N(0, I)$: the
# means shrink towards 0, the variances grow towards 1, and the decoder receives noisier codes, so
# reconstructions get worse. In the limit the latent carries no information at all. Latent
# diffusion sits at the far left of this curve: it wants near-perfect reconstructions and only
# enough KL to keep the latent space tame. We train the same small model with several $\beta$
# (short runs, so absolute numbers are lower than the shipped model's) and measure test PSNR
# (posterior samples, as in training) and KL. At full settings (400 steps each) we measured:
# $\beta = 10^{-6}$: 22.5 dB, KL 905 nats; $10^{-3}$: 21.6 dB, 847; $10^{-1}$: 19.1 dB, 380;
# $1$: 14.1 dB, 44; $10$: 15.0 dB, 11 (at that point the latent carries almost nothing, and the
# decoder draws an average picture). Under `TINYDIT_FAST` the runs are far too short to show it.

# %%
betas = [1e-6, 1e-2, 1.0] if FAST else [1e-6, 1e-3, 1e-1, 1.0, 10.0]
sweep_kw = dict(steps=15, n_images=500, batch_size=16) if FAST else dict(steps=400, n_images=5_000)
sweep_x = test_x[:64]
results = []
for beta in betas:
    m_beta, _ = train_book_vae(kl_weight=beta, disable=True, **sweep_kw)
    with torch.no_grad():
        post = m_beta.encode(sweep_x)
        rec_beta = m_beta.decode(post.sample(torch.Generator().manual_seed(0)))
    results.append((psnr(rec_beta, sweep_x).mean().item(), post.kl().mean().item()))
    print(f"beta {beta:8.0e}: PSNR {results[-1][0]:5.2f} dB, KL {results[-1][1]:10.1f} nats/image")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogx(betas, [r[0] for r in results], "o-", color="C0")
ax.set(xlabel=r"KL weight $\beta$", title="the trade-off")
ax.set_ylabel("test PSNR (dB)", color="C0")
ax2 = ax.twinx()
ax2.loglog(betas, [max(r[1], 1e-3) for r in results], "s--", color="C3")
ax2.set_ylabel("KL (nats / image)", color="C3")
plt.tight_layout()
plt.show()
assert all(np.isfinite(r).all() for r in results)
if not FAST:  # with enough steps the trend is monotone at the ends of the sweep
    assert results[0][0] > results[-1][0] and results[0][1] > results[-1][1]

# %% [markdown]
# ## Try it: compare original and reconstruction
#
# Pick a test image; choose whether to decode the posterior mean or a sample; and add Gaussian
# noise of standard deviation $\sigma$ to the **scaled** latent before decoding. The last slider
# shows why the scale matters: in diffusion space, $\sigma = 1$ is as large as the signal itself,
# and the picture is gone, as the diffusion model's noise schedule expects. (In a static page the
# widget does not move; run the notebook in JupyterLab.)

# %%
import ipywidgets as W
from IPython.display import display


def compare(index=0, posterior="mean", noise=0.0, seed=0):
    x0 = test_x[index:index + 1]  # (1, 3, 32, 32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        post = vae.encode(x0)
        z = post.mean if posterior == "mean" else post.sample(g)  # (1, 4, 8, 8), raw
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor  # diffusion space
        z = z + noise * torch.randn(z.shape, generator=g)
        xr = vae.from_latent(z)  # (1, 3, 32, 32)
    err = ((xr - x0).abs().mean(1, keepdim=True) * 4 - 1).expand(-1, 3, -1, -1)  # |error| x 4 on the [0, 1] scale
    caps = ["original", f"reconstruction {psnr(xr, x0).item():.1f} dB", "|error| x 4"]
    display(image_grid(torch.cat([x0, xr, err.clamp(-1, 1)]), caps, cols=3, scale=6))


demo = W.interactive(
    compare,
    index=W.IntSlider(0, 0, len(test_x) - 1, description="test image"),
    posterior=W.ToggleButtons(options=["mean", "sample"]),
    noise=W.FloatSlider(0.0, min=0.0, max=1.5, step=0.05, description="latent σ"),
    seed=W.IntSlider(0, 0, 20, description="noise seed"),
)
display(demo)

# %% [markdown]
# ## A real VAE on a real photo (when you have the weights)
#
# Set `TINYDIT_VAE_PATH` to a diffusers VAE folder (e.g. a downloaded `stabilityai/sdxl-vae`, or
# the `vae/` folder of a pipeline) or to a single-file checkpoint (`.safetensors` / `.ckpt`, bare or
# a full SD checkpoint; set `TINYDIT_VAE_PRESET` to `sd1`, `sdxl`, `sd3` or `flux`, default
# `sdxl`). This cell then encodes the astronaut photo from `skimage.data` at 512×512, decodes it
# and shows both with the PSNR. Without the variable it says what it would do and moves on: the
# hubs are out of reach here, and we never pretend to have weights we do not have.

# %%
from PIL import Image

from tinydit.data import pil_to_tensor

vae_path = os.environ.get("TINYDIT_VAE_PATH")
if not vae_path:
    print("TINYDIT_VAE_PATH is not set: with real weights this cell would load them "
          "(AutoencoderKL.from_pretrained for a folder, from_single_file for a file), encode "
          "skimage.data.astronaut() at 512x512 to a 4x64x64 (or 16x64x64) latent, decode it and "
          "show the photo beside its reconstruction with the PSNR. Skipping.")
else:
    import skimage.data  # the notebooks extra installs scikit-image; needed only with real weights

    preset = os.environ.get("TINYDIT_VAE_PRESET", "sdxl")
    real = (AutoencoderKL.from_pretrained(vae_path) if Path(vae_path).is_dir()
            else AutoencoderKL.from_single_file(vae_path, preset=preset))
    photo = pil_to_tensor(Image.fromarray(skimage.data.astronaut()).resize((512, 512)))[None]  # (1, 3, 512, 512)
    with torch.no_grad():
        z_real = real.to_latent(photo)  # (1, C, 64, 64)
        photo_rec = real.from_latent(z_real)  # (1, 3, 512, 512)
    p_real = psnr(photo_rec, photo).item()
    print(f"{vae_path}: latent {tuple(z_real.shape)}, std {z_real.std():.3f}, PSNR {p_real:.2f} dB")
    display(image_grid(torch.cat([photo, photo_rec]), ["original", f"reconstruction, {p_real:.1f} dB"],
                       cols=2, scale=1))
    assert z_real.shape[-1] == 64 and p_real > 20

# %% [markdown]
# ## What we built
#
# `tinydit.vae` now holds `AutoencoderKL` (encoder, `DiagonalGaussian` posterior, decoder) with
# presets for SD 1.x, SDXL, SD3, Flux and the book; loaders for the diffusers folder layout
# (`from_pretrained`, local or hub) and the original single-file layout (`from_single_file`,
# also nested inside full checkpoints), each matching diffusers to $10^{-5}$; `train_book_vae`, and
# the shipped book VAE (`load_book_vae()`), which turns a $3\times32\times32$ image into a
# $4\times8\times8$ latent and back at over 30 dB.
#
# **Speed.** `benchmarks/vae.py` encodes and decodes one 256×256 image with SD-sized random
# weights (83.7M parameters) in tinydit and in diffusers: same weights, same process, runs
# alternating. On the book's 2-core CPU machine the medians were 5.25 s (tinydit) and 5.30 s
# (diffusers): **ratio 0.99** (1.00 in a second run on a busier machine), and the outputs were
# identical to the last bit. That is what we should expect: both run the same convolutions, GroupNorms and
# `scaled_dot_product_attention` calls; the speed is PyTorch's, not the wrapper's.
#
# Next, chapter 03 builds the embeddings the diffusion transformer needs to know *where* and
# *when* it is.
