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
# # 06 · Text encoders and cross-attention
#
# Chapter 05's DiT was conditioned on a class label: one of 18 (colour, shape) pairs. A
# text-to-image model is conditioned on a **caption**, and a caption is not one vector but a
# sequence of words, each of which may matter to a different part of the picture ("a *red* circle
# *left of* a *blue* square"). This chapter builds the two halves of that:
#
# 1. **Text encoders** turn a list of prompts into token vectors. One interface serves all of them:
#    `encoder.encode(prompts) -> TextEmbeddings(tokens, mask, pooled)`. We wrap the two encoders that
#    real models use through `transformers` — CLIP's text tower (Radford et al., 2021, *Learning
#    Transferable Visual Models From Natural Language Supervision*) and T5's encoder (Raffel et al.,
#    2020, *Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer*) — and a
#    `DualTextEncoder` that combines them as SD3 does (Esser et al., 2024), with the big T5 kept off
#    the compute device until it is needed.
# 2. **The book's own text encoder**, trained here from scratch: a tiny CLIP text transformer with a
#    tokenizer built from our captions, trained contrastively against a small image encoder on the
#    shapes of chapter 01.
# 3. **Cross-attention in the DiT**: image tokens ask questions (queries), caption tokens answer
#    (keys and values). Two ways to modulate the blocks: adaLN-Zero on timestep + pooled text (the book
#    model, as SD3 uses the pooled CLIP vector) and PixArt's **adaLN-single** (Chen et al., 2023,
#    *PixArt-α*; 2024, *PixArt-Σ*), with loaders for PixArt checkpoints in diffusers' and the
#    original layout, checked against diffusers to $10^{-5}$.
#
# | tensor | shape | book | PixArt-α XL/2 at 1024² |
# |---|---|---|---|
# | token ids | $(B, T)$ | $(B, \le 32)$ | $(B, 120)$ |
# | text tokens `tokens` | $(B, T, D_\text{text})$ | $(B, T, 96)$ | $(B, 120, 4096)$ (T5-XXL) |
# | key-padding `mask` | $(B, T)$, True = real token | $(B, T)$ | $(B, 120)$ |
# | pooled text `pooled` | $(B, D_\text{pooled})$ or None | $(B, 64)$ | None |
# | image tokens (queries) | $(B, N, D)$ | $(B, 16, 192)$ | $(B, 4096, 1152)$ |
# | cross-attention map | $(B, \text{heads}, N, T)$ | $(B, 6, 16, T)$ | $(B, 16, 4096, 120)$ |
#
# This chapter exports `tinydit.text` and extends `tinydit.dit` with the text-conditioned model.

# %%
# | default_exp text

# %%
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)

# %% [markdown]
# ## 1. One interface for every text encoder
#
# Whatever the encoder, a diffusion model needs three things from a batch of prompts:
#
# - `tokens` $(B, T, D)$: one vector per token, what cross-attention reads;
# - `mask` $(B, T)$: which tokens are real (True) and which are padding (False). Captions have
#   different lengths but a batch is a rectangle, so short captions are padded; the mask keeps
#   attention from reading the padding;
# - `pooled` $(B, D_\text{pooled})$: one vector for the whole prompt, or None. CLIP has one (the
#   state at the end-of-text token, trained to match the image embedding); T5 does not.
#
# Bad input fails early and says what was wrong: an empty list, a prompt that is not a string, a
# single string where a list was expected. A prompt longer than the encoder's limit is truncated
# (that is what every pipeline does) with a warning that says how many tokens were dropped.

# %%
# | export
"""Text encoders for diffusion transformers, behind one interface.

`encoder.encode(prompts) -> TextEmbeddings(tokens (B, T, D), mask (B, T), pooled (B, D_p) | None)`
for CLIP's text tower (Radford et al. 2021), T5's encoder (Raffel et al. 2020), a dual encoder that
combines them as SD3 does (Esser et al. 2024) with the secondary encoder offloaded, and the book's
tiny CLIP text encoder trained contrastively on the shapes dataset.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tinydit
from tinydit.checkpoint import resolve_pretrained

BOOK_TEXT_ENCODER_DIR = Path(tinydit.__file__).resolve().parent / "assets" / "book_text_encoder"
TEXT_FILES = ("config.json", "*.safetensors", "*.json", "*.txt", "*.model")  # what a text encoder folder holds


@dataclass
class TextEmbeddings:
    """What every text encoder returns for a batch of B prompts."""

    tokens: torch.Tensor  # (B, T, D) one vector per token, what cross-attention reads
    mask: torch.Tensor  # (B, T) bool, True = real token, False = padding
    pooled: torch.Tensor | None = None  # (B, D_pooled) one vector per prompt (CLIP), or None (T5)

    def __post_init__(self):
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"tokens, mask: expected tokens (B, T, D) and mask (B, T), got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]):
            raise ValueError(f"pooled: expected (B, D_pooled) with B={self.tokens.shape[0]}, got "
                             f"{tuple(self.pooled.shape)}")
        self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Move (and optionally cast the float tensors of) the embeddings."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.mask.to(device), pooled)


def check_prompts(prompts) -> list[str]:
    """A non-empty list of strings, or a ValueError that says what was given instead."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts: expected a list of strings, got a single string {prompts[:40]!r}; "
                         "wrap it in a list: encode([prompt])")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}]: expected a string, got {type(p).__name__} ({p!r:.40})")
    return list(prompts)


def tokenize(tokenizer, prompts: list[str], max_length: int, padding: str = "max_length",
             what: str = "text encoder") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (B, T); truncates to `max_length` with a warning that
    says, per prompt, how many tokens were dropped."""
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > max_length:
            warnings.warn(f"prompts[{i}]: {n} tokens is more than the {what}'s limit of {max_length}; "
                          f"truncated, dropping the last {n - max_length} tokens", stacklevel=3)
    batch = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"].bool()  # (B, T) each


class TextEncoder(nn.Module):
    """The interface: `encode(prompts: list[str]) -> TextEmbeddings`.

    Subclasses set `width` (D of the tokens), `pooled_width` (or None) and `max_length`, and
    implement `_encode(prompts)`. `encode` checks the prompts and runs without gradients.
    """

    width: int
    pooled_width: int | None
    max_length: int

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        prompts = check_prompts(prompts)
        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError


def _local_folder(path_or_id, subfolder: str | None, what: str) -> Path:
    """`resolve_pretrained` with a one-line error naming the encoder when the hub is out of reach."""
    try:
        return resolve_pretrained(path_or_id, subfolder, filenames=TEXT_FILES)
    except OSError as e:
        raise OSError(f"{what}: {e}") from None


def _tokenizer_folder(path_or_id, subfolder: str | None, tokenizer_subfolder: str | None,
                      model_folder: Path, what: str) -> Path:
    """Where the tokenizer lives: given, beside the weights, or the diffusers sibling folder
    (`text_encoder` -> `tokenizer`, `text_encoder_2` -> `tokenizer_2`, ...)."""
    if tokenizer_subfolder is not None:
        return _local_folder(path_or_id, tokenizer_subfolder, what)
    if any((model_folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")):
        return model_folder
    if subfolder and subfolder.startswith("text_encoder"):
        return _local_folder(path_or_id, subfolder.replace("text_encoder", "tokenizer"), what)
    raise FileNotFoundError(f"{what}: no tokenizer files in {str(model_folder)!r}; pass tokenizer_subfolder=")

# %% [markdown]
# ## 2. CLIP and T5 through `transformers`
#
# **CLIP's text tower** is a causal transformer (each token sees only the tokens before it) trained
# so that the state at the end-of-text token (EOS), projected, has a high cosine similarity with the
# embedding of the matching image and a low one with every other image in the batch. Three readouts
# matter to diffusion models:
#
# - the **last** hidden layer after the final LayerNorm (SD 1.x, PixArt-free pipelines, SD3's CLIP tokens);
# - the **penultimate** hidden layer, before the final LayerNorm (SDXL; also "clip skip");
# - the **pooled** vector: the EOS state (`pooler_output`), or its projection into the joint space
#   (`CLIPTextModelWithProjection.text_embeds`, what SDXL and SD3 add to the timestep embedding).
#
# Because the attention is causal, the real tokens never see the padding after them, so CLIP runs
# without an attention mask (as in every Stable Diffusion pipeline) and `mask` only tells the DiT
# which tokens are real.
#
# **T5's encoder** is bidirectional (every token sees every other), so it *must* be given the
# attention mask, and it has no pooled output. PixArt-α reads 120 T5-XXL tokens, PixArt-Σ 300,
# SD3 256.
#
# Both load from a local folder or a hub id, including the `text_encoder` / `tokenizer` subfolders of
# a diffusers pipeline. An unreachable hub id fails in one line that says to pass a local folder.

# %%
# | export
class CLIPTextEncoder(TextEncoder):
    """CLIP text tower (Radford et al. 2021) behind the `TextEncoder` interface.

    `model`: a `transformers` `CLIPTextModel` or `CLIPTextModelWithProjection`. `layer`: "last"
    (after the final LayerNorm) or "penultimate" (the hidden state before the last layer, as SDXL).
    `pooled`: "projected" (`text_embeds`, needs the projection), "eos" (the EOS state,
    `pooler_output`) or "none"; "auto" picks "projected" when the model has a projection.
    """

    LAYERS = ("last", "penultimate")
    POOLED = ("auto", "projected", "eos", "none")

    def __init__(self, model, tokenizer, layer: str = "last", pooled: str = "auto",
                 max_length: int | None = None, padding: str = "max_length"):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer: expected one of {self.LAYERS}, got {layer!r}")
        if pooled not in self.POOLED:
            raise ValueError(f"pooled: expected one of {self.POOLED}, got {pooled!r}")
        has_projection = hasattr(model, "text_projection")
        if pooled == "auto":
            pooled = "projected" if has_projection else "eos"
        if pooled == "projected" and not has_projection:
            raise ValueError("pooled: 'projected' needs a CLIPTextModelWithProjection; this model has no "
                             "text_projection (use pooled='eos')")
        self.model, self.tokenizer, self.layer, self.pooled_mode, self.padding = model, tokenizer, layer, pooled, padding
        cfg = model.config
        limit = min(cfg.max_position_embeddings, getattr(tokenizer, "model_max_length", 10**9))
        self.max_length = limit if max_length is None else max_length
        if not 2 <= self.max_length <= cfg.max_position_embeddings:
            raise ValueError(f"max_length: expected 2..{cfg.max_position_embeddings} (the position table), "
                             f"got {max_length}")
        self.width = cfg.hidden_size
        self.pooled_width = {"projected": getattr(cfg, "projection_dim", None), "eos": cfg.hidden_size,
                             "none": None}[pooled]
        self.model.eval()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None,
                        tokenizer_subfolder: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **kwargs) -> CLIPTextEncoder:
        """Load a CLIP text tower and its tokenizer from a folder or hub id (e.g. the CLIP ViT-L/14
        text tower `openai/clip-vit-large-patch14`, or an SDXL pipeline with subfolder
        `text_encoder_2`). The projection head is used when the checkpoint has one."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        folder = _local_folder(path_or_id, subfolder, "CLIPTextEncoder")
        tok_folder = _tokenizer_folder(path_or_id, subfolder, tokenizer_subfolder, folder, "CLIPTextEncoder")
        config = json.loads((folder / "config.json").read_text())
        kwargs_model = {"dtype": dtype or torch.float32}
        if config.get("model_type") == "clip":  # a full CLIPModel (text + vision): keep the text tower
            from transformers import CLIPConfig

            full = CLIPConfig.from_pretrained(folder)
            text_config = full.text_config
            text_config.projection_dim = full.projection_dim  # the projection size lives on the full config
            model_cls, kwargs_model["config"] = CLIPTextModelWithProjection, text_config
        elif "CLIPTextModelWithProjection" in config.get("architectures", []):
            model_cls = CLIPTextModelWithProjection
        else:
            model_cls = CLIPTextModel
        model = model_cls.from_pretrained(folder, **kwargs_model).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tok_folder), **kwargs)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length, self.padding, "CLIP text encoder")
        ids, mask = ids.to(self.device), mask.to(self.device)  # (B, T) each
        text_model = self.model.text_model if hasattr(self.model, "text_projection") else self.model
        out = text_model(input_ids=ids, output_hidden_states=self.layer == "penultimate")  # causal: no mask needed
        tokens = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]  # (B, T, D)
        pooled = None
        if self.pooled_mode == "eos":
            pooled = out.pooler_output  # (B, D)
        elif self.pooled_mode == "projected":
            pooled = self.model.text_projection(out.pooler_output)  # (B, D_proj)
        return TextEmbeddings(tokens, mask, pooled)


class T5TextEncoder(TextEncoder):
    """T5 encoder (Raffel et al. 2020) behind the `TextEncoder` interface: bidirectional, so it is
    run with the attention mask; no pooled vector. `max_length`: 120 for PixArt-α, 300 for
    PixArt-Σ, 256 for SD3."""

    def __init__(self, model, tokenizer, max_length: int = 120, padding: str = "max_length"):
        super().__init__()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {max_length!r}")
        self.model, self.tokenizer, self.max_length, self.padding = model.eval(), tokenizer, max_length, padding
        self.width, self.pooled_width = model.config.d_model, None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None,
                        tokenizer_subfolder: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **kwargs) -> T5TextEncoder:
        """Load a `T5EncoderModel` and its tokenizer from a folder or hub id (e.g. a PixArt
        pipeline with subfolder `text_encoder`, or `google/t5-v1_1-xxl`)."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = _local_folder(path_or_id, subfolder, "T5TextEncoder")
        tok_folder = _tokenizer_folder(path_or_id, subfolder, tokenizer_subfolder, folder, "T5TextEncoder")
        model = T5EncoderModel.from_pretrained(folder, dtype=dtype or torch.float32).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tok_folder), **kwargs)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length, self.padding, "T5 text encoder")
        ids, mask = ids.to(self.device), mask.to(self.device)  # (B, T) each
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
        return TextEmbeddings(tokens, mask, None)

# %% [markdown]
# ## 3. The book's tokenizer, built from our captions
#
# Real tokenizers split text into sub-word pieces learned from a web corpus: CLIP uses byte-pair
# encoding with 49,408 pieces, T5 a SentencePiece unigram model with 32,000. Our captions come from a
# grammar of a few dozen words (chapter 01), so the right tokenizer is the simplest one: **one token
# per word**. We build it with the `tokenizers` library — a lower-casing normaliser, a whitespace /
# punctuation pre-tokeniser, a `WordLevel` model whose vocabulary is every word the captions use,
# and a post-processor that wraps each caption in CLIP's start and end tokens — and wrap it as a
# `transformers` tokenizer, so it saves and loads in the standard Hugging Face format
# (`tokenizer.json` + `tokenizer_config.json`) like any other.
#
# Ids 0-3 are the special tokens. The end-of-text id is deliberately not 2: `transformers`' CLIP
# treats `eos_token_id == 2` as a legacy config and pools at the *largest* id instead of at the EOS.

# %%
# | export
BOOK_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")  # ids 0, 1, 2, 3


def build_book_tokenizer(captions: Iterable[str], max_length: int = 32):
    """A word-level tokenizer (built with `tokenizers`) whose vocabulary is every word in `captions`.

    Lower-cases, splits on whitespace and punctuation, wraps each caption in `<|startoftext|>` ...
    `<|endoftext|>` (CLIP's convention), pads with `<pad>`; unknown words map to `<unk>`. Returned as
    a `transformers` fast tokenizer, so `save_pretrained` writes the standard HF files.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for c in captions for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(c))})
    if not words:
        raise ValueError("captions: expected at least one caption with words, got none")
    vocab = {t: i for i, t in enumerate(BOOK_SPECIAL_TOKENS)}
    vocab.update({w: len(BOOK_SPECIAL_TOKENS) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)

# %% [markdown]
# ### Token by token
#
# We build the tokenizer from the captions of 5,000 training samples and look at one caption the
# way the model sees it: a list of ids. Then a batch: short captions are padded with `<pad>` (id 0)
# and the mask marks the real tokens.

# %%
from tinydit.data import HELD_OUT, ShapesDataset

train_caps = [ShapesDataset(5000, seed=0)[i][1] for i in range(5000)]
book_tok = build_book_tokenizer(train_caps)
print(f"vocabulary: {len(book_tok)} tokens (4 special + {len(book_tok) - 4} words)")
caption = "a tiny red circle to the left of a big blue square on a gray background"
ids = book_tok(caption)["input_ids"]
print(f"{'token':>16s}  id")
for tok_id in ids:
    print(f"{book_tok.convert_ids_to_tokens(tok_id):>16s}  {tok_id}")
batch_ids, batch_mask = tokenize(book_tok, ["a red circle", caption], max_length=32, padding="longest")
print("ids ", batch_ids.tolist())
print("mask", batch_mask.int().tolist())
assert ids[0] == book_tok.bos_token_id == 2 and ids[-1] == book_tok.eos_token_id == 3
assert batch_mask.sum(1).tolist() == [5, len(ids)]
# every word the test split uses is in the vocabulary (same grammar), and unknown words map to <unk>
test_caps = [ShapesDataset(1000, seed=1, split="test")[i][1] for i in range(1000)]
assert all(book_tok.unk_token_id not in book_tok(c)["input_ids"] for c in test_caps)
print("'a pink circle' ->", book_tok.convert_ids_to_tokens(book_tok("a pink circle")["input_ids"]))

# %% [markdown]
# ## 4. The book's text encoder: a tiny CLIP, trained contrastively
#
# What should a text encoder for our shapes know? That "red" and "blue" are different, that
# "little", "small" and "tiny" are the same, that "a red circle left of a blue square" is not "a blue
# circle left of a red square". Nobody labels that; CLIP's trick is to learn it from pairs. Two
# encoders, one for captions and one for images, map into a shared $d$-dimensional space. For a
# batch of $B$ pairs with unit-length embeddings $t_i$ and $v_j$, the similarity matrix
# $S_{ij} = e^{\tau}\, t_i \cdot v_j$ (a learned temperature $\tau$) should be large on the diagonal
# (matching pairs) and small elsewhere. The **contrastive loss** is the cross-entropy of picking the
# right image for each caption and the right caption for each image:
#
# $$\mathcal L = \frac{1}{2B}\sum_{i=1}^{B}\Big[-\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
#   \;-\; \log \frac{e^{S_{ii}}}{\sum_j e^{S_{ji}}}\Big].$$
#
# The text side is a real `transformers` `CLIPTextModelWithProjection` with a tiny config (3 layers,
# width 96, 32 positions); the image side is a small convolutional network that keeps *where* things
# are (it flattens its last 4×4 feature map instead of averaging it away, because captions say "on
# the left"). After training we keep the text encoder and the image encoder (to measure retrieval);
# the DiT of chapter 07 reads the text encoder's tokens and its pooled vector.

# %%
# | export
@dataclass
class BookTextConfig:
    """Architecture of the book's text encoder and its image partner (CLIP-style, tiny)."""

    width: int = 96  # token width of the text transformer; ~40 words need little room
    layers: int = 3  # transformer layers: enough to bind colour to shape and order objects
    heads: int = 4  # attention heads (head_dim 24)
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * width, the transformer standard
    max_length: int = 32  # position table; the longest caption is about 21 tokens with BOS/EOS
    embed_dim: int = 64  # joint text-image space (CLIP's projection_dim); also the pooled width
    image_channels: tuple[int, ...] = (16, 32, 64)  # conv widths of the image tower, one per 2x downsampling
    image_size: int = 32  # the dataset's image side


def book_text_model(tokenizer, config: BookTextConfig | None = None):
    """A randomly initialised `CLIPTextModelWithProjection` sized by `config` for `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    c = config or BookTextConfig()
    hf = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=c.width, intermediate_size=c.mlp_ratio * c.width,
                        num_hidden_layers=c.layers, num_attention_heads=c.heads,
                        max_position_embeddings=c.max_length, projection_dim=c.embed_dim, hidden_act="gelu",
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(hf)


class ImageEncoder(nn.Module):
    """A small CNN for 32x32 images -> (B, embed_dim): stride-2 convolutions with GroupNorm, then a
    linear map of the *flattened* last feature map, so that positions survive (captions name them)."""

    def __init__(self, embed_dim: int = 64, channels: Sequence[int] = (16, 32, 64), image_size: int = 32):
        super().__init__()
        layers, c_in = [nn.Conv2d(3, channels[0], 3, padding=1), nn.GroupNorm(8, channels[0]), nn.GELU()], channels[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.proj = nn.Linear(c_in * side * side, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(1))  # (B, embed_dim)


def clip_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive (InfoNCE) loss of Radford et al. 2021 for B matching pairs (B, d) each."""
    t = F.normalize(text_emb, dim=-1)  # (B, d)
    v = F.normalize(image_emb, dim=-1)  # (B, d)
    logits = logit_scale.exp().clamp(max=100) * t @ v.T  # (B, B): caption i vs image j
    target = torch.arange(len(t), device=t.device)  # (B,)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

# %% [markdown]
# The training function renders `n_train` pairs once (the dataset is procedural, so this takes
# seconds), tokenises every caption, and runs AdamW with a linear warm-up and cosine decay. It is the
# function that produced the shipped weights (`python -m tinydit` exposes it too); `out_dir` writes
# the standard Hugging Face folder (`config.json`, `model.safetensors`, tokenizer files) plus the
# image tower and a `training.json` with the loss curve.

# %%
# | export
@dataclass
class BookEncoders:
    """The result of contrastive training: both towers, the temperature and the loss curve."""

    text_encoder: CLIPTextEncoder  # the part the DiT uses
    image_encoder: ImageEncoder  # kept to measure retrieval and attribute accuracy
    logit_scale: float  # learned log-temperature tau (similarities are scaled by e^tau)
    losses: list[float] = field(default_factory=list)  # contrastive loss of every step
    info: dict = field(default_factory=dict)  # settings, timing, evaluation numbers


def train_book_text_encoder(out_dir: str | Path | None = None, steps: int = 1500, batch_size: int = 128,
                            n_train: int = 20_000, lr: float = 1e-3, seed: int = 0,
                            config: BookTextConfig | None = None, disable: bool | None = None) -> BookEncoders:
    """Train the book's text encoder contrastively (CLIP loss, Radford et al. 2021) against a small
    image encoder on `ShapesDataset(n_train, split="train", seed=seed)`; save to `out_dir` if given."""
    from tqdm.auto import tqdm

    from tinydit.data import ShapesDataset

    for name, value in (("steps", steps), ("batch_size", batch_size), ("n_train", n_train)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if batch_size > n_train:
        raise ValueError(f"batch_size: expected at most n_train={n_train}, got {batch_size}")
    c = config or BookTextConfig()
    t0 = time.perf_counter()
    ds = ShapesDataset(n_train, size=c.image_size, seed=seed, split="train")
    images, captions = zip(*(ds[i] for i in range(n_train)))
    images = torch.stack(images)  # (N, 3, 32, 32)
    tokenizer = build_book_tokenizer(captions, c.max_length)
    ids, _ = tokenize(tokenizer, list(captions), c.max_length, "max_length", "book text encoder")  # (N, L)
    torch.manual_seed(seed)
    text_model = book_text_model(tokenizer, c)
    image_encoder = ImageEncoder(c.embed_dim, c.image_channels, c.image_size)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = [*text_model.parameters(), *image_encoder.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    losses = []
    text_model.train()
    image_encoder.train()
    for _ in tqdm(range(steps), desc="contrastive training", disable=disable):
        idx = torch.randint(0, n_train, (batch_size,), generator=g)  # (B,)
        batch_ids = ids[idx]  # (B, L)
        length = int((batch_ids == eos).int().argmax(1).max()) + 1  # trim padding: CLIP is causal
        text_emb = text_model(input_ids=batch_ids[:, :length]).text_embeds  # (B, d)
        loss = clip_loss(text_emb, image_encoder(images[idx]), logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    text_model.eval()
    image_encoder.eval()
    settings = dict(steps=steps, batch_size=batch_size, n_train=n_train, lr=lr, seed=seed)
    result = BookEncoders(CLIPTextEncoder(text_model, tokenizer, padding="longest"), image_encoder,
                          float(logit_scale.detach()), losses,
                          {"settings": settings, "config": asdict(c), "seconds": time.perf_counter() - t0})
    if out_dir is not None:
        save_book_encoders(result, out_dir)
    return result


def save_book_encoders(result: BookEncoders, out_dir: str | Path) -> None:
    """Write the text encoder in the standard HF format plus the image tower and `training.json`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.text_encoder.model.save_pretrained(out)
    result.text_encoder.tokenizer.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in result.image_encoder.state_dict().items()},
              out / "image_encoder.safetensors")
    info = {**result.info, "logit_scale": result.logit_scale, "losses": [round(x, 4) for x in result.losses]}
    (out / "training.json").write_text(json.dumps(info, indent=1))


def load_book_text_encoder(path: str | Path | None = None, device: str | torch.device = "cpu") -> CLIPTextEncoder:
    """The book's trained text encoder (shipped in the package, or from `path`): last-layer tokens
    (B, T, 96), pooled = the projected EOS state (B, 64), padded to the longest prompt."""
    folder = Path(path) if path is not None else BOOK_TEXT_ENCODER_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no book text encoder in {str(folder)!r} (expected config.json, "
                                "model.safetensors and tokenizer files); train one with "
                                "tinydit.text.train_book_text_encoder(out_dir=...)")
    return CLIPTextEncoder.from_pretrained(folder, device=device, padding="longest")


def load_book_image_encoder(path: str | Path | None = None) -> ImageEncoder:
    """The image tower trained together with the book's text encoder (for retrieval)."""
    from tinydit.checkpoint import check_and_load, load_state_dict

    folder = Path(path) if path is not None else BOOK_TEXT_ENCODER_DIR
    info = json.loads((folder / "training.json").read_text())
    c = BookTextConfig(**{**info["config"], "image_channels": tuple(info["config"]["image_channels"])})
    model = ImageEncoder(c.embed_dim, c.image_channels, c.image_size)
    check_and_load(model, load_state_dict(folder / "image_encoder.safetensors"), what="book image encoder")
    return model.eval()

# %% [markdown]
# ### How do we know it learned?
#
# Two measurements on the **test split** (a different seed, and it contains the `HELD_OUT` colour /
# shape pairs that training never showed):
#
# - **Caption → image retrieval, top-1.** Embed $n$ test captions and their $n$ images; for each
#   caption, pick the most similar image. *Exact* top-1 asks for the very image the caption was
#   written for; but "a small red circle" fits every small red circle on white, so we also count
#   *semantic* top-1: the picked image satisfies everything the caption says (objects, colours,
#   shapes, sizes, background, and positions where the caption names them).
# - **Zero-shot attribute accuracy.** For every single-object test image, score the 18 class prompts
#   "a {size} {colour} {shape}" — each averaged over sizes and backgrounds, CLIP's *prompt
#   ensembling* — and read the colour, the shape and the pair off the best one.
#
# On the held-out pairs both ask a compositional question: the encoder has seen "red" and
# "triangle" many times, never "red triangle".

# %%
# | export
def scene_matches(query, other, caption: str) -> bool:
    """Does scene `other` satisfy everything `caption` (written for scene `query`) says?"""
    from tinydit.data import POSITION_PHRASES

    if query.background != other.background or len(query.objects) != len(other.objects):
        return False
    if len(query.objects) == 2:  # the relation fixes both positions; the object order is free
        key = lambda s: sorted((o.color, o.shape, o.size, o.position) for o in s.objects)
        return key(query) == key(other)
    a, b = query.objects[0], other.objects[0]
    if (a.color, a.shape, a.size) != (b.color, b.shape, b.size):
        return False
    named = any(p in caption for p in POSITION_PHRASES[a.position])
    return not named or a.position == b.position


def class_prompts() -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The 18 (colour, shape) classes and, for each, its ensemble of prompts (sizes x backgrounds)."""
    from tinydit.data import COLORS, SHAPES

    classes = [(c, s) for c in COLORS for s in SHAPES]
    bgs = ("", " on a gray background", " on a black background")
    return classes, [[f"a {size} {c} {s}{bg}" for size in ("small", "large") for bg in bgs] for c, s in classes]


def embed_prompts(text_encoder: TextEncoder, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length pooled embeddings (N, d) of many prompts, in batches."""
    out = [text_encoder.encode(prompts[i:i + batch_size]).pooled for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)  # (N, d)


@torch.no_grad()
def evaluate_book_encoders(text_encoder: CLIPTextEncoder, image_encoder: ImageEncoder, n: int = 1000,
                           seed: int = 1) -> dict:
    """Retrieval top-1 (exact and semantic) and zero-shot colour / shape accuracy on
    `ShapesDataset(n, split="test", seed=seed)`, overall and on the `HELD_OUT` pairs."""
    from tinydit.data import HELD_OUT, ShapesDataset

    ds = ShapesDataset(n, seed=seed, split="test")
    images, captions = zip(*(ds[i] for i in range(n)))
    scenes = [ds.scene(i) for i in range(n)]
    dev = text_encoder.device
    t = embed_prompts(text_encoder, list(captions))  # (n, d)
    v = F.normalize(torch.cat([image_encoder.to(dev)(torch.stack(images[i:i + 256]).to(dev))
                               for i in range(0, n, 256)]).float(), dim=-1)  # (n, d)
    best = (t @ v.T).argmax(1).tolist()  # (n,) best image per caption
    exact = [b == i for i, b in enumerate(best)]
    semantic = [scene_matches(scenes[i], scenes[b], captions[i]) for i, b in enumerate(best)]
    held = [i for i in range(n) if any((o.color, o.shape) in HELD_OUT for o in scenes[i].objects)]
    classes, ensembles = class_prompts()
    flat = [p for e in ensembles for p in e]
    cls = F.normalize(embed_prompts(text_encoder, flat).reshape(len(classes), -1, t.shape[1]).mean(1), dim=-1)  # (18, d)
    single = [i for i in range(n) if len(scenes[i].objects) == 1]
    pred = (v[single] @ cls.T).argmax(1).tolist()  # (n_single,)
    truth = [(scenes[i].objects[0].color, scenes[i].objects[0].shape) for i in single]
    guess = [classes[k] for k in pred]
    mean = lambda xs: float(sum(xs) / len(xs)) if len(xs) else float("nan")

    def attrs(keep):
        pairs = [(g, tr) for g, tr, i in zip(guess, truth, single) if keep(i)]
        return dict(n=len(pairs), color=mean([g[0] == tr[0] for g, tr in pairs]),
                    shape=mean([g[1] == tr[1] for g, tr in pairs]), pair=mean([g == tr for g, tr in pairs]))

    held_set = set(held)
    return {
        "n": n,
        "retrieval_top1_exact": mean(exact),
        "retrieval_top1_semantic": mean(semantic),
        "heldout_queries": len(held),
        "heldout_retrieval_top1_exact": mean([exact[i] for i in held]),
        "heldout_retrieval_top1_semantic": mean([semantic[i] for i in held]),
        "attributes": attrs(lambda i: True),
        "heldout_attributes": attrs(lambda i: i in held_set),
    }

# %% [markdown]
# ## 4b. Training, in miniature, and the shipped result
#
# Under `TINYDIT_FAST` the notebook runs a few dozen steps of the same training function, to show it
# works; the numbers below come from the full run that produced the weights shipped in
# `tinydit/assets/book_text_encoder/` (the settings are stored beside them in `training.json`). To
# reproduce them: `train_book_text_encoder(out_dir="my_encoder")` with the defaults.

# %%
t0 = time.perf_counter()
mini = train_book_text_encoder(steps=20 if FAST else 200, batch_size=64, n_train=1000 if FAST else 5000, disable=True)
print(f"{len(mini.losses)} steps in {time.perf_counter() - t0:.1f} s: loss {mini.losses[0]:.2f} -> "
      f"{np.mean(mini.losses[-5:]):.2f} (chance level log(64) = {np.log(64):.2f})")
assert mini.losses[0] > np.mean(mini.losses[-5:])

# %%
book_text = load_book_text_encoder()
book_image = load_book_image_encoder()
shipped = json.loads((BOOK_TEXT_ENCODER_DIR / "training.json").read_text())
n_text_params = sum(p.numel() for p in book_text.parameters())
print(f"shipped text encoder: {n_text_params / 1e6:.2f} M parameters, width {book_text.width}, pooled "
      f"{book_text.pooled_width}; trained {shipped['settings']['steps']} steps x batch "
      f"{shipped['settings']['batch_size']} in {shipped['seconds'] / 60:.1f} min on 2 CPU cores")
losses = np.array(shipped["losses"])
smooth = np.convolve(losses, np.ones(25) / 25, mode="valid")
plt.figure(figsize=(6, 3))
plt.plot(losses, lw=0.5, alpha=0.4, label="per step")
plt.plot(np.arange(len(smooth)) + 12, smooth, label="moving average (25)")
plt.axhline(np.log(shipped["settings"]["batch_size"]), color="gray", ls="--", label="chance: log(batch)")
plt.xlabel("step")
plt.ylabel("contrastive loss")
plt.title("Training the book's text encoder (shipped run)")
plt.legend()
plt.show()
assert smooth[-1] < 0.5 * np.log(shipped["settings"]["batch_size"])

# %%
t0 = time.perf_counter()
metrics = evaluate_book_encoders(book_text, book_image, n=500 if FAST else 2000, seed=1)
print(f"evaluated in {time.perf_counter() - t0:.1f} s on {metrics['n']} test pairs "
      f"({metrics['heldout_queries']} contain a HELD_OUT pair {HELD_OUT})")
print(f"caption -> image top-1, exact:    {metrics['retrieval_top1_exact']:.1%} (chance {1 / metrics['n']:.2%})")
print(f"caption -> image top-1, semantic: {metrics['retrieval_top1_semantic']:.1%}; held-out pairs: "
      f"{metrics['heldout_retrieval_top1_semantic']:.1%}")
for name, a in (("all single-object images", metrics["attributes"]), ("held-out pairs only", metrics["heldout_attributes"])):
    print(f"zero-shot on {name} (n={a['n']}): colour {a['color']:.1%} (chance 16.7%), shape {a['shape']:.1%} "
          f"(chance 33.3%), pair {a['pair']:.1%} (chance 5.6%)")
assert metrics["retrieval_top1_exact"] > 100 / metrics["n"]  # far above chance (1 / n)
assert metrics["retrieval_top1_semantic"] > 0.85 and metrics["heldout_retrieval_top1_semantic"] > 0.8
assert metrics["attributes"]["color"] > 0.95 and metrics["attributes"]["shape"] > 0.9
assert metrics["heldout_attributes"]["color"] > 0.85 and metrics["heldout_attributes"]["shape"] > 0.8

# %% [markdown]
# ### What the encoder thinks is similar
#
# Cosine similarities of the pooled embeddings of a few captions. Paraphrases ("little" / "tiny",
# "in the middle" / "in the center") should sit close together; a change of colour, of shape, or
# of which object is on the left should push captions apart.

# %%
probe = ["a small red circle", "a tiny red circle", "a little red circle in the middle",
         "a small blue circle", "a small red square", "a big red circle",
         "a red circle left of a blue square", "a blue circle left of a red square",
         "a red circle right of a blue square", "a small red circle on a black background"]
emb = embed_prompts(book_text, probe)  # (10, d), unit length
sim = (emb @ emb.T).numpy()  # (10, 10)
fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
ax.set_xticks(range(len(probe)), probe, rotation=70, ha="right", fontsize=8)
ax.set_yticks(range(len(probe)), probe, fontsize=8)
for i in range(len(probe)):
    for j in range(len(probe)):
        ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if sim[i, j] < 0.5 else "k")
fig.colorbar(im, ax=ax, shrink=0.7)
ax.set_title("cosine similarity of pooled caption embeddings")
plt.tight_layout()
plt.show()
print(f"paraphrase (small/tiny) {sim[0, 1]:.2f}; colour change {sim[0, 3]:.2f}; shape change {sim[0, 4]:.2f}; "
      f"swapped colours {sim[6, 7]:.2f}")
assert sim[0, 1] > sim[0, 3] and sim[0, 1] > sim[0, 4] and sim[6, 7] < sim[6, 6] - 0.05

# %% [markdown]
# ### Bad input
#
# Every encoder shares these checks: an empty list, a non-string prompt and a bare string fail with
# a sentence; a prompt longer than the limit (32 tokens for the book encoder, 77 for CLIP) is
# truncated with a warning that counts the dropped tokens.

# %%
for bad in ([], ["a red circle", 7], "a red circle"):
    try:
        book_text.encode(bad)
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError(f"{bad!r} was accepted")
long_prompt = " ".join(["a big red circle left of a small blue square"] * 4)  # 40 words
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    long_emb = book_text.encode([long_prompt, "a red circle"])
print("UserWarning:", caught[0].message)
assert len(caught) == 1 and "dropping the last 10 tokens" in str(caught[0].message)
assert long_emb.tokens.shape[1] == book_text.max_length and long_emb.mask[1].sum() == 5

# %% [markdown]
# ## 5. Two encoders at once, and keeping the big one out of the way
#
# SD3 (Esser et al., 2024) reads three text encoders: two CLIPs for the pooled vector and short
# tokens, and T5-XXL for long, detailed token sequences. PixArt reads T5 alone. The pattern we build
# is SD3's, with one CLIP as the **primary** encoder (its pooled vector conditions adaLN) and T5 as
# the optional **secondary**: its tokens join the sequence after CLIP's. The two token widths differ
# (768 vs 4096 at real scale), so the narrower one is **zero-padded** to the common width, as SD3
# pads CLIP's 2048-wide states to T5's 4096; the DiT's caption projection then learns one linear map
# for both:
#
# $$\text{tokens} = \big[\,\operatorname{pad}_D(\text{CLIP tokens}) \;\|\; \operatorname{pad}_D(\text{T5 tokens})\,\big]
#   \in \mathbb R^{B \times (T_1 + T_2) \times D},\qquad \text{mask} = [\,m_1 \,\|\, m_2\,].$$
#
# **Offloading.** T5-XXL's encoder has about 4.7 B parameters: 9.5 GB in bf16, more than the whole
# DiT. It runs once per prompt, not once per denoising step, so it does not need to *live* on the GPU.
# `DualTextEncoder` keeps it off the compute device — parked in CPU memory (`offload="cpu"`) or not in
# memory at all (`offload="disk"`: the weights are written once to a safetensors file and the
# parameters become storage-less `meta` tensors) — brings it in only while it encodes, and releases
# it right after. A small LRU cache of T5 outputs means a repeated prompt (the negative prompt, a
# prompt re-run with another seed) does not bring it in at all.
#
# Moving parameters must not break weight tying (T5 shares its input embedding between `shared` and
# `encoder.embed_tokens`; `module.to("meta")` silently unties them). So we swap each *unique*
# parameter in place (`torch.utils.swap_tensors`): every module that holds it sees the new storage.

# %%
# | export
def where(module: nn.Module) -> str:
    """The device(s) a module's parameters live on, e.g. 'cpu', 'meta' or 'cuda:0'."""
    devices = sorted({str(p.device) for p in module.parameters()})
    return "+".join(devices) if devices else "no parameters"


def _swap_tensors(module: nn.Module, make) -> None:
    """Replace every unique parameter and buffer by `make(name, tensor)`, in place, so that tied
    weights stay tied (each Python object keeps its identity; only its storage changes)."""
    with torch.no_grad():
        for name, p in list(module.named_parameters()):
            torch.utils.swap_tensors(p, nn.Parameter(make(name, p), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers()):
            torch.utils.swap_tensors(b, make(name, b))


class DualTextEncoder(TextEncoder):
    """A primary encoder (CLIP: tokens + pooled) and an optional secondary (T5: tokens), SD3-style
    (Esser et al. 2024): tokens zero-padded to a common width and concatenated along the sequence,
    masks concatenated, pooled from the primary.

    `offload`: where the secondary waits between encodes: None (stays on `device`), "cpu" (CPU
    memory) or "disk" (weights in a safetensors file under `offload_dir`, parameters on `meta`).
    `cache_size`: how many prompts' secondary outputs to remember (0 = no cache).
    `events` records, step by step, where the secondary's weights were.
    """

    OFFLOAD = (None, "cpu", "disk")

    def __init__(self, primary: TextEncoder, secondary: TextEncoder | None = None, width: int | None = None,
                 offload: str | None = "cpu", device: str | torch.device | None = None,
                 offload_dir: str | Path | None = None, cache_size: int = 32):
        super().__init__()
        if offload not in self.OFFLOAD:
            raise ValueError(f"offload: expected one of {self.OFFLOAD}, got {offload!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size: expected an integer >= 0, got {cache_size!r}")
        widths = [primary.width] + ([secondary.width] if secondary is not None else [])
        self.width = max(widths) if width is None else width
        if self.width < max(widths):
            raise ValueError(f"width: expected at least the widest encoder's {max(widths)}, got {width}")
        self.primary = primary
        object.__setattr__(self, "secondary", secondary)  # not a submodule: .to() must not move it
        self.compute_device = torch.device(device) if device is not None else primary.device
        self.primary.to(self.compute_device)
        self.offload, self.cache_size = offload, cache_size
        self.pooled_width = primary.pooled_width
        self.max_length = primary.max_length + (secondary.max_length if secondary is not None else 0)
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = self.cache_misses = 0
        self.events: list[tuple[str, str]] = []
        self._weights_file = None
        if secondary is not None:
            if offload == "disk":
                self._weights_file = Path(offload_dir or tempfile.mkdtemp(prefix="tinydit_offload_")) / "secondary.safetensors"
            self._release() if offload else secondary.to(self.compute_device)
            self._log("built")

    @property
    def device(self) -> torch.device:
        return self.compute_device

    def _apply(self, fn, *args, **kwargs):
        """`.to(device)` moves the primary (a submodule); follow it, and move a resident secondary."""
        super()._apply(fn, *args, **kwargs)
        self.compute_device = self.primary.device
        if self.secondary is not None and not self.offload:
            self.secondary.to(self.compute_device)
        return self

    def where(self) -> dict[str, str]:
        """Where each encoder's weights are right now."""
        return {"primary": where(self.primary), "secondary": where(self.secondary) if self.secondary is not None else "-"}

    def _log(self, step: str) -> None:
        self.events.append((step, where(self.secondary)))

    def _bring_in(self) -> None:
        if self.offload == "disk":
            from safetensors.torch import load_file

            weights = load_file(str(self._weights_file), device=str(self.compute_device))
            _swap_tensors(self.secondary, lambda name, t: weights[name])
        elif self.offload == "cpu":
            _swap_tensors(self.secondary, lambda name, t: t.detach().to(self.compute_device))
        self._log("brought in")

    def _release(self) -> None:
        if self.offload == "disk":
            if not self._weights_file.is_file():  # first release: write the weights once
                from safetensors.torch import save_file

                self._weights_file.parent.mkdir(parents=True, exist_ok=True)
                state = {**dict(self.secondary.named_parameters()), **dict(self.secondary.named_buffers())}
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(self._weights_file))
            _swap_tensors(self.secondary, lambda name, t: torch.empty_like(t, device="meta"))
        elif self.offload == "cpu":
            _swap_tensors(self.secondary, lambda name, t: t.detach().to("cpu"))
        self._log("released")

    def _secondary_rows(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens (T, D2), mask (T,)) per prompt, from the cache or from one offloaded run."""
        rows = {}
        for p in prompts:
            if p in self.cache:
                self.cache.move_to_end(p)  # most recently used last
                rows[p] = self.cache[p]
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        self.cache_hits += sum(p in rows for p in prompts)
        if not missing:
            self._log("all prompts cached")
            return [rows[p] for p in prompts]
        self.cache_misses += len(missing)
        if self.offload:
            self._bring_in()
        hooks = [m.register_forward_pre_hook(lambda m, a: self._log("encoding")) for m in self.secondary.children()]
        try:
            emb = self.secondary.encode(missing)
        finally:
            for h in hooks:
                h.remove()
            if self.offload:
                self._release()
        for i, p in enumerate(missing):
            rows[p] = (emb.tokens[i].to("cpu"), emb.mask[i].to("cpu"))
            if self.cache_size:
                self.cache[p] = rows[p]
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # evict the least recently used
        return [rows[p] for p in prompts]

    def _pad_width(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.width - x.shape[-1]))  # (B, T, width): zeros on the right, as SD3

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        first = self.primary.encode(prompts)  # tokens (B, T1, D1), pooled (B, Dp)
        tokens, mask = self._pad_width(first.tokens), first.mask.to(self.compute_device)
        if self.secondary is not None:
            rows = self._secondary_rows(prompts)
            t2 = max(r[0].shape[0] for r in rows)
            sec = torch.stack([F.pad(t, (0, 0, 0, t2 - t.shape[0])) for t, _ in rows]).to(self.compute_device)  # (B, T2, D2)
            sec_mask = torch.stack([F.pad(m, (0, t2 - m.shape[0])) for _, m in rows]).to(self.compute_device)  # (B, T2)
            tokens = torch.cat([tokens, self._pad_width(sec).to(tokens.dtype)], dim=1)  # (B, T1 + T2, D)
            mask = torch.cat([mask, sec_mask], dim=1)  # (B, T1 + T2)
        return TextEmbeddings(tokens, mask, first.pooled)

# %% [markdown]
# ## 5b. The dual encoder and the offloading timeline
#
# We have no T5-XXL here (9.5 GB, and no network), so the secondary encoder is a **tiny T5 with
# random weights** built with `transformers` — the same class, the same code path, the same tied
# embedding. The primary is the book's CLIP. We ask for `offload="disk"`: between encodes the T5
# parameters are `meta` tensors (shape, no storage), so it costs no memory at all. `events` records,
# step by step, where the T5 weights were; the forward hook inside `encode` logs the device at the
# moment T5 actually runs.

# %%
from transformers import T5Config, T5EncoderModel, T5Tokenizer

torch.manual_seed(0)
t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in sorted({w for c in train_caps for w in c.split()})]
tiny_t5 = T5TextEncoder(T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_heads=4, relative_attention_num_buckets=8)),
                        T5Tokenizer(vocab=t5_vocab, extra_ids=0), max_length=24)
dual = DualTextEncoder(book_text, tiny_t5, offload="disk", device="cpu", cache_size=8)
print("after building:", dual.where())
e1 = dual.encode(["a red circle", "a blue square on a black background"])
e2 = dual.encode(["a red circle", "a blue square on a black background"])  # same prompts: cached
e3 = dual.encode(["a red circle", "a green triangle at the top"])  # one new prompt
print(f"tokens {tuple(e1.tokens.shape)}: CLIP's {book_text.width}-wide and T5's {tiny_t5.width}-wide tokens, "
      f"zero-padded to {dual.width} and concatenated; mask {tuple(e1.mask.shape)}; pooled {tuple(e1.pooled.shape)}")
print(f"cache: {dual.cache_hits} hits, {dual.cache_misses} misses")
print(f"{'step':>22s}   T5 weights on")
for step, device in dual.events:
    print(f"{step:>22s}   {device}")
states = [d for _, d in dual.events]
assert states[0] == "meta" and [d for s, d in dual.events if s == "encoding"] == ["cpu", "cpu"]
assert states[-1] == "meta" and dual.cache_hits == 3 and dual.cache_misses == 3
assert torch.equal(e1.tokens, e2.tokens) and e1.tokens.shape[-1] == max(book_text.width, tiny_t5.width)
assert tiny_t5.model.shared.weight is tiny_t5.model.encoder.embed_tokens.weight  # still tied

fig, ax = plt.subplots(figsize=(8, 1.8))
levels = {"meta": 0, "cpu": 1}
ax.step(range(len(states)), [levels[s] for s in states], where="mid", color="C3")
ax.set_xticks(range(len(states)), [s for s, _ in dual.events], rotation=30, ha="right", fontsize=7)
ax.set_yticks([0, 1], ["disk (meta)", "compute device (cpu)"])
ax.set_ylim(-0.3, 1.3)
ax.set_title("where the T5 weights are, step by step (offload='disk')", fontsize=9)
plt.show()

# %% [markdown]
# On a GPU the same mechanism keeps T5 off the card: with `offload="cpu"` the weights wait in CPU
# memory and visit the GPU only during `encode`, so the GPU's peak memory during denoising is the
# DiT's alone. This machine has no GPU, so the measurement below runs only where one is present.

# %%
if torch.cuda.is_available():
    for mode in (None, "cpu"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        d = DualTextEncoder(book_text, tiny_t5, offload=mode, device="cuda", cache_size=0)
        d.encode(["a red circle"])
        resident = torch.cuda.memory_allocated()
        print(f"offload={mode}: resident after encode {resident / 2**20:.1f} MiB, "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
        d._release() if mode else tiny_t5.to("cpu")
    book_text.to("cpu")
else:
    print("no CUDA device here: the GPU peak-memory comparison is skipped (the offloading mechanism itself "
          "was checked above on CPU/meta)")

# %% [markdown]
# The next cells extend `tinydit.dit` (they are exported into it, after chapter 05's cells). To run
# them here, the notebook first imports what chapter 05 defined.

# %%
from dataclasses import dataclass, replace

from tinydit.attention import BACKENDS, Attention
from tinydit.checkpoint import (
    check_and_load,
    load_state_dict,
    resolve_pretrained,
    unwrap_state_dict,
)
from tinydit.dit import (
    _HEADS_BY_WIDTH,
    DiT,
    DiTConfig,
    FinalLayer,
    Mlp,
    PatchEmbed,
    _from_original,
    _from_pretrained,
    diffusers_transformer_class,
    modulate,
    unpatchify,
)
from tinydit.embeddings import TimestepEmbedder, sincos_pos_embed_2d

# %% [markdown]
# ## 6. Cross-attention: image tokens read the caption
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
# same thing whether it is padded to 5 tokens or to 300. `CrossAttention` uses chapter 05's
# `attention()` with a `(B, T)` mask; its parameter names (`q_linear`, `kv_linear` holding $W_K$ and
# $W_V$ stacked, `proj`) are PixArt's, so original checkpoints load without renaming.
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

# %%
# | export dit
_MODULATIONS = ("adaln_single", "adaln_zero")  # chapter 06: the two ways a text-conditioned block is modulated

from tinydit.attention import RMSNorm, attention  # noqa: E402  (chapter 06 extends this module)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from image tokens x (B, N, D), keys and values from text
    tokens (B, T, D_ctx), with a (B, T) key-padding mask (True = real token). Parameter names follow
    PixArt's `MultiHeadCrossAttention` (Chen et al. 2023): `q_linear`, `kv_linear` (k and v stacked),
    `proj`."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
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

    def qkv_heads(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        T = context.shape[1]
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
            raise ValueError(f"context: expected ({B}, T, {self.context_dim}), got {tuple(context.shape)}")
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        kv = self.kv_linear(context).reshape(B, T, 2, self.num_heads, self.head_dim)  # (B, T, 2, heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, heads, T, hd) each
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x, context)  # (B, heads, N|T, hd)
        out = attention(q, k, v, mask=mask, backend=self.backend)  # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


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


class TextDiTBlock(nn.Module):
    """Self-attention -> cross-attention -> MLP. `modulation="adaln_single"`: a per-block
    `scale_shift_table` (6, D) added to the shared modulation (PixArt-α, Chen et al. 2023), no norm
    before cross-attention; `"adaln_zero"`: a per-block adaLN-Zero map from c (Peebles & Xie 2023)
    and a LayerNorm before cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, modulation: str = "adaln_single",
                 qk_norm: bool = False, attn_backend: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        if modulation not in _MODULATIONS:
            raise ValueError(f"modulation: expected one of {_MODULATIONS}, got {modulation!r}")
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

# %% [markdown]
# The model is a subclass of chapter 05's `DiT` (so `isinstance(model, dit.DiT)` holds and the
# patchify, position table and unpatchify are shared), with its own config subclass: each new field
# says why it exists. Presets: PixArt-α/Σ XL/2 and `book-text`, the book's text-conditioned DiT.
# `model(x, t, context=..., context_mask=...)` also accepts a `TextEmbeddings` as `context`
# (tokens, mask and pooled in one argument); `pooled=` passes the pooled vector explicitly.

# %%
# | export dit
@dataclass
class TextDiTConfig(DiTConfig):
    """A text-conditioned DiT: PixArt-α/Σ (adaLN-single) or the book model (adaLN-Zero + pooled text).
    Presets: `TextDiTConfig.preset("PixArt-alpha-XL/2-1024")`, `"PixArt-Sigma-XL/2-1024"`,
    `"PixArt-XL/2-512"`, `"PixArt-XL/2-256"`, `"book-text"`."""

    num_classes: int = 1  # unused: text models read captions, not labels (kept for DiTConfig's checks)
    class_dropout_prob: float = 0.0  # unused: caption dropout for CFG happens in training (chapter 07)
    context_dim: int = 4096  # width of the text tokens read (T5-XXL 4096; the book encoder 96)
    modulation: str = "adaln_single"  # "adaln_single" (PixArt: one shared map + per-block tables) or "adaln_zero"
    pooled_dim: int = 0  # width of the pooled text vector added to the timestep embedding (SD3-style); 0 = none
    caption_tokens: int = 0  # rows of the learned null caption y_embedding (PixArt-α 120, Σ 300); 0 = none
    micro_conditions: bool = False  # PixArt-α 1024: add resolution and aspect-ratio embeddings to e_t
    pos_base_size: int | None = None  # PixArt: grid the position table is scaled to (input_size // patch); None = DiT's raw indices
    interpolation_scale: float = 1.0  # PixArt: position scale s, 0.5 / 1 / 2 at 256 / 512 / 1024 px

    def __post_init__(self):
        super().__post_init__()
        if self.modulation not in _MODULATIONS:
            raise ValueError(f"modulation: expected one of {_MODULATIONS}, got {self.modulation!r}")
        for name in ("context_dim",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("pooled_dim", "caption_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions: need hidden_size divisible by 3 (resolution 2/3 + aspect "
                             f"ratio 1/3 of the width), got hidden_size={self.hidden_size}")
        if self.pos_base_size is not None and self.pos_base_size <= 0:
            raise ValueError(f"pos_base_size: expected a positive number or None, got {self.pos_base_size!r}")
        if self.interpolation_scale <= 0:
            raise ValueError(f"interpolation_scale: expected a positive number, got {self.interpolation_scale!r}")

    @classmethod
    def preset_names(cls) -> list[str]:
        return ["PixArt-XL/2-256", "PixArt-XL/2-512", "PixArt-alpha-XL/2-1024", "PixArt-Sigma-XL/2-1024", "book-text"]

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


class TextDiT(DiT):
    """A DiT conditioned on text through cross-attention (PixArt-α/Σ, Chen et al. 2023/2024; the book
    model). Parameter names follow the original PixArt code.

    `model(x, t, context=tokens, context_mask=mask)`: x (B, C, H, W), t (B,) or scalar, context
    (B, T, context_dim) text tokens (or a `TextEmbeddings`), context_mask (B, T) True = real token;
    `pooled` (B, pooled_dim) when the config has `pooled_dim`; `resolution` (B, 2) as (height, width)
    in pixels and `aspect_ratio` (B,) when it has `micro_conditions`. `context=None` uses the learned
    null caption. Returns the raw output (B, C_out, H, W).
    """

    def __init__(self, config: TextDiTConfig | None = None):
        nn.Module.__init__(self)  # DiT's own __init__ builds a label embedder we do not want
        self.config = cfg = config if config is not None else TextDiTConfig()
        if not isinstance(cfg, TextDiTConfig):
            raise ValueError(f"config: expected a TextDiTConfig, got {type(cfg).__name__} (use DiT for class labels)")
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_size, flip_sin_to_cos=True,
                                           downscale_freq_shift=cfg.freq_shift)
        if cfg.micro_conditions:  # PixArt's SizeEmbedders: sinusoid + MLP per number, D/3 wide
            self.csize_embedder = TimestepEmbedder(D // 3, 256, flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
            self.ar_embedder = TimestepEmbedder(D // 3, 256, flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
        if cfg.pooled_dim:
            self.pooled_embedder = ProjMlp(cfg.pooled_dim, D, D, act="silu")
        if cfg.modulation == "adaln_single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(cfg.context_dim, D, cfg.caption_tokens)
        grid = cfg.input_size // cfg.patch_size
        table = sincos_pos_embed_2d(D, grid, base_size=cfg.pos_base_size, interpolation_scale=cfg.interpolation_scale)
        self.register_buffer("pos_embed", table[None])  # (1, T, D), fixed
        self.blocks = nn.ModuleList([
            TextDiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.modulation, cfg.qk_norm, cfg.attn_backend, cfg.norm_eps)
            for _ in range(cfg.depth)
        ])
        if cfg.modulation == "adaln_single":
            self.final_layer = T2IFinalLayer(D, cfg.patch_size, cfg.out_channels)
        else:
            self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's initialisation (after DiT's): Xavier linears, N(0, 0.02) embedding MLPs, zero
        cross-attention outputs and final layer; adaLN-Zero maps zero as well."""
        self._init_linears_and_patch_embed()
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
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.modulation == "adaln_zero":
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if isinstance(self.final_layer, FinalLayer):
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)

    def null_context(self, batch_size: int) -> torch.Tensor:
        """The learned null caption (B, T_null, context_dim) for the unconditional branch of CFG."""
        if self.y_embedder.y_embedding is None:
            raise ValueError("context: this model has no learned null caption (caption_tokens=0; diffusers' "
                             "PixArt folders do not store y_embedding); pass the text encoder's encoding of an "
                             "empty prompt '' as context, as diffusers' pipeline does")
        return self.y_embedder.y_embedding[None].expand(batch_size, -1, -1)  # (B, T_null, C)

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

    def _check_text_inputs(self, x, t, y, context, context_mask, pooled, resolution, aspect_ratio):
        cfg = self.config
        # PixArt-style models recompute their position table, so any grid size is allowed
        t = self._check_latents(x, t, fixed_table=cfg.pos_base_size is None)
        B = x.shape[0]
        if y is not None:
            raise ValueError("y: a text-conditioned DiT takes no class labels; pass the caption as context=")
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask: given without context; pass the caption tokens as context= too")
            context = self.null_context(B)
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != B:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context: expected text tokens of shape ({B}, T, {cfg.context_dim}), got {got}")
        if context.shape[2] != cfg.context_dim:
            raise ValueError(f"context: expected text tokens of width {cfg.context_dim} (the model's context_dim), "
                             f"got width {context.shape[2]}; is this the text encoder the model was built for?")
        context = context.to(x.device)  # text encoders often live on another device (CPU, offloaded)
        if pooled is not None:
            pooled = torch.as_tensor(pooled).to(x.device)
        if context_mask is not None:
            context_mask = torch.as_tensor(context_mask, device=x.device)
            if context_mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask: expected shape (B, T) = {tuple(context.shape[:2])} (one flag per "
                                 f"text token, True = real), got {tuple(context_mask.shape)}")
            context_mask = context_mask.bool()
            if not context_mask.any(1).all():
                raise ValueError("context_mask: every caption needs at least one real (True) token; got a row of "
                                 "padding only")
        if cfg.pooled_dim:
            if pooled is None or pooled.shape != (B, cfg.pooled_dim):
                got = None if pooled is None else tuple(pooled.shape)
                raise ValueError(f"pooled: this model adds a pooled text vector to the timestep embedding; "
                                 f"expected shape ({B}, {cfg.pooled_dim}), got {got}")
        elif pooled is not None:
            raise ValueError("pooled: this model has no pooled-text embedder (pooled_dim=0); leave pooled=None")
        if cfg.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("resolution, aspect_ratio: this model (micro_conditions=True, PixArt-α 1024) needs "
                                 "both, e.g. resolution=[[1024., 1024.]], aspect_ratio=[1.]")
            resolution = torch.as_tensor(resolution, dtype=torch.float32, device=x.device).reshape(-1, 2)
            aspect_ratio = torch.as_tensor(aspect_ratio, dtype=torch.float32, device=x.device).reshape(-1, 1)
            for name, v in (("resolution", resolution), ("aspect_ratio", aspect_ratio)):
                if v.shape[0] not in (1, B):
                    raise ValueError(f"{name}: expected one value for the batch or one per sample ({B}), "
                                     f"got {v.shape[0]}")
            resolution, aspect_ratio = resolution.expand(B, 2), aspect_ratio.expand(B, 1)  # (B, 2), (B, 1)
        elif resolution is not None or aspect_ratio is not None:
            raise ValueError("resolution, aspect_ratio: this model has no micro-conditions; leave them None")
        return t, context, context_mask, pooled, resolution, aspect_ratio

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

    def forward(self, x: torch.Tensor, t, y=None, context=None, context_mask=None, resolution=None,
                aspect_ratio=None, pooled=None) -> torch.Tensor:
        if hasattr(context, "tokens") and hasattr(context, "mask"):  # a TextEmbeddings from tinydit.text
            context_mask = context.mask if context_mask is None else context_mask
            if pooled is None and self.config.pooled_dim:
                pooled = context.pooled
            context = context.tokens
        t, context, context_mask, pooled, resolution, aspect_ratio = self._check_text_inputs(
            x, t, y, context, context_mask, pooled, resolution, aspect_ratio)
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

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (tinydit's own layout)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_class": "TextDiT", **self.config.to_dict()}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

# %% [markdown]
# ### The book model, and where each word looks
#
# The `book-text` preset is chapter 05's book DiT (6 blocks, width 192, 4×8×8 latents → 16 tokens)
# with cross-attention to the book encoder's 96-wide tokens and its 64-wide pooled vector added to
# the timestep embedding. Fresh from initialisation it predicts exactly zero (zero final layer) and
# every block is the identity (zero adaLN-Zero maps and cross-attention outputs).
#
# Below, for one prompt, the last block's cross-attention map (averaged over heads) over the 4×4
# latent grid of a generated 32×32 image, one panel per token. This model is **untrained** — chapter
# 07 trains it — so the maps are still arbitrary; what we can already check is the mechanics: every
# row of the map is a distribution over the real tokens, and padding receives exactly zero attention.

# %%
from tinydit.attention import attention_weights
from tinydit.dit import DiT, TextDiT, TextDiTConfig

torch.manual_seed(0)
book_dit = TextDiT(TextDiTConfig.preset("book-text")).eval()
prompts = ["a red circle left of a blue square", "a big green triangle"]
text_emb = book_text.encode(prompts)  # tokens (2, T, 96), mask (2, T), pooled (2, 64)
x_lat = torch.randn(2, 4, 8, 8)  # (B, C, H, W) book latents
out = book_dit(x_lat, torch.tensor([500, 500]), context=text_emb)
print(f"book text DiT: {book_dit.num_params / 1e6:.2f} M parameters; context {tuple(text_emb.tokens.shape)} -> "
      f"output {tuple(out.shape)}; isinstance(model, DiT): {isinstance(book_dit, DiT)}")
assert out.shape == x_lat.shape and (out == 0).all() and isinstance(book_dit, DiT)
tok0 = torch.randn(2, 16, 192)
assert all(torch.equal(blk(tok0, torch.randn(2, 192), torch.randn(2, text_emb.tokens.shape[1], 192), text_emb.mask), tok0)
           for blk in book_dit.blocks)

with torch.no_grad():  # re-run the forward pass by hand up to the last block's cross-attention
    cfg_b = book_dit.config
    tk = book_dit.x_embedder(x_lat) + book_dit.pos_embed_for(4, 4)  # (B, 16, D)
    c = book_dit.condition(torch.tensor([500, 500]), text_emb.pooled)  # (B, D)
    ctx = book_dit.y_embedder(text_emb.tokens)  # (B, T, D)
    for blk in book_dit.blocks[:-1]:
        tk = blk(tk, c, ctx, text_emb.mask)
    last = book_dit.blocks[-1]
    sh, sc, g, *_ = last.modulation_params(c)
    tk = tk + g.unsqueeze(1) * last.attn(modulate(last.norm1(tk), sh, sc))
    q, k, _ = last.cross_attn.qkv_heads(last.norm_cross(tk), ctx)  # (B, heads, 16|T, hd)
    amap = attention_weights(q, k, text_emb.mask)  # (B, heads, 16, T)
words = book_text.tokenizer.convert_ids_to_tokens(book_text.tokenizer(prompts[0])["input_ids"])
fig, axes = plt.subplots(1, len(words), figsize=(1.3 * len(words), 1.8))
for j, (ax, word) in enumerate(zip(axes, words)):
    ax.imshow(amap[0, :, :, j].mean(0).reshape(4, 4), cmap="magma", vmin=0, vmax=float(amap[0].mean(0).max()))
    ax.set_title(word.replace("<|", "").replace("|>", ""), fontsize=7)
    ax.axis("off")
plt.suptitle(f"cross-attention of each 8x8-pixel patch to each token (untrained): {prompts[0]!r}", fontsize=8)
plt.show()
assert torch.allclose(amap.sum(-1), torch.ones_like(amap[..., 0]), atol=1e-5)
assert (amap[1][..., ~text_emb.mask[1]] == 0).all()  # the shorter prompt's padding is never read

# %% [markdown]
# Wrong inputs fail with a sentence, not a torch shape error: text tokens of the wrong width (a
# model built for one encoder fed by another), a mask of the wrong shape, a missing pooled vector.

# %%
for bad in (lambda: book_dit(x_lat, 10, context=torch.randn(2, 5, 77), pooled=text_emb.pooled),
            lambda: book_dit(x_lat, 10, context=text_emb.tokens, context_mask=text_emb.mask[:, :3], pooled=text_emb.pooled),
            lambda: book_dit(x_lat, 10, context=text_emb.tokens, context_mask=text_emb.mask),
            lambda: book_dit(x_lat, 10, y=torch.tensor([1, 2]), context=text_emb)):
    try:
        bad()
    except ValueError as e:
        print("ValueError:", e)
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
# ## 7. Loading PixArt checkpoints
#
# As for DiT in chapter 05, two layouts:
#
# - **diffusers'** `PixArtTransformer2DModel` folder. It splits `qkv` into `to_q/to_k/to_v`, and the
#   cross-attention's `kv_linear` into `to_k/to_v`; it calls the shared timestep map
#   `adaln_single.linear` (our `t_block.1`) and the caption MLP `caption_projection`. It does **not**
#   store the null caption `y_embedding`: its pipeline encodes an empty negative prompt with T5
#   instead, so a model loaded from it has `caption_tokens=0` and `null_context` says so.
# - **the original** PixArt-α/Σ checkpoints (`PixArt-XL-2-1024-MS.pth`, a `{"state_dict": ...}`
#   wrapper), whose names are ours. The config is inferred from the weights: width, patch, depth,
#   caption width, null-caption length (120 → α, 300 → Σ), micro-conditions (are `csize_embedder`
#   weights present?). Not in the weights: the number of heads (1152 → 16, as DiT-XL) and the
#   position interpolation scale (latent side / 64: 0.5, 1, 2 at 256, 512, 1024 px), which we check
#   against the stored `pos_embed` table when it is there.
#
# **Where diffusers and the original code differ**, we follow the original, which trained the
# weights: the caption padding is masked out exactly (the original attends over the real tokens
# only, via xformers' block-diagonal mask; diffusers adds a bias of $-10^4$, which in fp32 gives the
# same softmax to the last bit); the null caption for guidance is the learned `y_embedding` where
# the checkpoint has it; and when a diffusers config leaves `interpolation_scale` empty we use the
# original rule (latent side / 64, so 0.5 at 256 px) where diffusers' default would give 1. The timestep sinusoid is the same in both (`flip_sin_to_cos=True`, shift 0),
# unlike diffusers' DiT port of chapter 05.
#
# `DiT.from_pretrained` stays the single entry point: it reads `config.json`'s `_class_name` and
# dispatches; `DiT.from_original` looks for PixArt's `t_block` weights. Both fall back to chapter
# 05's loaders for class-conditional DiTs.

# %%
# | export dit
def convert_diffusers_pixart(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers PixArtTransformer2DModel state dict -> the original PixArt names (ours)."""
    if "adaln_single.linear.weight" not in sd or "transformer_blocks.0.attn2.to_q.weight" not in sd:
        raise ValueError("checkpoint: not a diffusers PixArtTransformer2DModel state dict (no "
                         "'adaln_single.linear.weight' / 'transformer_blocks.0.attn2.to_q.weight')")
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    take("pos_embed.proj", "x_embedder.proj")
    take("adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
    take("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
    take("adaln_single.emb.resolution_embedder.linear_1", "csize_embedder.mlp.0")
    take("adaln_single.emb.resolution_embedder.linear_2", "csize_embedder.mlp.2")
    take("adaln_single.emb.aspect_ratio_embedder.linear_1", "ar_embedder.mlp.0")
    take("adaln_single.emb.aspect_ratio_embedder.linear_2", "ar_embedder.mlp.2")
    take("adaln_single.linear", "t_block.1")
    take("caption_projection.linear_1", "y_embedder.y_proj.fc1")
    take("caption_projection.linear_2", "y_embedder.y_proj.fc2")
    take("proj_out", "final_layer.linear")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for n in range(depth):
        b, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        out[o + "scale_shift_table"] = sd.pop(b + "scale_shift_table")
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([sd.pop(b + f"attn1.to_{x}.{suffix}") for x in "qkv"])
            out[o + f"cross_attn.kv_linear.{suffix}"] = torch.cat([sd.pop(b + f"attn2.to_{x}.{suffix}") for x in "kv"])
        take(b + "attn1.to_out.0", o + "attn.proj")
        take(b + "attn2.to_q", o + "cross_attn.q_linear")
        take(b + "attn2.to_out.0", o + "cross_attn.proj")
        take(b + "ff.net.0.proj", o + "mlp.fc1")
        take(b + "ff.net.2", o + "mlp.fc2")
    if sd:
        raise ValueError(f"checkpoint: {len(sd)} diffusers PixArt keys that tinydit does not know how to map: "
                         f"{sorted(sd)[:10]}")
    return out


def config_from_diffusers_pixart(d: dict, **overrides) -> TextDiTConfig:
    """TextDiTConfig from a diffusers PixArtTransformer2DModel config.json."""
    if diffusers_transformer_class(d) != "PixArtTransformer2DModel":
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
               num_heads=num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out_ch == 2 * in_ch,
               frequency_embedding_size=sd["t_embedder.mlp.0.weight"].shape[1],
               qk_norm="blocks.0.attn.q_norm.weight" in sd, context_dim=sd["y_embedder.y_proj.fc1.weight"].shape[1],
               modulation="adaln_single", caption_tokens=0 if y_emb is None else y_emb.shape[0],
               micro_conditions="csize_embedder.mlp.0.weight" in sd, pos_base_size=input_size // p,
               interpolation_scale=input_size / 64)
    return TextDiTConfig(**{**cfg, **overrides})


def _pixart_from_state_dict(sd: dict[str, torch.Tensor], name: str, num_heads: int | None = None,
                            **overrides) -> TextDiT:
    model = TextDiT(infer_pixart_config_from_original(sd, num_heads=num_heads, **overrides))
    stored = sd.get("pos_embed")
    if stored is not None and stored.abs().sum() > 0 and stored.shape == model.pos_embed.shape:
        diff = (stored.float() - model.pos_embed).abs().max().item()
        if diff > 1e-4:
            raise ValueError(f"checkpoint: its stored position table differs from the one for "
                             f"interpolation_scale={model.config.interpolation_scale} by {diff:.3g}; pass the "
                             "training resolution's interpolation_scale= (0.5, 1 or 2 at 256, 512, 1024 px)")
    sd = {**sd, "pos_embed": model.pos_embed}  # the fixed table is recomputed, not trusted from disk
    check_and_load(model, sd, what=f"PixArt checkpoint {name}")
    return model


_from_pretrained_dit = _from_pretrained  # chapter 05's loaders, for class-conditional DiTs
_from_original_dit = _from_original


def _from_pretrained_any(cls, path_or_id: str | Path, subfolder: str | None = None, **overrides) -> DiT:
    """Load a diffusers `DiTTransformer2DModel` or `PixArtTransformer2DModel` folder, or a tinydit
    DiT / TextDiT folder (local path or hub id); dispatches on config.json."""
    folder = resolve_pretrained(path_or_id, subfolder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class") == "TextDiT":  # tinydit's own layout
        config.pop("_class")
        model = TextDiT(TextDiTConfig.from_dict({**config, **overrides}))
        sd = load_state_dict(folder / "model.safetensors")
    elif diffusers_transformer_class(config) == "PixArtTransformer2DModel":
        model = TextDiT(config_from_diffusers_pixart(config, **overrides))
        weights = next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"path_or_id: no diffusion_pytorch_model.safetensors (or .bin) in {folder}")
        sd = convert_diffusers_pixart(load_state_dict(weights))
    else:
        return _from_pretrained_dit(DiT, folder, **overrides)
    sd = {**sd, "pos_embed": model.pos_embed}
    check_and_load(model, sd, what=f"weights in {folder}")
    return model


def _from_original_any(cls, path: str | Path, num_heads: int | None = None, **overrides) -> DiT:
    """Load an original-layout checkpoint: PixArt-α/Σ (has `t_block`) or facebookresearch DiT."""
    sd = unwrap_state_dict(load_state_dict(path))
    if "t_block.1.weight" in sd:
        return _pixart_from_state_dict(sd, Path(path).name, num_heads=num_heads, **overrides)
    return _from_original_dit(DiT, path, num_heads=num_heads, state_dict=sd, **overrides)


DiT.from_pretrained = classmethod(_from_pretrained_any)
DiT.from_original = classmethod(_from_original_any)

# %% [markdown]
# ### Parity with diffusers, measured
#
# A tiny random `PixArtTransformer2DModel` saved in diffusers' format, loaded with
# `DiT.from_pretrained`, compared on padded captions at several timesteps: once PixArt-α-style (with
# resolution / aspect-ratio micro-conditions), once PixArt-Σ-style (without), at the training grid
# and at a larger, non-square one (the position table is recomputed, PixArt-style). Then the same
# weights renamed to the **original** layout, saved as a `.pth` with a `{"state_dict": ...}` wrapper
# as PixArt's releases are, and loaded with `DiT.from_original`.

# %%
import tempfile

try:
    import diffusers
except ImportError:
    diffusers = None
    print("diffusers is not installed (pip install -e '.[dev]'); skipping the live comparison")
if diffusers is not None:
    worst = {}
    for micro in (True, False):
        torch.manual_seed(0)
        ref = diffusers.PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=48, caption_channels=24, sample_size=8, patch_size=2, norm_eps=1e-6,
            use_additional_conditions=micro, interpolation_scale=8 / 64).eval()
        with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
            for p in ref.parameters():
                p.normal_(0, 0.1)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            ours = DiT.from_pretrained(tmp).eval()
            torch.save({"state_dict": ours.state_dict()}, f"{tmp}/PixArt-tiny.pth")
            ours_original = DiT.from_original(f"{tmp}/PixArt-tiny.pth", num_heads=4).eval()
        ctx = torch.randn(3, 7, 24)  # (B, T, caption_channels)
        cmask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])  # padded captions
        errs = []
        for shape in ((3, 4, 8, 8), (3, 4, 12, 16)):
            xp = torch.randn(shape)
            res, ar = torch.tensor([[64.0, 64.0]] * 3), torch.tensor([[1.0]] * 3)
            added = dict(resolution=res, aspect_ratio=ar) if micro else None
            mine_kw = dict(resolution=res, aspect_ratio=ar) if micro else {}
            for tp in (torch.tensor([0.0, 10.0, 999.0]), torch.tensor([500.0, 250.0, 1.0])):
                with torch.no_grad():
                    r = ref(xp, encoder_hidden_states=ctx, timestep=tp, encoder_attention_mask=cmask,
                            added_cond_kwargs=added).sample
                    errs += [(ours(xp, tp, context=ctx, context_mask=cmask, **mine_kw) - r).abs().max().item(),
                             (ours_original(xp, tp, context=ctx, context_mask=cmask, **mine_kw) - r).abs().max().item()]
        worst["alpha (micro-conditions)" if micro else "sigma (none)"] = max(errs)
    for name, err in worst.items():
        print(f"PixArt-{name}: max |diffusers - tinydit| = {err:.2e} over 2 grids x 2 timestep sets, "
              "from_pretrained and from_original")
    assert max(worst.values()) <= 1e-5

# %% [markdown]
# ### The null caption
#
# Classifier-free guidance (chapter 09) needs an unconditional prediction. PixArt learns one: the
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
# ## 8. Real CLIP-L and T5, if you have them
#
# Point `TINYDIT_CLIP_PATH` at a folder with the CLIP ViT-L/14 text tower (for example a download of
# `openai/clip-vit-large-patch14`, or an SD pipeline folder, with `TINYDIT_CLIP_SUBFOLDER=text_encoder`)
# and `TINYDIT_T5_PATH` at a T5 encoder folder (a PixArt pipeline, `TINYDIT_T5_SUBFOLDER=text_encoder`),
# and this cell encodes with them. Without them — as in CI, and on this machine, which has no
# network — it says so and moves on. A hub id that cannot be reached fails in one line:

# %%
try:
    CLIPTextEncoder.from_pretrained("openai/clip-vit-large-patch14")
except OSError as e:
    print("OSError:", e)
real = {"CLIP": (CLIPTextEncoder, os.environ.get("TINYDIT_CLIP_PATH"), os.environ.get("TINYDIT_CLIP_SUBFOLDER")),
        "T5": (T5TextEncoder, os.environ.get("TINYDIT_T5_PATH"), os.environ.get("TINYDIT_T5_SUBFOLDER"))}
for name, (cls, path, sub) in real.items():
    if not path:
        print(f"{name}: no local weights (set TINYDIT_{name.upper()}_PATH to use them); skipped")
        continue
    enc = cls.from_pretrained(path, subfolder=sub)
    e = enc.encode(["a photo of a red circle on a white table"])
    print(f"{name}: tokens {tuple(e.tokens.shape)}, mask {int(e.mask.sum())} real tokens, "
          f"pooled {None if e.pooled is None else tuple(e.pooled.shape)}")

# %% [markdown]
# ## What we built
#
# - `tinydit.text`: `TextEmbeddings` and the `TextEncoder` interface; `CLIPTextEncoder` (last or
#   penultimate layer; projected or EOS pooled) and `T5TextEncoder` from folders or hub ids;
#   `DualTextEncoder` (CLIP primary, T5 secondary offloaded to CPU or disk, with a prompt cache);
#   `build_book_tokenizer`, `train_book_text_encoder`, `load_book_text_encoder`,
#   `load_book_image_encoder` and `evaluate_book_encoders`.
# - `tinydit.dit` (extended): `CrossAttention`, `TextDiTBlock` (adaLN-Zero or adaLN-single),
#   `T2IFinalLayer`, `TextDiTConfig` with PixArt and `book-text` presets, `TextDiT` (a `DiT`), and
#   `DiT.from_pretrained` / `DiT.from_original` that now also load PixArt-α/Σ in diffusers' and the
#   original layout, equal to diffusers to within $10^{-5}$.
#
# The shipped book text encoder (0.35 M parameters, trained 1,500 steps x 128
# pairs in 24 minutes on 2 busy CPU cores), on 2,000 test pairs of the shapes
# dataset (full-size run of `evaluate_book_encoders(n=2000)`):
#
# | measure | all test captions | captions with a `HELD_OUT` pair |
# |---|---|---|
# | caption → image top-1, exact (the very image; chance 0.05 %) | 50.6 % | 56.4 % (445 queries) |
# | caption → image top-1, semantic (the image satisfies the caption) | 95.8 % | 91.5 % |
# | zero-shot colour, single-object images | 99.5 % (1,216 images) | 97.1 % (205 images) |
# | zero-shot shape | 98.3 % | 89.8 % |
# | zero-shot (colour, shape) pair, 18-way | 97.8 % | 86.8 % |
#
# The held-out pairs ("red triangle", "blue circle", "yellow square") were never seen together in
# training, and the encoder still names 87 % of them exactly: it has learned colour and shape words
# separately, not memorised the pairs. Shape is the harder half for the held-out images.
#
# Next, chapter 07 trains the `book-text` DiT on these embeddings.
