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
# # 09a · Training the book model, part 1: the step, the objective, the data, the schedule
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
# 5. **checkpoints you cannot lose** (atomic writes, resume bit for bit) and **torchrun** (DDP).
#
# Chapter 09 takes two sittings. This one, 09a, covers (1)–(4) and exports `tinydit.train_recipe`;
# 09b saves the model in diffusers' layout, makes checkpoints you cannot lose, runs the loop
# (`tinydit.train`) and spreads it over processes. Chapter 10 grades the result with a pixel reader.

# %%
# | default_exp train_recipe
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from tinydit.data import ShapesDataset
from tinydit.text import load_book_text_encoder
from tinydit.textdit import TextDiT, TextDiTConfig
from tinydit.vae import load_book_vae


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
"""The recipe of a training run of the book model (chapter 09a): `TrainConfig`, the objective
(chapter 08's `Parametrisation` and its loss weights), data encoded once, batch order, per-step
generators, the learning-rate schedule and EMA. `tinydit.train` runs it; inference never imports it."""


from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import zip_longest

import torch
from torch import nn
from tqdm.auto import tqdm

from tinydit.denoisers import Parametrisation
from tinydit.schedules import SCHEDULE_ALIASES, SCHEDULES, min_snr_weights
from tinydit.text import TextEmbeddings, load_book_text_encoder
from tinydit.vae import load_book_vae
from tinydit.validation import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_memory,
)


# %%
# | export
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

# %%
# | export
def _training_bytes(cfg) -> int:
    """About what the run holds per parameter: weights, gradients, EMA, AdamW's two moments (fp32)."""
    n_params = (16 * cfg.depth + 8) * cfg.hidden_size**2  # 16 h^2 per block (attention, cross, MLP)
    return 5 * 4 * n_params

# %%
# | export
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
        self.validate()  # every field, checked by name (below)

# %%
# | export
@add_to_class(TrainConfig)
def validate(self) -> None:
    """Check every field by name (run on construction)."""
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

# %%
# | export
@add_to_class(TrainConfig)
@classmethod
def fast(cls, **overrides) -> TrainConfig:
    """The same recipe at CI size (TINYDIT_FAST=1): a few steps on a few scenes."""
    small = dict(n_train=512, steps=20, batch_size=32, warmup_steps=5, checkpoint_every=10,
                 snapshot_every=10, hidden_size=64, depth=2, num_heads=2)
    return cls(**{**small, **overrides})

# %%
# | export
def check_train_config(name: str, cfg) -> TrainConfig:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{name}: expected a TrainConfig, got {type(cfg).__name__}"
                        + (" (build one: TrainConfig(**settings))" if isinstance(cfg, dict) else ""))
    return cfg

# %%
# | export
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
# so the weights work outside this book (chapter 13).

# %%
# | export
def parametrisation(cfg: TrainConfig) -> Parametrisation:
    """The training objective of a config as chapter 08's Parametrisation: the same object draws the
    training pairs (`noised`), hands the samplers their denoiser, and writes the scheduler config."""
    check_train_config("cfg", cfg)
    return Parametrisation(prediction=cfg.objective, beta_schedule=cfg.beta_schedule,
                           zero_terminal_snr=cfg.zero_terminal_snr)

# %%
# | export
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

# %%
# | export
def _pad_tokens(emb: TextEmbeddings, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = emb.tokens.shape
    tokens = torch.cat([emb.tokens, emb.tokens.new_zeros(B, length - T, D)], 1)  # (B, length, D)
    return tokens, torch.cat([emb.mask, emb.mask.new_zeros(B, length - T)], 1)  # (B, length)

# %%
# | export
def _check_dataset(dataset) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset: expected a sequence of (image, caption) pairs such as ShapesDataset, "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"dataset: yields no samples (len 0): {dataset!r}; nothing to train on")

# %%
# | export
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

# %%
# | export
@torch.no_grad()
def encode_batch(images: torch.Tensor, captions: list[str], vae, text_encoder, length: int | None = None):
    """Latents (B, 4, 8, 8) and padded text tokens / mask for a batch of images in [-1, 1] and captions."""
    emb = text_encoder(captions)
    tokens, mask = _pad_tokens(emb, length or text_encoder.max_length)
    return vae.to_latent(images), tokens, mask

# %%
# | export
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

# %%
# | export
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

# %%
# | export
def check_encoded_data(data) -> None:
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

# %%
# | export
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

# %%
# | export
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

# %%
# | export
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's noise, timesteps and caption dropout (so a resumed run draws the same)."""
    _check_step_args(step, seed)
    return torch.Generator().manual_seed(seed * 1_000_003 + step)

# %%
# | export
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to `min_ratio` at the last step."""
    _check_step_args(step, total=total)
    check_int("warmup", warmup, minimum=0)
    check_float("min_ratio", min_ratio, minimum=0, maximum=1)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

# %%
# | export
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
# ## Summary
#
# - One training step is fifteen lines: noise a latent, predict v, MSE, caption dropout.
# - `TrainConfig` is the recipe, every field checked by name; the objective is chapter 08's
#   `Parametrisation` (ε, v with optional zero-terminal SNR, flow) with min-SNR-γ weights; the frozen
#   encoders run once over the data; batches, noise and dropout come from one generator per step, so
#   a run is reproducible step by step; AdamW warms up and decays on a cosine; EMA weights sample.
#
# ## Exercises
#
# 1. Set `min_snr_gamma=5`. The plot in section 2 predicts which groups should suffer; check it with
#    chapter 10's evaluator.
