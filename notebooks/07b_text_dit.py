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
# # 07b · The text-conditioned DiT: the model, where each word looks, PixArt
#
# 07a built cross-attention and the text-conditioned block. This sitting assembles them into
# `TextDiT`, a sibling of chapter 05's `DiT` (PixArt-α/Σ and the book model as presets), trains it a
# little to watch where each word looks, and loads PixArt-α/Σ checkpoints. It exports
# `tinydit.textdit`.
#
# | tensor | shape | book | PixArt-α XL/2 at 1024² |
# |---|---|---|---|
# | text tokens `context` | $(B, T, D_\text{text})$ | $(B, T, 96)$ | $(B, 120, 4096)$ (T5-XXL) |
# | key-padding `context_mask` | $(B, T)$, True = real token | $(B, T)$ | $(B, 120)$ |
# | pooled text `pooled` | $(B, D_\text{pooled})$ or None | $(B, 64)$ | None |
# | image tokens (queries) | $(B, N, D)$ | $(B, 16, 192)$ | $(B, 4096, 1152)$ |
# | cross-attention map | $(B, \text{heads}, N, T)$ | $(B, 6, 16, T)$ | $(B, 16, 4096, 120)$ |


# %%
# | default_exp textdit
# %%
import os
import time

import matplotlib.pyplot as plt
import torch

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)
from tinydit.text import load_book_text_encoder


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)
book_text = load_book_text_encoder()  # chapter 06's shipped encoder: 96-wide tokens, 64-wide pooled

# %%
# | export
"""The text-conditioned Diffusion Transformer: cross-attention to text tokens, adaLN-Zero or
adaLN-single modulation, PixArt-α/Σ (Chen et al. 2023/2024) and the book model, with loaders for
diffusers' and the original PixArt layouts (their key maps: `tinydit.loading`, chapter 17), and
`load_transformer`, which reads any DiT / PixArt."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tinydit.checkpoint import load_state_dict, resolve_dtype, resolve_pretrained, unwrap_state_dict
from tinydit.dit import (
    DiT,
    FinalLayer,
    LatentTransformer,
    PatchEmbed,
    TransformerConfig,
    check_latents,
    heads_for,
    infer_config_from_original,
    unpatchify,
)
from tinydit.embeddings import TimestepEmbedder, sincos_pos_embed_2d
from tinydit.loading import convert_diffusers_pixart, read_config_json, transformer_kind
from tinydit.text import TextEmbeddings
from tinydit.textblock import MODULATIONS, CaptionEmbedder, ProjMlp, T2IFinalLayer, TextDiTBlock
from tinydit.validation import check_bool, check_choice, check_finite, check_float, check_int


# %% [markdown]
# ## 3. The model
#
# `TextDiT` is a **sibling** of chapter 05's `DiT`: both derive from `LatentTransformer` (position
# table, initialisation of linears, saving) and are built from the same parts; where `DiT` embeds a
# class label, `TextDiT` reads a caption. Its config extends the shared `TransformerConfig`, and
# each new field says why it exists. Presets: PixArt-α/Σ XL/2 and `book-text`, the book's
# text-conditioned DiT. `model(x, t, context=..., context_mask=...)` also accepts a `TextEmbeddings`
# as `context` (tokens, mask and pooled in one argument); `pooled=` passes the pooled vector
# explicitly. Masks are boolean (or 0/1 integers), True = real token; an additive float mask is
# refused, because cast to booleans it would mean the opposite.

# %%
# | export
@dataclass
class TextDiTConfig(TransformerConfig):
    """A text-conditioned DiT: PixArt-α/Σ (adaLN-single) or the book model (adaLN-Zero + pooled text).
    Presets: `TextDiTConfig.preset("PixArt-alpha-XL/2-1024")`, `"PixArt-Sigma-XL/2-1024"`,
    `"PixArt-XL/2-512"`, `"PixArt-XL/2-256"`, `"book-text"`."""

    context_dim: int = 4096  # width of the text tokens read (T5-XXL 4096; the book encoder 96)
    modulation: str = "adaln_single"  # "adaln_single" (PixArt: one shared map + per-block tables) or "adaln_zero"
    pooled_dim: int = 0  # width of the pooled text vector added to the timestep embedding (SD3-style); 0 = none
    caption_tokens: int = 0  # rows of the learned null caption y_embedding (PixArt-α 120, Σ 300); 0 = none
    micro_conditions: bool = False  # PixArt-α 1024: add resolution and aspect-ratio embeddings to e_t
    pos_base_size: int | None = None  # PixArt: grid the position table is scaled to (input_size // patch); None = DiT's raw indices
    interpolation_scale: float = 1.0  # PixArt: position scale s, 0.5 / 1 / 2 at 256 / 512 / 1024 px

    def __post_init__(self):
        super().__post_init__()
        check_choice("modulation", self.modulation, MODULATIONS)
        self.context_dim = check_int("context_dim", self.context_dim, minimum=1)
        self.pooled_dim = check_int("pooled_dim", self.pooled_dim, minimum=0)
        self.caption_tokens = check_int("caption_tokens", self.caption_tokens, minimum=0)
        self.micro_conditions = check_bool("micro_conditions", self.micro_conditions)
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions: need hidden_size divisible by 3 (resolution 2/3 + aspect "
                             f"ratio 1/3 of the width), got hidden_size={self.hidden_size}")
        if self.pos_base_size is not None:
            check_float("pos_base_size", self.pos_base_size, minimum=0, min_inclusive=False)
        check_float("interpolation_scale", self.interpolation_scale, minimum=0, min_inclusive=False)

    @classmethod
    def preset_names(cls) -> list[str]:
        return ["PixArt-XL/2-256", "PixArt-XL/2-512", "PixArt-alpha-XL/2-1024", "PixArt-Sigma-XL/2-1024", "book-text"]

# %%
# | export
@add_to_class(TextDiTConfig)
@classmethod
def preset(cls, name: str, **overrides) -> TextDiTConfig:
    """A named architecture (figures from the PixArt-α/Σ papers and code), optionally overridden."""
    if name == "book-text":
        base = cls(input_size=8, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=6,
                   learn_sigma=False, context_dim=96, pooled_dim=64, modulation="adaln_zero")
    else:
        latent = {"PixArt-XL/2-256": 32, "PixArt-XL/2-512": 64, "PixArt-alpha-XL/2-1024": 128,
                  "PixArt-Sigma-XL/2-1024": 128}.get(name)
        if latent is None:
            raise ValueError(f"name: unknown text DiT preset {name!r}; expected one of {cls.preset_names()}")
        base = cls(input_size=latent, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                   learn_sigma=True, context_dim=4096, modulation="adaln_single",
                   caption_tokens=300 if "Sigma" in name else 120, micro_conditions=name.startswith("PixArt-alpha"),
                   pos_base_size=latent // 2, interpolation_scale=latent / 64)
    return replace(base, **overrides)

# %%
# | export
class TextDiT(LatentTransformer):
    """A DiT conditioned on text through cross-attention (PixArt-α/Σ, Chen et al. 2023/2024; the book
    model). A sibling of chapter 05's `DiT`: the same patchify, blocks' parts and position table.

    `model(x, t, context=tokens, context_mask=mask)`: x (B, C, H, W), t (B,) or scalar, context
    (B, T, context_dim) text tokens (or a `TextEmbeddings`), context_mask (B, T) boolean, True = real
    token; `pooled` (B, pooled_dim) when the config has `pooled_dim`; `resolution` (B, 2) as (height,
    width) in pixels and `aspect_ratio` (B,) when it has `micro_conditions`. `context=None` uses the
    learned null caption. Returns the raw output (B, C_out, H, W).
    """

    config_class, diffusers_class = TextDiTConfig, "PixArtTransformer2DModel"  # what from_pretrained reads

    def __init__(self, config: TextDiTConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else TextDiTConfig()
        if not isinstance(cfg, TextDiTConfig):
            raise TypeError(f"config: expected a TextDiTConfig, got {type(cfg).__name__} (use DiT for class labels)")
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_size, flip_sin_to_cos=True,
                                           downscale_freq_shift=cfg.freq_shift)
        self._add_optional_embedders(cfg)  # size / aspect, pooled text, adaLN-single's t_block
        self.y_embedder = CaptionEmbedder(cfg.context_dim, D, cfg.caption_tokens)
        self.register_buffer("pos_embed", self.position_table(cfg))  # (1, T, D), fixed
        self.blocks = nn.ModuleList([
            TextDiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.modulation, cfg.qk_norm, cfg.attn_backend, cfg.norm_eps)
            for _ in range(cfg.depth)
        ])
        final = T2IFinalLayer if cfg.modulation == "adaln_single" else FinalLayer
        self.final_layer = final(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h x w grid: the stored one, PixArt's rescaled table for other grids,
        or (DiT-style, no base size) the stored table's top-left corner."""
        cfg = self.config
        g = cfg.input_size // cfg.patch_size
        if (h, w) == (g, g) or cfg.pos_base_size is None:
            return super().pos_embed_for(h, w)  # (1, T, D)
        table = sincos_pos_embed_2d(cfg.hidden_size, (h, w), base_size=cfg.pos_base_size,
                                    interpolation_scale=cfg.interpolation_scale)  # (h*w, D)
        return table[None].to(self.pos_embed.device)  # (1, T, D)

# %%
# | export
@add_to_class(TextDiT)
def _add_optional_embedders(self, cfg: TextDiTConfig) -> None:
    """The embedders only some configs have, created in checkpoint order."""
    D = cfg.hidden_size
    if cfg.micro_conditions:  # PixArt's SizeEmbedders: sinusoid + MLP per number, D/3 wide
        self.csize_embedder = TimestepEmbedder(D // 3, 256, flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
        self.ar_embedder = TimestepEmbedder(D // 3, 256, flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
    if cfg.pooled_dim:
        self.pooled_embedder = ProjMlp(cfg.pooled_dim, D, D, act="silu")
    if cfg.modulation == "adaln_single":
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

# %%
# | export
@add_to_class(TextDiT)
def initialize_weights(self) -> None:
    """PixArt's initialisation (after DiT's): Xavier linears, N(0, 0.02) embedding MLPs, zero
    cross-attention outputs and final layer; adaLN-Zero maps zero as well."""
    self.init_linears_and_patch_embed()
    embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
    for name in ("csize_embedder", "ar_embedder"):
        if hasattr(self, name):
            embedders += [getattr(self, name).mlp[0], getattr(self, name).mlp[2]]
    if hasattr(self, "pooled_embedder"):
        embedders += [self.pooled_embedder.fc1, self.pooled_embedder.fc2]
    if hasattr(self, "t_block"):
        embedders.append(self.t_block[1])
    for lin in embedders:
        nn.init.normal_(lin.weight, std=0.02)
    zeros = [self.final_layer.linear]  # the model starts by predicting exactly zero
    for block in self.blocks:  # every block starts as the identity
        zeros.append(block.cross_attn.proj)
        if block.modulation == "adaln_zero":
            zeros.append(block.adaLN_modulation[-1])
    if isinstance(self.final_layer, FinalLayer):
        zeros.append(self.final_layer.adaLN_modulation[-1])
    for lin in zeros:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)

# %%
# | export
@add_to_class(TextDiT)
def null_context(self, batch_size: int) -> torch.Tensor:
    """The learned null caption (B, T_null, context_dim) for the unconditional branch of CFG."""
    if self.y_embedder.y_embedding is None:
        raise ValueError("context: this model has no learned null caption (caption_tokens=0; diffusers' "
                         "PixArt folders do not store y_embedding); pass the text encoder's encoding of an "
                         "empty prompt '' as context, as diffusers' pipeline does")
    return self.y_embedder.y_embedding[None].expand(batch_size, -1, -1)  # (B, T_null, C)

# %%
# | export
@add_to_class(TextDiT)
@classmethod
def position_table(cls, cfg: TextDiTConfig) -> torch.Tensor:
    """The fixed table (1, T, D) of `cfg`'s grid, with PixArt's base size and interpolation scale."""
    return sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size, base_size=cfg.pos_base_size,
                               interpolation_scale=cfg.interpolation_scale)[None]  # (1, T, D)

# %%
# | export
@add_to_class(TextDiT)
def condition(self, t: torch.Tensor, pooled: torch.Tensor | None = None, resolution: torch.Tensor | None = None,
              aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The conditioning vector c = e_t (+ size embeddings) (+ pooled text embedding), (B, D)."""
    c = self.t_embedder(t)  # (B, D)
    if self.config.micro_conditions:
        B = t.shape[0]
        csize = self.csize_embedder(resolution.reshape(-1)).reshape(B, -1)  # (B, 2D/3)
        ar = self.ar_embedder(aspect_ratio.reshape(-1)).reshape(B, -1)  # (B, D/3)
        c = c + torch.cat([csize, ar], dim=1)  # (B, D)
    if self.config.pooled_dim:
        c = c + self.pooled_embedder(pooled.to(c.dtype))  # (B, D)
    return c

# %%
# | export
@add_to_class(TextDiT)
def check_values(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 context_mask: torch.Tensor | None) -> None:
    """Value checks run once per eager call (skipped inside torch.compile): finite inputs, and
    at least one real token in every caption (a row of padding only has nothing to attend to)."""
    check_finite("x", x)
    check_finite("t", t.float())
    check_finite("context", context)
    if context_mask is not None and not bool(context_mask.any(1).all()):
        raise ValueError("context_mask: every caption needs at least one real (True) token; got a row of "
                         "padding only")

# %%
# | export
@add_to_class(TextDiT)
def forward(self, x: torch.Tensor, t, context=None, context_mask=None, pooled=None, resolution=None,
            aspect_ratio=None) -> torch.Tensor:
    t, context, context_mask, pooled, resolution, aspect_ratio = text_dit_inputs(
        self, x, t, context, context_mask, pooled, resolution, aspect_ratio)
    x = x.to(self.x_embedder.proj.weight.dtype)  # float64 / fp16 input follows the model's dtype
    if not torch.compiler.is_compiling():  # eager calls get value checks; compiled graphs stay whole
        self.check_values(x, t, context, context_mask)
    B, _, H, W = x.shape
    h, w = H // self.config.patch_size, W // self.config.patch_size
    tokens = self.x_embedder(x) + self.pos_embed_for(h, w).to(x.dtype)  # (B, N, D)
    c = self.condition(t, pooled, resolution, aspect_ratio).to(tokens.dtype)  # (B, D)
    mod = self.t_block(c) if self.config.modulation == "adaln_single" else c  # (B, 6D) or (B, D)
    ctx = self.y_embedder(context.to(tokens.dtype))  # (B, T, D)
    for block in self.blocks:
        tokens = block(tokens, mod, ctx, context_mask)  # (B, N, D)
    out = self.final_layer(tokens, c)  # (B, N, p*p*C_out)
    return unpatchify(out, self.config.patch_size, h, w)  # (B, C_out, H, W)

# %%
# | export
@add_to_class(TextDiT)
@classmethod
def config_from_diffusers(cls, config: dict, **overrides) -> TextDiTConfig:
    """The TextDiTConfig of a diffusers PixArtTransformer2DModel config.json (the reader: the appendix);
    `TextDiT.from_pretrained` is chapter 05b's, shared by both families."""
    return config_from_diffusers_pixart(config, **overrides)

# %%
# | export
@add_to_class(TextDiT)
@staticmethod
def convert_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers PixArt weights -> ours (the key map: chapter 17a)."""
    return convert_diffusers_pixart(sd)
# %%
# | export
@add_to_class(TextDiT)
@classmethod
def from_original(cls, path: str | Path, num_heads: int | None = None, dtype=None, **overrides) -> TextDiT:
    """Load an original-layout PixArt-α/Σ checkpoint (`.pth` with a state_dict wrapper, or `.safetensors`);
    `dtype` as in `from_pretrained`."""
    sd = unwrap_state_dict(load_state_dict(path, resolve_dtype(dtype)))
    if "t_block.1.weight" not in sd:
        raise ValueError(f"path: {Path(path).name} is not a PixArt checkpoint (no t_block weights); a "
                         "facebookresearch DiT loads with tinydit.dit.DiT.from_original")
    return pixart_from_state_dict(cls, sd, Path(path).name, num_heads=num_heads, dtype=dtype, **overrides)

# %%
# | export
def text_dit_inputs(model: TextDiT, x, t, context, context_mask, pooled, resolution, aspect_ratio):
    """Shape, dtype and presence checks of a TextDiT call (metadata only: no device sync); returns
    (t, context, context_mask, pooled, resolution, aspect_ratio) ready for the forward pass."""
    cfg = model.config
    if isinstance(context, TextEmbeddings):  # tokens, mask and pooled in one argument
        context_mask = context.mask if context_mask is None else context_mask
        pooled = context.pooled if pooled is None and cfg.pooled_dim else pooled
        context = context.tokens
    # PixArt-style models recompute their position table, so any grid size is allowed
    t = check_latents(x, t, cfg, fixed_table=cfg.pos_base_size is None)
    B = x.shape[0]
    if context is None:
        if context_mask is not None:
            raise ValueError("context_mask: given without context; pass the caption tokens as context= too")
        context = model.null_context(B)
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != B:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context: expected text tokens of shape ({B}, T, {cfg.context_dim}), got {got}")
    if context.shape[2] != cfg.context_dim:
        raise ValueError(f"context: expected text tokens of width {cfg.context_dim} (the model's context_dim), "
                         f"got width {context.shape[2]}; is this the text encoder the model was built for?")
    context = context.to(x.device)  # text encoders often live on another device (CPU, offloaded)
    if context_mask is not None:
        context_mask = key_padding_mask("context_mask", context_mask, tuple(context.shape[:2])).to(x.device)
    if cfg.pooled_dim:
        if not isinstance(pooled, torch.Tensor) or pooled.shape != (B, cfg.pooled_dim):
            got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else pooled
            raise ValueError(f"pooled: this model adds a pooled text vector to the timestep embedding; "
                             f"expected shape ({B}, {cfg.pooled_dim}), got {got}")
        pooled = pooled.to(x.device)
    elif pooled is not None:
        raise ValueError("pooled: this model has no pooled-text embedder (pooled_dim=0); leave pooled=None")
    resolution, aspect_ratio = micro_conditions(cfg, resolution, aspect_ratio, B, x.device)
    return t, context, context_mask, pooled, resolution, aspect_ratio

# %%
# | export
def micro_conditions(cfg: TextDiTConfig, resolution, aspect_ratio, B: int, device) -> tuple:
    """PixArt-α 1024's size and aspect-ratio inputs as (B, 2), (B, 1) tensors; None for other models."""
    if not cfg.micro_conditions:
        if resolution is not None or aspect_ratio is not None:
            raise ValueError("resolution, aspect_ratio: this model has no micro-conditions; leave them None")
        return None, None
    if resolution is None or aspect_ratio is None:
        raise ValueError("resolution, aspect_ratio: this model (micro_conditions=True, PixArt-α 1024) needs "
                         "both, e.g. resolution=[[1024., 1024.]], aspect_ratio=[1.]")
    resolution = torch.as_tensor(resolution, dtype=torch.float32, device=device).reshape(-1, 2)
    aspect_ratio = torch.as_tensor(aspect_ratio, dtype=torch.float32, device=device).reshape(-1, 1)
    for name, v in (("resolution", resolution), ("aspect_ratio", aspect_ratio)):
        if v.shape[0] not in (1, B):
            raise ValueError(f"{name}: expected one value for the batch or one per sample ({B}), got {v.shape[0]}")
    return resolution.expand(B, 2), aspect_ratio.expand(B, 1)  # (B, 2), (B, 1)

# %%
# | export
def key_padding_mask(name: str, mask, shape: tuple[int, int]) -> torch.Tensor:
    """A (B, T) key-padding mask as booleans (True = real token). Integer 0/1 masks (the
    transformers convention) are accepted; float masks are refused: an additive mask (0 = attend,
    -inf = ignore) cast to bool would silently mean the opposite."""
    mask = torch.as_tensor(mask)
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name}: expected a boolean (or 0/1 integer) mask, True = real token; got dtype "
                        f"{mask.dtype}. An additive float mask (0 / -inf) means the opposite: convert it with `mask == 0`")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name}: expected shape (B, T) = {shape} (one flag per text token, True = real), "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not torch.compiler.is_compiling():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name}: an integer mask must hold only 0 and 1, got values {mask.unique().tolist()[:5]}")
    return mask.bool()

# %% [markdown]
# Stripped of its checks, the forward pass is a short recipe. Written with the model's own parts
# (so the weights are shared), it must give exactly what `forward` gives:

# %%
def text_dit_lesson(model, x, t, ctx, pad, pooled):
    """The book model's forward pass: patchify, condition, blocks, unpatchify."""
    p = model.config.patch_size
    h, w = x.shape[2] // p, x.shape[3] // p
    tokens = model.x_embedder(x) + model.pos_embed_for(h, w)  # (B, N, D)
    c = model.t_embedder(t) + model.pooled_embedder(pooled)  # (B, D): timestep + pooled text
    ctx = model.y_embedder(ctx)  # (B, T, D): text tokens projected to the model width
    for block in model.blocks:
        tokens = block(tokens, c, ctx, pad)  # adaLN-Zero blocks read c directly
    return unpatchify(model.final_layer(tokens, c), p, h, w)  # (B, C_out, H, W)


torch.manual_seed(0)
lesson_model = TextDiT(TextDiTConfig.preset("book-text", depth=2)).eval()
for prm in lesson_model.parameters():  # non-zero everywhere, so every path is exercised
    torch.nn.init.normal_(prm, std=0.05)
emb = book_text.encode(["a red circle", "a big blue square left of a green triangle"])
xl, tl = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
with torch.no_grad():
    torch.testing.assert_close(lesson_model(xl, tl, context=emb),
                               text_dit_lesson(lesson_model, xl, tl, emb.tokens, emb.mask, emb.pooled))
print("TextDiT.forward == the lesson forward")

# %% [markdown]
# ### The book model, and where each word looks
#
# The `book-text` preset is chapter 05's book DiT (6 blocks, width 192, 4×8×8 latents → 16 tokens)
# with cross-attention to the book encoder's 96-wide tokens and its 64-wide pooled vector added to
# the timestep embedding. Fresh from initialisation it predicts exactly zero (zero final layer) and
# every block is the identity (zero adaLN-Zero maps and cross-attention outputs).
#
# Fresh from initialisation its cross-attention maps are nearly uniform: nothing has taught a patch
# which word to read. Section 4 overfits it on a few captioned images and looks again.

# %%
from tinydit.dit import DiT


torch.manual_seed(0)
book_dit = TextDiT(TextDiTConfig.preset("book-text")).eval()
prompts = ["a red circle left of a blue square", "a big green triangle"]
text_emb = book_text.encode(prompts)  # tokens (2, T, 96), mask (2, T), pooled (2, 64)
x_lat = torch.randn(2, 4, 8, 8)  # (B, C, H, W) book latents
out = book_dit(x_lat, torch.tensor([500, 500]), context=text_emb)
print(f"book text DiT: {book_dit.num_params / 1e6:.2f} M parameters; context {tuple(text_emb.tokens.shape)} -> "
      f"output {tuple(out.shape)}; a DiT subclass: {isinstance(book_dit, DiT)}")
assert out.shape == x_lat.shape and (out == 0).all() and not isinstance(book_dit, DiT)
tok0 = torch.randn(2, 16, 192)
assert all(torch.equal(blk(tok0, torch.randn(2, 192), torch.randn(2, text_emb.tokens.shape[1], 192), text_emb.mask), tok0)
           for blk in book_dit.blocks)

# %% [markdown]
# Wrong inputs fail with a sentence, not a torch shape error: text tokens of the wrong width (a
# model built for one encoder fed by another), a mask of the wrong shape, a missing pooled vector.

# %%
for bad in (lambda: book_dit(x_lat, 10, context=torch.randn(2, 5, 77), pooled=text_emb.pooled),
            lambda: book_dit(x_lat, 10, context=text_emb.tokens, context_mask=text_emb.mask[:, :3], pooled=text_emb.pooled),
            lambda: book_dit(x_lat, 10, context=text_emb.tokens, context_mask=text_emb.mask),
            lambda: book_dit(x_lat, 10, context=text_emb.tokens, context_mask=(~text_emb.mask).float() * -1e9,
                             pooled=text_emb.pooled)):  # an additive float mask
    try:
        bad()
    except (ValueError, TypeError) as e:
        print(f"{type(e).__name__}:", e)
        assert str(e).split(":")[0] in ("context", "context_mask", "pooled")
    else:
        raise AssertionError("bad input was accepted")

# %% [markdown]
# ### adaLN-single, counted
#
# Built on the `meta` device (shapes without memory), PixArt-α XL/2 with adaLN-single and the same
# network with a per-block adaLN-Zero map:

# %%
with torch.device("meta"):
    pixart = TextDiT(TextDiTConfig.preset("PixArt-alpha-XL/2-1024"))
    per_block = TextDiT(TextDiTConfig.preset("PixArt-alpha-XL/2-1024", modulation="adaln_zero"))
saved = per_block.num_params - pixart.num_params
print(f"PixArt-alpha XL/2: {pixart.num_params / 1e6:.1f} M parameters with adaLN-single, "
      f"{per_block.num_params / 1e6:.1f} M with per-block adaLN-Zero: {saved / 1e6:.1f} M saved "
      f"({saved / per_block.num_params:.0%})")
assert 600e6 < pixart.num_params < 620e6  # the paper's 0.6 B

# %% [markdown]
# ## 4. Where each word looks, after a little training
#
# An untrained model's cross-attention is nearly uniform: no patch has a reason to prefer a word.
# To see the mechanism do something, we overfit a 2-block `book-text` model on 16 captioned images
# with chapter 05's verification loop. `overfit_single_batch` and `wiring_report` call
# `model(x_t, t, cond)`, so the same loop trains a text model when `cond` is a `TextEmbeddings`.

# %%
from tinydit import schedules, vae
from tinydit.attention import attention_weights
from tinydit.data import ShapesDataset
from tinydit.dit_measure import overfit_single_batch, wiring_report


scenes = ShapesDataset(16, seed=3)
images = torch.stack([scenes[i][0] for i in range(16)])  # (16, 3, 32, 32)
captions = [scenes[i][1] for i in range(16)]
with torch.no_grad():
    latents = vae.load_book_vae().to_latent(images)  # (16, 4, 8, 8)
    cond = book_text.encode(captions)  # tokens (16, T, 96), mask, pooled (16, 64)
ab = schedules.alphas_cumprod(schedules.make_betas("linear"))
torch.manual_seed(0)
student = TextDiT(TextDiTConfig.preset("book-text", depth=2, hidden_size=96, num_heads=4))
untrained = TextDiT(TextDiTConfig.preset("book-text", depth=2, hidden_size=96, num_heads=4))
untrained.load_state_dict(student.state_dict())
STEPS = 400 if FAST else 1500
t0 = time.perf_counter()
losses = overfit_single_batch(student, latents, cond, ab, steps=STEPS, lr=2e-3, seed=0)
print(f"{STEPS} steps in {time.perf_counter() - t0:.1f} s: loss {losses[0]:.3f} -> {sum(losses[-50:]) / 50:.3f}")
report = wiring_report(student, latents, cond, ab)
print({k: round(v, 4) for k, v in report.items()})
assert sum(losses[-50:]) / 50 < 0.25 and report["timestep_gain"] > 0 and report["token_mixing"] > 0


# %%
def cross_attention_maps(model: TextDiT, x: torch.Tensor, t: int, emb) -> torch.Tensor:
    """The last block's cross-attention weights (B, heads, N, T), caught with a forward hook."""
    seen = {}
    block = model.blocks[-1]
    hook = block.cross_attn.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    with torch.no_grad():
        model(x, t, context=emb)
        hook.remove()
        x_in, ctx, mask = seen["args"]
        q, k, _ = block.cross_attn.qkv_heads(x_in, ctx)  # (B, heads, N|T, hd)
        return attention_weights(q, k, mask)  # (B, heads, N, T)


def spread(maps: torch.Tensor, mask: torch.Tensor) -> float:
    """How far the maps are from uniform: std over patches of each real token's weight, averaged."""
    per_token = maps.mean(1).std(1)  # (B, T): over the N patches, heads averaged
    return float(per_token[mask].mean())


x_noisy, _ = schedules.add_noise(latents, torch.full((16,), 200), ab, generator=torch.Generator().manual_seed(1))
trained_maps = cross_attention_maps(student, x_noisy, 200, cond)
untrained_maps = cross_attention_maps(untrained, x_noisy, 200, cond)
print(f"spread of the maps: untrained {spread(untrained_maps, cond.mask):.4f}, "
      f"after overfitting {spread(trained_maps, cond.mask):.4f}")
assert torch.allclose(trained_maps.sum(-1), torch.ones_like(trained_maps[..., 0]), atol=1e-5)
assert (trained_maps[~cond.mask[:, None, None, :].expand_as(trained_maps)] == 0).all()  # padding is never read
assert spread(trained_maps, cond.mask) > 2 * spread(untrained_maps, cond.mask)

# %% [markdown]
# Pick an image and edit its caption: each panel shows how strongly each of the 4×4 patches (8×8
# pixels each) reads that token, in the last block, heads averaged. Swap a colour or a shape word and
# watch which panels change. (Only 16 images trained this model, so expect the maps to be
# suggestive, not crisp; chapter 09 trains the real book model.)

# %%
import ipywidgets as widgets


def show_maps(index: int = 0, caption: str = captions[0]):
    emb = book_text.encode([caption or " "])
    maps = cross_attention_maps(student, x_noisy[index:index + 1], 200, emb)[0].mean(0)  # (N, T)
    words = book_text.tokenizer.convert_ids_to_tokens(book_text.tokenizer(caption)["input_ids"])
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.25 * (len(words) + 1), 1.7))
    axes[0].imshow(((images[index] + 1) / 2).permute(1, 2, 0))
    axes[0].set_title("image", fontsize=7)
    for j, (ax, word) in enumerate(zip(axes[1:], words)):
        ax.imshow(maps[:, j].reshape(4, 4), cmap="magma", vmin=0, vmax=float(maps.max()))
        ax.set_title(word.replace("<|", "").replace("|>", ""), fontsize=7)
    for ax in axes:
        ax.axis("off")
    plt.show()


show_maps(0, captions[0])  # a static first picture for the printed book
widgets.interact(show_maps, index=widgets.IntSlider(0, 0, 15), caption=widgets.Text(captions[0]))

# %% [markdown]
# ### The null caption
#
# Classifier-free guidance (chapter 11) needs an unconditional prediction. PixArt learns one: the
# `y_embedding` table (120 rows for α, 300 for Σ) replaces the T5 tokens of a dropped caption during
# training, and `model(x, t)` with no context uses it. (PixArt's inference scripts pass the prompt's
# own mask along with it.) The book model has no such table; its null caption is the encoding of an
# empty prompt, `book_text.encode([""])`: just the start and end tokens.

# %%
torch.manual_seed(0)
with_null = TextDiT(TextDiTConfig(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=4, context_dim=24,
                                  caption_tokens=12, pos_base_size=4, interpolation_scale=8 / 64))
xn = torch.randn(2, 4, 8, 8)
assert torch.equal(with_null(xn, 10), with_null(xn, 10, context=with_null.null_context(2)))
empty = book_text.encode([""])
print("null caption of the book model:", book_text.tokenizer.convert_ids_to_tokens(
    book_text.tokenizer("")["input_ids"]), "->", tuple(empty.tokens.shape), "pooled", tuple(empty.pooled.shape))
assert empty.mask.sum() == 2

# %% [markdown]
# ## Summary
#
# - adaLN-single (07a) saves about a quarter of PixArt-α's parameters (counted above on the `meta`
#   device).
# - `TextDiT` is a sibling of `DiT` built from the same parts; `TextDiTConfig` presets cover
#   PixArt-α/Σ XL/2 and `book-text`. Bad input (wrong widths, float masks, missing pooled vector)
#   fails with a sentence.
# - Overfitting 16 captioned images turns near-uniform cross-attention maps into maps several
#   times more spread (measured above), and the wiring report shows the model reads t and mixes tokens.
# - PixArt loads from diffusers' and the original layout and matches diffusers to $10^{-5}$; the key
#   maps are in chapter 17; `load_transformer` reads any DiT or PixArt file or folder.
#
# ## Exercises
#
# 1. Count the parameters of `book-text` with `modulation="adaln_single"` and with `"adaln_zero"`.
#    Which share does adaLN-Zero take at width 192, and why is it so much larger than PixArt's 26 %?
# 2. In the widget, replace the colour word of a caption with one the image does not show. Do the
#    maps of the shape word change? What does that say about how the model combines words?
# 3. Train the `student` with the pooled vector zeroed (`cond.pooled * 0`). Does the loss still
#    fall? Which path carries the caption now?

# %% [markdown]
# ## Appendix: loading PixArt checkpoints
#
# `TextDiT.from_original` reads the original PixArt-α/Σ `.pth` files and `TextDiT.from_pretrained`
# diffusers' `PixArtTransformer2DModel` folders; `load_transformer(path_or_id)` reads any DiT or PixArt
# file or folder, dispatching on its contents. Their configs are read here, from the weights or from
# diffusers' config.json; the key maps both ways and the parity with diffusers are in chapter 17.

# %%
# | export
def config_from_diffusers_pixart(d: dict, **overrides) -> TextDiTConfig:
    """TextDiTConfig from a diffusers PixArtTransformer2DModel config.json."""
    if transformer_kind(d) != "PixArtTransformer2DModel":
        raise ValueError(f"config: expected a PixArtTransformer2DModel config, got {d.get('_class_name')!r} "
                         f"(norm_type={d.get('norm_type')!r})")
    heads, head_dim = d.get("num_attention_heads", 16), d.get("attention_head_dim", 72)
    hidden = heads * head_dim
    unsupported = {k: d.get(k) for k, ok in (("norm_type", "ada_norm_single"), ("norm_elementwise_affine", False),
                                            ("attention_bias", True), ("activation_fn", "gelu-approximate"),
                                            ("attention_type", "default")) if d.get(k, ok) != ok}
    if d.get("caption_channels") is None:
        unsupported["caption_channels"] = None
    if d.get("cross_attention_dim", hidden) != hidden:
        unsupported["cross_attention_dim"] = d["cross_attention_dim"]
    if unsupported:
        raise ValueError(f"config: PixArt options tinydit does not implement: {unsupported}")
    in_ch = d.get("in_channels", 4)
    out_ch = d.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"config: out_channels={out_ch} for in_channels={in_ch}; expected the same or twice as many")
    sample, patch = d.get("sample_size", 128), d.get("patch_size", 2)
    micro = d.get("use_additional_conditions")
    cfg = dict(input_size=sample, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=d.get("num_layers", 28),
               num_heads=heads, learn_sigma=out_ch == 2 * in_ch, norm_eps=d.get("norm_eps", 1e-6),
               context_dim=d["caption_channels"], modulation="adaln_single", caption_tokens=0,
               micro_conditions=(sample == 128) if micro is None else bool(micro),  # diffusers' default rule
               pos_base_size=sample // patch,
               # not stored: the original code's rule (latent side / 64: 0.5 at 256 px), where diffusers'
               # default, max(sample_size // 64, 1), gives 1 at 256 px
               interpolation_scale=d.get("interpolation_scale") or sample / 64)
    return TextDiTConfig(**{**cfg, **overrides})

# %%
# | export
def infer_pixart_config_from_original(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                                      **overrides) -> TextDiTConfig:
    """Infer a TextDiTConfig from a state dict in the original PixArt-α/Σ layout."""
    needed = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_block.1.weight", "y_embedder.y_proj.fc1.weight",
              "final_layer.linear.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"checkpoint: not a PixArt checkpoint in the original layout; missing {missing}")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"checkpoint: final layer gives {out_ch} channels for {in_ch} input channels")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if "pos_embed" in sd:
        input_size = math.isqrt(sd["pos_embed"].shape[1]) * p
    elif "input_size" in overrides:
        input_size = overrides["input_size"]
    else:
        raise ValueError("checkpoint: no 'pos_embed' to read the training resolution from; pass input_size= "
                         "(latent side: 32, 64, 128 for 256, 512, 1024 px)")
    y_emb = sd.get("y_embedder.y_embedding")
    cfg = dict(input_size=input_size, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
               num_heads=heads_for(depth, hidden, num_heads),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out_ch == 2 * in_ch,
               frequency_embedding_size=sd["t_embedder.mlp.0.weight"].shape[1],
               qk_norm="blocks.0.attn.q_norm.weight" in sd, context_dim=sd["y_embedder.y_proj.fc1.weight"].shape[1],
               modulation="adaln_single", caption_tokens=0 if y_emb is None else y_emb.shape[0],
               micro_conditions="csize_embedder.mlp.0.weight" in sd, pos_base_size=input_size // p,
               interpolation_scale=input_size / 64)
    return TextDiTConfig(**{**cfg, **overrides})

# %%
# | export
def pixart_from_state_dict(cls, sd: dict[str, torch.Tensor], name: str, num_heads: int | None = None,
                           dtype=None, **overrides) -> TextDiT:
    """Build `cls` (a TextDiT class) from an original-layout PixArt state dict, checking the stored
    position table against the one the config implies (`dtype`: the model's, None = float32)."""
    cfg = infer_pixart_config_from_original(sd, num_heads=num_heads, **overrides)
    table, stored = cls.position_table(cfg), sd.get("pos_embed")  # (1, T, D) each
    if stored is not None and stored.abs().sum() > 0 and stored.shape == table.shape:
        diff = (stored.float() - table).abs().max().item()
        if diff > max(1e-4, torch.finfo(stored.dtype).eps):  # a bf16 / fp16 copy is off by its rounding
            raise ValueError(f"interpolation_scale: the checkpoint's stored position table differs from the one for "
                             f"interpolation_scale={cfg.interpolation_scale} by {diff:.3g}; pass the "
                             "training resolution's interpolation_scale= (0.5, 1 or 2 at 256, 512, 1024 px)")
    return cls.from_weights(cfg, sd, f"PixArt checkpoint {name}", dtype)  # the table is recomputed, not read

# %%
# | export
def load_transformer(path_or_id: str | Path, subfolder: str | None = None, num_heads: int | None = None,
                     dtype=None, **overrides) -> DiT | TextDiT:
    """Load any transformer this book knows, dispatching on the files' contents.

    A file (`.pt`, `.pth`, `.safetensors`) is read in the original layout: PixArt-α/Σ when it has
    `t_block` weights, else facebookresearch DiT. A folder (or hub id) is read by its config.json:
    a diffusers `DiTTransformer2DModel` / `PixArtTransformer2DModel`, or a tinydit DiT / TextDiT.
    `dtype` ("bf16", "fp16", a torch dtype; None = float32) converts the weights while reading.
    """
    path, dtype = Path(path_or_id), resolve_dtype(dtype)
    if path.is_file():
        if subfolder is not None:
            raise ValueError(f"subfolder: {path} is a file; subfolder only applies to folders and hub ids")
        sd = unwrap_state_dict(load_state_dict(path, dtype))
        if "t_block.1.weight" in sd:
            return pixart_from_state_dict(TextDiT, sd, path.name, num_heads=num_heads, dtype=dtype, **overrides)
        cfg = infer_config_from_original(sd, num_heads=num_heads, **overrides)
        return DiT.from_weights(cfg, sd, f"DiT checkpoint {path.name}", dtype)
    if num_heads is not None:
        raise ValueError("num_heads: a model folder's config.json states its heads; pass num_heads only with a "
                         "single checkpoint file")
    folder = resolve_pretrained(path_or_id, subfolder)
    kind = transformer_kind(read_config_json(folder))
    if kind in ("TextDiT", "PixArtTransformer2DModel"):
        return TextDiT.from_pretrained(folder, dtype=dtype, **overrides)
    if kind in ("DiT", "DiTTransformer2DModel"):
        return DiT.from_pretrained(folder, dtype=dtype, **overrides)
    raise ValueError(f"path_or_id: {folder}/config.json describes a {kind!r} model; expected a DiT or PixArt "
                     "transformer (diffusers DiTTransformer2DModel / PixArtTransformer2DModel, or tinydit's own)")
