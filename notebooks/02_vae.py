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
# **Latent diffusion** (Rombach et al., 2022) splits image generation in two: an autoencoder
# compresses each image into a small *latent* once, the diffusion model (our DiT, chapter 05)
# learns to generate latents, and a decoder turns a generated latent back into pixels. SD 1.x,
# SDXL, SD3, PixArt and Flux all use the same autoencoder, the **AutoencoderKL** of the LDM paper:
# a convolutional VAE (Kingma & Welling, 2014) whose latent is kept near a standard normal by a
# small KL penalty.
#
# | | real models (SD 1.x / SDXL) | the book |
# |---|---|---|
# | image → latent | $3 \times 512^2$ → $4 \times 64^2$ (SD3, Flux: 16 channels) | $3 \times 32^2$ → $4 \times 8^2$ |
# | downsampling factor $f$ | 8 | 4 |
#
# **The maths.** The encoder $q_\phi(z \mid x)$ outputs, for every latent element, a mean $\mu$
# and a log-variance $\log \sigma^2$: a diagonal Gaussian. We sample $z = \mu + \sigma \odot
# \varepsilon$ with $\varepsilon \sim \mathcal N(0, I)$ (the *reparameterisation trick*: gradients
# flow through the sample), decode $\hat x = D_\theta(z)$, and minimise
#
# $$
# \mathcal L(x) = \lVert x - \hat x \rVert^2
#   + \beta \, \mathrm{KL}\big(q_\phi(z\mid x)\,\Vert\,\mathcal N(0, I)\big),
# \qquad
# \mathrm{KL} = \tfrac12 \sum_i \big(\mu_i^2 + \sigma_i^2 - 1 - \log \sigma_i^2\big).
# $$
#
# With $\beta = 1$ this is, up to constants, the negative evidence lower bound. Latent diffusion
# uses $\beta \approx 10^{-6}$: the KL term only stops the latents drifting to huge values; the
# diffusion model, not the VAE, is the generative model. The plan: (1) the idea in small teaching
# versions, (2) the production `AutoencoderKL`, checked against them, (3) train the book's VAE and
# measure it; an appendix loads the real SD / SDXL / SD3 / Flux checkpoints.

# %%
# | default_exp vae
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %% [markdown]
# ## 1 · The idea, in small pieces
#
# Both halves of the autoencoder are stacks of three small modules:
#
# * a **ResNet block**, $x + \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(\mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x))))))$,
#   with a $1\times1$ conv on the skip path when the width changes. GroupNorm normalises groups of
#   channels within one image, so it behaves the same at batch size 1 and 64;
# * a **downsample**: a stride-2 $3\times3$ conv. LDM pads only the right and bottom edge first,
#   an asymmetry we must copy for the real weights to work;
# * an **upsample**: nearest-neighbour ×2, then a $3\times3$ conv.

# %%
import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin, cout, groups=8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):  # (B, cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, cout, H, W)
        return self.skip(x) + h  # (B, cout, H, W)


def down(c):  # (B, c, H, W) -> (B, c, H/2, W/2)
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))


def up(c):  # (B, c, h, w) -> (B, c, 2h, 2w)
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))


def head(cin, cout):  # GroupNorm, SiLU, 3x3 conv: the last layers of both halves
    return [nn.GroupNorm(8, cin, eps=1e-6), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1)]


x = torch.randn(2, 16, 32, 32)
assert ResBlock(16, 32)(x).shape == (2, 32, 32, 32) and down(16)(x).shape == (2, 16, 16, 16)
assert up(16)(x).shape == (2, 16, 64, 64)

# %% [markdown]
# The **encoder** walks down the levels of `ch = (16, 32, 64)`: at each, ResNet blocks widen the
# channels, then (except at the last level) a downsample halves the resolution, so
# $f = 2^{\text{levels}-1}$. Two more ResNet blocks (the "mid block") and the head produce
# $2C$ maps: the mean and the log-variance. The **decoder** mirrors it, widest level first, with
# one extra ResNet block per level (decoding is the harder direction).

# %%
def tiny_encoder(ch=(16, 32, 64), latent=4):
    layers = [nn.Conv2d(3, ch[0], 3, padding=1)]  # (B, 16, 32, 32)
    for i, c in enumerate(ch):
        layers.append(ResBlock(ch[max(i - 1, 0)], c))  # (B, ch[i], H, W)
        if i < len(ch) - 1:
            layers.append(down(c))  # (B, ch[i], H/2, W/2)
    layers += [ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1])]  # mid block (attention: later)
    return nn.Sequential(*layers, *head(ch[-1], 2 * latent))  # (B, 2*latent, 8, 8)


def tiny_decoder(ch=(16, 32, 64), latent=4):
    ch = ch[::-1]  # widest first
    layers = [nn.Conv2d(latent, ch[0], 3, padding=1), ResBlock(ch[0], ch[0]), ResBlock(ch[0], ch[0])]
    for i, c in enumerate(ch):
        layers += [ResBlock(ch[max(i - 1, 0)], c), ResBlock(c, c)]  # (B, ch[i], h, w)
        if i < len(ch) - 1:
            layers.append(up(c))  # (B, ch[i], 2h, 2w)
    return nn.Sequential(*layers, *head(ch[-1], 3))  # (B, 3, 32, 32)


torch.manual_seed(0)
enc_t, dec_t = tiny_encoder(), tiny_decoder()
x = torch.rand(2, 3, 32, 32) * 2 - 1  # (B, 3, 32, 32), pixels in [-1, 1]
mean, logvar = enc_t(x).chunk(2, dim=1)  # (2, 4, 8, 8) each
x_rec = dec_t(mean)  # (2, 3, 32, 32)
print(f"image {tuple(x.shape)} -> mean, logvar {tuple(mean.shape)} -> reconstruction {tuple(x_rec.shape)}")
assert mean.shape == logvar.shape == (2, 4, 8, 8) and x_rec.shape == x.shape

# %% [markdown]
# ### The posterior: a diagonal Gaussian
#
# Sampling is $z = \mu + e^{\frac12 \log\sigma^2} \varepsilon$; the KL to $\mathcal N(0, I)$ has the
# closed form from the top of the chapter. We check the formula against `torch.distributions`, and
# that gradients reach both $\mu$ and $\log\sigma^2$ through a sample: that is the whole point of
# the reparameterisation.

# %%
def sample(mean, logvar, eps):  # (B, C, h, w) each
    return mean + torch.exp(0.5 * logvar) * eps  # (B, C, h, w)


def kl(mean, logvar):  # KL(N(mean, var) || N(0, 1)), summed over each latent
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))  # (B,)


mean, logvar = mean.detach().requires_grad_(), logvar.detach().requires_grad_()
D = torch.distributions
reference = D.kl_divergence(D.Normal(mean, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum((1, 2, 3))
torch.testing.assert_close(kl(mean, logvar), reference)
sample(mean, logvar, torch.randn_like(mean)).sum().backward()
assert torch.equal(mean.grad, torch.ones_like(mean)) and logvar.grad.abs().sum() > 0
print("KL per image (nats):", kl(mean, logvar).detach())

# %% [markdown]
# ## 2 · The production AutoencoderKL
#
# Every AutoencoderKL in the wild is one architecture with a handful of numbers changed (from the
# diffusers configs of the released models). They become presets:
#
# | preset | latent ch. | `block_out_channels` | layers / block | quant convs | scaling | shift |
# |---|---|---|---|---|---|---|
# | `sd1` / `sdxl` | 4 | 128, 256, 512, 512 | 2 | yes | 0.18215 / 0.13025 | 0 |
# | `sd3` / `flux` | 16 | 128, 256, 512, 512 | 2 | no | 1.5305 / 0.3611 | 0.0609 / 0.1159 |
# | `book` | 4 | 16, 32, 64 | 1 | yes | measured below | measured below |

# %%
# | export
"""AutoencoderKL (Kingma & Welling 2014; Rombach et al. 2022, LDM): encoder, diagonal Gaussian
posterior, decoder; loaders for the diffusers and original LDM/SGM layouts; the book's tiny VAE."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from tinydit.checkpoint import (
    BOOK_VAE_DIR,
    WeightsMismatchError,
    load_model,
    load_state_dict,
    read_config,
    resolve_dtype,
    resolve_pretrained,
)
from tinydit.data import ShapesDataset
from tinydit.loading import ldm_to_diffusers, single_file_vae_weights
from tinydit.validation import check_choice, check_finite, check_float, check_int, check_tensor


# Weight files `from_pretrained` looks for in a diffusers folder, in this order.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")

# %%
# | export
@dataclass
class VAEConfig:
    """Hyper-parameters of an AutoencoderKL; field names follow diffusers' `config.json`."""

    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3  # decoded image channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; f = 2**(levels-1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder uses one more, as LDM)
    latent_channels: int = 4  # channels of z: 4 for SD 1.x/SDXL, 16 for SD3/Flux
    norm_num_groups: int = 32  # GroupNorm groups
    mid_block_add_attention: bool = True  # one self-attention at the lowest resolution: global context
    use_quant_conv: bool = True  # 1x1 conv on the posterior moments (SD 1.x/SDXL; SD3/Flux drop it)
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder (same families as above)
    scaling_factor: float = 0.18215  # to_latent multiplies by it: unit variance for the diffusion model
    shift_factor: float = 0.0  # to_latent subtracts it first: zero mean (SD3/Flux centre latents)
    sample_size: int = 512  # training resolution; informational only (any multiple of f works)
    force_upcast: bool = True  # keep this VAE in fp32 when the pipeline runs fp16 (SDXL overflows)

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        if not isinstance(self.block_out_channels, (tuple, list)):
            raise TypeError(f"block_out_channels: expected a tuple of widths, got {self.block_out_channels!r}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels: expected at least one level, got ()")
        self.block_out_channels = tuple(check_int("block_out_channels", c, minimum=1) for c in self.block_out_channels)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels: every width must be divisible by norm_num_groups="
                             f"{self.norm_num_groups}, got {self.block_out_channels}")
        self.scaling_factor = check_float("scaling_factor", self.scaling_factor, minimum=0, min_inclusive=False)
        self.shift_factor = check_float("shift_factor", self.shift_factor)

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

# %%
# | export
@add_to_class(VAEConfig)
def to_diffusers(self) -> dict:
    """The `config.json` dict that diffusers' AutoencoderKL reads."""
    n = len(self.block_out_channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            **asdict(self), "block_out_channels": list(self.block_out_channels)}

# %%
# | export
@add_to_class(VAEConfig)
@classmethod
def from_diffusers(cls, d: dict) -> VAEConfig:
    """Read a diffusers AutoencoderKL `config.json` dict (unknown extra keys are ignored)."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config: expected an AutoencoderKL config, got _class_name={d['_class_name']!r}")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"config: expected act_fn='silu', got {d['act_fn']!r}")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if set(d.get(key, [want])) != {want}:
            raise ValueError(f"config: expected {key} to hold only {want!r}, got {sorted(set(d[key]))}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})

# %%
# | export
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
# The production blocks are the teaching ones under **diffusers' parameter names**
# (`resnets.0.norm1`, `downsamplers.0.conv`, `to_q`, ...), so a diffusers checkpoint loads without
# renaming. One addition: a single-head **self-attention** in the mid block, where every latent
# position looks at every other (is the background white everywhere?).

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

# %%
# | export
class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one pixel (LDM's asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)

# %%
# | export
class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)

# %%
# | export
class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(ch, ch) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list only to match diffusers' names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C), softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h

# %%
# | export
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

# %%
# | export
class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then a Downsample unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)  # (B, out, H, W), then (B, out, H/2, W/2)
        return x

# %%
# | export
class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then an Upsample unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)  # (B, out, h, w), then (B, out, 2h, 2w)
        return x

# %%
# | export
class Encoder(nn.Module):
    """Image (B, in, H, W) -> posterior moments (B, 2*latent, H/f, W/f). LDM's Encoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
             for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, ch[i], H/2^i, W/2^i)
        h = self.mid_block(h)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*latent, H/f, W/f)

# %%
# | export
class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f). LDM's Decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
             for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, ch[-1], h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, reversed ch[i], h*2^i, w*2^i)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, H, W)

# %% [markdown]
# **Check: the teaching version is the production version.** Without attention, the production
# `Encoder` / `Decoder` hold the same layers, in the same order, as our `nn.Sequential` sketches.
# Copy the production weights over one by one and the outputs agree; then spell the attention out
# as $\mathrm{softmax}(qk^\top/\sqrt C)\,v$ and compare it with `SelfAttention` (which calls
# PyTorch's fused `scaled_dot_product_attention`).

# %%
from dataclasses import replace


cfg = replace(VAEConfig.preset("book"), mid_block_add_attention=False)
enc, dec = Encoder(cfg), Decoder(cfg)
with torch.no_grad():
    for teach, prod in ((enc_t, enc), (dec_t, dec)):
        for a, b in zip(teach.parameters(), prod.parameters(), strict=True):
            assert a.shape == b.shape  # the same layers, in the same order
            a.copy_(b)
    torch.testing.assert_close(enc_t(x), enc(x))
    torch.testing.assert_close(dec_t(mean), dec(mean))

    attn, h = SelfAttention(64, groups=8), torch.randn(2, 64, 8, 8)  # (B, C, h, w)
    t = attn.group_norm(h).flatten(2).transpose(1, 2)  # (B, 64 positions, C)
    w = torch.softmax(attn.to_q(t) @ attn.to_k(t).transpose(1, 2) / 64**0.5, dim=-1)  # (B, 64, 64)
    by_hand = h + attn.to_out[0](w @ attn.to_v(t)).transpose(1, 2).reshape(h.shape)  # (B, C, h, w)
    torch.testing.assert_close(attn(h), by_hand)
print(f"teaching == production: encoder {sum(p.numel() for p in enc.parameters()):,} parameters, "
      f"decoder {sum(p.numel() for p in dec.parameters()):,}; attention by hand == SDPA")

# %% [markdown]
# The production posterior keeps one detail from LDM: the log-variance is clamped to $[-30, 20]$,
# so $\exp$ never overflows or underflows to an exact zero.

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

# %%
moments = torch.randn(2, 8, 8, 8)  # (B, 2C, h, w)
post, (m, lv) = DiagonalGaussian(moments), moments.chunk(2, dim=1)
eps = torch.randn(m.shape, generator=torch.Generator().manual_seed(0))
torch.testing.assert_close(post.kl(), kl(m, lv))
torch.testing.assert_close(post.sample(torch.Generator().manual_seed(0)), sample(m, lv, eps))

# %% [markdown]
# ### AutoencoderKL: the two halves and the latent scale
#
# Two optional $1\times1$ convs sit around the latent: `quant_conv` on the moments and
# `post_quant_conv` on $z$ (left over from VQGAN; SD3 and Flux drop them). `decode` takes **raw**
# latents; the diffusion model works with $z_{\text{diff}} = (\mu - \text{shift}) \cdot
# \text{scale}$, which `to_latent` returns and `from_latent` undoes (section 3 explains why).
#
# The entry points check their input (and `from_pretrained` its folder) with the small helpers
# below, not inline: a batch `(B, C, H, W)` with $B \ge 1$, finite values, a floating dtype (an
# integer image is almost certainly 0–255, so it is refused with a hint), and for images the range
# $[-1, 1]$ and sides divisible by $f$. **Floating inputs of another precision** (float64, fp16, bf16) are cast to the
# model's dtype, so a float64 image works on an fp32 model; outputs have the model's dtype.

# %%
# | export
def _check_batch(name: str, t, channels: int, what: str, dims: str) -> None:
    """`t` is a (B >= 1, channels, ., .) tensor of a floating dtype with finite values."""
    check_tensor(name, t)
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name}: expected {what} of shape (B, {channels}, {dims}), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: expected a batch of at least one, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        hint = "; a 0-255 image converts with x.float() / 127.5 - 1" if t.dtype == torch.uint8 else ""
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}{hint}")
    check_finite(name, t)

# %%
# | export
def _check_image_batch(x, channels: int, factor: int) -> None:
    """x: (B, channels, H, W) with H, W multiples of `factor` and values in [-1, 1] (some slack)."""
    _check_batch("x", x, channels, "an image batch", "H, W")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"x: H and W must be divisible by the downsampling factor {factor}, "
                         f"got H={x.shape[2]}, W={x.shape[3]}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.5 or hi > 1.5:
        raise ValueError(f"x: expected pixel values in [-1, 1] (image / 127.5 - 1), got range "
                         f"[{lo:.3g}, {hi:.3g}]" + ("; this looks like a 0-255 image" if hi > 2 else ""))

# %%
# | export
def _check_latent_batch(z, channels: int) -> None:
    _check_batch("z", z, channels, "latents", "h, w")

# %%
# | export
def _upcast_decoder(model) -> None:
    """An fp16 decoder overflowed (SDXL's VAE does): warn, and move it to float32 for good."""
    warnings.warn("AutoencoderKL.decode: the float16 decoder overflowed (inf/NaN in the image; SDXL's VAE does "
                  "this, its activations exceed fp16's 65504). Decoding in float32 from now on; load the VAE with "
                  "dtype='bf16' or 'fp32', or use an fp16-fixed VAE, to avoid it.", stacklevel=3)
    for part in (model.post_quant_conv, model.decoder):
        if part is not None:
            part.float()

# %%
# | export
def _diffusers_folder(folder: Path) -> tuple[dict, Path]:
    """The config dict and the weights file of a diffusers AutoencoderKL folder."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} has no config.json (a diffusers AutoencoderKL"
                                " folder has config.json + diffusion_pytorch_model.safetensors; "
                                "try subfolder='vae')")
    weights = next((folder / w for w in WEIGHT_NAMES if (folder / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} has none of the weight files {WEIGHT_NAMES}")
    return read_config(folder / "config.json"), weights

# %%
# | export
class AutoencoderKL(nn.Module):
    """The LDM autoencoder (Rombach et al. 2022) with a diagonal-Gaussian posterior (Kingma & Welling).

    `encode(x)` -> DiagonalGaussian; `decode(z)` takes raw latents; `to_latent` / `from_latent`
    apply the shift and scaling the diffusion model expects. Images are (B, 3, H, W) in [-1, 1].
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else VAEConfig.preset("book")
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; floating inputs of another precision are cast to it."""
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over raw latents (B, C, H/f, W/f)."""
        _check_image_batch(x, self.config.in_channels, self.downsampling_factor)
        moments = self.encoder(x.to(self.dtype))  # (B, 2C, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (B, 2C, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents (B, C, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1].
        An fp16 decoder that overflows (SDXL's VAE does) is moved to fp32 for good, with a warning."""
        _check_latent_batch(z, self.config.latent_channels)
        x = self._decode(z)  # (B, 3, H, W)
        if x.dtype == torch.float16 and not torch.isfinite(x).all():
            _upcast_decoder(self)
            x = self._decode(z)  # (B, 3, H, W), float32
        return x

# %%
# | export
@add_to_class(AutoencoderKL)
def _decode(self, z: torch.Tensor) -> torch.Tensor:
    z = z.to(self.decoder.conv_in.weight.dtype)  # the decoder's dtype (float32 after an fp16 overflow)
    if self.post_quant_conv is not None:
        z = self.post_quant_conv(z)  # (B, C, h, w)
    return self.decoder(z)  # (B, 3, H, W)

# %%
# | export
@add_to_class(AutoencoderKL)
def to_latent(self, x: torch.Tensor, sample: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(posterior mean - shift_factor) * scaling_factor: what the diffusion model sees.
    `sample=True` uses a posterior sample instead of the mean."""
    post = self.encode(x)
    z = post.sample(generator) if sample else post.mean  # (B, C, h, w)
    return (z - self.config.shift_factor) * self.config.scaling_factor

# %%
# | export
@add_to_class(AutoencoderKL)
def from_latent(self, z: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_latent`, then decode: diffusion-space latents -> image."""
    _check_latent_batch(z, self.config.latent_channels)
    return self.decode(z / self.config.scaling_factor + self.config.shift_factor)  # (B, 3, H, W)

# %%
# | export
@add_to_class(AutoencoderKL)
def forward(self, x: torch.Tensor, sample_posterior: bool = False,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
    """Reconstruct: returns (x_rec, posterior)."""
    post = self.encode(x)
    z = post.sample(generator) if sample_posterior else post.mode()  # (B, C, h, w)
    return self.decode(z), post

# %%
# | export
@add_to_class(AutoencoderKL)
@classmethod
def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None,
                    dtype=None) -> AutoencoderKL:
    """A diffusers-layout AutoencoderKL: a local folder, or a Hugging Face Hub id when online.
    `dtype` ("fp16", "bf16", a torch dtype; None = float32) converts the weights while reading."""
    dtype = resolve_dtype(dtype)
    folder = resolve_pretrained(path_or_id, subfolder, filenames=("config.json", *WEIGHT_NAMES))
    config, weights = _diffusers_folder(folder)
    cfg = VAEConfig.from_diffusers(config)
    sd = rename_legacy_attention(load_state_dict(weights, dtype))
    return load_model(lambda: cls(cfg), sd, what=str(weights), dtype=dtype)

# %%
# | export
@add_to_class(AutoencoderKL)
@classmethod
def from_single_file(cls, path: str | os.PathLike, preset: str = "sdxl",
                     config: VAEConfig | None = None, dtype=None) -> AutoencoderKL:
    """An original LDM/SGM-layout VAE file, bare or nested under `first_stage_model.` / `vae.`.
    The file holds no config: `preset` names the family; pass `config=` for anything else."""
    cfg = config if config is not None else VAEConfig.preset(check_choice("preset", preset, tuple(VAE_PRESETS)))
    dtype = resolve_dtype(dtype)
    sd = single_file_vae_weights(load_state_dict(path, dtype))
    sd = ldm_to_diffusers(sd, len(cfg.block_out_channels))
    try:
        return load_model(lambda: cls(cfg), sd, what=str(path), dtype=dtype)
    except WeightsMismatchError as e:
        hint = "" if config is not None else f" (is preset={preset!r} the right family?)"
        raise WeightsMismatchError(str(e).replace(" does not fit", f" does not fit{hint}", 1)) from None

# %%
# | export
@add_to_class(AutoencoderKL)
def save_pretrained(self, folder: str | os.PathLike,
                    weights_name: str = "diffusion_pytorch_model.safetensors") -> Path:
    """Write config.json (diffusers format) and the weights (safetensors) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(self.config.to_diffusers(), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
              str(folder / weights_name))
    return folder

# %% [markdown]
# `save_pretrained` / `from_pretrained` use the diffusers folder layout (`config.json` +
# safetensors). Because our names *are* diffusers' names, loading is: read the config, build,
# check every key and shape, copy. One wrinkle: older diffusers folders call the attention
# projections `query/key/value/proj_attn`; diffusers renames them on load, and so do we.

# %%
# | export
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

# %% [markdown]
# A round trip through disk, the shapes of one forward pass, and the errors a user meets when
# something is wrong (each one names the argument, what was expected and what was given):

# %%
import re
import tempfile


book = AutoencoderKL(VAEConfig.preset("book")).eval()
with tempfile.TemporaryDirectory() as tmp:
    again = AutoencoderKL.from_pretrained(book.save_pretrained(tmp))
assert all(torch.equal(a, b) for a, b in zip(book.state_dict().values(), again.state_dict().values(), strict=True))
x = torch.rand(2, 3, 32, 32) * 2 - 1  # (B, 3, 32, 32)
with torch.no_grad():
    x_rec, post = book(x)  # (2, 3, 32, 32), posterior over (2, 4, 8, 8)
    assert book.encode(x.double()).mean.dtype == torch.float32  # float64 input: cast to the model's dtype
print(post, "->", tuple(x_rec.shape), f"| book VAE {sum(p.numel() for p in book.parameters()):,} parameters")
assert post.mean.shape == post.std.shape == (2, 4, 8, 8) and x_rec.shape == x.shape

bad_calls = [
    (lambda: book.encode(torch.zeros(1, 1, 32, 32)), r"x: expected an image batch of shape \(B, 3, H, W\)"),
    (lambda: book.encode(torch.zeros(1, 3, 30, 32)), r"x: H and W must be divisible by the downsampling factor 4"),
    (lambda: book.encode(torch.full((1, 3, 32, 32), 255.0)), r"x: expected pixel values in \[-1, 1\].*0-255"),
    (lambda: book.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), r"x: expected a floating-point.*uint8"),
    (lambda: book.encode(torch.zeros(0, 3, 32, 32)), r"x: expected a batch of at least one"),
    (lambda: book.decode(torch.full((1, 4, 8, 8), float("nan"))), r"z: expected finite values, got 256 NaN"),
    (lambda: book.decode(torch.zeros(1, 16, 8, 8)), r"z: expected latents of shape \(B, 4, h, w\)"),
    (lambda: VAEConfig.preset("sd4"), r"name: unknown VAE preset 'sd4'"),
]
for call, pattern in bad_calls:
    try:
        call()
    except (ValueError, TypeError) as e:
        assert re.search(pattern, str(e)), (pattern, str(e))
        print(f"{type(e).__name__}: {e}")
    else:
        raise AssertionError(f"no error raised; expected {pattern!r}")

# %% [markdown]
# ## 3 · Training the book's VAE
#
# The objective is the $\beta$-weighted ELBO, written per pixel so the numbers do not depend on the
# image size: $\mathcal L = \frac{1}{N}\lVert x - D(z) \rVert^2 + \beta\,\mathrm{KL}/N$ with
# $z \sim q(z\mid x)$, $N = 3 \cdot 32 \cdot 32$ and $\beta = 10^{-6}$ as in the LDM autoencoders
# (which add a perceptual loss and a patch discriminator for photographs; flat-coloured shapes do
# not need them). Data: the first `n_images` training images of `ShapesDataset`, with random
# horizontal flips; Adam with a short warm-up and cosine decay; everything seeded.
#
# One practical detail: at initialisation the log-variance is about 0, so the decoder first sees
# latents drowned in unit noise, and with $\beta = 10^{-6}$ that noise would shrink only as fast as
# Adam walks the bias down. We start the log-variance bias at $-6$ ($\sigma \approx 0.05$). After
# training we **calibrate**: `shift_factor` = mean and `scaling_factor` = 1 / std of the latents of
# 4 096 training images.

# %%
# | export
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, C, H, W) batches in [-1, 1], measured on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))  # (B,)

# %%
# | export
def shapes_images(n: int, seed: int = 0, split: str = "train", size: int = 32) -> torch.Tensor:
    """The first `n` images of `ShapesDataset(n, size, seed, split)` as one (n, 3, size, size) tensor."""
    ds = ShapesDataset(n, size=size, seed=seed, split=split)
    return torch.stack([ds[i][0] for i in range(n)])  # (n, 3, size, size)

# %%
# | export
@torch.no_grad()
def calibrate_latents(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Latent statistics of `images` under `model` (posterior means): global and per channel."""
    model.eval()
    z = torch.cat([model.encode(images[i:i + batch_size]).mean for i in range(0, len(images), batch_size)])
    per_ch = z.transpose(0, 1).flatten(1)  # (C, B*h*w)
    return {"mean": z.mean().item(), "std": z.std().item(),
            "channel_mean": per_ch.mean(1).tolist(), "channel_std": per_ch.std(1).tolist()}

# %%
# | export
LOGVAR_INIT = -6.0  # initial posterior log-variance: std 0.05 instead of 1 (faster start)

# %%
# | export
def warmup_cosine(step: int, steps: int, warmup: int | None = None) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps (default min(200, steps/10)), then
    a cosine to 0 at `steps`."""
    warmup = max(1, min(200, steps // 10)) if warmup is None else warmup
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

# %%
# | export
def vae_loss(model: AutoencoderKL, images: torch.Tensor, batch_size: int, kl_weight: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of VAE training: random rows and flips; (reconstruction MSE, KL, their weighted sum)."""
    idx = torch.randint(len(images), (batch_size,), generator=gen)
    x = images[idx]  # (B, 3, H, W)
    flip = torch.rand(batch_size, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, H, W)
    post = model.encode(x)
    x_rec = model.decode(post.sample(gen))  # (B, 3, H, W)
    rec = (x_rec - x).pow(2).mean()
    kl = post.kl().mean()
    return rec, kl, rec + kl_weight * kl / x[0].numel()  # KL per pixel, like the MSE

# %%
# | export
def train_book_vae(steps: int = 4500, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6,
                   n_images: int = 20_000, seed: int = 0, config: VAEConfig | None = None,
                   out_dir: str | os.PathLike | None = None, disable: bool | None = None) -> tuple[AutoencoderKL, dict]:
    """Train the book VAE on ShapesDataset (32x32 -> 4x8x8) and calibrate its latent scale.

    Returns `(model, history)`; history holds per-step "rec" (MSE), "kl" (per image) and "loss",
    plus the latent statistics ("latents"). `out_dir` (optional) receives config.json and
    model.safetensors, the layout `load_book_vae` reads.
    """
    steps, batch_size, n_images = (check_int(name, v, minimum=1) for name, v in
                                   (("steps", steps), ("batch_size", batch_size), ("n_images", n_images)))
    check_float("lr", lr, minimum=0, min_inclusive=False), check_float("kl_weight", kl_weight, minimum=0)
    cfg = VAEConfig(**asdict(config)) if config is not None else VAEConfig.preset("book")
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg)
    with torch.no_grad():  # start with a small posterior std (see the note above)
        last = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
        last.bias[cfg.latent_channels:] = LOGVAR_INIT
    images = shapes_images(n_images, seed=seed, split="train", size=cfg.sample_size)  # (n, 3, H, W)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, steps=steps))
    hist: dict = {"rec": [], "kl": [], "loss": []}
    model.train()
    for _ in tqdm(range(steps), desc="train VAE", disable=disable):
        rec, kl, loss = vae_loss(model, images, batch_size, kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for key, value in (("rec", rec), ("kl", kl), ("loss", loss)):
            hist[key].append(value.item())
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
    return BOOK_VAE_DIR

# %%
# | export
def load_book_vae(dtype=None) -> AutoencoderKL:
    """The book's trained tiny VAE (32x32 images <-> 4x8x8 latents), in eval mode; `dtype` as in
    `AutoencoderKL.from_pretrained` (None = float32)."""
    dtype = resolve_dtype(dtype)
    folder = book_vae_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the book VAE is missing from the package ({folder}); regenerate it with "
                                "tinydit.vae.train_book_vae(out_dir=...)")
    return AutoencoderKL.from_pretrained(folder, dtype=dtype)

# %% [markdown]
# Under `TINYDIT_FAST=1` (CI) the cell below trains for 60 steps, only to show that the loop runs
# and the loss falls. Without it, `train_book_vae()` with its defaults (4 500 steps of 32 images,
# seed 0) is the exact run that produced the weights shipped in `tinydit/assets/book_vae/`; it
# writes them to `outputs/book_vae/` (about 13 minutes on an idle two-core CPU).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np


t0 = time.perf_counter()
trained, history = train_book_vae(**(dict(steps=60, n_images=2_000) if FAST else dict(out_dir="outputs/book_vae")))
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
print(f"{len(rec)} steps in {time.perf_counter() - t0:.0f} s; MSE {smooth[0]:.4f} -> {smooth[-1]:.4f}; "
      f"shift_factor {trained.config.shift_factor}, scaling_factor {trained.config.scaling_factor}")
# measured: the 10-step mean falls to 0.28x its start in the 60 fast steps (far lower at full size);
# 0.7 leaves a wide margin for platform noise and still catches a loop that does not learn
assert smooth[-1] < 0.7 * smooth[0]

# %% [markdown]
# ### The shipped book VAE
#
# `load_book_vae()` loads the full-settings weights from the package. We measure the reconstruction
# PSNR, $10\log_{10}(1/\mathrm{MSE})$ per image on the $[0, 1]$ scale, on 256 images of the
# **test** split (never seen in training, with the held-out colour/shape pairs), through the
# diffusion-space round trip `from_latent(to_latent(x))`.

# %%
from tinydit.data import image_grid, tensor_to_pil


vae = load_book_vae()
test_x = shapes_images(256, seed=0, split="test")  # (256, 3, 32, 32)
with torch.no_grad():
    test_z = vae.to_latent(test_x)  # (256, 4, 8, 8), diffusion space
    test_rec = vae.from_latent(test_z)  # (256, 3, 32, 32)
scores = psnr(test_rec, test_x)  # (256,)
print(f"PSNR on 256 test images: mean {scores.mean():.2f} dB, worst {scores.min():.2f} dB, best {scores.max():.2f} dB")
assert test_z.shape == (256, 4, 8, 8)
assert scores.mean() >= 38.69  # measured 39.19 dB; 0.5 dB margin for platform (BLAS / CPU) differences

# %% [markdown]
# Every loader in the book takes `dtype=` ("bf16", "fp16" or a torch dtype): the weights are converted
# as they are read and the model is built directly in that precision (appendix; chapter 12 explains
# the formats). With bfloat16 weights the book VAE loses about a tenth of a dB:

# %%
vae_bf16 = load_book_vae(dtype="bf16")
with torch.no_grad():
    scores_bf16 = psnr(vae_bf16.from_latent(vae_bf16.to_latent(test_x)).float(), test_x)  # (256,)
print(f"bf16 weights: mean PSNR {scores_bf16.mean():.2f} dB (float32: {scores.mean():.2f} dB)")
assert scores_bf16.mean() >= scores.mean() - 0.5  # measured 0.10 dB lower; 0.5 dB margin

# %% [markdown]
# Originals (odd rows) and their reconstructions (even rows), with each reconstruction's PSNR:

# %%
rows = torch.cat([test_x[0:8], test_rec[0:8], test_x[8:16], test_rec[8:16]])  # (32, 3, 32, 32)
test_captions = ShapesDataset(16, seed=0, split="test")
caps = [c for r in (0, 8) for c in [test_captions[i][1] for i in range(r, r + 8)] +
        [f"{scores[i]:.1f} dB" for i in range(r, r + 8)]]
image_grid(rows, caps, cols=8, scale=4)

# %% [markdown]
# **What do the latents look like?** Each image becomes four $8\times8$ maps. They are not a tiny
# picture (the encoder spreads colour, shape and position over the channels however helps the
# decoder), but the objects' positions show clearly: the encoder is convolutional, so each latent
# pixel describes its own $4\times4$ patch.

# %%
fig, axes = plt.subplots(5, 6, figsize=(9, 7.5))
for col in range(6):
    axes[0, col].imshow(tensor_to_pil(test_x[col]))
    for ch in range(4):
        axes[ch + 1, col].imshow(test_z[col, ch].numpy(), cmap="RdBu_r", vmin=-2.5, vmax=2.5)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for row, label in enumerate(["image"] + [f"channel {c}" for c in range(4)]):
    axes[row, 0].set_ylabel(label)
plt.suptitle("scaled latents (diffusion space), blue < 0 < red")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Why a scaling factor?
#
# Nothing in the VAE objective fixes the *scale* of the latents: with $\beta \approx 0$ the encoder
# can make $\mu$ as large as it likes. The diffusion model mixes data and noise as
# $x_t = \alpha_t x_0 + \sigma_t \varepsilon$, and its schedule is designed for
# $\operatorname{Var}(x_0) \approx 1$: latents with standard deviation 5 would still be clearly
# visible at noise levels the schedule considers pure noise. Rombach et al. therefore multiply by
# the inverse of the latents' measured standard deviation (SD: $1/0.18215 \approx 5.5$); SD3 and
# Flux also subtract a mean. One scalar for all channels keeps `to_latent` identical in form to the
# real families'.

# %%
train_x = shapes_images(4096, seed=0, split="train")  # (4096, 3, 32, 32): the calibration images
with torch.no_grad():
    raw = torch.cat([vae.encode(train_x[i:i + 512]).mean for i in range(0, 4096, 512)])  # (4096, 4, 8, 8)
scaled = (raw - vae.config.shift_factor) * vae.config.scaling_factor  # (4096, 4, 8, 8)
print(f"raw: mean {raw.mean():+.3f} std {raw.std():.3f}; per-channel std "
      f"{[round(s, 3) for s in raw.transpose(0, 1).flatten(1).std(1).tolist()]}")
print(f"shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor} -> "
      f"scaled: mean {scaled.mean():+.4f} std {scaled.std():.4f}")
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
for c in range(4):
    ax[0].hist(raw[:, c].flatten().numpy(), bins=80, histtype="step", label=f"ch {c}")
    ax[1].hist(scaled[:, c].flatten().numpy(), bins=80, histtype="step", label=f"ch {c}")
grid = np.linspace(-4, 4, 200)
ax[1].plot(grid, scaled[:, 0].numel() * 0.1 * np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
ax[0].set_title("raw latents (what decode takes)")
ax[1].set(title="to_latent: (z - shift) * scale", xlim=(-4, 4))
ax[1].legend(fontsize=8)
plt.show()
# measured on these (the calibration) images: mean +0.00002, std 1.00004, i.e. exact up to the
# 4-digit rounding of the stored factors; 0.01 is a wide margin over that rounding
assert abs(scaled.mean()) < 0.01 and abs(scaled.std() - 1) < 0.01

# %% [markdown]
# ### The KL / reconstruction trade-off
#
# A larger $\beta$ pulls every posterior towards $\mathcal N(0, I)$: the means shrink, the
# variances grow towards 1, the decoder receives noisier codes and reconstructions get worse; in
# the limit the latent carries nothing. We train the same small model with several $\beta$ (short
# runs, so the PSNRs are lower than the shipped model's). At full settings (400 steps each) we
# measured $\beta = 10^{-6}$: 22.5 dB, KL 905 nats; $10^{-3}$: 21.6 dB, 847; $10^{-1}$: 19.1 dB,
# 380; $1$: 14.1 dB, 44; $10$: 15.0 dB, 11 (the decoder draws an average picture). Under
# `TINYDIT_FAST` the runs are far too short to show it.

# %%
betas = [1e-6, 1e-2, 1.0] if FAST else [1e-6, 1e-3, 1e-1, 1.0, 10.0]
sweep_kw = dict(steps=15, n_images=500, batch_size=16) if FAST else dict(steps=400, n_images=5_000)
results = []
for beta in betas:
    m_beta, _ = train_book_vae(kl_weight=beta, disable=True, **sweep_kw)
    with torch.no_grad():
        post = m_beta.encode(test_x[:64])
        rec_beta = m_beta.decode(post.sample(torch.Generator().manual_seed(0)))  # (64, 3, 32, 32)
    results.append((psnr(rec_beta, test_x[:64]).mean().item(), post.kl().mean().item()))
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
assert np.isfinite(results).all()
if not FAST:  # measured above: 22.5 -> 14-15 dB and 905 -> 11 nats from the first beta to the last
    assert results[0][0] > results[-1][0] + 3 and results[0][1] > 10 * results[-1][1]

# %% [markdown]
# **Try it.** Pick a test image, decode the posterior mean or a sample, and add Gaussian noise of
# standard deviation $\sigma$ to the **scaled** latent: at $\sigma = 1$ the noise is as large as
# the signal and the picture is gone, as the diffusion model's schedule expects. (Run the notebook
# in JupyterLab to move the sliders.)

# %%
import ipywidgets as W
from IPython.display import display


def compare(index=0, posterior="mean", noise=0.0, seed=0):
    x0, g = test_x[index:index + 1], torch.Generator().manual_seed(seed)  # (1, 3, 32, 32)
    with torch.no_grad():
        post = vae.encode(x0)
        z = post.mean if posterior == "mean" else post.sample(g)  # (1, 4, 8, 8), raw
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor  # diffusion space
        xr = vae.from_latent(z + noise * torch.randn(z.shape, generator=g))  # (1, 3, 32, 32)
    err = ((xr - x0).abs().mean(1, keepdim=True) * 4 - 1).expand(-1, 3, -1, -1).clamp(-1, 1)  # |error| x 4
    caps = ["original", f"reconstruction {psnr(xr, x0).item():.1f} dB", "|error| x 4"]
    display(image_grid(torch.cat([x0, xr, err]), caps, cols=3, scale=6))


display(W.interactive(compare, index=W.IntSlider(0, 0, len(test_x) - 1, description="test image"),
                      posterior=W.ToggleButtons(options=["mean", "sample"]),
                      noise=W.FloatSlider(0.0, min=0.0, max=1.5, step=0.05, description="latent σ"),
                      seed=W.IntSlider(0, 0, 20, description="noise seed")))

# %% [markdown]
# ## Summary
#
# - **Built:** teaching versions of the ResNet block, the encoder / decoder stacks and the diagonal
#   Gaussian (sample + closed-form KL), checked against `torch.distributions` and then against the
#   exported `tinydit.vae.AutoencoderKL` (same layers, same outputs); presets for SD 1.x, SDXL,
#   SD3, Flux and the book; `train_book_vae` with latent calibration; `load_book_vae()`; loaders
#   for the diffusers folder and original single-file layouts (the key maps: chapter 17), matching diffusers to
#   $10^{-5}$.
# - **Measured:** the shipped book VAE reconstructs 256 held-out test images at 39.19 dB mean PSNR
#   through $3\times32\times32 \to 4\times8\times8 \to 3\times32\times32$; its calibrated latents
#   have mean 0 and std 1; larger $\beta$ trades PSNR for KL as the theory says.
# - **Speed:** `benchmarks/vae.py` encodes and decodes one 256×256 image with SD-sized random
#   weights (83.7M parameters) in 5.25 s (tinydit) vs 5.30 s (diffusers) on the book's 2-core CPU
#   (ratio 0.99), with identical outputs: both run the same convolutions and attention calls.
#
# Next, chapter 03 builds the embeddings the diffusion transformer needs to know *where* and *when*
# it is.
#
# ## Exercises
#
# 1. Show that with $\beta = 1$ the per-pixel loss above is, up to constants, the negative ELBO of a
#    Gaussian decoder with fixed variance. Which variance?
# 2. Remove the asymmetric padding from the teaching `down` (use `padding=1` instead). Does the
#    teaching encoder still match the production one after copying weights? Why do real SD
#    weights care?
# 3. Train the book VAE with `LOGVAR_INIT = 0` for 300 steps and compare the loss curve with the
#    default. Explain the difference in terms of the reparameterised sample.
# 4. Compute per-channel shift and scale factors for the shipped VAE. How different are the
#    channels, and what would a per-channel `to_latent` change for the diffusion model?
# 5. Using `torch.distributions`, estimate the KL of one posterior by Monte Carlo with 10, 100 and
#    1 000 samples and compare with `DiagonalGaussian.kl()`. How does the error shrink?

# %% [markdown]
# ## Appendix: loading real checkpoints — skip on a first read
#
# ### Reading weights safely: `tinydit.checkpoint`
#
# Every loader in the book (this VAE, the DiT, PixArt, the text encoders) needs the same three
# things, so they live in one small module exported here:
#
# - **Files.** safetensors first: a flat table of tensors that cannot run code when read. Pickle
#   files (`.pt`, `.pth`, `.ckpt`, `.bin`) are read only with `torch.load(weights_only=True)`; when
#   it refuses a file the error says so rather than falling back to unsafe loading. A file that
#   cannot be read at all (empty, truncated, garbage) is reported as corrupt / damaged, with its size.
# - **Where.** A local folder, or a Hugging Face hub id fetched with `huggingface_hub` when online.
#   Offline, the error is one line that says how to download the files and pass the folder instead.
# - **Keys and values.** Every missing key, unexpected key and shape mismatch is listed in one
#   error; weights of a non-floating dtype, or holding NaN / inf, are refused before they are copied.
# - **Precision.** `load_state_dict(path, dtype="bf16")` converts each tensor as it is read, and
#   `load_model` builds the model empty (on the `meta` device) in that dtype, so a float32 copy of
#   the model is never in memory. Every loader of the book takes this `dtype=`; dtype=None keeps the
#   file's float32. In fp16, SDXL's VAE decoder overflows (activations beyond 65504): `decode` then
#   warns once and moves the decoder to float32 for good (`tests/test_dtype_loading.py` provokes it).

# %%
# | export checkpoint
"""Reading weights safely: safetensors or `torch.load(weights_only=True)`, local folders or hub
ids, and key/shape/value checks that list everything that does not fit (chapter 02)."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

import tinydit


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# The book's trained weights ship inside the package; inference owns their paths (training writes new ones).
ASSETS = Path(tinydit.__file__).resolve().parent / "assets"
BOOK_VAE_DIR = ASSETS / "book_vae"  # chapter 02
BOOK_TEXT_ENCODER_DIR = ASSETS / "book_text_encoder"  # chapter 06 (and its image tower)
BOOK_MODEL_DIR = ASSETS / "book_model"  # chapter 09's TextDiT, in diffusers' PixArt layout
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
WRAPPER_KEYS = ("state_dict", "ema", "model", "module")  # how training code nests a state dict
# How torch.load(weights_only=True) says that a readable file holds something other than tensors
# (garbage bytes fail inside the same unpickler, with "Unsupported operand" instead).
_REFUSED = re.compile(r"unsupported (global|class)|not an allowed global|safe_globals|is blocked", re.I)


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: lists missing / unexpected keys and shape mismatches."""

# %%
# | export checkpoint
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

# %%
# | export checkpoint
def _read_pickle(path: Path, mmap: bool = False):
    """torch.load(weights_only=True); a refusal and an unreadable file get different errors.
    `mmap=True` leaves the tensors in the file (zip-format files only) until they are used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, OSError or RuntimeError from a broken zip, garbage
        if isinstance(e, pickle.UnpicklingError) and _REFUSED.search(str(e)):
            raise ValueError(f"path: torch.load(weights_only=True) refused {path.name} ({type(e).__name__}); it "
                             "holds more than tensors. Convert it to .safetensors with a tool you trust.") from None
        raise ValueError(f"path: {path.name} ({path.stat().st_size:,} bytes) is damaged: truncated or not a "
                         f"PyTorch checkpoint ({type(e).__name__}); download it again") from None

# %%
# | export checkpoint
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None (keep the file's precision), a floating-point torch dtype, or a name in `DTYPES`."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"{name}: expected one of fp32, fp16, bf16 (or a torch dtype), got {dtype!r}")

# %%
# | export checkpoint
def _converted(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy of `t` (never a view into the file) in `dtype`; integer tensors keep theirs."""
    if not t.is_floating_point():
        return t.clone()
    out = t.to(dtype, copy=True)
    if dtype == torch.float16 and not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise ValueError(f"dtype: {key} holds values beyond float16's range (65504); load this checkpoint "
                         "with dtype='bf16' (float32's range) or 'fp32'")
    return out

# %%
# | export checkpoint
def load_state_dict(path: str | os.PathLike, dtype=None) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file, or a pickle file via `torch.load(weights_only=True)`.
    `dtype` ("bf16", torch.float16, ...): every floating-point tensor is converted while reading,
    one at a time, so the file's own copy is never in memory whole (old non-zip pickles excepted)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            if dtype is None:
                return load_file(str(path))
            with safe_open(str(path), framework="pt") as f:  # get_tensor: a view of the mapped file
                return {k: _converted(k, f.get_tensor(k), dtype) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"path: {path.name} ({path.stat().st_size:,} bytes) is corrupt: truncated or not a "
                             f"safetensors file ({e}); download it again") from None
    if path.suffix in PICKLE_SUFFIXES:
        if dtype is None:
            return unwrap_state_dict(_read_pickle(path))
        sd = unwrap_state_dict(_read_pickle(path, mmap=zipfile.is_zipfile(path)))
        return {k: _converted(k, v, dtype) for k, v in sd.items()}
    raise ValueError(f"path: expected a .safetensors file or one of {PICKLE_SUFFIXES}, got {path.name!r}")

# %%
# | export checkpoint
def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. 'first_stage_model.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

# %%
# | export checkpoint
def read_config(path: str | os.PathLike, name: str = "path_or_id") -> dict:
    """The JSON object in a `config.json`; a damaged or non-object file names `name` and the path."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: expected a JSON object in {str(path)!r}, got {type(config).__name__}")
    return config

# %%
# | export checkpoint
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

# %%
# | export checkpoint
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
    how = (f"download it where the Hub is reachable (`hf download {repo_id} --local-dir <folder>`) and pass "
           "that folder instead: from_pretrained('<folder>'" + (f", subfolder={subfolder!r})" if subfolder else ")"))
    if hub_offline():
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and the Hugging Face Hub is offline "
                      f"(HF_HUB_OFFLINE=1); {how}")
    try:
        patterns = [f"{subfolder}/{f}" if subfolder else f for f in filenames]
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # no network, unknown or gated repo, ...
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and could not be fetched from the "
                      f"Hugging Face Hub ({type(e).__name__}); {how}") from None
    return root / subfolder if subfolder else root

# %%
# | export checkpoint
def _listing(title: str, items: list[str]) -> str:
    """A titled list for an error message, one item a line, cut after 20; "" for no items."""
    if not items:
        return ""
    more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {k}" for k in items[:20]) + more

# %%
# | export checkpoint
def _check_weight_values(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str) -> None:
    """Where the model holds floats, the checkpoint must too, and they must be finite."""
    keys = sorted(k for k in sd if own[k].is_floating_point())
    wrong = [f"{k}: {sd[k].dtype}" for k in keys if not sd[k].is_floating_point()]
    if wrong:
        raise ValueError(f"{what}: expected floating-point weights, got another dtype in" + _listing("tensors", wrong))
    bad = [k for k in keys if not torch.isfinite(sd[k] if sd[k].element_size() > 1 else sd[k].float()).all()]
    if bad:
        raise ValueError(f"{what}: weights hold NaN or infinite values (a corrupt file or a diverged training run) in"
                         + _listing("tensors", bad))

# %%
# | export checkpoint
def check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint",
                   assign: bool = False) -> None:
    """`model.load_state_dict(sd, strict=True)`, after one error that lists every problem.
    `assign=True` (for an `empty_model`): the model takes `sd`'s tensors themselves, no copy."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise WeightsMismatchError(f"{what} does not fit the model" + _listing("missing keys", missing)
                                   + _listing("unexpected keys", unexpected) + _listing("shape mismatches", shapes))
    _check_weight_values(sd, own, what)
    if assign:
        model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}, strict=True, assign=True)
    else:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)

# %% [markdown]
# Loading in another precision without a float32 copy: build the model on the `meta` device
# (shapes, no memory), cast it, give it uninitialised CPU storage, and let the strict
# `check_and_load` *assign* the tensors just read: every parameter and buffer is replaced (a missing
# key raises first), so the weights exist once, in the target dtype. What a state dict does not hold
# (a plain tensor attribute, a non-persistent buffer) would stay uninitialised: `empty_model` refuses it.

# %%
# | export checkpoint
def empty_model(build: Callable[[], nn.Module], dtype) -> nn.Module:
    """`build()` without its weights: made on the meta device, cast to `dtype`, then given
    uninitialised CPU storage (`to_empty`) for a strict `check_and_load(..., assign=True)` to fill.
    `dtype=None` keeps the dtypes `build` gives."""
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = build()
    model = (model if dtype is None else model.to(dtype)).to_empty(device="cpu")
    unfilled = []
    for name, m in model.named_modules():
        plain = [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]  # still on the meta device
        unfilled += [f"{name}.{k}" if name else k for k in plain + sorted(m._non_persistent_buffers_set)]
    if unfilled:
        raise RuntimeError(f"build: {type(model).__name__} holds tensors that no state dict fills (left on the "
                           f"meta device or uninitialised): {unfilled[:10]}; load it with dtype=None")
    return model

# %%
# | export checkpoint
def load_model(build: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str = "checkpoint",
               dtype=None) -> nn.Module:
    """`build()` filled from `sd` by the strict `check_and_load`, in eval mode. With `dtype`, an
    `empty_model` in that dtype takes `sd`'s tensors (read in `dtype`): no float32 copy, no init."""
    dtype = resolve_dtype(dtype)
    if dtype is None:  # the model's own init, then a copy: what every loader did before dtype=
        model = build()
        check_and_load(model, sd, what)
    else:
        model = empty_model(build, dtype)
        check_and_load(model, sd, what, assign=True)
    return model.eval()

# %% [markdown]
# A damaged download, a checkpoint that would run code, and a NaN in the weights, each met with an
# error that says what is wrong with the file:

# %%
with tempfile.TemporaryDirectory() as tmp:
    good = book.save_pretrained(f"{tmp}/good") / "diffusion_pytorch_model.safetensors"
    (Path(tmp) / "cut.safetensors").write_bytes(good.read_bytes()[:1000])  # a download cut short
    (Path(tmp) / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "callback": Exception("not a tensor")}, f"{tmp}/code.ckpt")
    nan_sd = {k: v.clone() for k, v in book.state_dict().items()}
    nan_sd["decoder.conv_out.bias"][0] = float("nan")
    cases = [(lambda: load_state_dict(f"{tmp}/cut.safetensors"), r"cut\.safetensors \(1,000 bytes\) is corrupt"),
             (lambda: load_state_dict(f"{tmp}/empty.ckpt"), r"empty\.ckpt \(0 bytes\) is damaged"),
             (lambda: load_state_dict(f"{tmp}/code.ckpt"), r"weights_only=True\) refused code\.ckpt"),
             (lambda: check_and_load(AutoencoderKL(), nan_sd), r"(?s)NaN or infinite.*decoder\.conv_out\.bias"),
             (lambda: load_state_dict(good, dtype="int8"), r"^dtype: expected one of fp32, fp16, bf16")]
    for call, pattern in cases:
        try:
            call()
        except ValueError as e:
            assert re.search(pattern, str(e)), (pattern, str(e))
            print(f"ValueError: {e}")
        else:
            raise AssertionError(f"no error raised; expected {pattern!r}")

# %% [markdown]
# The original LDM / SGM single-file layout that `from_single_file` reads, its key map both ways and
# its parity with diffusers' own converter are in chapter 17, the loading appendix.
