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
# # 09 · Training the book model: a text-to-image DiT that composes what it never saw
#
# Chapters 01–08 built every part of a text-to-image engine — data, VAE, text encoder, a PixArt-style
# text-conditioned DiT, samplers — but the DiT's weights are still random. This chapter trains it.
# The result is the **book model**: a 3.9 M-parameter text-to-image model that runs on a laptop CPU,
# ships with the package (`tinydit/assets/book_model`), and loads unmodified in diffusers'
# `PixArtTransformer2DModel`. On the way:
#
# 1. one training step written by hand (the whole idea in 15 lines), then the production loop;
# 2. three **objectives** (ε, v, flow) and their loss weights; **caption dropout** for guidance;
# 3. the frozen encoders run **once** over the data (measured: why that matters);
# 4. AdamW with warm-up and cosine decay, gradient clipping, **EMA** weights;
# 5. **checkpoints you cannot lose** (atomic writes, resume bit for bit) and **torchrun** (DDP);
# 6. a **pixel reader** that grades what the model draws, GenEval-style, on colour–shape pairs the
#    model never saw in training (`data.HELD_OUT`) — compositional generalisation is the point.
#
# It exports `tinydit.train` (the loop, the book model's layout) and `tinydit.evaluate` (the reader
# and the metrics).

# %%
# | default_exp train

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from tinydit import data
from tinydit.data import ShapesDataset, image_grid, pil_to_tensor
from tinydit.text import load_book_text_encoder
from tinydit.textdit import TextDiT, TextDiTConfig
from tinydit.vae import load_book_vae
from tinydit.validation import expect_error

torch.set_num_threads(1 if FAST else torch.get_num_threads())  # CI shares 2 cores with other jobs
vae, text_encoder = load_book_vae(), load_book_text_encoder()  # frozen: chapters 02 and 06

# %% [markdown]
# ## 1. One training step, by hand
#
# A diffusion model learns to undo noise. Take a clean latent $x_0$ (the VAE's 4×8×8 encoding of a
# 32×32 image), pick a step $t$ of the DDPM schedule, mix in noise,
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$, and ask the network — which
# also reads the caption's tokens — to predict something from which $x_0$ follows. We use the
# **velocity** $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0$ (Salimans & Ho
# 2022). With probability $p$ the caption is swapped for the empty prompt, so the same network also
# learns the unconditional prediction that classifier-free guidance needs. That is all of it:

# %%
def teach_step(model, opt, x0, tokens, mask, empty_tokens, empty_mask, alphas_cumprod, p_drop=0.1):
    B = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (B,))  # (B,) a random step per sample
    noise = torch.randn_like(x0)  # (B, 4, 8, 8)
    a = alphas_cumprod[t].sqrt().view(B, 1, 1, 1).float()  # signal scale
    s = (1 - alphas_cumprod[t]).sqrt().view(B, 1, 1, 1).float()  # noise scale
    x_t = a * x0 + s * noise  # (B, 4, 8, 8) the noised latent
    v = a * noise - s * x0  # (B, 4, 8, 8) the target
    drop = torch.rand(B) < p_drop  # (B,) caption dropout
    tokens = torch.where(drop[:, None, None], empty_tokens, tokens)  # (B, T, 96)
    mask = torch.where(drop[:, None], empty_mask, mask)  # (B, T)
    loss = F.mse_loss(model(x_t, t, context=tokens, context_mask=mask), v)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


images, captions = zip(*(ShapesDataset(8, split="train")[i] for i in range(8)))
with torch.no_grad():
    x0 = vae.to_latent(torch.stack(images))  # (8, 4, 8, 8)
    emb, empty = text_encoder(list(captions)), text_encoder([""])
T_len = emb.tokens.shape[1]
empty_tokens = torch.cat([empty.tokens[0], torch.zeros(T_len - empty.tokens.shape[1], 96)])  # (T, 96)
empty_mask = torch.cat([empty.mask[0], torch.zeros(T_len - empty.mask.shape[1], dtype=torch.bool)])  # (T,)
betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # PixArt's linear DDPM schedule
ab = torch.cumprod(1 - betas, 0)  # (1000,) alpha-bar
torch.manual_seed(0)
toy = TextDiT(TextDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                            learn_sigma=False, context_dim=96, modulation="adaln_single"))
toy_opt = torch.optim.AdamW(toy.parameters(), lr=1e-3)
toy_losses = [teach_step(toy, toy_opt, x0, emb.tokens, emb.mask, empty_tokens, empty_mask, ab) for _ in range(60)]
print(f"loss {toy_losses[0]:.3f} -> {sum(toy_losses[-10:]) / 10:.3f} over 60 steps on one batch of 8")
assert sum(toy_losses[-10:]) / 10 < 0.8 * toy_losses[0]  # measured 0.97 -> 0.65; it learns

# %% [markdown]
# The production loop does the same arithmetic with everything a long run needs around it. Its
# recipe is one dataclass, saved in every checkpoint; each field says why it has its value. The
# defaults are the shipped book model's run; `TrainConfig.fast()` is the same recipe at CI size.

# %%
# | export
"""Training the book model (chapter 09): the TrainConfig recipe, chapter 08's Parametrisation as the
objective, data encoded once, EMA, atomic checkpoints and bit-exact resume, torchrun (DDP), and the
diffusers layout the pipeline loads. Stands on the pipeline (`book_pipeline`); inference never imports it."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from itertools import zip_longest
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tinydit.checkpoint import BOOK_MODEL_DIR, _read_pickle, check_and_load, read_config
from tinydit.data import ShapesDataset
from tinydit.denoisers import Parametrisation
from tinydit.pipeline import SamplingConfig, TextToImagePipeline
from tinydit.samplers import DEFAULT_SAMPLER
from tinydit.schedules import SCHEDULE_ALIASES, SCHEDULES, min_snr_weights
from tinydit.text import TextEmbeddings, load_book_text_encoder
from tinydit.textdit import TextDiT, config_from_diffusers_pixart, pixart_to_diffusers
from tinydit.vae import load_book_vae
from tinydit.validation import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_memory,
)

OBJECTIVES = ("epsilon", "v_prediction", "flow")
BETA_SCHEDULES = SCHEDULES + tuple(SCHEDULE_ALIASES)
MAX_SEED = 2**32 - 1  # seeds of a run (the CLI's --seed range); a step's generator is seeded seed * 1e6 + step

# %%
# | export
def _check_objective_settings(kind: str, zero_terminal_snr: bool, min_snr_gamma: float) -> None:
    """Refuse, by name, a setting the objective cannot learn with or would silently ignore."""
    check_bool("zero_terminal_snr", zero_terminal_snr)
    check_float("min_snr_gamma", min_snr_gamma, minimum=0)
    if zero_terminal_snr and kind == "epsilon":
        raise ValueError("zero_terminal_snr: at SNR 0 the noise *is* the input, so an epsilon model cannot "
                         "recover x0 at the last step; use objective='v_prediction' (Lin et al. 2023)")
    if kind == "flow" and (zero_terminal_snr or min_snr_gamma > 0):
        name, value = ("zero_terminal_snr", True) if zero_terminal_snr else ("min_snr_gamma", min_snr_gamma)
        raise ValueError(f"{name}: only the DDPM objectives (epsilon, v_prediction) use it; objective='flow' "
                         f"would ignore it, got {name}={value}")


def _training_bytes(cfg) -> int:
    """About what the run holds per parameter: weights, gradients, EMA, AdamW's two moments (fp32)."""
    n_params = (16 * cfg.depth + 8) * cfg.hidden_size**2  # 16 h^2 per block (attention, cross, MLP)
    return 5 * 4 * n_params


@dataclass
class TrainConfig:
    """Everything that defines a training run of the book model (saved in every checkpoint)."""

    # the network: a PixArt-style TextDiT (adaLN-single, cross-attention) that diffusers loads unmodified
    hidden_size: int = 192  # 6 heads of 32: 3.9 M parameters, ~0.45 s per step of 128 on 2 cores
    depth: int = 6  # blocks; 6 x 192 fits the hour, deeper / wider halves the steps we can afford
    num_heads: int = 6
    patch_size: int = 2  # 16 tokens on the 4x8x8 latent; patch 1 (64 tokens) costs 3.6x per step
    # what the network learns
    objective: str = "v_prediction"  # "epsilon" | "v_prediction" (DDPM, diffusers' stock schedulers) | "flow"
    beta_schedule: str = "linear"  # PixArt's DDPM betas, 1e-4 .. 0.02 over 1000 steps
    zero_terminal_snr: bool = False  # rescale the betas so the last step is pure noise (needs v_prediction)
    min_snr_gamma: float = 0.0  # min-SNR-gamma weights (Hang et al. 2023); 0 = plain v-MSE, see the text
    caption_dropout: float = 0.1  # p of training on the empty prompt: one model serves CFG
    # data: the shapes world's train split (never a HELD_OUT pair), encoded once
    n_train: int = 100_000  # scenes; 6,000 steps of 128 see each about 8 times
    data_seed: int = 0
    cache: bool = True  # VAE latents and text tokens computed once (section 3 measures the saving)
    # optimisation
    steps: int = 6000  # 44 min at 0.435 s/step on 2 idle cores (+3 min of encoding)
    batch_size: int = 128  # the global batch: split over the processes of torchrun
    lr: float = 5e-4
    warmup_steps: int = 500  # linear warm-up: AdamW's second moments are noise at first
    min_lr_ratio: float = 0.1  # cosine decay to 10 % of lr at the last step
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global gradient norm
    ema_decay: float = 0.999  # EMA of the weights (sampled from); ~1,000-step memory
    seed: int = 0  # model init, noise, timesteps, caption dropout (one generator per step)
    # checkpoints and speed
    checkpoint_every: int = 500  # steps between resumable checkpoints
    keep_last: int = 3  # checkpoints kept on disk (older ones deleted after a good save)
    snapshot_every: int = 500  # EMA-only weights kept for the adherence-vs-time curve; 0 = none
    compile: bool = False  # torch.compile the training forward
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "no"

    def __post_init__(self):
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "no"))
        for name in ("hidden_size", "depth", "num_heads", "patch_size", "n_train", "steps", "batch_size", "keep_last"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("warmup_steps", "checkpoint_every", "snapshot_every"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        for name in ("data_seed", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0, maximum=MAX_SEED))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size, num_heads: hidden_size={self.hidden_size} must be a multiple of "
                             f"num_heads={self.num_heads}")
        if 8 % self.patch_size:
            raise ValueError(f"patch_size: the 8x8 latent must split into whole patches (1, 2, 4 or 8), "
                             f"got {self.patch_size}")
        check_memory("hidden_size, depth", _training_bytes(self))
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        for name in ("cache", "compile"):
            check_bool(name, getattr(self, name))
        check_float("caption_dropout", self.caption_dropout, minimum=0, maximum=1)
        check_float("lr", self.lr, minimum=0, min_inclusive=False)
        check_float("min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        check_float("weight_decay", self.weight_decay, minimum=0)
        check_float("ema_decay", self.ema_decay, minimum=0, maximum=1)
        check_float("grad_clip", self.grad_clip, minimum=0, min_inclusive=False)
        _check_objective_settings(self.objective, self.zero_terminal_snr, self.min_snr_gamma)

    @classmethod
    def fast(cls, **overrides) -> TrainConfig:
        """The same recipe at CI size (TINYDIT_FAST=1): a few steps on a few scenes."""
        small = dict(n_train=512, steps=20, batch_size=32, warmup_steps=5, checkpoint_every=10,
                     snapshot_every=10, hidden_size=64, depth=2, num_heads=2)
        return cls(**{**small, **overrides})


def _check_train_config(name: str, cfg) -> TrainConfig:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{name}: expected a TrainConfig, got {type(cfg).__name__}"
                        + (" (build one: TrainConfig(**settings))" if isinstance(cfg, dict) else ""))
    return cfg


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "snapshot_every", "compile", "mixed_precision")

# %% [markdown]
# ## 2. Three objectives, one denoiser
#
# What the network predicts is a choice. **ε** (Ho et al. 2020) is the classic; **v** is better
# behaved at high noise, where ε says almost nothing about $x_0$, and is the only one of the two that
# survives a **zero-terminal-SNR** schedule (Lin et al. 2023: the last step pure noise, so training
# and sampling start from the same place). **Flow** (rectified flow, SD3/Flux) mixes
# $x_t = (1-t)\,x_0 + t\,\varepsilon$ and predicts $\varepsilon - x_0$. Chapter 08's
# `Parametrisation` is that choice as one object: it draws the training pair (`noised`), hands the
# samplers the matching denoiser and writes the scheduler config a saved folder carries, so none of
# the three can disagree with another; `parametrisation(cfg)` builds it from a `TrainConfig`. The check: a network that outputs the exact target makes the denoiser
# return exactly $x_0$, for each objective.
#
# The book model uses **v on PixArt's linear DDPM schedule** because diffusers' `PixArtAlphaPipeline`
# samples that with a stock scheduler (`DPMSolverMultistepScheduler(prediction_type="v_prediction")`),
# so the weights work outside this book (chapter 12).

# %%
# | export
def parametrisation(cfg: TrainConfig) -> Parametrisation:
    """The training objective of a config as chapter 08's Parametrisation: the same object draws the
    training pairs (`noised`), hands the samplers their denoiser, and writes the scheduler config."""
    _check_train_config("cfg", cfg)
    return Parametrisation(prediction=cfg.objective, beta_schedule=cfg.beta_schedule,
                           zero_terminal_snr=cfg.zero_terminal_snr)


def loss_weight(param: Parametrisation, t: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """(B,) per-sample loss weights at model times `t`: 1, or min-SNR-gamma (Hang et al. 2023) on DDPM targets."""
    if check_float("min_snr_gamma", min_snr_gamma, minimum=0) == 0 or param.prediction == "flow":
        return torch.ones(len(t), device=t.device)
    ab = param.alphas_cumprod[t.cpu()].float().to(t.device)  # (B,)
    snr = (ab / (1 - ab)).clamp(min=1e-10)  # clamp: zero-terminal-SNR's last step has SNR 0
    return min_snr_weights(snr, min_snr_gamma, param.prediction)

# %%
g = torch.Generator().manual_seed(0)
x0_demo, noise_demo = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
u_demo, n_demo = torch.rand(6, generator=g), torch.randn(6, generator=g)
for kind in OBJECTIVES:
    obj = parametrisation(TrainConfig(objective=kind))
    x_t, t, target = obj.noised(x0_demo, noise_demo, u_demo, n_demo)

    class Oracle(torch.nn.Module):  # knows the answer for this batch
        def forward(self, x, timestep, target=target, **_):
            return target

    if kind == "flow":
        sigma, x_in = t / obj.num_train_timesteps, x_t
    else:  # chapter 08's denoisers take Karras-scaled inputs x0 + sigma * noise
        sigma = ((1 - obj.alphas_cumprod[t]) / obj.alphas_cumprod[t]).sqrt().float()
        x_in = x_t * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
    err = (obj.denoiser(Oracle())(x_in, sigma) - x0_demo).abs().max().item()
    print(f"{kind:13s} oracle -> x0, max error {err:.1e}")
    assert err < 1e-4  # float32 round-off: measured <= 3.2e-5 (epsilon, at the noisiest step)

# the teaching step's target is the production target (same draws)
step_demo = (u_demo * 1000).long()
a_demo, s_demo = ab[step_demo].sqrt().view(-1, 1, 1, 1).float(), (1 - ab[step_demo]).sqrt().view(-1, 1, 1, 1).float()
torch.testing.assert_close(parametrisation(TrainConfig()).noised(x0_demo, noise_demo, u_demo, n_demo)[2],
                           a_demo * noise_demo - s_demo * x0_demo)

# %% [markdown]
# **Which steps count.** A uniform $t$ with a plain MSE on $v$ weighs every step alike *in v*. In
# terms of the error on $x_0$ that is a weight of $\mathrm{SNR}+1$: never below 1, even at pure
# noise, where the layout of the picture is decided. Min-SNR-γ (Hang et al. 2023) clips the easy,
# low-noise steps at γ — and, for a v-loss, also scales the high-noise steps down by SNR/(SNR+1).
# The plot shows the three weights over the schedule. The book model trains with the plain v-loss
# (`min_snr_gamma=0`): our captions are about *where* and *what colour*, decided in the high-noise
# half that min-SNR mutes. `min_snr_gamma=5` stays one flag away.

# %%
u_axis = torch.linspace(0, 0.999, 200)
zeros = torch.zeros(200, 4, 8, 8)
fig, ax = plt.subplots(figsize=(6, 3))
for label, kind, gamma in [("v, plain MSE (book model)", "v_prediction", 0), ("v, min-SNR-5", "v_prediction", 5),
                           ("epsilon, min-SNR-5", "epsilon", 5)]:
    obj = parametrisation(TrainConfig(objective=kind))
    t_axis = obj.noised(zeros, zeros, u_axis, torch.zeros(200))[1]  # (200,) the DDPM steps drawn
    ax.plot(u_axis * 1000, loss_weight(obj, t_axis, gamma), label=label)
ax.set(xlabel="DDPM step t (noise grows →)", ylabel="loss weight", title="loss weight per step")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. The data, encoded once
#
# The VAE and the text encoder are frozen, so their outputs for a given scene never change. Running
# them once over the training set, instead of in every step, trades memory (100,000 scenes: 100 MB
# of latents, ~800 MB of text tokens) for time; `StreamingData` is the uncached alternative with the
# same interface. Section 7 measures a step both ways.

# %%
# | export
@dataclass
class EncodedData:
    """The training set after the frozen encoders: what a step reads."""

    latents: torch.Tensor  # (N, 4, 8, 8) VAE latents, scaled and shifted (chapter 02's to_latent)
    tokens: torch.Tensor  # (N, T, 96) the book text encoder's last-layer states
    mask: torch.Tensor  # (N, T) bool, True = real token
    empty_tokens: torch.Tensor  # (T, 96) the empty prompt "", what caption dropout trains on
    empty_mask: torch.Tensor  # (T,)

    def __len__(self) -> int:
        return len(self.latents)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.latents[idx], self.tokens[idx], self.mask[idx]  # (B, 4, 8, 8), (B, T, 96), (B, T)


def _pad_tokens(emb: TextEmbeddings, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = emb.tokens.shape
    tokens = torch.cat([emb.tokens, emb.tokens.new_zeros(B, length - T, D)], 1)  # (B, length, D)
    return tokens, torch.cat([emb.mask, emb.mask.new_zeros(B, length - T)], 1)  # (B, length)


def _check_dataset(dataset) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset: expected a sequence of (image, caption) pairs such as ShapesDataset, "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"dataset: yields no samples (len 0): {dataset!r}; nothing to train on")


def _pairs(dataset, indices) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, 32, 32) and captions of dataset[i] for i in indices, each item checked."""
    images, captions = [], []
    for i in indices:
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"dataset: expected (image, caption) pairs, got {type(item).__name__} at index {i}")
        if not isinstance(item[0], torch.Tensor) or tuple(item[0].shape) != (3, 32, 32):
            got = tuple(item[0].shape) if isinstance(item[0], torch.Tensor) else type(item[0]).__name__
            raise ValueError(f"dataset: expected (3, 32, 32) images (4x8x8 latents), got {got} at index {i}")
        images.append(item[0])
        captions.append(item[1])
    return torch.stack(images), captions


@torch.no_grad()
def encode_batch(images: torch.Tensor, captions: list[str], vae, text_encoder, length: int | None = None):
    """Latents (B, 4, 8, 8) and padded text tokens / mask for a batch of images in [-1, 1] and captions."""
    emb = text_encoder(captions)
    tokens, mask = _pad_tokens(emb, length or text_encoder.max_length)
    return vae.to_latent(images), tokens, mask


@torch.no_grad()
def encode_dataset(dataset, vae=None, text_encoder=None, batch_size: int = 500, disable: bool | None = None) -> EncodedData:
    """Run the frozen VAE and text encoder over a dataset of (image, caption) pairs once."""
    _check_dataset(dataset)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    vae = vae if vae is not None else load_book_vae()
    text_encoder = text_encoder if text_encoder is not None else load_book_text_encoder()
    parts = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding the training set", disable=disable):
        images, captions = _pairs(dataset, range(start, min(start + batch_size, len(dataset))))
        parts.append(encode_batch(images, captions, vae, text_encoder))
    latents, tokens, mask = (torch.cat(p) for p in zip(*parts))
    T = int(mask.sum(1).max())  # trim the padding no caption uses
    empty_tokens, empty_mask = encode_batch(torch.zeros(1, 3, 32, 32), [""], vae, text_encoder, length=T)[1:]
    return EncodedData(latents, tokens[:, :T].contiguous(), mask[:, :T].contiguous(), empty_tokens[0], empty_mask[0])


class StreamingData:
    """The uncached alternative (`TrainConfig(cache=False)`): render and encode each batch when it is
    drawn. Same interface as `EncodedData`; costs encoder time every step, no memory."""

    def __init__(self, dataset, vae=None, text_encoder=None):
        _check_dataset(dataset)
        _pairs(dataset, [0])  # the first item, before any training
        self.dataset = dataset
        self.vae = vae if vae is not None else load_book_vae()
        self.text_encoder = text_encoder if text_encoder is not None else load_book_text_encoder()
        _, tokens, mask = encode_batch(torch.zeros(1, 3, 32, 32), [""], self.vae, self.text_encoder)
        self.empty_tokens, self.empty_mask = tokens[0], mask[0]  # padded to the encoder's max_length

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, captions = _pairs(self.dataset, [int(i) for i in idx])
        return encode_batch(images, captions, self.vae, self.text_encoder)


def _check_encoded_data(data) -> None:
    """What a Trainer reads: EncodedData of consistent shapes, finite latents, at least one sample."""
    if isinstance(data, StreamingData):
        return
    if not isinstance(data, EncodedData):
        raise TypeError(f"data: expected EncodedData (encode_dataset) or StreamingData, got {type(data).__name__}")
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in vars(data).items()}
    n, t, d = got["tokens"] if isinstance(got["tokens"], tuple) and len(got["tokens"]) == 3 else (-1, -1, -1)
    want = {"latents": (n, 4, 8, 8), "tokens": (n, t, d), "mask": (n, t), "empty_tokens": (t, d), "empty_mask": (t,)}
    if got != want:
        raise ValueError(f"data: expected latents (N, 4, 8, 8), tokens (N, T, D), mask (N, T), empty_tokens (T, D) "
                         f"and empty_mask (T,), got {got}")
    if n == 0:
        raise ValueError("data: holds no samples (N = 0); nothing to train on")
    check_finite("data: latents", data.latents)

# %% [markdown]
# ## 4. Order, randomness, learning rate, EMA
#
# Four small functions make a run reproducible and resumable. The data order is a pure function of
# the step (seeded permutations, epoch after epoch); every random draw of a step comes from a
# generator seeded by the step; the learning rate warms up linearly (AdamW's second-moment estimates
# are noise at first) and then decays along a cosine; the weights we *sample* from are an exponential
# moving average of the trained ones, which smooths the last thousand steps of SGD noise.

# %%
# | export
def _check_step_args(step: int, seed: int | None = None, **counts: int) -> None:
    """step >= 0, seed in [0, MAX_SEED], every other count >= 1."""
    check_int("step", step, minimum=0)
    if seed is not None:
        check_int("seed", seed, minimum=0, maximum=MAX_SEED)
    for name, value in counts.items():
        check_int(name, value, minimum=1)


def _check_ema_args(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """Two copies of one network (same parameter names and shapes), decay in [0, 1], step >= 0."""
    for name, m in (("ema", ema), ("model", model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(m).__name__}")
    mine, theirs = ([(k, tuple(p.shape)) for k, p in m.named_parameters()] for m in (ema, model))
    if mine != theirs:
        a, b = next((a, b) for a, b in zip_longest(mine, theirs) if a != b)
        raise ValueError(f"ema: expected a copy of model (same parameter names and shapes), first difference: "
                         f"ema {a}, model {b}")
    check_float("decay", decay, minimum=0, maximum=1)
    check_int("step", step, minimum=0)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of `step`: epochs of seeded permutations, read in order, so the
    data position is a pure function of the step (resume needs nothing else)."""
    _check_step_args(step, seed, n=n, batch_size=batch_size)
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's noise, timesteps and caption dropout (so a resumed run draws the same)."""
    _check_step_args(step, seed)
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to `min_ratio` at the last step."""
    _check_step_args(step, total=total)
    check_int("warmup", warmup, minimum=0)
    check_float("min_ratio", min_ratio, minimum=0, maximum=1)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model, with decay warmed up as (1 + step) / (10 + step)."""
    _check_ema_args(ema, model, decay, step)
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)

# %%
steps_axis = range(6000)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot([5e-4 * lr_factor(s, 500, 6000, 0.1) for s in steps_axis])
axes[0].set(title="learning rate of the book-model run", xlabel="step")
# EMA of a noisy scalar "weight" drifting from 0 to 1
torch.manual_seed(0)
w = torch.zeros(1, requires_grad=False)
raw, smooth = [], []
ema_box, raw_box = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
ema_box.weight.data.zero_()
for s in range(3000):
    raw_box.weight.data.fill_(min(1.0, s / 1500) + 0.2 * torch.randn(()).item())
    ema_update(ema_box, raw_box, decay=0.999, step=s)
    raw.append(raw_box.weight.item())
    smooth.append(ema_box.weight.item())
axes[1].plot(raw, lw=0.3, label="trained weight (noisy)")
axes[1].plot(smooth, label="EMA, decay 0.999")
axes[1].set(title="what EMA does", xlabel="step")
axes[1].legend()
plt.show()
tail_noise = torch.tensor(raw[-500:]).std() / torch.tensor(smooth[-500:]).std()
print(f"EMA lowers the late-training spread {tail_noise:.0f}x")
assert tail_noise > 5  # measured 66x; a wide margin, the walk is random
# the same step draws the same batch and the same noise, whatever happened before
assert torch.equal(batch_indices(1234, 100_000, 128, 0), batch_indices(1234, 100_000, 128, 0))
assert torch.equal(torch.randn(3, generator=step_generator(0, 7)), torch.randn(3, generator=step_generator(0, 7)))
epoch = torch.cat([batch_indices(s, 1000, 100, 0) for s in range(10)])  # 10 steps of 100 = one epoch
assert sorted(epoch.tolist()) == list(range(1000))  # every scene once per epoch

# %% [markdown]
# ## 5. The book model, in a layout diffusers reads
#
# The network is chapter 07's `TextDiT` with PixArt's adaLN-single modulation and cross-attention
# to the book text encoder's tokens (96 wide). `book_model_config` writes the diffusers
# `PixArtTransformer2DModel` config that describes it, and `build_model` builds our model *from that
# config* through chapter 07's reader, so the two cannot drift. Saving renames our keys to
# diffusers' (and splits the fused q/k/v): the inverse of chapter 07's converter.

# %%
# | export
def book_model_config(cfg: TrainConfig, context_dim: int = 96) -> dict:
    """The diffusers `PixArtTransformer2DModel` config.json of the book model."""
    _check_train_config("cfg", cfg)
    return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.30.0",
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": 4, "out_channels": 4, "num_layers": cfg.depth, "sample_size": 8,
            "patch_size": cfg.patch_size, "cross_attention_dim": cfg.hidden_size, "caption_channels": context_dim,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "interpolation_scale": 1, "use_additional_conditions": False, "attention_type": "default",
            "dropout": 0.0, "norm_num_groups": 32, "upcast_attention": False}


def build_model(cfg: TrainConfig, context_dim: int = 96) -> TextDiT:
    """A fresh book model: the TextDiT that the diffusers config above describes (seeded by cfg.seed)."""
    _check_train_config("cfg", cfg)
    torch.manual_seed(cfg.seed)
    return TextDiT(config_from_diffusers_pixart(book_model_config(cfg, context_dim)))

# %%
# | export
def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry is data too (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`: a reader (or a crash at
    any instant) sees the old file or the new one, never half of one."""
    path = Path(path)
    if not callable(write):
        raise TypeError(f"write: expected a callable that writes the file it is given, got {type(write).__name__}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: no folder {str(path.parent)!r} to write {path.name!r} into")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"write: did not create the file it was given ({tmp.name})")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _check_book_model(model, cfg) -> None:
    """`model` is a TextDiT and `cfg` describes it: the saved config.json must rebuild these weights."""
    if not isinstance(model, TextDiT):
        raise TypeError(f"model: expected the book model, a TextDiT (build_model), got {type(model).__name__}")
    want = config_from_diffusers_pixart(book_model_config(cfg, model.config.context_dim))
    diff = [f"{f.name}: cfg {getattr(want, f.name)!r}, model {getattr(model.config, f.name)!r}"
            for f in fields(want) if getattr(want, f.name) != getattr(model.config, f.name)]
    if diff:
        raise ValueError(f"cfg: does not describe the model ({'; '.join(diff)}); pass the one it was built with")


def save_book_model(model: TextDiT, folder: str | Path, cfg: TrainConfig, info: dict | None = None) -> Path:
    """Write `model` in diffusers' PixArtTransformer2DModel layout (+ scheduler and training notes)."""
    _check_book_model(model, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = pixart_to_diffusers({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda p: save_file(sd, str(p)))
    files = {"config.json": book_model_config(cfg, model.config.context_dim),
             "scheduler_config.json": parametrisation(cfg).scheduler_config(DEFAULT_SAMPLER),
             "training.json": {"config": asdict(cfg), **(info or {})}}
    for name, content in files.items():
        atomic_write(folder / name, lambda p, c=content: p.write_text(json.dumps(c, indent=1)))
    return folder


def read_train_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig a saved book model was trained with."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: no training.json in {str(folder)!r} (not a book model folder)")
    config = read_config(path, "folder").get("config")  # a JSON object, else "folder: ... is not valid JSON"
    if not isinstance(config, dict):
        raise ValueError(f"folder: {str(path)!r} is not a book-model training record (no \"config\" object)")
    unknown = sorted(set(config) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"folder: {str(path)!r} has settings TrainConfig does not know: {', '.join(unknown)}")
    return TrainConfig(**config)


def load_book_model(folder: str | Path | None = None) -> tuple[TextDiT, Parametrisation]:
    """The shipped book model (EMA weights) or one saved by `save_book_model`, and its parametrisation."""
    folder = Path(folder) if folder is not None else BOOK_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder: no book model in {str(folder)!r} (expected config.json and "
                                "diffusion_pytorch_model.safetensors); train one with python -m tinydit train")
    return TextDiT.from_pretrained(folder), parametrisation(read_train_config(folder))


def book_pipeline(model: TextDiT, cfg: TrainConfig | None = None, text_encoder=None, vae=None) -> TextToImagePipeline:
    """Chapter 12's pipeline around a book model (the EMA of a run: the pipeline puts it in eval mode):
    its parametrisation from `cfg` (default TrainConfig()), the book text encoder and VAE. Previews and
    the evaluator sample through it, so what is graded is what `generate` draws."""
    if not isinstance(model, TextDiT):
        raise TypeError(f"model: expected the book model, a TextDiT (load_book_model, build_model), got {type(model).__name__}")
    sampling = SamplingConfig(**asdict(parametrisation(cfg if cfg is not None else TrainConfig())))
    return TextToImagePipeline(text_encoder if text_encoder is not None else load_book_text_encoder(), model,
                               vae if vae is not None else load_book_vae(), sampling.validate())

# %%
book_cfg = TrainConfig()
book_net = build_model(book_cfg)
print(f"book model: {sum(p.numel() for p in book_net.parameters()) / 1e6:.2f} M parameters, "
      f"{book_cfg.depth} blocks of width {book_cfg.hidden_size}, {(8 // book_cfg.patch_size) ** 2} tokens per image")
with torch.no_grad():  # every weight non-zero, so a wrong key map cannot hide behind zero init
    for p in book_net.parameters():
        p.add_(torch.randn_like(p) * 0.02)
with TemporaryDirectory() as tmp:
    save_book_model(book_net, tmp, book_cfg)
    back = TextDiT.from_pretrained(tmp)
    print(sorted(p.name for p in Path(tmp).iterdir()))
    x_demo, t_demo = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(back(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2]),
                                   book_net(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2]),
                                   atol=0, rtol=0)
    try:  # diffusers is a test dependency: when present, it loads the folder unmodified
        from diffusers import PixArtTransformer2DModel
    except ImportError:
        PixArtTransformer2DModel = None
    if PixArtTransformer2DModel is not None:
        ref = PixArtTransformer2DModel.from_pretrained(tmp).eval()
        with torch.no_grad():
            out_ref = ref(x_demo, encoder_hidden_states=emb.tokens[:2], timestep=t_demo,
                          encoder_attention_mask=emb.mask[:2].long(),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            diff = (out_ref - back(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2])).abs().max()
        print(f"diffusers PixArtTransformer2DModel vs tinydit: max |difference| {diff:.1e}")
        assert diff < 1e-5  # measured 0 (same kernels); 1e-5 allows other SDPA backends

# %% [markdown]
# ## 6. Checkpoints you cannot lose
#
# A run of an hour dies for dull reasons: a laptop lid, an out-of-memory kill, a full disk in the
# middle of a save. `atomic_write` writes to a temporary file, forces it to disk (`fsync`), and only
# then renames it over the target; the rename is atomic, so at any instant the folder holds the old
# checkpoint or the new one, never half of one (the tests kill a process with SIGKILL mid-save and
# load what is left). A checkpoint holds everything the next step depends on — weights, EMA,
# optimiser moments, scheduler, step (which fixes the data position and the step's random draws),
# the global RNG and the loss history — so a resumed run continues **bit for bit**.

# %%
# | export
def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun (WORLD_SIZE > 1):
    gloo on CPU, NCCL on CUDA. Several nodes: the same command with torchrun --nnodes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


CHECKPOINT_GLOB = "step-*.pt"


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (half-written temp files are not listed)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder: expected a folder path, got {type(folder).__name__}")
    return sorted(Path(folder).glob(CHECKPOINT_GLOB))


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: name every setting that differs."""
    diff = {f.name: (saved.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
            if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(cfg, f.name)}
    if diff:
        listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: {path} was written by a different run ({listed}); start a new --out "
                         "folder or train with the checkpoint's settings")


TRAINING_STATE = ("model", "ema", "optimizer", "scheduler", "step", "config", "rng_torch", "losses")


def _load_training_state(path: Path) -> dict:
    """A Trainer checkpoint read with torch.load(weights_only=True); anything else is refused by name."""
    if path.suffix == ".safetensors":
        raise ValueError(f"resume: {path} holds weights only, not a training checkpoint (step-*.pt)")
    try:
        state = _read_pickle(path)  # chapter 02: damaged, truncated or code-carrying files get one clear error
    except ValueError as e:  # a file this run wrote is not downloaded again: an older one is the cure
        reason = str(e).removeprefix("path: ").replace("download it again", "resume from an older one")
        raise ValueError(f"resume: {reason}") from None
    missing = [k for k in TRAINING_STATE if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"resume: {path} is not a training checkpoint (missing {', '.join(missing)})")
    return state


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: {device} is not available ({torch.cuda.device_count()} CUDA devices here)")
    return device

# %%
# | export
class Trainer:
    """The book model's training loop: one global batch per step, split over torchrun's processes."""

    def __init__(self, config: TrainConfig, out_dir: str | Path | None = None, data: EncodedData | None = None,
                 device: str | torch.device | None = None, disable: bool | None = None):
        self.cfg, self.disable = _check_train_config("config", config), disable
        if data is not None:
            _check_encoded_data(data)
        self.rank, self.world = distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size: {config.batch_size} does not split over {self.world} processes")
        if device is None and torch.cuda.is_available():  # one GPU per process: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = _check_device(device or "cpu")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.objective = parametrisation(config)
        if data is None:
            dataset = ShapesDataset(config.n_train, seed=config.data_seed, split="train")
            data = encode_dataset(dataset, disable=disable or self.rank > 0) if config.cache else StreamingData(dataset)
        self.data = data
        self.model = build_model(config, data.empty_tokens.shape[-1]).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        decay, rest = [], []  # no weight decay on norms, biases and the adaLN tables (PixArt, nanoGPT)
        for p in self.model.parameters():
            (decay if p.ndim >= 2 and p.shape[0] > 1 else rest).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(
            s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.net = self.model
        if self.world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.net = torch.compile(self.net)
        self.step, self.losses, self.last_checkpoint = 0, [], None

    def autocast(self):
        use = self.cfg.mixed_precision == "bf16" or (self.cfg.mixed_precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use)

    def batch(self, step: int):
        """This process's share of the global batch of `step`: latents, tokens, mask and the draws."""
        cfg, d = self.cfg, self.data
        idx = batch_indices(step, len(d), cfg.batch_size, cfg.data_seed)  # (B,)
        share = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
        g = step_generator(cfg.seed, step)
        noise = torch.randn(len(idx), 4, 8, 8, generator=g)  # (B, 4, 8, 8), all drawn on the CPU
        u, normal = torch.rand(len(idx), generator=g), torch.randn(len(idx), generator=g)  # (B,), (B,)
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout  # (B,) train on "" instead
        latents, tokens, mask = d.take(idx[share])  # this process's rows only
        tokens = torch.where(drop[share, None, None], d.empty_tokens, tokens)  # (b, T, 96)
        mask = torch.where(drop[share, None], d.empty_mask, mask)  # (b, T)
        parts = (latents, noise[share], u[share], normal[share], tokens, mask)
        return [p.to(self.device) for p in parts]

    def loss(self, step: int) -> torch.Tensor:
        x0, noise, u, normal, tokens, mask = self.batch(step)
        x_t, t, target = self.objective.noised(x0, noise, u, normal)
        weight = loss_weight(self.objective, t, self.cfg.min_snr_gamma)  # (b,)
        with self.autocast():
            pred = self.net(x_t, t, context=tokens, context_mask=mask)  # (b, 4, 8, 8)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (b,)
        return (weight * per_sample).mean()

    def train_step(self) -> float:
        loss = self.loss(self.step)
        if not torch.isfinite(loss):
            kept = self.last_checkpoint or "none written yet"
            raise FloatingPointError(f"loss: {float(loss.detach())} at step {self.step}; training stopped before the "
                                     f"update, the last good checkpoint is {kept} (lower lr, or check the data)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.model, self.cfg.ema_decay, self.step)
        self.step += 1
        value = float(loss.detach())
        if self.world > 1:  # the logged loss is the global batch's, as one process would see it
            t = torch.tensor([value], device=self.device)
            dist.all_reduce(t)
            value = float(t) / self.world
        self.losses.append(value)
        return value

    def train(self, until: int | None = None, callback=None) -> Trainer:
        """Train to step `until` (default: the config's steps), checkpointing as configured.
        `callback(trainer)` runs after every step (sample grids, early stops)."""
        until = self.cfg.steps if until is None else check_int("until", until, minimum=0, maximum=self.cfg.steps)
        if until < self.step:
            raise ValueError(f"until: this trainer is already at step {self.step}, got until={until}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected a function callback(trainer) or None, got {type(callback).__name__}")
        bar = tqdm(total=until, initial=self.step, desc="training", disable=self.disable or self.rank > 0)
        t0, s0 = time.perf_counter(), self.step
        while self.step < until:
            loss = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{(self.step - s0) / (time.perf_counter() - t0):.2f}")
            if self.out_dir is not None and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.out_dir is not None and self.cfg.snapshot_every and self.step % self.cfg.snapshot_every == 0:
                self.save_snapshot()
            if callback is not None:
                callback(self)
        bar.close()
        every = self.cfg.checkpoint_every
        if self.out_dir is not None and self.step == self.cfg.steps and (not every or self.step % every):
            self.save_checkpoint()  # the end of the run, unless the loop just saved it
        return self

    def state(self) -> dict:
        """Everything a resumed run needs: weights, EMA, optimiser, scheduler, step, RNG, losses."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "config": json.dumps(asdict(self.cfg)),
                "rng_torch": torch.get_rng_state(), "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes `step-NNNNNNN.pt` atomically, then deletes all but the last `keep_last`."""
        self._check_out_dir()
        if self.rank == 0:
            folder = self.out_dir / "checkpoints"
            folder.mkdir(parents=True, exist_ok=True)
            path = atomic_write(folder / f"step-{self.step:07d}.pt", lambda p: torch.save(self.state(), p))
            for old in checkpoints(folder)[:-self.cfg.keep_last]:
                old.unlink()
            self.last_checkpoint = path
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
        return self.last_checkpoint

    def save_snapshot(self) -> None:
        """EMA weights only, in the book-model layout, for the adherence-vs-time curve."""
        self._check_out_dir()
        if self.rank == 0:
            save_book_model(self.ema, self.out_dir / "snapshots" / f"step-{self.step:07d}", self.cfg,
                            {"step": self.step, "losses": self.losses[-1:]})

    def _check_out_dir(self) -> None:
        if self.out_dir is None:
            raise ValueError("out_dir: this Trainer has none to save into; create it with Trainer(config, out_dir=...)")

    def resume(self, path: str | Path | None = None) -> Trainer:
        """Continue from a checkpoint file, or from the newest one in `<out_dir>/checkpoints`."""
        if path is None:
            found = checkpoints(self.out_dir / "checkpoints") if self.out_dir is not None else []
            if not found:
                raise FileNotFoundError(f"resume: no checkpoint (step-*.pt) in "
                                        f"{str(self.out_dir / 'checkpoints') if self.out_dir else 'out_dir=None'}")
            path = found[-1]
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint file {str(path)!r}")
        state = _load_training_state(path)  # never arbitrary pickle
        _check_resumable(json.loads(state["config"]), self.cfg, path)
        if state["step"] > self.cfg.steps:
            raise ValueError(f"resume: {path} is at step {state['step']}, beyond this run's steps={self.cfg.steps}")
        check_and_load(self.model, state["model"], f"resume: {path.name} (model)")  # + NaN / inf weights refused
        check_and_load(self.ema, state["ema"], f"resume: {path.name} (ema)")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        self.step, self.losses, self.last_checkpoint = int(state["step"]), state["losses"].tolist(), path
        return self

# %% [markdown]
# ## 7. Training, watched
#
# A short run at this notebook's size: the loss curve and what the EMA model draws for a few
# captions, every few steps. (At CI size it is a few dozen steps of a tiny model, so expect blobs;
# section 9 loads the real run.) The previews are drawn by chapter 12's pipeline around the EMA
# weights (`book_pipeline`): the one way this book samples a model, so a preview, a grade and
# `python -m tinydit generate` are the same computation.

# %%
demo_cfg = TrainConfig.fast(steps=30 if FAST else 300, checkpoint_every=15 if FAST else 150,
                            n_train=512 if FAST else 5000)  # a tiny model: this is about the loop
demo_prompts = ["a big red circle in the middle", "a small blue square on the left", "a green triangle at the top",
                "a yellow circle above a purple square"]
demo_data = encode_dataset(ShapesDataset(demo_cfg.n_train, split="train"), vae, text_encoder, disable=True)
grids = []


def watch(trainer):
    if trainer.step % (demo_cfg.steps // 3) == 0:
        out = book_pipeline(trainer.ema, demo_cfg, text_encoder, vae)(demo_prompts, num_inference_steps=10, seed=0,
                                                                      disable=True)
        grids.append((trainer.step, torch.stack([pil_to_tensor(im) for im in out.images])))  # (4, 3, 32, 32)


with TemporaryDirectory() as run_dir:
    demo = Trainer(demo_cfg, out_dir=run_dir, data=demo_data, disable=FAST).train(until=demo_cfg.steps // 2)
    half = [p.name for p in checkpoints(Path(run_dir) / "checkpoints")]
    resumed = Trainer(demo_cfg, out_dir=run_dir, data=demo_data, disable=FAST).resume().train(callback=watch)
    straight = Trainer(demo_cfg, data=demo_data, disable=FAST).train()
print("checkpoints at half time:", half)
assert resumed.step == straight.step == demo_cfg.steps
same = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()))
print("resumed run == straight run, bit for bit:", same)
assert same
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(resumed.losses, lw=0.6)
ax.set(xlabel="step", ylabel="weighted v-MSE", title=f"a {demo_cfg.steps}-step run (resumed at {demo_cfg.steps // 2})")
plt.show()
image_grid(torch.cat([g for _, g in grids]), [f"step {s}: {p}" for s, _ in grids for p in demo_prompts],
           cols=len(demo_prompts))

# %% [markdown]
# Section 3's question — is caching the encoders worth its memory? — measured on a book-size step:

# %%
def seconds_per_step(trainer, n=3):
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    return (time.perf_counter() - t0) / n


probe_cfg = TrainConfig.fast(hidden_size=192, depth=6, num_heads=6, batch_size=128, n_train=256)  # book-model size
probe_set = ShapesDataset(256, split="train")
cached = Trainer(probe_cfg, data=encode_dataset(probe_set, vae, text_encoder, disable=True), disable=True)
streamed = Trainer(replace(probe_cfg, cache=False), data=StreamingData(probe_set, vae, text_encoder), disable=True)
t_cached, t_streamed = seconds_per_step(cached), seconds_per_step(streamed)
print(f"one step of 128, cached:   {t_cached * 1000:.0f} ms")
print(f"one step of 128, streamed: {t_streamed * 1000:.0f} ms  (cache saves {1 - t_cached / t_streamed:.0%})")
torch.testing.assert_close(cached.loss(7), streamed.loss(7), atol=1e-5, rtol=1e-4)  # same batch, same loss

# %% [markdown]
# ## 8. Many processes, the standard way
#
# The same loop runs on several processes under PyTorch's launcher:
#
# ```bash
# torchrun --nproc_per_node 2 -m tinydit train --out runs/book2     # 2 processes, one machine
# torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m tinydit train ...  # 2 machines
# ```
#
# `distributed()` starts the process group (gloo on CPU, NCCL on CUDA) when torchrun set
# `WORLD_SIZE`; the model is wrapped in `DistributedDataParallel`, which averages gradients across
# processes. Every process computes the same global batch indices and the same step draws, and
# keeps its slice of the rows, so K processes with a global batch B do exactly the arithmetic of one
# process with batch B — `tests/test_train.py` runs 2 CPU processes and checks the weights match a
# single process to 1e-6. Only rank 0 writes checkpoints; the others wait at a barrier. On a GPU
# the loop runs the forward in bf16 autocast (`mixed_precision="auto"`), and `compile=True` hands
# the network to `torch.compile` (chapter 05 showed it compiles without graph breaks).

# %%
# | export
def _check_run_folder(out_dir: Path, resume: bool) -> None:
    """Before the data is encoded: out_dir is writable; resume needs a checkpoint there, a new run none."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OSError(f"out_dir: cannot write to {str(out_dir)!r} ({e.strerror or type(e).__name__})") from None
    found = checkpoints(out_dir / "checkpoints")
    if resume and not found:
        raise FileNotFoundError(f"resume: no checkpoint (step-*.pt) in {out_dir / 'checkpoints'}")
    if found and not resume:
        raise ValueError(f"out_dir: {str(out_dir)!r} already holds checkpoints of a run (up to {found[-1].name}); "
                         "continue it with resume=True, or choose an empty folder")


def train_book_model(config: TrainConfig | None = None, out_dir: str | Path = "runs/book", resume: bool = False,
                     disable: bool | None = None) -> Path:
    """The whole recipe: encode the data, train (or continue a run), save the EMA weights in
    `<out_dir>/book_model` (diffusers layout). `python -m tinydit train` calls this."""
    cfg = _check_train_config("config", config) if config is not None else TrainConfig()
    out_dir = Path(out_dir)
    _check_run_folder(out_dir, check_bool("resume", resume))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out_dir=out_dir, disable=disable)
    encode_seconds = time.perf_counter() - t0
    if resume:
        trainer.resume()
    start_step, t1 = trainer.step, time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t1
    info = {"steps_trained_here": trainer.step - start_step, "train_seconds": round(seconds, 1),
            "encode_seconds": round(encode_seconds, 1), "seconds_per_step": round(seconds / max(1, trainer.step - start_step), 4),
            "torch_threads": torch.get_num_threads(), "processes": trainer.world, "device": str(trainer.device),
            "losses": [round(v, 5) for v in trainer.losses]}
    folder = out_dir / "book_model"
    if trainer.rank == 0:
        save_book_model(trainer.ema, folder, cfg, info)
    return folder


# %% [markdown]
# ## 9. Grading pictures by their pixels
#
# Is the model any good? A loss curve cannot say whether "a red triangle" comes out red and
# triangular. GenEval (Ghosh et al. 2023) answers such questions with an object detector; our world
# is simple enough to read back **by its pixels**: find the background, label the connected blobs of
# palette colour, name each blob's colour by majority, its shape by how much of its bounding box it
# fills (square ≈ 1, circle ≈ π/4, triangle ≈ ½), its place by its centroid. The teaching version,
# for one object:

# %%
def read_one(image):  # image (3, 32, 32) in [-1, 1], one object -> (colour, shape)
    rgb = (image.numpy().transpose(1, 2, 0) + 1) * 127.5  # (32, 32, 3) in [0, 255]
    names = list(data.COLORS) + list(data.BACKGROUNDS)  # 6 palette colours, then 3 backgrounds
    table = np.array([*data.COLORS.values(), *data.BACKGROUNDS.values()], dtype=float)  # (9, 3)
    nearest = ((rgb[:, :, None, :] - table) ** 2).sum(-1).argmin(-1)  # (32, 32) index into names
    mask = nearest < len(data.COLORS)  # (32, 32) True where a palette colour is nearest
    comp, todo = np.zeros_like(mask), [np.unravel_index(mask.argmax(), mask.shape)]  # first object pixel
    while todo:  # flood fill its 8-connected component
        y, x = todo.pop()
        if 0 <= y < 32 and 0 <= x < 32 and mask[y, x] and not comp[y, x]:
            comp[y, x] = True
            todo += [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ys, xs = np.nonzero(comp)  # (A,) each
    fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # square ~1, circle ~pi/4, triangle ~1/2
    shape = "triangle" if fill < 0.68 else "circle" if fill < 0.9 else "square"
    return names[np.bincount(nearest[comp]).argmax()], shape


# %% [markdown]
# The exported reader (`tinydit.evaluate`) keeps the idea and fixes what breaks it on generated
# images, which are softer than renders: a pixel is a *blend* of the background and one palette
# colour (so a pink anti-aliased rim is not called orange), blobs of two colours are split, tiny
# specks are dropped, and a triangle is also recognised as bottom-heavy (row skewness), a cue that
# survives blur where the fill ratio does not. `score_scene` grades a reading against its prompt,
# GenEval-style; `evaluate` runs a whole generator over fixed test prompts in three groups: one object
# of a **seen** colour–shape pair, one object of a **HELD_OUT** pair (never in training), and **two
# objects** with a relation ("a red circle left of a blue square").

# %%
# | export evaluate
"""Grading prompt adherence (chapter 09): a pixel reader for the shapes world, scoring of test prompts
by group, a Fréchet distance on the book image tower, and `evaluate_model`, which grades a pipeline's
own pictures (`pipeline_generator`). Stands on the pipeline; inference never imports it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tinydit import data
from tinydit.data import Scene, pil_to_tensor
from tinydit.pipeline import TextToImagePipeline
from tinydit.text import load_book_image_encoder
from tinydit.train import book_pipeline, load_book_model, read_train_config
from tinydit.validation import check_choice, check_finite, check_int, check_tensor

PALETTE = np.array(list(data.COLORS.values()), dtype=np.float64)  # (6, 3) RGB in [0, 255]
PALETTE_NAMES = tuple(data.COLORS)
# The reader's thresholds, calibrated on 600 test-split renders, clean, with Gaussian noise of std
# 0.1 and blurred 2x (average-pool, bilinear up), then checked on the next 1500 (0 / 3 / 0 errors).
BACKGROUND_MATCH = 40.0  # max RGB distance of the border's median colour from a named background
MAX_RESIDUAL = 90.0  # farther than this from every background->colour blend: no palette colour
#                      (noisy object pixels measured at most 53 off their blend; palette gaps >= 75)
MIN_COVER = 0.5  # a pixel is part of an object when more than half of it is the object's colour
MIN_AREA_FRACTION = 8 / 1024  # 8 px at 32x32: a third of the smallest drawn object (a small
#                               triangle, ~28 px), yet more than noise specks ever join up to
RIM_COVER = 0.25  # rim pixels covered less than this count as empty (noise of std 0.1 moves ~0.1)
TRIANGLE_FILL = 0.68  # fill under this -> triangle (triangles <= 0.64; circles >= 0.72 even noisy)
TRIANGLE_SKEW = -0.17  # row skewness under this -> triangle (blurred: triangles <= -0.20, others >= -0.14)
SQUARE_FILL = 0.86  # fill over this -> square, else circle (circles <= 0.85 blurred, squares >= 0.88 noisy)
MIN_SIDE = 8  # smallest image side the reader accepts (the dataset's smallest size)
MAX_PIXEL = 3.0  # |value| above this is no [-1, 1] image: a 0-255 one (renders + noise of std 0.1 stay < 1.6)
IMAGE_SIZE = 32  # what `generate` must return: the book's images, the size the image encoder reads
GROUPS = ("seen", "held_out", "two")
MAX_SCAN = 100  # eval_scenes looks at most at MAX_SCAN * n test indices (held-out singles are ~10 %)
MAX_EVAL_N = 100_000  # prompts per group: more would scan 10^7 scenes for nothing
RELATION_MARGIN = 0.1  # centroids must differ by this (of the side) along the relation's axis;
#                        drawn pairs are 0.5 +- 0.06 apart, so only a real layout passes
RELATION_AXIS = {"left of": ("cx", 1), "right of": ("cx", -1), "above": ("cy", 1), "below": ("cy", -1)}


@dataclass
class ObjectReading:
    """One object found in an image: what a detector would report, plus the two shape cues."""

    color: str  # majority palette colour of its pixels, one of data.COLORS
    shape: str  # "circle", "square" or "triangle", from fill and skew
    cx: float  # coverage-weighted centroid x, a fraction of the side (like ShapeObject.cx)
    cy: float  # centroid y; a triangle's sits 1/6 of its height below its box centre (ShapeObject.cy)
    area: int  # pixels more than half covered by the object
    fill: float  # area / bounding-box area, sub-pixel: square ~1, circle ~pi/4, triangle ~1/2
    skew: float  # skewness of its rows: triangles ~ -0.57 (bottom-heavy), circles and squares ~0


@dataclass
class Reading:
    """Everything the pixel reader saw in one image."""

    background: str | None  # the named background that explains the border, None if none does
    objects: list[ObjectReading]  # largest first: a single-object prompt is judged on objects[0]

# %%
# | export evaluate
def max3x3(a: np.ndarray) -> np.ndarray:
    """Maximum over each pixel's 3x3 neighbourhood (zero-padded): dilates a mask or spreads labels."""
    h, w = a.shape
    p = np.pad(a, 1)  # (H + 2, W + 2)
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)  # (H, W)


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean mask: (H, W) ints, 0 outside, 1..K inside."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)  # (H, W) unique ids
    while True:  # every pixel takes the largest id among its neighbours until nothing changes
        grown = np.where(mask, max3x3(labels), 0)  # (H, W)
        if np.array_equal(grown, labels):
            break
        labels = grown
    out = np.zeros(mask.shape, dtype=np.int64)
    out[mask] = np.searchsorted(np.unique(labels[mask]), labels[mask]) + 1  # ids -> 1..K
    return out  # (H, W)


def read_background(rgb: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The border's median colour (3,) and the named background within BACKGROUND_MATCH of it."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (2H + 2W - 4, 3)
    median = np.median(border, axis=0)  # (3,) robust to an object that reaches the edge
    names = list(data.BACKGROUNDS)
    dist = np.linalg.norm(np.array([data.BACKGROUNDS[b] for b in names]) - median, axis=1)  # (3,)
    return median, (names[int(dist.argmin())] if dist.min() < BACKGROUND_MATCH else None)


def classify_pixels(rgb: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Palette index per pixel (-1: background or no colour) and each colour's coverage of it."""
    # Each pixel is modelled as a blend of the background and one palette colour: anti-aliased and
    # blurred edges are exactly such blends, so an edge pixel is "40 % red", not "pink -> orange".
    d = PALETTE - bg  # (K, 3) direction background -> colour
    p = rgb[:, :, None, :] - bg  # (H, W, 1, 3)
    cover = (p * d).sum(-1) / np.maximum((d * d).sum(-1), 1.0)  # (H, W, K): 0 background, 1 colour
    residual = np.linalg.norm(p - cover.clip(0, None)[..., None] * d, axis=-1)  # (H, W, K) off the blend
    best = residual.argmin(-1)  # (H, W) the blend that explains the pixel best
    best_cover = np.take_along_axis(cover, best[..., None], -1)[..., 0]  # (H, W)
    on = (best_cover > MIN_COVER) & (residual.min(-1) < MAX_RESIDUAL)  # (H, W)
    return np.where(on, best, -1), cover.clip(0, 1)  # (H, W), (H, W, K)


def split_components(colour: np.ndarray, min_area: int) -> list[np.ndarray]:
    """One boolean (H, W) mask per object: the connected groups of coloured pixels."""
    # Two objects that touch make one group; a group with sizeable pieces of two or more colours is
    # split into those pieces (the prompts never ask for two touching objects of one colour).
    labels = label_components(colour >= 0)  # (H, W)
    objects = []
    for j in range(1, labels.max() + 1):
        comp = labels == j  # (H, W)
        if comp.sum() < min_area:  # a speck of noise
            continue
        pieces = []
        for c in np.unique(colour[comp]):
            sub = label_components(comp & (colour == c))  # (H, W)
            pieces += [sub == m for m in range(1, sub.max() + 1) if (sub == m).sum() >= min_area]
        if len({int(colour[p][0]) for p in pieces}) > 1:
            objects += pieces
        else:  # one colour dominates: stray pixels of another colour are noise, not an object
            objects.append(comp)
    return objects

# %%
# | export evaluate
def shape_from_profile(fill: float, skew: float) -> str:
    """Name a shape by how much of its box it fills and how bottom-heavy it is."""
    # Fill alone is not enough: a 2x blur lifts a small triangle's fill to ~0.86, among the circles.
    # Blur keeps the triangle's skew: a symmetric blur adds nothing to the third cumulant.
    if fill < TRIANGLE_FILL or skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def describe_object(comp: np.ndarray, colour: np.ndarray, cover: np.ndarray) -> ObjectReading:
    """Colour, shape, centroid and area of one object mask (H, W)."""
    k = int(np.bincount(colour[comp]).argmax())  # majority palette colour
    inner = comp & ~max3x3(~comp)  # (H, W) all 8 neighbours inside: fully covered, whatever the noise
    rim = max3x3(comp) & (comp | (colour < 0)) & (cover[..., k] > RIM_COVER)  # (H, W) not a neighbour
    a = np.where(inner, 1.0, np.where(rim, cover[..., k], 0.0))  # (H, W) how much of each pixel is it
    width, height = a.max(0).sum(), a.max(1).sum()  # sub-pixel extents from column / row profiles
    fill = float(a.sum() / max(width * height, 1e-9))
    h, w = comp.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # (H, W) pixel centres
    mass = a.sum()
    cx, cy = (a * xs).sum() / mass, (a * ys).sum() / mass
    var = max((a * (ys - cy) ** 2).sum() / mass, 1e-9)
    skew = float((a * (ys - cy) ** 3).sum() / mass / var ** 1.5)  # < 0: mass sits low, tail points up
    return ObjectReading(PALETTE_NAMES[k], shape_from_profile(fill, skew), float(cx / w), float(cy / h),
                         int(comp.sum()), fill, skew)


def _check_image(name: str, image, ndim: int = 3) -> torch.Tensor:
    """A finite floating (3, H, W) image (ndim=3) or (B, 3, H, W) batch (ndim=4), sides >= MIN_SIDE."""
    want = "(3, H, W)" if ndim == 3 else "(B, 3, H, W)"
    check_tensor(name, image, floating=True)
    if image.ndim != ndim or image.shape[-3] != 3 or min(image.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{name}: expected a {want} RGB tensor in [-1, 1] with H, W >= {MIN_SIDE}, "
                         f"got shape {tuple(image.shape)}")
    check_finite(name, image)
    peak = float(image.abs().max()) if image.numel() else 0.0
    if peak > MAX_PIXEL:
        raise ValueError(f"{name}: expected values in [-1, 1], got values up to {peak:g} (a 0-255 image? "
                         "use x / 127.5 - 1)")
    return image


def read_image(image: torch.Tensor) -> Reading:
    """Read one (3, H, W) image in [-1, 1]: its background and its objects, largest first."""
    x = _check_image("image", image).detach().to("cpu", torch.float64).clamp(-1, 1)
    rgb = ((x + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 255]
    bg, background = read_background(rgb)  # the median border colour is the blend's other end
    colour, cover = classify_pixels(rgb, bg)  # (H, W), (H, W, K)
    min_area = max(1, round(MIN_AREA_FRACTION * colour.size))
    objects = [describe_object(m, colour, cover) for m in split_components(colour, min_area)]
    return Reading(background, sorted(objects, key=lambda o: -o.area))


def read_images(images: torch.Tensor) -> list[Reading]:
    """`read_image` on each of (B, 3, H, W) images."""
    return [read_image(x) for x in _check_image("images", images, ndim=4)]

# %%
# | export evaluate
def scene_group(scene: Scene) -> str:
    """Which evaluation group a scene belongs to: "seen", "held_out" or "two"."""
    if len(scene.objects) == 2:
        return "two"
    o = scene.objects[0]
    return "held_out" if (o.color, o.shape) in data.HELD_OUT else "seen"


def eval_indices(group: str, n: int, seed: int = 0) -> list[int]:
    """The first `n` test-split indices whose scene falls in `group`."""
    group = check_choice("group", group, GROUPS)
    n, seed = check_int("n", n, minimum=1, maximum=MAX_EVAL_N), check_int("seed", seed, minimum=0)
    found = []
    for i in range(MAX_SCAN * n):
        if scene_group(data.sample_scene(seed, "test", i)) == group:
            found.append(i)
            if len(found) == n:
                return found
    raise RuntimeError(f"n: asked for {n} {group!r} scenes, found only {len(found)} among the first "
                       f"{MAX_SCAN * n} test-split scenes of seed={seed}; ask for fewer")


def eval_scenes(group: str, n: int, seed: int = 0) -> list[Scene]:
    """`n` deterministic test-split prompts (with their ground truth) of one group."""
    return [data.sample_scene(seed, "test", i) for i in eval_indices(group, n, seed)]


def names_position(scene: Scene) -> bool:
    """Does the caption of a one-object scene say where the object is?"""
    return any(p in scene.caption for p in data.POSITION_PHRASES[scene.objects[0].position])


def nearest_position(cx: float, cy: float) -> str:
    """The named region (data.POSITIONS) whose centre is closest to (cx, cy)."""
    return min(data.POSITIONS, key=lambda p: (data.POSITIONS[p][0] - cx) ** 2 + (data.POSITIONS[p][1] - cy) ** 2)


def relation_of(scene: Scene) -> str:
    """The relation a two-object scene was drawn with (its positions determine it)."""
    where = (scene.objects[0].position, scene.objects[1].position)
    return next(r for r, pos in data.RELATIONS.items() if pos == where)


def _find(reading: Reading, color: str, shape: str) -> ObjectReading | None:
    return next((o for o in reading.objects if (o.color, o.shape) == (color, shape)), None)


# Decisions, as in GenEval: a one-object prompt is judged on the largest object read (colour,
# shape, position); any extra object makes `pair` wrong (the prompt asked for one). `position` is the
# named region nearest the centroid, scored only when the caption names one. `both` needs both
# (colour, shape) objects and nothing else; `relation` needs `both` and the centroids in the named
# order by more than RELATION_MARGIN. `background` needs the named background (None is wrong).
def score_scene(scene: Scene, reading: Reading) -> dict[str, bool]:
    """GenEval-style checks of one reading against the scene its prompt described."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a tinydit.data.Scene, got {type(scene).__name__}")
    if not isinstance(reading, Reading):
        raise TypeError(f"reading: expected a Reading (from read_image), got {type(reading).__name__}")
    background = reading.background == scene.background
    if len(scene.objects) == 1:
        want, got = scene.objects[0], (reading.objects[0] if reading.objects else None)
        color = got is not None and got.color == want.color
        shape = got is not None and got.shape == want.shape
        scores = {"color": color, "shape": shape, "pair": color and shape and len(reading.objects) == 1}
        if names_position(scene):
            scores["position"] = got is not None and nearest_position(got.cx, got.cy) == want.position
        return {**scores, "background": background}
    first, second = (_find(reading, o.color, o.shape) for o in scene.objects)
    both = first is not None and second is not None and len(reading.objects) == 2
    axis, sign = RELATION_AXIS[relation_of(scene)]  # "left of": first.cx < second.cx, with a margin
    relation = both and sign * (getattr(second, axis) - getattr(first, axis)) > RELATION_MARGIN
    return {"both": both, "relation": relation, "background": background}


def summarise(scores: list[dict[str, bool]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per check: the fraction of scenes that pass, and how many scenes were scored on it."""
    counts = {k: sum(k in s for s in scores) for s in scores for k in s}
    return {k: sum(s.get(k, False) for s in scores) / c for k, c in counts.items()}, counts


def render_scenes(scenes: list[Scene]) -> torch.Tensor:
    """Real renders of scenes at the book's size: (N, 3, 32, 32) in [-1, 1]."""
    return torch.stack([data.pil_to_tensor(data.render_scene(s, IMAGE_SIZE)) for s in scenes])  # (N, 3, 32, 32)


def _corrupted(corrupt, images: torch.Tensor) -> torch.Tensor:
    """corrupt(images), which must keep one image per scene: (n, 3, H, W)."""
    out = corrupt(images)
    if isinstance(out, torch.Tensor) and (out.ndim != 4 or out.shape[:2] != images.shape[:2]):
        raise ValueError(f"corrupt: expected it to return (n, 3, H, W) images like its input {tuple(images.shape)}, "
                         f"got shape {tuple(out.shape)}")
    return out


def reader_accuracy(n: int = 100, seed: int = 0,
                    corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per group and check, how often the reader scores real renders right (optionally `corrupt`ed)."""
    # Real renders are correct by construction, so every check should pass: this validates the
    # reader before it judges a model. `corrupt` maps (n, 3, 32, 32) -> (n, 3, H, W), e.g. noise.
    if corrupt is not None and not callable(corrupt):
        raise TypeError(f"corrupt: expected a function images -> images, or None, got {type(corrupt).__name__}")
    out = {}
    for group in GROUPS:
        scenes = eval_scenes(group, n, seed)
        images = render_scenes(scenes)  # (n, 3, 32, 32)
        if corrupt is not None:
            images = _corrupted(corrupt, images)
        out[group] = summarise([score_scene(s, r) for s, r in zip(scenes, read_images(images))])[0]
    return out

# %%
# | export evaluate
def _check_encoder(encoder) -> nn.Module:
    if encoder is None:
        return load_book_image_encoder()
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder: expected an image encoder nn.Module (B, 3, H, W) -> (B, D) or None "
                        f"for the book's, got {type(encoder).__name__}")
    if next(encoder.parameters(), None) is None:
        raise TypeError(f"encoder: expected a module with weights (images go to their device), got "
                        f"{type(encoder).__name__}, which has none")
    return encoder


@torch.no_grad()
def image_features(images: torch.Tensor, encoder: nn.Module | None = None, batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) of images (N, 3, H, W); by default the book's CLIP image tower (32x32, D = 64)."""
    images = _check_image("images", images, ndim=4)
    if len(images) == 0:
        raise ValueError(f"images: expected at least one image, got shape {tuple(images.shape)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if encoder is None and tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images: the book image encoder reads {IMAGE_SIZE}x{IMAGE_SIZE} images, "
                         f"got shape {tuple(images.shape)}")
    encoder = _check_encoder(encoder)
    training, device = encoder.training, next(encoder.parameters()).device
    encoder.eval()
    try:
        feats = [encoder(images[i:i + batch_size].to(device, torch.float32)).float().cpu()
                 for i in range(0, len(images), batch_size)]
    finally:
        encoder.train(training)
    return torch.cat(feats)  # (N, D)


def _as_features(name: str, feats) -> np.ndarray:
    """(N, D) features with N >= 2 (a covariance needs two samples) as float64 numpy."""
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(feats)
    check_tensor(name, feats, ndim=2, finite=True)
    if feats.dtype == torch.bool or feats.is_complex():
        raise TypeError(f"{name}: expected real-valued features, got dtype {feats.dtype}")
    if len(feats) < 2 or feats.shape[1] < 1:
        raise ValueError(f"{name}: expected at least 2 feature rows (a covariance needs two samples) of at least "
                         f"1 feature, got shape {tuple(feats.shape)}")
    return feats.detach().cpu().double().numpy()  # (N, D)


def sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (D, D) by eigendecomposition."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(0, None))) @ v.T  # (D, D); tiny negative eigenvalues are round-off


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N, D) and (M, D), in float64."""
    # |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2). S_a S_b is not symmetric, but
    # sqrt(S_a) S_b sqrt(S_a) is, and has the same eigenvalues: take their square roots.
    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_b: expected {a.shape[1]} features per row like feats_a, got shape {b.shape}")
    s_a, s_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(a.shape[1], -1)
    root_a = sqrtm_psd(s_a)  # (D, D)
    m = root_a @ s_b @ root_a  # (D, D)
    cross = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(0, None)).sum()  # Tr((S_a S_b)^1/2)
    dist = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    return float(max(dist, 0.0))  # a squared distance: clamp round-off below zero

# %%
# | export evaluate
TABLE_ROWS = (  # (group, row label, checks in column order)
    ("seen", "seen pairs", ("color", "shape", "pair", "position")),
    ("held_out", "HELD_OUT pairs", ("color", "shape", "pair", "position")),
    ("two", "two objects", ("both", "relation")),
)


@dataclass
class EvalReport:
    """Prompt adherence of one generator: per-group check accuracies and a Fréchet distance."""

    accuracy: dict[str, dict[str, float]]  # group -> check -> fraction of its scenes that pass
    counts: dict[str, dict[str, int]]  # group -> check -> scenes scored (position: captions naming one)
    frechet: float  # FD, book image features: all generated images vs real renders of the same scenes
    n: int  # prompts per group
    seed: int  # which test-split prompts (the seed of data.sample_scene)

    def background(self) -> float:
        """Background accuracy over all groups together."""
        total = sum(c["background"] for c in self.counts.values())
        return sum(self.accuracy[g]["background"] * c["background"] for g, c in self.counts.items()) / total

    def table(self) -> str:
        """The report as a Markdown table (accuracies in %)."""
        pct = lambda g, k: f"{100 * self.accuracy[g][k]:.1f}" if k in self.accuracy[g] else "–"
        lines = ["| prompts | checks | accuracy (%) | scenes |", "|---|---|---|---|"]
        for group, label, checks in TABLE_ROWS:
            lines.append(f"| {label} | {' / '.join(checks).replace('color', 'colour')} | "
                         f"{' / '.join(pct(group, k) for k in checks)} | {self.n} |")
        lines.append(f"| background | all prompts | {100 * self.background():.1f} | {len(GROUPS) * self.n} |")
        lines.append(f"| Fréchet distance | generated vs real, book image features | {self.frechet:.3f} | "
                     f"{len(GROUPS) * self.n} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """Plain dicts and numbers, ready for json.dumps."""
        return {**asdict(self), "background": self.background()}


def _check_generated(images, count: int) -> torch.Tensor:
    """`count` finite float (3, 32, 32) images from `generate`, on the CPU, clipped to [-1, 1]."""
    want = f"a ({count}, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) float tensor in [-1, 1] (one image per caption)"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"generate: expected it to return {want}, got {type(images).__name__}")
    if tuple(images.shape) != (count, 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"generate: expected it to return {want}, got shape {tuple(images.shape)}")
    _check_image("generate", images, ndim=4)
    return images.detach().cpu().float().clamp(-1, 1)  # (count, 3, 32, 32)


def evaluate(generate: Callable[[list[str], list[int]], torch.Tensor], n: int = 300, seed: int = 0,
             batch_size: int = 100, disable: bool | None = None) -> EvalReport:
    """Generate, read and score `n` test prompts per group; Fréchet distance to their real renders."""
    # generate(captions, seeds) -> (B, 3, 32, 32) in [-1, 1]. seeds[j] is the test-split index of
    # captions[j]: unique across the groups, so every prompt has its own noise and reruns match.
    if not callable(generate):
        raise TypeError(f"generate: expected a callable (captions, seeds) -> images, got {type(generate).__name__}")
    n, batch_size = check_int("n", n, minimum=1), check_int("batch_size", batch_size, minimum=1)
    jobs = {group: eval_indices(group, n, seed) for group in GROUPS}
    accuracy, counts, fakes, reals = {}, {}, [], []
    with tqdm(total=len(GROUPS) * n, desc="evaluate", unit="prompt", disable=disable) as bar:
        for group, indices in jobs.items():
            scenes, scores = [data.sample_scene(seed, "test", i) for i in indices], []
            for start in range(0, n, batch_size):
                batch, seeds = scenes[start:start + batch_size], indices[start:start + batch_size]
                images = _check_generated(generate([sc.caption for sc in batch], seeds), len(batch))  # (B, 3, 32, 32)
                scores += [score_scene(sc, r) for sc, r in zip(batch, read_images(images))]
                fakes.append(images)
                bar.update(len(batch))
            accuracy[group], counts[group] = summarise(scores)
            reals.append(render_scenes(scenes))  # (n, 3, 32, 32)
    encoder = load_book_image_encoder()
    fd = frechet_distance(image_features(torch.cat(fakes), encoder), image_features(torch.cat(reals), encoder))
    return EvalReport(accuracy, counts, fd, n, seed)

# %%
# | export evaluate
def pipeline_generator(pipe: TextToImagePipeline, **options) -> Callable[[list[str], list[int]], torch.Tensor]:
    """`evaluate`'s generate(captions, seeds): the pipeline's own pictures (its PNG pixels, read back),
    image j from seed seeds[j]; `options` go to every call (num_inference_steps, guidance_scale, sampler)."""
    if not isinstance(pipe, TextToImagePipeline):
        raise TypeError(f"pipe: expected a TextToImagePipeline, got {type(pipe).__name__}")

    def draw(captions: list[str], seeds: list[int]) -> torch.Tensor:
        for name, value in (("captions", captions), ("seeds", seeds)):
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
                raise TypeError(f"{name}: expected a list, one entry per image, got {type(value).__name__}")
        out = pipe(list(captions), seed=list(seeds), disable=True, **options)
        return torch.stack([pil_to_tensor(im) for im in out.images])  # (B, 3, 32, 32) in [-1, 1]

    draw.pipe = pipe
    return draw


def _snapshot_step(snap: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", snap.name)
    if match is None or not snap.is_dir():
        raise ValueError(f"run_dir: {str(snap)!r} is not a snapshot folder step-NNNNNNN (as Trainer writes them)")
    return int(match.group(1))


def evaluate_model(pipe: TextToImagePipeline | None = None, n: int = 300, steps: int | None = None,
                   guidance_scale: float | None = None, sampler: str | None = None, seed: int = 0,
                   batch_size: int = 100, disable: bool | None = None) -> EvalReport:
    """`evaluate` a pipeline (default: the shipped book model's) at one sampler setting; None takes the
    pipeline's defaults, as `python -m tinydit generate` does."""
    draw = pipeline_generator(TextToImagePipeline.from_pretrained() if pipe is None else pipe)  # checks `pipe`
    pipe = draw.pipe
    options = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance_scale),
                                 ("sampler", sampler)) if v is not None}
    pipe.check_inputs(["a red circle"], **options)  # a bad setting fails here, not after the first batch
    return evaluate(pipeline_generator(pipe, **options), n=n, seed=seed, batch_size=batch_size, disable=disable)


def evaluate_run(run_dir: str | Path, n: int = 100, disable: bool | None = None, **settings) -> list[dict]:
    """The adherence-vs-training curve: `evaluate_model` on every EMA snapshot of a training run
    (`<run_dir>/snapshots/step-*`), oldest first -> [{"step": ..., **report.as_dict()}, ...]."""
    snaps = sorted(Path(run_dir).glob("snapshots/step-*"))
    if not snaps:
        raise FileNotFoundError(f"run_dir: no snapshots (snapshots/step-*) in {str(run_dir)!r}; train with "
                                "snapshot_every > 0")
    steps = [_snapshot_step(snap) for snap in snaps]  # before any work
    curve = []
    for snap, step in zip(tqdm(snaps, desc="snapshots", disable=disable), steps):
        model, _ = load_book_model(snap)
        report = evaluate_model(book_pipeline(model, read_train_config(snap)), n=n, disable=True, **settings)
        curve.append({"step": step, **report.as_dict()})
    return curve

# %% [markdown]
# Before the reader judges a model it must pass on images whose answer is known: real renders of
# the test prompts, clean, noisy and blurred. The teaching reader agrees with it on colour always
# and on shape except for a few small circles, whose whole-pixel fill swings with where they fall on
# the grid — the reason the exported one measures sub-pixel coverage.

# %%
n_check = 60 if FAST else 500
probe_scenes = eval_scenes("seen", 50) + eval_scenes("held_out", 50)
probe_images = render_scenes(probe_scenes)  # (100, 3, 32, 32)
mine = [read_one(x) for x in probe_images]
theirs = [(r.objects[0].color, r.objects[0].shape) for r in read_images(probe_images)]
assert all(a[0] == b[0] for a, b in zip(mine, theirs))
shape_agree = np.mean([a[1] == b[1] for a, b in zip(mine, theirs)])
print(f"teaching reader vs read_image, shape agreement: {shape_agree:.0%}")
assert shape_agree >= 0.93  # measured 96 % (4 small circles of 100)

noise_gen = torch.Generator().manual_seed(0)
damage = {"clean": None,
          "noise 0.1": lambda x: x + 0.1 * torch.randn(x.shape, generator=noise_gen),
          "blur 2x": lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear")}
for name, corrupt in damage.items():
    acc = reader_accuracy(n_check, seed=1, corrupt=corrupt)
    worst = min(v for group in acc.values() for v in group.values())
    print(f"reader on {n_check} real renders per group, {name:9s}: worst check {worst:.1%}")
    assert worst >= 0.97  # measured 100 % for all three (500 per group, seed 1)

# %%
real_a, real_b = render_scenes(eval_scenes("two", 200, seed=3)), render_scenes(eval_scenes("two", 200, seed=4))
feats = {name: image_features(x) for name, x in [("real", real_a), ("another real sample", real_b),
                                                   ("blur 4x", F.interpolate(F.avg_pool2d(real_b, 4), scale_factor=4,
                                                                             mode="bilinear")),
                                                   ("noise", torch.randn(200, 3, 32, 32, generator=noise_gen).clamp(-1, 1))]}
fd = {name: frechet_distance(feats["real"], f) for name, f in feats.items()}
print("Fréchet distance to real images (book image features):", {k: round(v, 2) for k, v in fd.items()})
assert fd["real"] < 1e-6 and fd["another real sample"] < fd["blur 4x"] < fd["noise"]

# %% [markdown]
# ## 10. The book model
#
# The shipped weights are the EMA of the run `python -m tinydit train` performs with the defaults of
# `TrainConfig` (section 2); `tinydit/assets/book_model/training.json` keeps its settings, timing,
# loss curve and evaluations. Its loss curve first:

# %%
book_pipe = book_pipeline(load_book_model()[0])  # what `python -m tinydit generate` runs
info = json.loads((BOOK_MODEL_DIR / "training.json").read_text())
print(f"shipped run: {info['config']['steps']} steps of {info['config']['batch_size']}, "
      f"{info['train_seconds'] / 60:.0f} min of training with {info['torch_threads']} thread(s) "
      f"({info['seconds_per_step']} s/step, a shared machine) + {info['encode_seconds'] / 60:.1f} min encoding the data; "
      f"on 2 idle cores the recipe runs at {info['recipe_seconds_per_step_2_idle_threads']} s/step "
      f"({info['config']['steps'] * info['recipe_seconds_per_step_2_idle_threads'] / 60:.0f} min)")
losses = torch.tensor(info["losses"])
window = max(1, len(losses) // 60)
smooth = losses[: len(losses) // window * window].view(-1, window).mean(1)  # mean of each window of steps
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses, lw=0.2, alpha=0.5, label="per step")
ax.plot(torch.arange(len(smooth)) * window + window / 2, smooth, label=f"mean of {window} steps")
ax.set(xlabel="step", ylabel="v-MSE", title="the book model's training loss", ylim=(0, float(losses[:50].max())))
ax.legend()
plt.show()
assert smooth[-1] < 0.7 * smooth[0]  # measured: see the plot

# %% [markdown]
# What it draws, at the pipeline's defaults: DPM++ 2M, 20 steps, classifier-free guidance at 2.0
# (chapter 10 chose the scale; the sweep below shows why). The middle row asks for colour–shape pairs the model **never saw**: no red
# triangle, blue circle or yellow square is in its training split; it has only seen red things,
# triangles, blue things and circles separately.

# %%
rows = {"seen pairs": ["a big green triangle in the middle", "a small purple circle on the left",
                       "a large orange square at the top", "a red circle on a black background"],
        "HELD_OUT pairs": ["a big red triangle in the middle", "a blue circle on the right",
                           "a large yellow square at the bottom", "a small red triangle on a gray background"],
        "two objects": ["a red square left of a green circle", "a blue triangle above a yellow circle",
                        "a purple circle right of an orange square", "a green square below a red circle"]}
shown = [p for r in rows.values() for p in r]
pictures = pipeline_generator(book_pipe)(shown, list(range(len(shown))))  # (12, 3, 32, 32)
image_grid(pictures, shown, cols=4)

# %% [markdown]
# And graded: ≥ 300 test prompts per group at full settings (30 at CI size), read back by the
# pixel reader, plus the Fréchet distance to real renders of the same prompts.

# %%
n_eval = 30 if FAST else 300
report = evaluate_model(book_pipe, n=n_eval, disable=FAST)
print(report.table())
acc = report.accuracy
# measured at n=30 (the first 30 prompts of each group): see the printed table; at n=300: seen 98.0 %,
# HELD_OUT 88.3 %, two objects both 79.3 % / relation 63.7 %, FD 0.64. Margins ~3 binomial standard errors.
assert acc["seen"]["pair"] >= (0.85 if FAST else 0.95)
assert acc["held_out"]["pair"] >= (0.70 if FAST else 0.84)
assert acc["two"]["relation"] >= (0.40 if FAST else 0.58)
assert report.background() >= 0.97

# %% [markdown]
# **Which guidance scale.** The shipped `training.json` holds the sweep that chose the default scale
# (300 prompts per group, DPM++ 2M, 20 steps; `python -m tinydit evaluate --n 300 --cfg S`). Without
# guidance (scale 1) the model already draws seen pairs right; guidance is what lifts the pairs it
# never saw. Past 3 it starts to hurt: colours saturate, shapes bloat, the two-object layouts break,
# and the Fréchet distance grows. Scales 2 and 2.5 are within noise of each other on adherence
# (±2.7 points at n = 300); 2 has the lower FD, so it is the default. Chapter 10 looks at the cures.

# %%
sweep = info["guidance_sweep"]["by_scale"]
scales = [float(k) for k in sweep]
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for group, check, label in [("seen", "pair", "seen pairs"), ("held_out", "pair", "HELD_OUT pairs"),
                            ("two", "relation", "two objects + relation")]:
    axes[0].plot(scales, [100 * v["accuracy"][group][check] for v in sweep.values()], "o-", label=label)
axes[0].axvline(book_pipe.sampling.guidance_scale, color="gray", ls=":")
axes[0].set(xlabel="guidance scale", ylabel="correct (%)", title="adherence vs guidance (n = 300 per group)")
axes[0].legend()
axes[1].plot(scales, [v["frechet"] for v in sweep.values()], "o-")
axes[1].set(xlabel="guidance scale", ylabel="FD", title="Fréchet distance to real images")
plt.show()
best = max(sweep, key=lambda k: sum(sweep[k]["accuracy"][g][c] for g, c in [("seen", "pair"), ("held_out", "pair"),
                                                                          ("two", "relation")]))
print(f"best total adherence at scale {best}; default {book_pipe.sampling.guidance_scale}")
assert abs(float(best) - book_pipe.sampling.guidance_scale) <= 0.5  # the default sits at the measured optimum

# %% [markdown]
# **Adherence vs training time.** Every 500 steps the run kept its EMA weights
# (`runs/book/snapshots/`); `python -m tinydit evaluate --run runs/book --n 100 --cfg 2` grades each.
# Single objects come first; HELD_OUT pairs follow the seen ones closely (the model composes colour
# and shape it learnt separately); relations between two objects come last and are still rising when
# the hour ends.

# %%
points = info["curve"]["points"]
minutes = [p["step"] * info["recipe_seconds_per_step_2_idle_threads"] / 60 for p in points]
fig, ax = plt.subplots(figsize=(6, 3.2))
for group, check, label in [("seen", "pair", "seen pairs"), ("held_out", "pair", "HELD_OUT pairs"),
                            ("two", "relation", "two objects + relation")]:
    ax.plot(minutes, [100 * p["accuracy"][group][check] for p in points], "o-", label=label)
ax.set(xlabel="minutes of training (2 idle cores, 0.46 s/step)", ylabel="correct (%)",
       title=f"adherence vs training (n = {info['curve']['n']}, guidance {info['curve']['guidance_scale']})")
ax.legend()
plt.show()
assert points[-1]["accuracy"]["two"]["relation"] > points[len(points) // 2]["accuracy"]["two"]["relation"]

# %% [markdown]
# ## 11. Bad input gets a clear error

# %%
expect_error(lambda: TrainConfig(objective="x0"), r"objective.*x0")
expect_error(lambda: TrainConfig(objective="epsilon", zero_terminal_snr=True), r"zero_terminal_snr.*v_prediction")
expect_error(lambda: encode_dataset([]), r"dataset: yields no samples")
with TemporaryDirectory() as tmp:
    expect_error(lambda: Trainer(demo_cfg, out_dir=tmp, data=demo_data).resume(), r"resume: no checkpoint",
                 FileNotFoundError)
    Trainer(demo_cfg, out_dir=tmp, data=demo_data, disable=True).train(until=demo_cfg.checkpoint_every)
    wider = replace(demo_cfg, hidden_size=128, num_heads=4)
    expect_error(lambda: Trainer(wider, out_dir=tmp, data=demo_data).resume(), r"hidden_size: checkpoint 64, this run 128")
    exploding = Trainer(replace(demo_cfg, lr=1e30, warmup_steps=0, checkpoint_every=1), out_dir=Path(tmp) / "nan",
                        data=demo_data, disable=True)
    expect_error(exploding.train, r"at step \d+; .*last good checkpoint is .*step-", FloatingPointError)
expect_error(lambda: evaluate(lambda captions, seeds: torch.zeros(1, 3, 32, 32), n=2), r"generate: expected .*\(2, 3, 32, 32\)")
expect_error(lambda: read_image(torch.zeros(32, 32)), r"image: expected a \(3, H, W\)")
expect_error(lambda: eval_scenes("three", 5), r"group")
expect_error(lambda: TrainConfig(objective="flow", min_snr_gamma=5.0), r"min_snr_gamma: .*objective='flow'")
expect_error(lambda: pipeline_generator("a pipeline"), r"pipe: expected a TextToImagePipeline", TypeError)
expect_error(lambda: read_image(probe_images[0] * 127.5 + 127.5), r"image: expected values in \[-1, 1\]")

# %% [markdown]
# ## Summary
#
# - One training step is fifteen lines: noise a latent, predict v, MSE, caption dropout. The
#   production `Trainer` adds the objectives (ε, v with optional zero-terminal SNR, flow; min-SNR-γ
#   weights), cached encoders, AdamW with warm-up and cosine decay, clipping, EMA, bf16 autocast on
#   CUDA, `torch.compile`, atomic checkpoints that resume bit for bit, and torchrun/DDP.
# - The book model is a 3.9 M-parameter PixArt-style DiT saved in diffusers' layout; diffusers'
#   `PixArtTransformer2DModel` loads it unmodified and computes the same outputs.
# - `tinydit.evaluate` reads pictures back by their pixels (100 % on real renders, clean, noisy or
#   blurred) and grades a generator GenEval-style on seen pairs, HELD_OUT pairs and two-object
#   relations, with a Fréchet distance in the book image encoder's space.
# - The measured table of the shipped model is in section 10; the adherence-vs-training curve shows
#   where an hour of CPU gets you, and what it does not reach.
#
# ## Exercises
#
# 1. Train with `objective="epsilon"` and with `"flow"` for the same number of steps (`python -m
#    tinydit train --objective flow --out runs/flow`) and compare `python -m tinydit evaluate` tables.
#    Which group moves most?
# 2. Set `min_snr_gamma=5`. The plot in section 2 predicts which groups should suffer; check it.
# 3. Run `torchrun --nproc_per_node 2 -m tinydit train --steps 20 --out runs/ddp` with `TINYDIT_FAST=1`
#    and compare the checkpoint with a single-process run. Where does the last bit of difference
#    come from?
# 4. Evaluate the model with `guidance_scale=1` (no guidance). How much of the HELD_OUT accuracy is
#    the model and how much is guidance? (Chapter 10 continues from here.)
# 5. Give the model patch size 1 (64 tokens instead of 16): what does a step cost, and do the
#    two-object relations improve for the same minutes of training?
