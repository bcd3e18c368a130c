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
# # 00 · Introduction: what we build, and how to read this book
#
# This book builds a **text-to-image diffusion engine** from scratch: you type "a big red circle to
# the left of a small blue square" and it draws that picture. The architecture is the one behind
# today's open models — a **Diffusion Transformer (DiT)** working in the latent space of a **VAE**,
# conditioned on **text encoders** — the family of DiT (Peebles & Xie, 2023), PixArt-α/Σ,
# Stable Diffusion 3 and Flux.
#
# ```
#  prompt ──► text encoder(s) ──► tokens (B, T, D) + pooled (B, D)
#                                         │ cross-attention / adaLN
#  noise (B, 4, 8, 8) ──► DiT denoiser ◄──┘   × N sampler steps (Euler, DPM++ …, with CFG)
#                                 │
#                         latent (B, 4, 8, 8) ──► VAE decoder ──► image (B, 3, 32, 32)
# ```
#
# Every box is a chapter. Each chapter is a notebook that builds one component, explains it with
# maths and pictures, **checks its claims** with `assert` cells (shapes, reconstruction error, loss
# going down, parity with the reference libraries), and **exports** the finished code into the
# Python package `tinydit`. Later chapters import what earlier chapters exported — nothing is
# copied between notebooks.

# %% [markdown]
# ## The map of the book
#
# | # | chapter | module | builds |
# |---|---|---|---|
# | 00 | introduction | `tinydit.validation`, `tinydit.notebook` | this page; the conventions for bad input and long classes |
# | 01a | data | `tinydit.data` | procedural shapes with captions |
# | 01b | emoji | `tinydit.emoji` | an optional dataset of colour emoji |
# | 02a | VAE | `tinydit.vae` | AutoencoderKL; loading SD/SDXL/SD3/Flux VAEs; the book's VAE |
# | 02b | VAE training | `tinydit.vae_training` | training the book's VAE, latent calibration |
# | 03 | embeddings | `tinydit.embeddings` | sinusoidal timestep, 2D sin-cos position, rotary embeddings |
# | 04a | noise schedules | `tinydit.schedules` | linear, cosine, scaled-linear, zero-terminal-SNR, Karras |
# | 04b | flow matching | `tinydit.flow` | rectified flow, SD3's shift, every schedule side by side |
# | 05a | attention | `tinydit.attention` | attention, masks, QK-norm |
# | 05b | DiT | `tinydit.dit` | patchify, adaLN-Zero; loading DiT-XL/2 |
# | 05c | DiT measured | `tinydit.dit_measure` | GFLOPs of every preset, the verification loop |
# | 06a | text encoders | `tinydit.text` | CLIP and T5 behind one interface; the book text encoder |
# | 06b | book text encoder | `tinydit.text_training` | its tokenizer, contrastive training and measurements |
# | 06c | dual encoder | `tinydit.dual_encoder` | CLIP + T5 as SD3, T5 offloaded |
# | 07a | cross-attention | `tinydit.textblock` | cross-attention, the text-conditioned block |
# | 07b | text-conditioned DiT | `tinydit.textdit` | adaLN-single, PixArt-α/Σ loading |
# | 08a | denoisers | `tinydit.denoisers` | one denoiser for ε / v / x0 / flow models; schedules; `Parametrisation` |
# | 08b | samplers | `tinydit.samplers` | Euler, ancestral, Heun, DPM++ 2M / SDE / 3M, DDIM, LMS, UniPC |
# | 09a | training recipe | `tinydit.train_recipe` | objectives, CFG dropout, data encoded once, EMA |
# | 09b | training loop | `tinydit.train` | checkpoints, the trainer, DDP, the book model |
# | 10 | evaluation | `tinydit.evaluate` | a pixel reader that grades the pipeline's pictures: adherence, Fréchet distance |
# | 11a | guidance | `tinydit.guidance` | classifier-free guidance, rescale, dynamic thresholding, APG |
# | 11b | guidance measured | `tinydit.guidance_study` | the cures measured on the book model |
# | 12a | offloading | `tinydit.offload` | model, block and leaf offload with hooks |
# | 12b | precision | `tinydit.precision`, `tinydit.stepcache` | fp16 / bf16 / fp8 weights, step caching, compile |
# | 13 | pipeline | `tinydit.pipeline` | text-to-image end to end through public steps, the CLI |
# | 14 | folders & demo | `tinydit.formats`, `tinydit.demo` | diffusers' layout both ways, attention maps, widget demo |
# | 15 | img2img & inpainting | `tinydit.edit` | SDEdit strength, masked latent blending |
# | 16 | safety | `tinydit.safety` | a safety checker on generated images |
# | 17a | appendix: loading | `tinydit.loading` | key maps and converters for real checkpoints |
# | 17b | appendix: weights | `tinydit.checkpoint` | reading weight files safely |
#
# Each module comes from exactly one notebook (a notebook may write two small modules), so every
# module reads as one lesson; `tools/export.py --check` enforces it.
# Each chapter uses only what came before it. The README lists which chapters have landed.
# A chapter too long for one sitting comes in parts (12a, 12b): its number stays, so a reference to
# "chapter 12" still points at the right place.

# %% [markdown]
# ## Two scales, one codebase
#
# **Book scale** is the default. Images are 32×32, the VAE compresses them 4× per side into
# 4×8×8 latents, the DiT has a few million parameters, and the text encoder is a tiny transformer
# trained on our own captions. Everything trains and samples on a 2-core laptop CPU in minutes.
#
# **Real scale** is the same code with real weights. The VAE class loads the autoencoders of
# SD 1.x, SDXL, SD3 and Flux; the DiT class loads DiT-XL/2 and PixArt transformers; the text chapter
# wraps CLIP-L and T5 from `transformers`. They load from a local folder or a Hugging Face hub id.
# Because the book must also build without a network, each loader is proven by a **parity test**:
# we build a tiny random model with the reference library (`diffusers`, `transformers`), save it in
# that library's real on-disk format, load it with tinydit and compare outputs numerically.

# %% [markdown]
# ## How to run it
#
# ```bash
# pip install -e ".[notebooks]"      # the package plus JupyterLab, jupytext, ipywidgets, matplotlib
# jupyter lab notebooks/             # jupytext opens the percent .py files as notebooks
# ```
#
# Every notebook reads one environment variable, `TINYDIT_FAST`. The test suite sets
# `TINYDIT_FAST=1` and every chapter then runs at CI size (fewer samples, fewer training steps);
# without it the chapter runs at book size. Both are honest runs of the same code — only the
# numbers change.
#
# Conventions that tie the chapters together:
#
# - images are tensors in $[-1, 1]$ of shape `(B, C, H, W)`; token sequences are `(B, T, D)`;
# - everything random takes a seed or a `torch.Generator`, and initial noise is drawn on the CPU,
#   so the same seed gives the same picture on the same machine;
# - weights are stored as safetensors with a JSON config beside them.

# %%
import os

import torch

import tinydit


FAST = os.environ.get("TINYDIT_FAST") == "1"
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"tinydit {tinydit.__version__}, torch {torch.__version__}, device: {device}, "
      f"CPU threads: {torch.get_num_threads()}, fast mode: {FAST}")

# %% [markdown]
# ## One convention for bad input
#
# A library that a reader trusts must never turn a typo into a silently wrong picture. Every public
# entry point of `tinydit` checks its arguments with the small helpers below and, when something is
# wrong, raises an error that names **the argument, what was given, and what was expected**:
#
# ```
# ValueError: num_inference_steps: expected an integer >= 1, got 0
# ```
#
# The checks run once per call at the entry points (a loader, a sampler's start, the pipeline), not
# inside a model's `forward`: a value check such as `if (t < 0).any()` forces the GPU to wait for
# the CPU on every forward pass and breaks `torch.compile` graphs. Chapters teach each idea first
# without any guard; the exported versions call these helpers. The module is `tinydit.validation`.

# %% [markdown]
# The whole convention fits in four lines. Here it is for one case, a positive integer:

# %%
def positive_int(name, value):
    """The lesson version: no numpy, no bounds other than 1, no bool special case."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


for ok in (1, 20):
    assert positive_int("steps", ok) == ok
try:
    positive_int("steps", 0)
except ValueError as e:
    assert str(e) == "steps: expected an integer >= 1, got 0"
else:
    raise AssertionError("0 steps was accepted")

# %% [markdown]
# The production helpers below add what real callers need: numpy integers (which are not `int`)
# count as integers, `True` does not (it *is* an `int` in Python, and `steps=True` is a typo, not
# one step), NaN and infinity are named as such, and each helper returns the value it checked.

# %%
# | default_exp validation

# %%
# | export
"""Argument checks shared by every public entry point of tinydit.

Each helper returns the (normalised) value or raises `ValueError` / `TypeError` whose message
starts with the argument's name, then says what was expected and what was given. Numpy scalars
count as numbers; booleans do not count as integers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import numpy as np
import torch


# Refuse allocations above this many bytes before trying them (a typo such as `--n 100000`).
MAX_SENSIBLE_BYTES = 8 * 2**30


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

# %%
# | export
def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int in [minimum, maximum]; numpy integers accepted, bools refused."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if not _is_int(value):
        raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {value}")
    return value

# %%
# | export
def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True) -> float:
    """`value` as a finite Python float within the given bounds; ints and numpy numbers accepted."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and (value < minimum if min_inclusive else value <= minimum):
        raise ValueError(f"{name}: expected a number {'>=' if min_inclusive else '>'} {minimum}, got {value}")
    if maximum is not None and (value > maximum if max_inclusive else value >= maximum):
        raise ValueError(f"{name}: expected a number {'<=' if max_inclusive else '<'} {maximum}, got {value}")
    return value

# %%
# | export
def check_bool(name: str, value) -> bool:
    """`value` as a Python bool; numpy booleans accepted. Strings are refused: `"false"` is truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")
    return bool(value)

# %%
# | export
def check_choice(name: str, value, choices) -> object:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {valid}, got {value!r}")
    return value

# %%
# | export
def check_tensor(name: str, x, ndim: int | tuple[int, ...] | None = None, floating: bool = False,
                 finite: bool = False) -> torch.Tensor:
    """`x` if it is a tensor with `ndim` dimensions (an int or a tuple of allowed counts), a
    floating dtype when `floating`, and no NaN / inf values when `finite`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if finite:
        check_finite(name, x)
    return x

# %%
# | export
def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """`x` if every value is finite; otherwise say how many are NaN or infinite. Tensors on the
    `meta` device (shapes without values) pass."""
    if (x.is_floating_point() or x.is_complex()) and not x.is_meta:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_nan = int(torch.isnan(x).sum())
            raise ValueError(f"{name}: expected finite values, got {n_nan} NaN and "
                             f"{int(bad.sum()) - n_nan} infinite value(s) in shape {tuple(x.shape)}")
    return x

# %%
# | export
def check_bool_mask(name: str, mask, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A boolean mask (True = keep / attend). Float masks are refused: an additive mask
    (0 = attend, -inf = ignore) cast with `.bool()` would silently mean the opposite."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a boolean torch.Tensor (True = attend), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a boolean mask (True = attend), got dtype {mask.dtype}; "
                        "additive float masks are not accepted, convert with `mask == 0` if yours is one")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask

# %%
# | export
def expect_error(call, pattern: str, error: type[Exception] | tuple = ValueError) -> Exception:
    """Run `call` and require `error` with a message matching the regex `pattern`; print and return
    it. The chapters show every expected error this way, so a check fails when no error comes."""
    try:
        call()
    except error as e:
        print(f"{type(e).__name__}: {e}")
        assert re.search(pattern, str(e)), f"message {str(e)!r} does not match {pattern!r}"
        return e
    raise AssertionError(f"expected {error} matching {pattern!r}, but no error was raised")

# %%
# | export
def check_memory(name: str, n_bytes: int, limit: int = MAX_SENSIBLE_BYTES) -> None:
    """Refuse, before allocating, a request that would need more than `limit` bytes."""
    if n_bytes > limit:
        raise ValueError(f"{name}: this would need about {n_bytes / 2**30:.1f} GiB of memory, more than "
                         f"the {limit / 2**30:.0f} GiB tinydit allows for one request; ask for less")

# %%
# | export
def check_prompts(name: str, prompts) -> list[str]:
    """Prompts as a non-empty list of strings. One string is one prompt, never its characters (as in
    diffusers: `prompt` may be a string or a list); anything else is refused by name."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name}: expected a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name}: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(p).__name__} ({p!r:.40})")
    return list(prompts)

# %%
# | export
def check_device(name: str, device, allow_meta: bool = False) -> torch.device:
    """`device` as a torch.device that exists here ('cpu', 'cuda', 'cuda:1', 'mps'); 'meta' (shapes
    without data: it cannot run a model) only where `allow_meta` (offloading's bookkeeping)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected a device such as 'cuda', 'cuda:1', 'cpu' or 'meta', got {device!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"{name}: {str(device)!r}, but this machine has {count} CUDA device(s)")
    elif device.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"{name}: {str(device)!r}, but this build of torch has no {device.type} device here")
    elif device.type == "meta" and not allow_meta:
        raise ValueError(f"{name}: 'meta' holds shapes without data and cannot run a model; use 'cpu' or 'cuda'")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{name}: expected a device such as 'cuda', 'cuda:1', 'cpu' or 'meta', got {str(device)!r}")
    return device

# %%
# | export
def unknown_fields(given, config_class) -> list[str]:
    """The keys of `given` (a dict of settings) that are not fields of the dataclass `config_class`,
    sorted: every reader of a config file or of keyword settings refuses them by name."""
    return sorted(set(given) - {f.name for f in dataclasses.fields(config_class)})

# %% [markdown]
# Each helper returns the value it checked, so an entry point reads as a short list of facts:

# %%
import numpy as np

from tinydit.validation import check_float, check_int


for ok in (1, 20, np.int64(20)):  # the production helper agrees with the lesson, and takes numpy ints
    assert check_int("steps", ok, minimum=1) == positive_int("steps", int(ok))
for typo in (True, 2.0, "3"):
    try:
        check_int("steps", typo, minimum=1)
    except TypeError as e:
        print(e)
        assert str(e).startswith("steps: expected an integer")
    else:
        raise AssertionError(f"{typo!r} was accepted as a step count")
steps = check_int("num_inference_steps", 20, minimum=1)
try:
    check_float("guidance_scale", float("nan"), minimum=0)
except ValueError as e:
    print(e)
    assert str(e).startswith("guidance_scale: expected a finite number")
else:
    raise AssertionError("a NaN guidance scale was accepted")

# %% [markdown]
# ## A first look at the data
#
# Chapter 01 builds the dataset every later chapter trains on. Here are eight samples, straight
# from the package, to show where we are going: by the end of the book the model draws pictures
# like these from their captions alone.

# %%
from tinydit.data import ShapesDataset, dataset_grid


ds = ShapesDataset(8, seed=0)
image, caption = ds[0]
assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
dataset_grid(ds, n=8, cols=8, scale=3)

# %% [markdown]
# ## One convention for long classes
#
# A production class can be longer than a screen. Rather than one cell of a hundred lines, a chapter
# builds it across cells, the way *Dive into Deep Learning* does: the class's first cell holds its
# idea (`__init__` and `forward`), and each later cell adds one method with `@add_to_class(Name)`.
# In the notebook the decorator attaches the method when the cell runs; `tools/export.py` writes
# it inside the class body of the generated module, so `tinydit` reads as ordinary Python.

# %%
# | export notebook
"""Helpers that the chapters use while they are read; the generated package never imports this."""

import sys


def add_to_class(cls):
    """Decorator: attach the decorated function (or property, classmethod) to `cls` as a method.

    The notebook's global of the same name, if there is one, stays what it was: a method `where`
    must not replace the module's function `where` that other code calls."""
    def attach(member):
        function = getattr(member, "fget", None) or getattr(member, "__func__", None) or member
        setattr(cls, function.__name__, member)
        return sys._getframe(1).f_globals.get(function.__name__, member)
    return attach

# %%
class Counter:
    def __init__(self):
        self.n = 0

@add_to_class(Counter)
def tick(self):
    self.n += 1
    return self

assert Counter().tick().tick().n == 2


def size(x):
    return len(x)

@add_to_class(Counter)
def size(self):  # a method named like a function of the notebook ...
    return self.n

assert size("abc") == 3 and Counter().size() == 0  # ... leaves the function as it was

# %% [markdown]
# ## Summary
#
# - The book builds a latent text-to-image DiT in eighteen chapters (the longer ones in two or three
#   sittings); each sitting exports its module of `tinydit` and later chapters import it.
# - Every chapter runs at book size by default and at CI size with `TINYDIT_FAST=1`.
# - Bad input gets an error that names the argument, what was expected and what was given
#   (`tinydit.validation`); value checks run at entry points, never inside a model's `forward`.
#
# ## Exercises
#
# 1. Call `check_int("n", True)` and `check_int("n", np.int64(3))`. Why is a boolean refused where a
#    numpy integer is accepted?
# 2. `check_memory` refuses requests above 8 GiB. Estimate the bytes of a grid of 100,000 book images
#    at scale 3 and check that chapter 01's `image_grid` refuses it before allocating.
# 3. Run chapter 05 with and without `TINYDIT_FAST=1` and compare its printed timings. Which cells
#    take the difference?
