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
# | 00 | introduction | — | this page |
# | 01 | data | `tinydit.data` | procedural shapes with captions; optional colour emoji |
# | 02 | VAE | `tinydit.vae` | AutoencoderKL; the book's tiny VAE; loading SD/SDXL/SD3/Flux VAEs |
# | 03 | embeddings | `tinydit.embeddings` | sinusoidal timestep, 2D sin-cos position, rotary embeddings |
# | 04 | noise schedules | `tinydit.schedules` | linear, cosine, scaled-linear, zero-terminal-SNR, flow matching |
# | 05 | DiT | `tinydit.dit`, `tinydit.attention` | patchify, attention, adaLN-Zero; loading DiT-XL/2 |
# | 06 | text encoders | `tinydit.text` | CLIP + T5 dual encoder, cross-attention, PixArt loading |
# | 07 | training | `tinydit.train` | losses, CFG dropout, EMA, the book model |
# | 08 | samplers | `tinydit.samplers` | Euler, Euler ancestral, DPM++ 2M / SDE |
# | 09 | guidance | `tinydit.guidance` | classifier-free guidance, rescale, dynamic thresholding |
# | 10 | efficiency | `tinydit.offload`, `tinydit.precision` | CPU offload, fp16 / bf16 weights |
# | 11 | pipeline | `tinydit.pipeline` | text-to-image end to end, CLI, widget demo |
# | 12 | img2img & inpainting | `tinydit.pipeline` | SDEdit strength, masked latent blending |
# | 13 | safety | `tinydit.safety` | a safety checker on generated images |
#
# Each chapter uses only what came before it. The README lists which chapters have landed.

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
