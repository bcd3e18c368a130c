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
# # 13 · The pipeline: text to image, end to end
#
# Every part exists: the text encoder (chapter 06), the text-conditioned DiT (07) trained into the
# book model (09) and graded (10), the samplers (08), guidance (11), offloading and precision (12), the VAE (02). This
# chapter puts them behind one object, `TextToImagePipeline`, that a user calls with a prompt, that the
# command line wraps (`python -m tinydit generate "..."`), and whose public steps (`check_inputs`,
# `encode_prompt`, `prepare_latents`, `denoise`, `decode`) editing, the evaluator and the studies of
# chapters 10–12 compose instead of writing a second sampling loop. `from_pretrained` reads folders in
# diffusers' layout, which chapter 14 builds (`tinydit.formats`), with cross-attention maps and a widget.
# It exports `tinydit.pipeline`.

# %%
# | default_exp pipeline
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from tinydit import evaluate, samplers
from tinydit.checkpoint import BOOK_MODEL_DIR
from tinydit.denoisers import Parametrisation
from tinydit.guidance import CFGDenoiser, guidance_args
from tinydit.text import load_book_text_encoder
from tinydit.textdit import TextDiT
from tinydit.vae import load_book_vae
from tinydit.validation import expect_error


torch.set_num_threads(1)  # a 4 M-parameter model on 16 tokens: one thread beats two contending

# %% [markdown]
# ## 1. The whole pipeline in fifteen lines
#
# Text → tokens (the encoder) → noise at the first noise level → the sampler, calling the guided
# denoiser once per step → latents → pixels (the VAE). With the book's parts:

# %%
def lesson_pipeline(prompt, encoder, model, param, vae, seed=0, steps=20, scale=2.0):
    cond = guidance_args(encoder, [prompt])  # tokens (1, T, 96) and the empty prompt's, with masks
    denoiser = CFGDenoiser(param.denoiser(model), scale)  # D(x, sigma) -> x0, guided
    sigmas = param.sigmas(denoiser.denoiser, steps)  # (steps + 1,) from sigma_max down to 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]  # (1, 4, 8, 8)
    z = samplers.sample_dpmpp_2m(denoiser, x, sigmas, extra_args=cond, disable=True)  # (1, 4, 8, 8)
    return vae.from_latent(z).clamp(-1, 1)  # (1, 3, 32, 32) in [-1, 1]


encoder, vae = load_book_text_encoder(), load_book_vae()
model = TextDiT.from_pretrained(BOOK_MODEL_DIR)  # the book model that chapter 09 trains, shipped with the package
param = Parametrisation.from_scheduler_config(json.loads((BOOK_MODEL_DIR / "scheduler_config.json").read_text()))
with torch.no_grad():
    lesson_image = lesson_pipeline("a red circle above a blue square", encoder, model, param, vae)
assert lesson_image.shape == (1, 3, 32, 32)
reading = evaluate.read_image(lesson_image[0])
print(reading)

# %% [markdown]
# A production pipeline adds: defaults stored with the model, a batch of prompts (with several images
# each), seeds per image, any sampler and guidance cure, negative prompts, a cache of text embeddings,
# offloading and dtype, the two on-disk layouts, a progress bar and clear errors. First, what a
# diffusers scheduler config means in chapter 08's terms.
#
# ## 2. Scheduler configs as samplers
#
# A diffusers pipeline folder has no "sampler": it has `scheduler/scheduler_config.json`, a class
# name and its settings. Each stock scheduler is one of chapter 08's samplers on one of its sigma
# schedules (the parity tests of chapter 08 check exactly these pairs), with the model's
# parametrisation (`prediction_type`) and its training betas. `SamplingConfig` holds the translation
# and writes it back.

# %%
# | export
"""Text to image end to end (chapter 13): `TextToImagePipeline` (text encoder -> DiT + sampler +
guidance -> VAE) with diffusers' public steps (`check_inputs`, `encode_prompt`, `prepare_latents`,
`denoise`, `decode`), which img2img, inpainting, the evaluator and the chapters reuse, defaults stored
beside the weights, a prompt-embedding cache, offloading and dtype. Folder layouts: `tinydit.formats`."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from tqdm.auto import tqdm

from tinydit import formats
from tinydit.checkpoint import BOOK_MODEL_DIR, resolve_dtype
from tinydit.denoisers import FLOW_SAMPLERS, Parametrisation, scheduler_sampler
from tinydit.guidance import DEFAULT_CURE, DEFAULT_SCALE, CFGDenoiser, guidance_args
from tinydit.offload import ModelOffload
from tinydit.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, get_sampler
from tinydit.text import PromptCache, TextEmbeddings
from tinydit.textdit import TextDiT
from tinydit.vae import AutoencoderKL
from tinydit.validation import (
    check_bool,
    check_device,
    check_float,
    check_int,
    check_memory,
    check_tensor,
    unknown_fields,
)


# %%
# | export
@dataclass
class SamplingConfig(Parametrisation):
    """Chapter 08's Parametrisation of a model (read from its scheduler config), and the defaults a
    call uses when it does not say (sampler, steps, guidance, size)."""

    sampler: str = DEFAULT_SAMPLER  # chapter 08's name
    steps: int = DEFAULT_STEPS  # model evaluations per image
    guidance_scale: float = DEFAULT_SCALE  # chapter 11's default for the book model
    sample_size: int = 32  # image side in pixels when a call gives no height / width

    @classmethod
    def from_scheduler_config(cls, d: dict, **defaults) -> SamplingConfig:
        """Our reading of a diffusers scheduler_config.json: its parametrisation and its sampler."""
        sampler = scheduler_sampler(d)
        return cls(**asdict(Parametrisation.from_scheduler_config(d)), **{"sampler": sampler, **defaults})

    def validate(self) -> SamplingConfig:
        """Every field checked (a hand-edited folder or a from_pretrained override); errors name the field."""
        self.__post_init__()
        check_int("steps", self.steps, minimum=1)
        check_float("guidance_scale", self.guidance_scale, minimum=0)
        _check_sampler(self.sampler, self.prediction)
        check_int("sample_size", self.sample_size, minimum=1)
        return self

    def scheduler_config(self, sampler: str | None = None) -> dict:
        """The diffusers scheduler config that samples like this (for save_pretrained)."""
        return super().scheduler_config(self.sampler if sampler is None else sampler)

# %%
book_sampling = SamplingConfig.from_scheduler_config(json.loads((BOOK_MODEL_DIR / "scheduler_config.json").read_text()))
print(book_sampling)
assert (book_sampling.sampler, book_sampling.prediction, book_sampling.sigma_schedule) == ("dpmpp_2m", "v_prediction", "karras")
assert SamplingConfig.from_scheduler_config(book_sampling.scheduler_config()) == book_sampling  # round trip

# %% [markdown]
# ## 3. The pipeline object
#
# `TextToImagePipeline` holds the four components and the sampling defaults. A call checks its
# arguments (named helpers, below the class), encodes the prompts once (repeated prompts come from
# an LRU cache), draws each image's noise from its own seed on the CPU — so image *i* is the same
# whether it is generated alone, in a batch, or on another process — and runs the sampler with
# chapter 11's `CFGDenoiser` around chapter 08's denoiser.

# %%
# | export
@dataclass
class PipelineOutput:
    """What a call returns: PIL images, the final latents (B, C, h, w), and per-image facts."""

    images: list
    latents: torch.Tensor
    prompts: list[str]
    seeds: list[int | None]
    nsfw: list[bool] | None = None  # per image: replaced by the safety checker (chapter 16); None: no check ran
    reasons: list[list[str]] | None = None  # per image: why it was replaced ([] when it was not)

# %%
# | export
@dataclass
class Request:
    """A call's arguments after `check_inputs`: what the other steps read."""

    prompts: list[str]  # one per image (each prompt repeated num_images_per_prompt times)
    negatives: list[str]  # one per image; "" = the unconditional branch
    steps: int  # model evaluations
    guidance_scale: float
    sampler: str
    shape: tuple[int, int, int, int]  # (B, C, h, w) of the latents

# %%
# | export
class InitialNoise(NamedTuple):
    """`prepare_latents`: unit-variance noise (B, C, h, w) on the CPU, each image's seed, and the
    generator of the stochastic samplers' fresh noise."""

    noise: torch.Tensor
    seeds: list[int | None]
    generator: torch.Generator | None

# %%
# | export
class PipelineParts:
    """The components of a pipeline and where they live (the device, model offload, the prompt cache)."""

    def __init__(self, text_encoder, transformer: TextDiT, vae: AutoencoderKL, sampling: SamplingConfig | None = None,
                 safety_checker=None, cache_size: int = 64):
        self.text_encoder, self.transformer, self.vae = text_encoder, transformer.eval(), vae.eval()
        # chapter 16: any callable (images, prompts) -> (images, flags, reasons); checks every call unless safety=False
        self.safety_checker, self._safety_off_logged = safety_checker, False
        self.sampling = sampling or SamplingConfig()
        self.cache = PromptCache(cache_size)
        self.offloader = None
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling
        self.multiple = self.factor * transformer.config.patch_size  # pixels per DiT token side

    @property
    def components(self) -> dict:
        """The parts, to build another pipeline on the same weights (chapter 15: `Img2ImgPipeline(**pipe.components)`)."""
        return dict(text_encoder=self.text_encoder, transformer=self.transformer, vae=self.vae, sampling=self.sampling,
                    safety_checker=self.safety_checker)

    @property
    def device(self) -> torch.device:
        return self.offloader.device if self.offloader is not None else next(self.transformer.parameters()).device

    def to(self, device) -> PipelineParts:
        device = check_device("device", device)  # one that exists here, and not 'meta'
        for part in (self.text_encoder, self.transformer, self.vae):
            part.to(device)
        return self

    def enable_model_offload(self, device="cuda") -> ModelOffload:
        """Keep one component on `device` at a time (chapter 12's ModelOffload); the rest waits on the CPU."""
        if self.offloader is not None:
            raise ValueError("enable_model_offload: model offload is already on; call pipe.disable_model_offload() "
                             "first to change it")
        device = check_device("device", device)
        self.to("cpu")
        self.offloader = ModelOffload({"text_encoder": self.text_encoder, "transformer": self.transformer,
                                       "vae": self.vae}, device=device)
        return self.offloader

# %%
# | export
@add_to_class(PipelineParts)
def disable_model_offload(self, device="cpu") -> PipelineParts:
    """Undo enable_model_offload: the hooks removed, every component back on `device`."""
    if self.offloader is not None:
        self.offloader.close()
        self.offloader = None
    return self.to(device)

# %%
# | export
@add_to_class(PipelineParts)
def encode(self, prompts: list[str]) -> TextEmbeddings:
    """Text embeddings of `prompts`, each prompt encoded once per pipeline (LRU cache)."""
    if self.offloader is None:
        return self.cache.encode(self.text_encoder, prompts)
    with self.offloader.use("text_encoder"):
        return self.cache.encode(self.text_encoder, prompts)

# %%
# | export
class PipelineSteps(PipelineParts):
    """The public steps of a call, in diffusers' order; img2img, inpainting, the evaluator and the
    chapters' studies compose them instead of writing a second sampling loop."""

    def check_inputs(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, num_inference_steps=None,
                     guidance_scale=None, sampler=None, height=None, width=None, callback=None,
                     output_type: str = "pil") -> Request:
        """Every argument checked before any work; None takes the model's default."""
        s = self.sampling
        _check_call_options(callback, output_type)
        prompts, negatives = _check_prompts(prompt, negative_prompt, num_images_per_prompt)
        steps = check_int("num_inference_steps", s.steps if num_inference_steps is None else num_inference_steps, minimum=1)
        scale = check_float("guidance_scale", s.guidance_scale if guidance_scale is None else guidance_scale, minimum=0)
        sampler = _check_sampler(s.sampler if sampler is None else sampler, s.prediction)
        h, w = (_check_side(n, v, s.sample_size, self.multiple) for n, v in (("height", height), ("width", width)))
        shape = (len(prompts), self.transformer.config.in_channels, h // self.factor, w // self.factor)
        _check_request(shape, self.transformer.config, "height" if height is not None else "width")
        return Request(prompts, negatives, steps, scale, sampler, shape)

    def encode_prompt(self, prompts: list[str], negatives: list[str]) -> dict:
        """The sampler's extra_args: prompt and negative-prompt tokens with masks, on the DiT's device."""
        prompts, negatives = _check_prompts(prompts, negatives, 1)  # a bare string is one prompt, not its letters
        args = guidance_args(self.encode, prompts, negatives)
        return {k: v.to(self.device) for k, v in args.items()}

    def prepare_latents(self, shape, seed=None, generator=None, latents=None) -> InitialNoise:
        """Unit-variance noise (B, C, h, w) drawn on the CPU: image i from seed + i (or seed[i]), from one
        `generator`, or the given `latents`; with none of them, a random seed that the output reports."""
        noise, seeds = _initial_noise(_check_shape(shape), seed, generator, latents)
        return InitialNoise(noise, seeds, _sampler_generator(seeds, generator))

    def schedule(self, steps: int) -> torch.Tensor:
        """The model's `steps` + 1 noise levels (chapter 08's Parametrisation), from the first down to 0."""
        return self.sampling.sigmas(self.sampling.denoiser(self.transformer), steps)

# %%
# | export
class PipelineSampling(PipelineSteps):
    """The remaining steps: the guided sampling loop, decoding, and the safety check."""

    def denoise(self, x: torch.Tensor, cond: dict, sigmas: torch.Tensor, guidance_scale: float | None = None,
                sampler=None, cure=DEFAULT_CURE, interval=None, span: torch.Tensor | None = None, wrap=None,
                generator=None, callback=None, disable: bool | None = None) -> torch.Tensor:
        """Sample from `x` (B, C, h, w), at sigmas[0], down `sigmas` with CFG (chapter 11: `cure`, `interval`);
        `sampler`: a name or any function with k-diffusion's signature; `span`: the whole run's schedule
        (for scheduled cures; default `sigmas`); `wrap(guided) -> denoiser` (inpainting's latent blend)."""
        s = self.sampling
        _check_denoise_args(cond, sigmas, wrap)
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        sample = sampler if callable(sampler) else get_sampler(_check_sampler(s.sampler if sampler is None else sampler, s.prediction))
        guided = CFGDenoiser(s.denoiser(self.transformer), scale, cure, interval, sigmas=sigmas if span is None else span)
        guided = guided if wrap is None else wrap(guided)
        with tqdm(total=len(sigmas) - 1, desc="generate", unit="step", disable=disable) as bar:
            def step(info):
                bar.update(1)
                if callback is not None:
                    callback(info)
            return sample(guided, x.to(self.device), sigmas.to(self.device), extra_args=cond, callback=step,
                          disable=True, generator=generator)

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) on the CPU, in [-1, 1] (`clamp=False`: as decoded)."""
        check_bool("clamp", clamp)
        if self.offloader is None:
            images = self.vae.from_latent(z.to(next(self.vae.parameters()).device)).float().cpu()
        else:
            with self.offloader.use("vae") as device:
                images = self.vae.from_latent(z.to(device)).float().cpu()
        return images.clamp(-1, 1) if clamp else images

# %%
# | export
@add_to_class(PipelineSampling)
def _check_safety(self, safety) -> bool:
    """safety=None: on when a checker is configured; False: off, said once; True: needs a checker."""
    if safety is not None and not isinstance(safety, bool):
        raise TypeError(f"safety: expected True, False or None (on when a checker is configured), got {safety!r}")
    if safety and self.safety_checker is None:
        raise ValueError("safety: True, but this pipeline has no safety checker (pass safety_checker=..., chapter 16)")
    if safety is False and self.safety_checker is not None and not self._safety_off_logged:
        logging.getLogger("tinydit").warning("safety checker turned off for this pipeline (safety=False)")
        self._safety_off_logged = True
    return self.safety_checker is not None if safety is None else safety

# %%
# | export
@add_to_class(PipelineSampling)
def finish(self, images: list, z, prompts, seeds, safety: bool) -> PipelineOutput:
    """The output, after the safety checker (when on) replaced what it flags."""
    if not safety:
        return PipelineOutput(images, z, prompts, seeds)
    images, flags, reasons = self.safety_checker(images, prompts)
    return PipelineOutput(images, z, prompts, seeds, list(flags), list(reasons))

# %%
# | export
class TextToImagePipeline(PipelineSampling):
    """Text encoder -> TextDiT + sampler + classifier-free guidance -> VAE, with defaults from the model's
    folder. `TextToImagePipeline.from_pretrained()` loads the shipped book model; a path (or hub id)
    loads a tinydit / diffusers PixArt pipeline folder or a book-model folder of chapter 09."""

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, sampler: str | None = None, seed=None, generator=None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 callback=None, latents: torch.Tensor | None = None, cure=DEFAULT_CURE, disable: bool | None = None,
                 output_type: str = "pil", safety: bool | None = None) -> PipelineOutput:
        r = self.check_inputs(prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
                              sampler, height, width, callback, output_type)
        safety = self._check_safety(safety)
        cond = self.encode_prompt(r.prompts, r.negatives)  # the sampler's extra_args
        start = self.prepare_latents(r.shape, seed, generator, latents)  # unit noise (B, C, h, w), seeds
        sigmas = self.schedule(r.steps)  # (steps + 1,)
        z = self.denoise(start.noise * sigmas[0], cond, sigmas, r.guidance_scale, r.sampler, cure=cure,
                         generator=start.generator, callback=callback, disable=disable)  # (B, C, h, w)
        if output_type == "latent":
            return PipelineOutput([], z, r.prompts, start.seeds)
        return self.finish(to_pil(self.decode(z)), z, r.prompts, start.seeds, safety)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, dtype=None, device="cpu",
                        **defaults) -> TextToImagePipeline:
        """None: the shipped book model. A folder or hub id: a pipeline folder (model_index.json: text_encoder/,
        tokenizer/, transformer/, vae/, scheduler/; written by `save_pretrained` or by diffusers for PixArt-α/Σ),
        or a book-model folder of chapter 09 (PixArt transformer + scheduler config; the book encoders).
        `dtype`: "fp32", "fp16", "bf16" for every component; `defaults`: SamplingConfig fields to override."""
        dtype, device = resolve_dtype(dtype), check_device("device", device)
        unknown = unknown_fields(defaults, SamplingConfig)
        if unknown:
            raise TypeError(f"from_pretrained: unknown sampling default(s) {unknown}; known: "
                            f"{[f.name for f in fields(SamplingConfig)]}")
        folder = BOOK_MODEL_DIR if path_or_id is None else formats.resolve_pipeline_folder(path_or_id)
        parts = formats.load_parts(folder, dtype)  # the components, the scheduler config, the saved defaults
        saved = {**parts.pop("defaults"), **defaults}
        sampling = SamplingConfig.from_scheduler_config(parts.pop("scheduler"))
        for k, v in saved.items():
            setattr(sampling, k, v)
        return cls(**parts, sampling=sampling.validate()).to(device)

# %%
# | export
@add_to_class(TextToImagePipeline)
def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Write diffusers' pipeline layout: model_index.json, transformer/ (PixArtTransformer2DModel),
    vae/ (AutoencoderKL), text_encoder/ + tokenizer/ (transformers), scheduler/ (the stock scheduler of
    our sampler), and tinydit's sampling defaults under model_index.json's "_tinydit" key."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder: expected a folder path, got {type(folder).__name__}")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"folder: {str(folder)!r} is a file, expected a folder (new or existing)")
    return formats.save_pipeline(self, Path(folder), asdict(self.sampling), self.sampling.scheduler_config())

# %%
# | export
def _check_call_options(callback, output_type) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable (it receives each step's dict) or None, got {type(callback).__name__}")
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type: expected 'pil' (PIL images) or 'latent' (latents only), got {output_type!r}")

# %%
# | export
def _check_request(shape, cfg, side: str) -> None:
    """Refuse a request far beyond memory before drawing its noise: latents plus one attention map."""
    B, C, h, w = shape
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    per_image = 4 * (C * h * w + 2 * cfg.num_heads * tokens * tokens)  # float32; CFG doubles the batch
    check_memory(side, per_image)
    check_memory("num_images_per_prompt", B * per_image)

# %%
# | export
def _check_prompts(prompt, negative_prompt, per_prompt) -> tuple[list[str], list[str]]:
    """Prompts and negatives as equal-length lists, each prompt repeated `per_prompt` times."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompts!r}")
    bad = [f"{i}: {type(p).__name__}" for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompt: every prompt must be a string; got {', '.join(bad[:5])}")
    per_prompt = check_int("num_images_per_prompt", per_prompt, minimum=1)
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list, tuple)):
        raise TypeError(f"negative_prompt: expected a string or a list of strings, got {type(negative_prompt).__name__}")
    negatives = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
        else list(negative_prompt)
    if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt: expected one string or one string per prompt ({len(prompts)}), "
                         f"got {negative_prompt!r}")
    return [p for p in prompts for _ in range(per_prompt)], [n for n in negatives for _ in range(per_prompt)]

# %%
# | export
def _check_sampler(name, prediction: str | None = None) -> str:
    """A known sampler name that fits a model predicting `prediction` (flow-only samplers need "flow")."""
    fits = [n for n in SAMPLERS if prediction in (None, "flow") or n not in FLOW_SAMPLERS]
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(fits)}, got {name!r}")
    if name not in fits:
        raise ValueError(f"sampler: {name!r} is for rectified-flow models; this model predicts {prediction!r} on a "
                         f"DDPM schedule; use one of {sorted(fits)}")
    return name

# %%
# | export
def _check_side(name: str, value, default: int, multiple: int) -> int:
    value = check_int(name, default if value is None else value, minimum=multiple)
    if value % multiple:
        raise ValueError(f"{name}: expected a multiple of {multiple} (VAE factor x patch size), got {value}; "
                         f"the nearest are {value // multiple * multiple} and {(value // multiple + 1) * multiple}")
    return value

# %%
# | export
def _check_shape(shape) -> tuple[int, int, int, int]:
    """A latent shape (B, C, h, w) of positive integers (check_inputs' Request.shape)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 4:
        raise ValueError(f"shape: expected the latents' (B, C, h, w), as check_inputs returns it, got {shape!r}")
    return tuple(check_int(f"shape[{i}]", n, minimum=1) for i, n in enumerate(shape))

# %%
# | export
def _check_denoise_args(cond, sigmas, wrap) -> None:
    """denoise's conditioning (encode_prompt's dict), schedule (a 1-D float tensor) and wrap (callable)."""
    if not isinstance(cond, dict) or "context" not in cond:
        raise TypeError("cond: expected the dict encode_prompt returns (context, context_mask, uncond_context, "
                        f"uncond_mask), got {sorted(cond) if isinstance(cond, dict) else type(cond).__name__}")
    check_tensor("sigmas", sigmas, ndim=1, floating=True)
    if wrap is not None and not callable(wrap):
        raise TypeError(f"wrap: expected a function guided -> denoiser, or None, got {type(wrap).__name__}")

# %%
# | export
def _initial_noise(shape, seed, generator, latents) -> tuple[torch.Tensor, list[int | None]]:
    """Unit-variance noise (B, C, h, w) drawn on the CPU: image i from seed + i (or seeds[i]), from one
    `generator`, or the given `latents`; with none of them, a random seed that the output reports."""
    B = shape[0]
    if seed is not None and (generator is not None or latents is not None):
        raise ValueError("seed: give seed, or generator, or latents (the initial noise), not several")
    if latents is not None:
        check_tensor("latents", latents, ndim=4, floating=True, finite=True)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected initial noise of shape {shape}, got {tuple(latents.shape)}")
        return latents.float().cpu(), [None] * B
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        return torch.randn(shape, generator=generator), [None] * B
    if seed is None:
        seed = int(torch.randint(0, 2**31 - B, ()).item())
    top = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
    seeds = [check_int("seed", seed, minimum=0, maximum=top - B + 1) + i for i in range(B)] \
        if not isinstance(seed, (list, tuple)) else [check_int(f"seed[{i}]", s, minimum=0, maximum=top) for i, s in enumerate(seed)]
    if len(seeds) != B:
        raise ValueError(f"seed: expected one seed, or one per image ({B}), got {len(seeds)}")
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]), seeds

# %%
# | export
def _sampler_generator(seeds, generator):
    """The generator of the stochastic samplers' fresh noise: the caller's, or one seeded by the first image."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(seeds[0] + 1) if seeds[0] is not None else None

# %%
# | export
def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> a list of RGB PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(p) for p in pixels]

# %% [markdown]
# ## 4. A gallery of pairs the model never saw
#
# `data.HELD_OUT` colour–shape pairs (a red triangle, a blue circle, a yellow square) never appear in
# the training captions (chapter 01). The pipeline draws them; chapter 10's reader grades each.

# %%
pipe = TextToImagePipeline.from_pretrained()  # the shipped book model (chapter 14 reads its folder)
held_out = evaluate.eval_scenes("held_out", 8 if FAST else 32, seed=3)
gallery = pipe([s.caption for s in held_out], seed=100, disable=True)
hits = [evaluate.score_scene(s, evaluate.read_image(evaluate.data.pil_to_tensor(im)))["pair"]
        for s, im in zip(held_out, gallery.images)]
cols = 8
fig, axes = plt.subplots((len(held_out) + cols - 1) // cols, cols, figsize=(2 * cols, 2.3 * ((len(held_out) + cols - 1) // cols)),
                         squeeze=False)
for ax, scene, image, hit in zip(axes.flat, held_out, gallery.images, hits):
    ax.imshow(image)
    ax.set_title(("✓ " if hit else "✗ ") + scene.caption.replace(" on a", "\non a"), fontsize=6)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()
print(f"HELD_OUT pairs drawn correctly: {sum(hits)} / {len(hits)}")
assert sum(hits) >= 0.6 * len(hits)  # chapter 10 measured 88 % on 300 prompts; a small sample, a wide margin

# %% [markdown]
# ## 5. Bad input
#
# Every argument is checked before any work, with the argument's name, what it got and what it wants.
# A prompt longer than the encoder's window is truncated with a warning that counts the tokens (chapter
# 06's tokenizer), never silently.

# %%
for call, pattern in [(dict(prompt=[]), "prompt: expected a string or a non-empty list"),
                      (dict(prompt=["a red circle", None]), "prompt: every prompt must be a string; got 1: NoneType"),
                      (dict(prompt="a red circle", height=30), "height: expected a multiple of 8"),
                      (dict(prompt="a red circle", num_inference_steps=0), "num_inference_steps: expected an integer >= 1"),
                      (dict(prompt="a red circle", sampler="dpm_fast"), "sampler: expected one of")]:
    expect_error(lambda call=call: pipe(disable=True, **call), pattern, (ValueError, TypeError))
expect_error(lambda: TextToImagePipeline.from_pretrained(tempfile.mkdtemp()), "is neither a pipeline folder",
             FileNotFoundError)
long_prompt = " ".join(["a red circle"] * 20)
with __import__("warnings").catch_warnings(record=True) as caught:
    __import__("warnings").simplefilter("always")
    pipe(long_prompt, seed=0, num_inference_steps=2, disable=True)
print(caught[0].message if caught else "no warning")
assert any("token" in str(w.message) for w in caught)

# %% [markdown]
# ## Summary
#
# - `TextToImagePipeline` (`tinydit.pipeline`) joins the book's parts: prompts → the text encoder
#   (cached per prompt) → chapter 08's sampler around chapter 11's `CFGDenoiser` around the DiT → the
#   VAE. Each image's noise comes from its own seed on the CPU, so an image does not depend on its
#   batch or process; the same seed gives the same image.
# - A call is five public steps in diffusers' order; img2img and inpainting (chapter 15), the evaluator
#   (chapter 10) and the guidance studies (chapter 11) compose the same steps, so there is one way to
#   generate an image.
# - `SamplingConfig` is chapter 08's `Parametrisation` plus the call defaults: it reads diffusers
#   scheduler configs as our samplers and sigma schedules — including the detail that multistep
#   schedulers space "linspace" timesteps over n + 1 points.
#
# ## Exercises
#
# 1. Time the pipeline with `enable_model_offload("cpu")` against without: what do the hooks cost per
#    image on a CPU, where the copies are free?
# 2. Split a schedule: `denoise` over `sigmas[:k + 1]` with one sampler, then over `sigmas[k:]` with
#    another (ComfyUI's SplitSigmas). Which pair beats either sampler alone at 8 steps, by chapter 10's
#    reader?
# 3. Per-image seeds make batches reproducible for deterministic samplers. Make the ancestral samplers'
#    fresh noise per-image too (one generator per image), and test that image *i* no longer depends on
#    its batch.
