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
# # 06a · Text encoders
#
# Chapter 05's DiT was conditioned on one of 18 class labels. A text-to-image model is conditioned
# on a **caption**: a sequence of words, each of which may matter to a different part of the picture
# ("a *red* circle *left of* a *blue* square"). A text encoder turns prompts into one vector per
# token (what chapter 07's cross-attention reads) and, for some encoders, one per prompt. We build:
#
# 1. **One interface** for every encoder: `encoder(prompts) -> TextEmbeddings(tokens, mask, pooled)`.
# 2. **CLIP's text tower** (Radford et al., 2021) and **T5's encoder** (Raffel et al., 2020) through
#    `transformers`, loaded from folders or hub ids, refusing checkpoints that do not fit.
# 3. **The book's own text encoder**, as shipped: a tiny CLIP loaded like any other (chapter 06b
#    builds its tokenizer, trains it contrastively on the shapes of chapter 01 and measures it).
# 4. **A dual encoder** as in SD3 (Esser et al., 2024), in chapter 06c: CLIP's tokens and pooled
#    vector plus T5's tokens, with the big T5 kept off the compute device until it is needed.
#
# | tensor | shape | book | PixArt-α (T5-XXL) |
# |---|---|---|---|
# | token ids | $(B, T)$ | $(B, \le 32)$ | $(B, 120)$ |
# | `tokens` | $(B, T, D)$ | $(B, T, 96)$ | $(B, 120, 4096)$ |
# | `mask`, True = real token | $(B, T)$ | $(B, T)$ | $(B, 120)$ |
# | `pooled` | $(B, D_\text{pooled})$ or None | $(B, 64)$ | None |

# %%
# | default_exp text
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import re
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn


torch.manual_seed(0)

# %% [markdown]
# ## 1. A text encoder in twenty lines
#
# Four steps turn captions into vectors: **tokenize** (words to integer ids, wrapped in start and
# end tokens, padded to a rectangle), **embed** (a learned vector per id plus one per position),
# run a **transformer**, and **pool** one vector per caption. CLIP's text tower is *causal* (each
# token sees only the ones before it) and pools the state at the end-of-text token, the only one that
# has seen the whole caption.

# %%
captions = ["a red circle", "a big blue square on the left"]
vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>"] + sorted({w for c in captions for w in c.split()}))}


def word_ids(prompts, vocab):  # one id per word, <bos> ... <eos>, padded with <pad> = 0
    rows = [[1] + [vocab[w] for w in p.split()] + [2] for p in prompts]
    T = max(map(len, rows))
    return torch.tensor([r + [0] * (T - len(r)) for r in rows])  # (B, T)


class TinyTextEncoder(nn.Module):
    def __init__(self, vocab_size, d=32, layers=2, heads=4, max_len=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d), nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids):  # ids (B, T)
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T))  # (B, T, d)
        causal = nn.Transformer.generate_square_subsequent_mask(T)  # (T, T): -inf above the diagonal
        x = self.blocks(x, mask=causal, is_causal=True)  # (B, T, d)
        eos = (ids == 2).int().argmax(1)  # (B,) where each caption ends
        return x, x[torch.arange(len(ids)), eos]  # tokens (B, T, d), pooled (B, d)


ids = word_ids(captions, vocab)  # (2, 9)
tiny = TinyTextEncoder(len(vocab)).eval()
tokens, pooled = tiny(ids)
print("ids", ids.tolist(), "\nmask", (ids != 0).int().tolist())
assert tokens.shape == (2, 9, 32) and pooled.shape == (2, 32)
# causal: the real tokens of the short caption do not depend on the padding after them
torch.testing.assert_close(tokens[0, :5], tiny(ids[:1, :5])[0][0], atol=1e-5, rtol=0)

# %% [markdown]
# ## 2. One interface for every text encoder
#
# Whatever the encoder, a diffusion model needs three things from a batch of prompts: `tokens`
# $(B, T, D)$, what cross-attention reads; `mask` $(B, T)$, True for real tokens and False for
# padding, so that attention skips the padding; and `pooled` $(B, D_\text{pooled})$, one vector for
# the whole prompt, or None (T5 has none). The mask is **boolean**: a float mask is ambiguous (an
# *additive* mask uses 0 for "keep" and $-\infty$ for "drop", and `.bool()` would flip it), so it is
# refused; the 0/1 integer masks tokenizers return are converted.

# %%
# | export
"""Text encoders for diffusion transformers, behind one interface.

`encoder(prompts)` (or `encoder.encode(prompts)`) `-> TextEmbeddings(tokens (B, T, D), mask (B, T),
pooled (B, D_p) | None)` for CLIP's text tower (Radford et al. 2021), T5's encoder (Raffel et al.
2020), a dual encoder that combines them as SD3 does (Esser et al. 2024) with the secondary
offloaded, and the book's tiny CLIP text encoder trained contrastively on the shapes dataset.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from tinydit.checkpoint import (
    BOOK_TEXT_ENCODER_DIR,
    WeightsMismatchError,
    _listing,
    resolve_pretrained,
)
from tinydit.validation import check_bool_mask, check_choice, check_int, check_prompts, check_tensor


TEXT_FILES = ("config.json", "*.safetensors", "*.json", "*.txt", "*.model")  # what a text encoder folder holds

# %%
# | export
def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = real token): 0/1 integer masks are converted, float masks refused."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool and not mask.is_floating_point():
        if not mask.is_meta and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask: expected 0/1 values (1 = real token), got {mask.unique()[:6].tolist()}")
        mask = mask.bool()
    return check_bool_mask("mask", mask)

# %%
# | export
@dataclass
class TextEmbeddings:
    """What every text encoder returns for a batch of B prompts."""

    tokens: torch.Tensor  # (B, T, D) one vector per token, what cross-attention reads
    mask: torch.Tensor  # (B, T) bool, True = real token, False = padding
    pooled: torch.Tensor | None = None  # (B, D_pooled) one vector per prompt (CLIP), or None (T5)

    def __post_init__(self):
        check_tensor("tokens", self.tokens, ndim=3, floating=True)
        if self.pooled is not None:
            check_tensor("pooled", self.pooled, floating=True)
        self.mask = _as_bool_mask(self.mask)
        if self.tokens.ndim != 3 or tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
            raise ValueError(f"tokens, mask: expected tokens (B, T, D) and mask (B, T), got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]):
            raise ValueError(f"pooled: expected (B, D_pooled) with B={self.tokens.shape[0]}, got "
                             f"{tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Move (and optionally cast the float tensors of) the embeddings."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.mask.to(device), pooled)

# %% [markdown]
# Prompts are checked before any tokenizer sees them: an empty list, a prompt that is not a string
# and a bare string where a list was expected fail with a sentence. A prompt longer than the
# encoder's limit is truncated (what every pipeline does) with a warning that counts what was lost.

# %%
# | export
def warn_unknown_words(tokenizer, prompts: list[str], all_ids: list[list[int]], what: str) -> None:
    """A word-level tokenizer (the book's) reads a word it never saw as <unk>: say which, per prompt,
    rather than let "a pink hexagon" be drawn as "a <unk> <unk>" without a word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, (prompt, ids) in enumerate(zip(prompts, all_ids)):
        if unk is None or unk not in ids:
            continue
        unknown = [w for w in prompt.split() if tokenizer(w, add_special_tokens=False)["input_ids"] == [unk]]
        warnings.warn(f"prompts[{i}]: {', '.join(map(repr, unknown)) or 'some words'} not in the {what}'s "
                      f"vocabulary; read as {tokenizer.unk_token}", stacklevel=4)

# %%
# | export
def tokenize(tokenizer, prompts: list[str], max_length: int, padding: str = "max_length",
             what: str = "text encoder") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (B, T); truncates to `max_length` with a warning that
    says, per prompt, how many tokens were dropped."""
    all_ids = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    warn_unknown_words(tokenizer, prompts, all_ids, what)
    for i, n in enumerate(len(ids) for ids in all_ids):
        if n > max_length:
            warnings.warn(f"prompts[{i}]: {n} tokens is more than the {what}'s limit of {max_length}; "
                          f"truncated, dropping the last {n - max_length} tokens", stacklevel=3)
    batch = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"].bool()  # (B, T) each

# %% [markdown]
# The interface itself is a module whose `encode` (and `__call__`) checks the prompts, brings the
# weights onto the compute device if they were offloaded (section 7) and runs without gradients.
# A subclass sets three sizes and writes `_encode`.

# %%
# | export
class TextEncoder(nn.Module):
    """The interface: `encoder(prompts)` or `encoder.encode(prompts)` -> `TextEmbeddings`.

    Subclasses set `width` (D of the tokens), `pooled_width` (or None) and `max_length`, and
    implement `_encode(prompts)`. `encode` checks the prompts, brings offloaded weights in for the
    call (`offloader`, see `Offloader`) and runs without gradients.
    """

    width: int
    pooled_width: int | None
    max_length: int
    offloader: object | None = None  # a dual_encoder.Offloader (06c) while DualTextEncoder offloads it

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        prompts = check_prompts("prompts", prompts)  # one string is one prompt
        with torch.no_grad(), (self.offloader or contextlib.nullcontext()):
            return self._encode(prompts)

    def forward(self, prompts: list[str]) -> TextEmbeddings:
        return self.encode(prompts)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

# %% [markdown]
# Our twenty-line encoder fits behind it in a few lines, and calling it like any module now returns
# `TextEmbeddings`. A float mask is refused with a message that says why.

# %%
class WordTextEncoder(TextEncoder):
    def __init__(self, net, vocab):
        super().__init__()
        self.net, self.vocab, self.width, self.pooled_width, self.max_length = net, vocab, 32, 32, 16

    def _encode(self, prompts):
        ids = word_ids(prompts, self.vocab)  # (B, T)
        tokens, pooled = self.net(ids)  # (B, T, 32), (B, 32)
        return TextEmbeddings(tokens, ids != 0, pooled)


te = WordTextEncoder(tiny, vocab)
e = te(captions)
torch.testing.assert_close(e.tokens, tokens)  # (no_grad lets PyTorch take a fused path: equal to rounding)
assert e.pooled.shape == (2, 32) and e.mask.sum(1).tolist() == [5, 9]
assert TextEmbeddings(e.tokens, (ids != 0).long()).mask.dtype == torch.bool  # 0/1 integers: converted
try:
    TextEmbeddings(e.tokens, torch.zeros(2, 9).masked_fill(ids == 0, -torch.inf))  # an additive float mask
except TypeError as err:
    print("TypeError:", err)
    assert re.search(r"mask: expected a boolean mask", str(err))
else:
    raise AssertionError("a float mask was accepted")

# %% [markdown]
# ## 3. CLIP and T5 through `transformers`
#
# **CLIP's text tower** is our causal encoder at scale (12 layers, width 768 for CLIP-L). Diffusion
# models read its **last** layer (SD 1.x, SD3), its **penultimate** layer (SDXL, "clip skip") and its
# **pooled** vector: the EOS state or its projection into the joint space (what SDXL and SD3 add to
# the timestep embedding). Being causal, it runs without an attention mask, as in every SD pipeline.
# **T5's encoder** is bidirectional, so it *must* get the mask, and has no pooled output (PixArt-α
# reads 120 T5-XXL tokens, PixArt-Σ 300, SD3 256).
#
# Both load from a folder or a hub id, including a diffusers pipeline's `text_encoder` / `tokenizer`
# subfolders. When a checkpoint's keys do not fit, `transformers` only *logs* a report and carries
# on with those weights random: a silent wrong result. Our loaders read `output_loading_info` and
# refuse, naming the keys (only a full CLIP model's vision-tower keys may go unused).

# %%
# | export
def _local_folder(path_or_id, subfolder: str | None, what: str) -> Path:
    """`resolve_pretrained` with a one-line error naming the encoder when the hub is out of reach."""
    try:
        return resolve_pretrained(path_or_id, subfolder, filenames=TEXT_FILES)
    except OSError as e:
        raise OSError(f"{what}: {e}") from None

# %%
# | export
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

# %%
# | export
@contextlib.contextmanager
def _quiet_transformers(progress_bar: bool = True):
    """Within the block only: no transformers load report (we check the loading info ourselves)
    and, unless `progress_bar`, no "Loading weights" bar. The previous settings come back after."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity, bar_was_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars_off, hide_bar = hub_utils.are_progress_bars_disabled(), bar_was_on and not progress_bar
    hf_logging.set_verbosity_error()
    if hide_bar:
        hf_logging.disable_progress_bar()  # also turns the hub's bars off: restored below
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hide_bar:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS is set
                hf_logging.enable_progress_bar()
            if hub_bars_off:
                hub_utils.disable_progress_bars()

# %%
# | export
def _load_checked(model_cls, folder: Path, what: str, allow_unused: tuple[str, ...] = (), **kwargs):
    """`model_cls.from_pretrained(folder)`, refusing a checkpoint whose keys do not fit the model
    (transformers would log a report and leave those weights random). Checkpoint keys starting with
    one of `allow_unused` may go unused (e.g. the vision tower of a full CLIP model)."""
    with _quiet_transformers():
        try:
            model, info = model_cls.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True,
                                                    **kwargs)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{what}: the weights in {str(folder)!r} are corrupt or truncated ({e}); "
                             "download them again") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{what}: the checkpoint in {str(folder)!r} holds NaN or infinite weights in "
                         f"{len(bad)} tensor(s), e.g. {bad[:3]}; refusing to load a broken model")
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(allow_unused))
    shapes = sorted(f"{k[0]}: checkpoint {tuple(k[1])} vs model {tuple(k[2])}" if isinstance(k, tuple) else str(k)
                    for k in info.get("mismatched_keys", ()))
    if missing or unexpected or shapes or info.get("error_msgs"):
        raise WeightsMismatchError(
            f"{what}: the checkpoint in {str(folder)!r} does not fit {model_cls.__name__} (those weights would "
            "stay random); is it the right folder / subfolder?" + _listing("missing keys", missing)
            + _listing("unexpected keys", unexpected) + _listing("shape mismatches", shapes)
            + _listing("errors", [str(m) for m in info.get("error_msgs", ())]))
    return model

# %% [markdown]
# The two wrappers read the right readout and pooled vector; `from_pretrained` picks the model
# class from the folder's `config.json` (a text tower with or without projection, or a full CLIP
# model whose text half we keep).

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
        check_choice("layer", layer, self.LAYERS)
        check_choice("pooled", pooled, self.POOLED)
        has_projection = hasattr(model, "text_projection")
        if pooled == "auto":
            pooled = "projected" if has_projection else "eos"
        if pooled == "projected" and not has_projection:
            raise ValueError("pooled: 'projected' needs a CLIPTextModelWithProjection; this model has no "
                             "text_projection (use pooled='eos')")
        self.model, self.tokenizer, self.layer, self.pooled_mode, self.padding = model, tokenizer, layer, pooled, padding
        cfg = model.config
        limit = min(cfg.max_position_embeddings, getattr(tokenizer, "model_max_length", 10**9))
        self.max_length = limit if max_length is None else check_int("max_length", max_length)
        if not 2 <= self.max_length <= cfg.max_position_embeddings:
            raise ValueError(f"max_length: expected 2..{cfg.max_position_embeddings} (the position table), "
                             f"got {max_length}")
        self.width = cfg.hidden_size
        self.pooled_width = {"projected": getattr(cfg, "projection_dim", None), "eos": cfg.hidden_size,
                             "none": None}[pooled]
        self.model.eval()

# %%
# | export
@add_to_class(CLIPTextEncoder)
@classmethod
def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None,
                    tokenizer_subfolder: str | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", **kwargs) -> CLIPTextEncoder:
    """Load a CLIP text tower and its tokenizer from a folder or hub id (e.g. the CLIP ViT-L/14
    text tower `openai/clip-vit-large-patch14`, or an SDXL pipeline with subfolder
    `text_encoder_2`). The projection head is used when the checkpoint has one. A checkpoint
    whose keys do not fit raises `WeightsMismatchError` naming them."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = _local_folder(path_or_id, subfolder, "CLIPTextEncoder")
    tok_folder = _tokenizer_folder(path_or_id, subfolder, tokenizer_subfolder, folder, "CLIPTextEncoder")
    config = json.loads((folder / "config.json").read_text())
    kwargs_model, unused = {"dtype": dtype or torch.float32}, ()
    if config.get("model_type") == "clip":  # a full CLIPModel (text + vision): keep the text tower
        from transformers import CLIPConfig

        full = CLIPConfig.from_pretrained(folder)
        text_config = full.text_config
        text_config.projection_dim = full.projection_dim  # the projection size lives on the full config
        model_cls, kwargs_model["config"] = CLIPTextModelWithProjection, text_config
        unused = ("vision_model.", "visual_projection.", "logit_scale")
    elif "CLIPTextModelWithProjection" in config.get("architectures", []):
        model_cls = CLIPTextModelWithProjection
    else:
        model_cls = CLIPTextModel
    model = _load_checked(model_cls, folder, "CLIPTextEncoder", unused, **kwargs_model).to(device)
    return cls(model, AutoTokenizer.from_pretrained(tok_folder), **kwargs)

# %%
# | export
@add_to_class(CLIPTextEncoder)
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

# %%
# | export
class T5TextEncoder(TextEncoder):
    """T5 encoder (Raffel et al. 2020) behind the `TextEncoder` interface: bidirectional, so it is
    run with the attention mask; no pooled vector. `max_length`: 120 for PixArt-α, 300 for
    PixArt-Σ, 256 for SD3."""

    def __init__(self, model, tokenizer, max_length: int = 120, padding: str = "max_length"):
        super().__init__()
        max_length = check_int("max_length", max_length, minimum=1)
        self.model, self.tokenizer, self.max_length, self.padding = model.eval(), tokenizer, max_length, padding
        self.width, self.pooled_width = model.config.d_model, None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None,
                        tokenizer_subfolder: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **kwargs) -> T5TextEncoder:
        """Load a `T5EncoderModel` and its tokenizer from a folder or hub id (e.g. a PixArt
        pipeline with subfolder `text_encoder`, or `google/t5-v1_1-xxl`; a full encoder-decoder
        checkpoint's decoder is skipped). Keys that do not fit raise `WeightsMismatchError`."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = _local_folder(path_or_id, subfolder, "T5TextEncoder")
        tok_folder = _tokenizer_folder(path_or_id, subfolder, tokenizer_subfolder, folder, "T5TextEncoder")
        model = _load_checked(T5EncoderModel, folder, "T5TextEncoder", dtype=dtype or torch.float32).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tok_folder), **kwargs)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length, self.padding, "T5 text encoder")
        ids, mask = ids.to(self.device), mask.to(self.device)  # (B, T) each
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
        return TextEmbeddings(tokens, mask, None)

# %% [markdown]
# ## 4. The book's text encoder, shipped
#
# The book trains its own text encoder (chapter 06b): a word-level tokenizer built from the captions
# and a tiny CLIP text tower (`transformers`' `CLIPTextModelWithProjection`, so `CLIPTextEncoder`
# loads it), trained contrastively against a small image encoder. Both towers ship with the package;
# this section holds what inference needs to load and use them: the architecture, the image tower,
# the two loaders and a batched embedding of many prompts.

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

# %%
# | export
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

# %%
# | export
def load_book_text_encoder(path: str | Path | None = None, device: str | torch.device = "cpu",
                           dtype=None) -> CLIPTextEncoder:
    """The book's trained text encoder (shipped in the package, or from `path`): last-layer tokens
    (B, T, 96), pooled = the projected EOS state (B, 64), padded to the longest prompt. `dtype`
    ("bf16", "fp16", a torch dtype; None = float32): the weights' precision."""
    from tinydit.checkpoint import resolve_dtype

    dtype = resolve_dtype(dtype)
    folder = Path(path) if path is not None else BOOK_TEXT_ENCODER_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no book text encoder in {str(folder)!r} (expected config.json, "
                                "model.safetensors and tokenizer files); train one with "
                                "tinydit.text_training.train_book_text_encoder(out_dir=...)")
    with _quiet_transformers(progress_bar=False):  # a 1.4 MB model: no "Loading weights" bar
        return CLIPTextEncoder.from_pretrained(folder, device=device, padding="longest", dtype=dtype)

# %%
# | export
def load_book_image_encoder(path: str | Path | None = None, dtype=None) -> ImageEncoder:
    """The image tower trained together with the book's text encoder (for retrieval); `dtype` as in
    `load_book_text_encoder`."""
    from tinydit.checkpoint import load_model, load_state_dict, resolve_dtype

    dtype = resolve_dtype(dtype)
    folder = Path(path) if path is not None else BOOK_TEXT_ENCODER_DIR
    info = json.loads((folder / "training.json").read_text())
    c = BookTextConfig(**{**info["config"], "image_channels": tuple(info["config"]["image_channels"])})
    sd = load_state_dict(folder / "image_encoder.safetensors", dtype)
    return load_model(lambda: ImageEncoder(c.embed_dim, c.image_channels, c.image_size), sd,
                      what="book image encoder", dtype=dtype)

# %%
# | export
def embed_prompts(text_encoder: TextEncoder, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length pooled embeddings (N, d) of many prompts, in batches."""
    out = [text_encoder.encode(prompts[i:i + batch_size]).pooled for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)  # (N, d)

# %%
book_text, book_image = load_book_text_encoder(), load_book_image_encoder()
e = book_text(["a red circle left of a blue square", "a green triangle"])
print("tokens", tuple(e.tokens.shape), "mask", e.mask.sum(1).tolist(), "pooled", tuple(e.pooled.shape))
assert e.tokens.shape[2] == 96 and e.pooled.shape == (2, 64) and e.mask.sum(1).tolist() == [10, 5]
book_tok = book_text.tokenizer

# %% [markdown]
# Encoding the same prompt twice is common (a grid of seeds, the empty prompt of every guided step),
# so encoders keep the last few results in a small least-recently-used cache:

# %%
# | export
class PromptCache(OrderedDict):
    """An encoder's output rows per prompt, least recently used first, at most `size` prompts."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.size, self.hits, self.misses = size, 0, 0

    def encode(self, encoder: TextEncoder, prompts: list[str]) -> TextEmbeddings:
        """`encoder.encode(prompts)`, running the encoder once on the prompts not cached (if any)."""
        prompts, rows = check_prompts("prompts", prompts), {}
        for p in prompts:
            if p in self:
                self.move_to_end(p)  # most recently used last
                rows[p] = self[p]
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        self.hits, self.misses = self.hits + sum(p in rows for p in prompts), self.misses + len(missing)
        if missing:
            emb = encoder.encode(missing)
            for i, p in enumerate(missing):
                rows[p] = (emb.tokens[i].cpu(), emb.mask[i].cpu())  # (T, D), (T,)
                if self.size:
                    self[p] = rows[p]
                    while len(self) > self.size:
                        self.popitem(last=False)  # evict the least recently used
        T = max(rows[p][0].shape[0] for p in prompts)
        tokens = torch.stack([F.pad(rows[p][0], (0, 0, 0, T - rows[p][0].shape[0])) for p in prompts])  # (B, T, D)
        return TextEmbeddings(tokens, torch.stack([F.pad(rows[p][1], (0, T - rows[p][1].shape[0])) for p in prompts]))

# %% [markdown]
# ## 5. Real CLIP-L and T5, if you have them
#
# Point `TINYDIT_CLIP_PATH` at a CLIP ViT-L/14 text tower (a download of
# `openai/clip-vit-large-patch14`, or an SD pipeline with `TINYDIT_CLIP_SUBFOLDER=text_encoder`) and
# `TINYDIT_T5_PATH` at a T5 encoder (a PixArt pipeline, `TINYDIT_T5_SUBFOLDER=text_encoder`), and this
# cell encodes with them; without them (CI, this machine) it says so. A hub id that cannot be reached
# fails in one line, and a checkpoint whose keys do not fit fails with the keys named:

# %%
from transformers import T5Config, T5EncoderModel


try:
    CLIPTextEncoder.from_pretrained("openai/clip-vit-large-patch14")
except OSError as err:
    print("OSError:", err)
    assert re.search(r"CLIPTextEncoder: .*local folder", str(err))
else:
    raise AssertionError("an unreachable hub id loaded")
with tempfile.TemporaryDirectory() as tmp, _quiet_transformers(progress_bar=False):
    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        tmp)  # a T5 checkpoint where CLIP weights are expected (wrong subfolder)
    book_tok.save_pretrained(tmp)
    try:
        CLIPTextEncoder.from_pretrained(tmp)
    except ValueError as err:
        print("WeightsMismatchError:", str(err)[:400], "...")
        assert re.search(r"does not fit CLIPTextModel.*missing keys", str(err), re.S)
    else:
        raise AssertionError("a mismatched checkpoint loaded")
for name, cls in (("CLIP", CLIPTextEncoder), ("T5", T5TextEncoder)):
    path = os.environ.get(f"TINYDIT_{name}_PATH")
    if not path:
        print(f"{name}: no local weights (set TINYDIT_{name}_PATH to use them); skipped")
        continue
    e = cls.from_pretrained(path, subfolder=os.environ.get(f"TINYDIT_{name}_SUBFOLDER"))(["a red circle on a white table"])
    print(f"{name}: tokens {tuple(e.tokens.shape)}, {int(e.mask.sum())} real tokens, "
          f"pooled {None if e.pooled is None else tuple(e.pooled.shape)}")

# %% [markdown]
# **Looking at it.** How alike the book encoder finds a few prompts (cosine similarity of their pooled
# vectors): prompts that share colour and shape sit close, and changing either word moves them apart.

# %%
import matplotlib.pyplot as plt


sim_prompts = ["a red circle", "a big red circle", "a blue circle", "a red square", "a green triangle"]
pooled = F.normalize(book_text(sim_prompts).pooled, dim=-1)  # (5, 64)
sim = (pooled @ pooled.T).detach()  # (5, 5)
assert torch.allclose(sim.diagonal(), torch.ones(5), atol=1e-5) and sim[0, 1] > sim[0, 4]
plt.figure(figsize=(5, 4))
plt.imshow(sim, cmap="magma", vmin=float(sim.min()), vmax=1)
plt.xticks(range(5), sim_prompts, rotation=45, ha="right")
plt.yticks(range(5), sim_prompts)
plt.colorbar(label="cosine similarity")
plt.title("pooled embeddings of the book encoder")
plt.show()

# %% [markdown]
# ## Summary
#
# - **Built** (in `tinydit.text`): `TextEmbeddings` (bool masks only; 0/1 integers converted) and
#   the `TextEncoder` interface (`encoder(prompts)` or `.encode(prompts)`); `CLIPTextEncoder` (last
#   or penultimate layer; projected or EOS pooled) and `T5TextEncoder`, from folders or hub ids, that
#   refuse checkpoints whose keys do not fit; the book's tiny CLIP as shipped
#   (`load_book_text_encoder`, `load_book_image_encoder`, `embed_prompts`); `PromptCache`.
# - **Checked here**: the twenty-line encoder is causal (its real tokens ignore padding); the
#   shipped encoder gives 96-wide tokens and a 64-wide pooled vector, padding masked.
#
# Next, 06b trains the book's encoder and measures it, and 06c runs two encoders at once; chapter 07
# adds cross-attention to the DiT.
#
# ## Exercises
#
# 1. Remove the causal mask from `TinyTextEncoder`. Which assertion of section 1 fails, and what
#    would the DiT then have to do with the mask that CLIP does not need?
# 2. Time `DualTextEncoder(..., offload="disk")` and `offload="cpu"` on 20 distinct prompts with
#    `cache_size=0` and with the default cache. Where does the time go, and when does the cache help?
