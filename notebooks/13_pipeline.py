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
# # 12 · The pipeline: text to image, end to end
#
# Every part exists: the text encoder (chapter 06), the text-conditioned DiT (07) trained into the
# book model (09) and graded (10), the samplers (08), guidance (11), offloading and precision (12), the VAE (02). This
# chapter puts them behind one object, `TextToImagePipeline`, that a user calls with a prompt, that the
# command line wraps (`python -m tinydit generate "..."`), and that speaks diffusers' on-disk layout
# both ways: our folders load in diffusers' `PixArtAlphaPipeline`, and diffusers' PixArt folders load
# here — tested to give the same latents. It exports `tinydit.pipeline`.

# %%
# | default_exp pipeline

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import io
import json
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import display

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
from tinydit.denoisers import Parametrisation, scheduler_sampler
from tinydit.guidance import DEFAULT_CURE, DEFAULT_SCALE, CFGDenoiser, guidance_args
from tinydit.offload import ModelOffload, as_device
from tinydit.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, get_sampler
from tinydit.text import PromptCache, TextEmbeddings
from tinydit.textdit import TextDiT
from tinydit.vae import AutoencoderKL
from tinydit.validation import check_float, check_int, check_memory, check_tensor


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
        _check_sampler(self.sampler)
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
    nsfw: list[bool] | None = None  # per image: replaced by the safety checker (chapter 15); None: no check ran
    reasons: list[list[str]] | None = None  # per image: why it was replaced ([] when it was not)


@dataclass
class Request:
    """A call's arguments after `check_inputs`: what the other steps read."""

    prompts: list[str]  # one per image (each prompt repeated num_images_per_prompt times)
    negatives: list[str]  # one per image; "" = the unconditional branch
    steps: int  # model evaluations
    guidance_scale: float
    sampler: str
    shape: tuple[int, int, int, int]  # (B, C, h, w) of the latents


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
        # chapter 15: any callable (images, prompts) -> (images, flags, reasons); checks every call unless safety=False
        self.safety_checker, self._safety_off_logged = safety_checker, False
        self.sampling = sampling or SamplingConfig()
        self.cache = PromptCache(cache_size)
        self.offloader = None
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling
        self.multiple = self.factor * transformer.config.patch_size  # pixels per DiT token side

    @property
    def components(self) -> dict:
        """The parts, to build another pipeline on the same weights (chapter 14: `Img2ImgPipeline(**pipe.components)`)."""
        return dict(text_encoder=self.text_encoder, transformer=self.transformer, vae=self.vae, sampling=self.sampling,
                    safety_checker=self.safety_checker)

    @property
    def device(self) -> torch.device:
        return self.offloader.device if self.offloader is not None else next(self.transformer.parameters()).device

    def to(self, device) -> PipelineParts:
        for part in (self.text_encoder, self.transformer, self.vae):
            part.to(device)
        return self

    def enable_model_offload(self, device="cuda") -> ModelOffload:
        """Keep one component on `device` at a time (chapter 12's ModelOffload); the rest waits on the CPU."""
        if self.offloader is not None:
            raise ValueError("enable_model_offload: model offload is already on; call pipe.disable_model_offload() "
                             "first to change it")
        device = as_device("device", device)
        self.to("cpu")
        self.offloader = ModelOffload({"text_encoder": self.text_encoder, "transformer": self.transformer,
                                       "vae": self.vae}, device=device)
        return self.offloader

    def disable_model_offload(self, device="cpu") -> PipelineParts:
        """Undo enable_model_offload: the hooks removed, every component back on `device`."""
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None
        return self.to(device)

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
        sampler = _check_sampler(s.sampler if sampler is None else sampler)
        h, w = (_check_side(n, v, s.sample_size, self.multiple) for n, v in (("height", height), ("width", width)))
        shape = (len(prompts), self.transformer.config.in_channels, h // self.factor, w // self.factor)
        _check_request(shape, self.transformer.config, "height" if height is not None else "width")
        return Request(prompts, negatives, steps, scale, sampler, shape)

    def encode_prompt(self, prompts: list[str], negatives: list[str]) -> dict:
        """The sampler's extra_args: prompt and negative-prompt tokens with masks, on the DiT's device."""
        args = guidance_args(self.encode, prompts, negatives)
        return {k: v.to(self.device) for k, v in args.items()}

    def prepare_latents(self, shape, seed=None, generator=None, latents=None) -> InitialNoise:
        """Unit-variance noise (B, C, h, w) drawn on the CPU: image i from seed + i (or seed[i]), from one
        `generator`, or the given `latents`; with none of them, a random seed that the output reports."""
        noise, seeds = _initial_noise(shape, seed, generator, latents)
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
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        sample = sampler if callable(sampler) else get_sampler(_check_sampler(s.sampler if sampler is None else sampler))
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
        if self.offloader is None:
            images = self.vae.from_latent(z.to(next(self.vae.parameters()).device)).float().cpu()
        else:
            with self.offloader.use("vae") as device:
                images = self.vae.from_latent(z.to(device)).float().cpu()
        return images.clamp(-1, 1) if clamp else images

    def _check_safety(self, safety) -> bool:
        """safety=None: on when a checker is configured; False: off, said once; True: needs a checker."""
        if safety is not None and not isinstance(safety, bool):
            raise TypeError(f"safety: expected True, False or None (on when a checker is configured), got {safety!r}")
        if safety and self.safety_checker is None:
            raise ValueError("safety: True, but this pipeline has no safety checker (pass safety_checker=..., chapter 15)")
        if safety is False and self.safety_checker is not None and not self._safety_off_logged:
            logging.getLogger("tinydit").warning("safety checker turned off for this pipeline (safety=False)")
            self._safety_off_logged = True
        return self.safety_checker is not None if safety is None else safety

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
        dtype, device = resolve_dtype(dtype), as_device("device", device)
        unknown = sorted(set(defaults) - {f.name for f in fields(SamplingConfig)})
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


def _check_request(shape, cfg, side: str) -> None:
    """Refuse a request far beyond memory before drawing its noise: latents plus one attention map."""
    B, C, h, w = shape
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    per_image = 4 * (C * h * w + 2 * cfg.num_heads * tokens * tokens)  # float32; CFG doubles the batch
    check_memory(side, per_image)
    check_memory("num_images_per_prompt", B * per_image)


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


def _check_sampler(name) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {name!r}")
    return name


def _check_side(name: str, value, default: int, multiple: int) -> int:
    value = check_int(name, default if value is None else value, minimum=multiple)
    if value % multiple:
        raise ValueError(f"{name}: expected a multiple of {multiple} (VAE factor x patch size), got {value}; "
                         f"the nearest are {value // multiple * multiple} and {(value // multiple + 1) * multiple}")
    return value


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


def _sampler_generator(seeds, generator):
    """The generator of the stochastic samplers' fresh noise: the caller's, or one seeded by the first image."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(seeds[0] + 1) if seeds[0] is not None else None


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> a list of RGB PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(p) for p in pixels]


# %% [markdown]
# ## 4. Two layouts, both ways
#
# A diffusers pipeline folder is a `model_index.json` naming each component's library and class, and
# one subfolder per component in that library's own format. Chapter 07 reads diffusers'
# `PixArtTransformer2DModel`, chapter 02 its `AutoencoderKL`, chapter 06 transformers' CLIP and T5; the
# scheduler config is read above. Writing is the inverse, plus one private key (`"_tinydit"`, which
# diffusers ignores, as it ignores every key that starts with `_`) for what diffusers has no field for:
# our default sampler, steps and guidance, and how the text encoder pads.

# %%
# | export formats
"""Pipeline folders on disk (chapter 13): diffusers' layout read and written (model_index.json and one
subfolder per component, PixArt-α / Σ), and chapter 09's book-model folder read. The pipeline builds
itself from what `load_parts` returns; `save_pipeline` writes any pipeline's components."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinydit.checkpoint import read_config, resolve_pretrained
from tinydit.text import CLIPTextEncoder, T5TextEncoder, _quiet_transformers, load_book_text_encoder
from tinydit.textdit import TextDiT, pixart_config, pixart_to_diffusers
from tinydit.vae import AutoencoderKL, load_book_vae

MODEL_INDEX = "model_index.json"
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_FILES = (MODEL_INDEX, "*/config.json", "*/*.safetensors", "tokenizer/*", "scheduler/*")
SAVED_DEFAULTS = ("steps", "guidance_scale", "sample_size", "sampler")  # what "_tinydit" keeps that diffusers cannot


def resolve_pipeline_folder(path_or_id) -> Path:
    """A local folder for `path_or_id`, downloading a hub id's pipeline files when online."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id: expected a folder path or a hub id, got {type(path_or_id).__name__}")
    return resolve_pretrained(path_or_id, filenames=PIPELINE_FILES)


def _require(folder: Path, names, what: str) -> None:
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} is {what} but lacks {', '.join(missing)}")


def load_parts(folder: Path, dtype=None) -> dict:
    """A pipeline folder or a book-model folder -> text_encoder, transformer, vae, the scheduler config
    (a dict) and the defaults the folder stores (a dict of SamplingConfig fields)."""
    return load_pipeline_parts(folder, dtype) if (folder / MODEL_INDEX).is_file() else load_book_parts(folder, dtype)


def load_book_parts(folder: Path, dtype=None) -> dict:
    """A book-model folder (chapter 09): its PixArt transformer and scheduler, the book encoder and VAE."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} is neither a pipeline folder (no {MODEL_INDEX}) nor a "
                                "book-model folder (no config.json with diffusion_pytorch_model.safetensors)")
    _require(folder, ["diffusion_pytorch_model.safetensors", "scheduler_config.json"], "a book-model folder")
    scheduler = read_config(folder / "scheduler_config.json", "path_or_id")
    return dict(text_encoder=load_book_text_encoder(dtype=dtype), transformer=TextDiT.from_pretrained(folder, dtype=dtype),
                vae=load_book_vae(dtype=dtype), scheduler=scheduler, defaults={})


def load_text_encoder(folder: Path, index: dict, dtype=None):
    """The text encoder + tokenizer a model_index.json names (transformers' CLIP or T5 classes)."""
    kind = (index.get("text_encoder") or [None, None])[1] or ""
    extra = index.get("_tinydit", {}).get("text_encoder", {})
    if "T5" in kind:
        max_length = extra.get("max_length", 300 if "Sigma" in index.get("_class_name", "") else 120)
        return T5TextEncoder.from_pretrained(folder, "text_encoder", "tokenizer", dtype=dtype, max_length=max_length,
                                             padding=extra.get("padding", "max_length"))
    if "CLIP" in kind:
        options = {k: extra[k] for k in ("max_length", "padding", "layer") if k in extra}
        with _quiet_transformers(progress_bar=False):
            return CLIPTextEncoder.from_pretrained(folder, "text_encoder", "tokenizer", dtype=dtype, **options)
    raise ValueError(f"path_or_id: text_encoder class {kind!r} in {MODEL_INDEX}; expected a CLIP or T5 text model")


def _check_index(index: dict) -> dict:
    """model_index.json's entries: [library, class] pairs, and our "_tinydit" object."""
    for part in PIPELINE_PARTS:
        entry = index.get(part)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"path_or_id: {MODEL_INDEX}'s {part!r} entry should be [library, class], got {entry!r}")
    extra = index.get("_tinydit", {})
    if not isinstance(extra, dict) or not all(isinstance(extra.get(k, {}), dict) for k in ("sampling", "text_encoder")):
        raise ValueError(f"path_or_id: {MODEL_INDEX}'s '_tinydit' entry should be an object with 'sampling' and "
                         f"'text_encoder' objects, got {extra!r}")
    return index


def load_pipeline_parts(folder: Path, dtype=None) -> dict:
    """Every component of a pipeline folder, its scheduler config and its stored defaults."""
    index = _check_index(read_config(folder / MODEL_INDEX, "path_or_id"))
    _require(folder, [f"{p}/" for p in PIPELINE_PARTS] + ["scheduler/scheduler_config.json"], "a pipeline folder")
    scheduler = read_config(folder / "scheduler" / "scheduler_config.json", "path_or_id")
    transformer = TextDiT.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = index.get("_tinydit", {}).get("sampling", {})
    defaults = dict(steps=20, guidance_scale=4.5, sample_size=transformer.config.input_size * factor)  # PixArt's
    defaults.update({k: v for k, v in saved.items() if k in SAVED_DEFAULTS})
    return dict(text_encoder=load_text_encoder(folder, index, dtype), transformer=transformer, vae=vae,
                scheduler=scheduler, defaults=defaults)


def pixart_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE to save in a PixArt folder. diffusers' PixArt pipelines decode `z / scaling_factor` and
    never add `shift_factor`, so a shifted VAE (the book's: -0.2582) is saved with the shift folded into
    its 1x1 convs (exact: post_quant_conv's bias += W @ shift, quant_conv's mean bias -= shift) and
    shift_factor 0: the same latents and the same images in both libraries."""
    shift = vae.config.shift_factor
    if not shift:
        return vae
    if vae.quant_conv is None or vae.post_quant_conv is None:
        warnings.warn(f"vae: shift_factor {shift} cannot be folded (no quant convs); diffusers' PixArt pipelines "
                      "will decode without it", stacklevel=3)
        return vae
    folded, C = copy.deepcopy(vae), vae.config.latent_channels
    with torch.no_grad():
        folded.post_quant_conv.bias += folded.post_quant_conv.weight[:, :, 0, 0] @ torch.full((C,), float(shift))
        folded.quant_conv.bias[:C] -= shift  # moments = (mean, logvar): the mean's channels come first
    folded.config = dataclasses.replace(folded.config, shift_factor=0.0)
    return folded


def save_pipeline(pipe, folder: Path, sampling: dict, scheduler: dict) -> Path:
    """`TextToImagePipeline.save_pretrained`: diffusers' pipeline layout, with `scheduler` (a diffusers
    scheduler config) and tinydit's `sampling` defaults under model_index.json's "_tinydit" key."""
    for part in PIPELINE_PARTS:
        (folder / part).mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(pixart_config(pipe.transformer.config), indent=1))
    sd = {k: v for k, v in pipe.transformer.state_dict().items() if k != "y_embedder.y_embedding"}  # diffusers has none
    save_file(pixart_to_diffusers({k: v.detach().cpu() for k, v in sd.items()}),
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    pixart_vae(pipe.vae).save_pretrained(folder / "vae")
    encoder = pipe.text_encoder
    with _quiet_transformers(progress_bar=False):
        encoder.model.save_pretrained(folder / "text_encoder")
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    text = {"max_length": encoder.max_length, "padding": encoder.padding}
    if isinstance(encoder, CLIPTextEncoder):
        text["layer"] = encoder.layer
    index = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.30.0",
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", type(encoder.model).__name__],
             "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "_tinydit": {"sampling": sampling, "text_encoder": text}}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=1))
    return folder


# %% [markdown]

# %% [markdown]
# Round trip: the book model written in diffusers' layout and read back gives the same latents, and
# its files are exactly what diffusers expects. (The tests go further: diffusers' own
# `PixArtAlphaPipeline` loads this folder and, fed the book encoder's embeddings, lands on our
# latents within 3.4e-5; and a random PixArt-α pipeline saved by diffusers loads here and gives
# diffusers' latents within 2e-5 of their size.)

# %%
pipe = TextToImagePipeline.from_pretrained()
with tempfile.TemporaryDirectory() as tmp:
    pipe.save_pretrained(tmp)
    print(sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file()))
    back = TextToImagePipeline.from_pretrained(tmp)
    a = pipe(["a red circle above a blue square"], seed=0, disable=True, output_type="latent").latents
    b = back(["a red circle above a blue square"], seed=0, disable=True, output_type="latent").latents
assert torch.equal(a, b) and back.sampling == pipe.sampling

# %% [markdown]
# ## 5. What the model looks at: cross-attention maps
#
# Each block's cross-attention lets every image token (a 2×2 patch of the 8×8 latent: a 4×4 grid)
# read the caption's tokens. Recording the attention weights during sampling — with forward hooks
# again, the model untouched — shows which part of the image listens to which word.

# %%
# | export demo
"""What the model looks at, and a widget to play with it (chapter 13): cross-attention maps recorded
with forward hooks while the pipeline samples, their plot, and `GenerateDemo` (ipywidgets; served by
`python -m tinydit demo`). matplotlib, ipywidgets and IPython are imported only where they are used."""

from __future__ import annotations

import html
import io
import time

import torch
from PIL import Image

from tinydit.pipeline import PipelineOutput, TextToImagePipeline
from tinydit.samplers import SAMPLERS
from tinydit.textdit import TextDiT


# %%
# | export demo
class CrossAttentionMaps:
    """Records a TextDiT's text-to-image cross-attention while sampling: `with CrossAttentionMaps(model)
    as maps: pipe(...)`, then `maps.mean(B)` -> (B, T, h, w): the attention of the image tokens to each
    text token, averaged over heads, blocks and steps (the first B rows of each call: the conditional
    half of a CFG batch)."""

    def __init__(self, model: TextDiT):
        self.model, self.calls, self.hooks = model, [], []
        self.grid = model.config.input_size // model.config.patch_size

    def _record(self, module, args, kwargs, out) -> None:
        from tinydit.attention import attention_weights

        x, context = args[0], args[1]
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        q, k, _ = module.qkv_heads(x, context)  # (B, heads, N, hd), (B, heads, T, hd)
        self.calls.append(attention_weights(q, k, mask).mean(1).detach().float().cpu())  # (B, N, T)

    def mean(self, batch_size: int) -> torch.Tensor:
        maps = torch.stack([c[:batch_size] for c in self.calls if c.shape[0] >= batch_size]).mean(0)  # (B, N, T)
        return maps.transpose(1, 2).reshape(batch_size, -1, self.grid, self.grid)  # (B, T, h, w)

    def __enter__(self) -> CrossAttentionMaps:
        blocks = self.model.blocks
        for block in [blocks[i] for i in range(len(blocks))]:  # indexing: a step cache's iteration yields callables
            self.hooks.append(block.cross_attn.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


# %%
# | export demo
def attention_maps(pipe: TextToImagePipeline, prompt: str, seed: int = 0, **options):
    """Generate `prompt` and record where the image tokens attended: (PipelineOutput, (T, h, w) maps, T tokens)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected one string, got {type(prompt).__name__}")
    with CrossAttentionMaps(pipe.transformer) as maps:
        out = pipe([prompt], seed=seed, disable=True, **options)
    attn = maps.mean(1)[0]  # (T, h, w)
    ids = pipe.text_encoder.tokenizer([prompt], truncation=True, max_length=attn.shape[0])["input_ids"][0]
    return out, attn, pipe.text_encoder.tokenizer.convert_ids_to_tokens(ids)  # the tokens the encoder kept


def plot_attention(attn: torch.Tensor, words: list[str], image: Image.Image | None = None):
    """One panel per caption token (and the image first, if given); returns the matplotlib figure."""
    import matplotlib.pyplot as plt  # optional: the notebooks extra

    panels = len(words) + (image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(1.6 * panels, 1.9), squeeze=False)
    axes = list(axes[0])
    if image is not None:
        axes.pop(0).imshow(image)
        fig.axes[0].set_title("image", fontsize=8)
    vmax = float(attn[1:len(words) - 1].max()) if len(words) > 2 else float(attn.max())  # scale by the words, not <sot>/<eot>
    for ax, word, m in zip(axes, words, attn.numpy()):
        ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(word.replace("<|startoftext|>", "<sot>").replace("<|endoftext|>", "<eot>"), fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    return fig


# %%
def show_attention(pipe, prompt, seed=0, **options):
    """The image for `prompt` and, per caption word, where the image tokens attended to it."""
    out, attn, words = attention_maps(pipe, prompt, seed=seed, **options)
    plot_attention(attn, words, out.images[0])
    plt.show()
    return out, attn, words


pipe = TextToImagePipeline.from_pretrained()  # the package's class, which the demo module above imported
out, attn, words = show_attention(pipe, "a red circle above a blue square")
torch.testing.assert_close(attn.sum(0), torch.ones(4, 4), atol=1e-5, rtol=0)  # each image token's weights sum to 1
share = attn.mean((1, 2))  # (T,) how much of the attention each token receives
print("  ".join(f"{w}: {100 * s:.0f} %" for w, s in zip(words, share)))
assert words[int(share.argmax())] not in ("<pad>",)  # the model reads real tokens, never padding

# %% [markdown]
# The maps are not the crisp "red goes to the top" pictures of large models. The book text encoder is
# a *causal* CLIP (chapter 06): each token sees only the words before it, so the last ones — the final
# noun and the end token — carry a summary of the whole caption, and the DiT learnt to read mostly
# those, with image tokens in the centre columns (where objects are drawn) attending differently from
# the border. PixArt's T5 is bidirectional: every token sees the whole caption, and its maps are
# spatial. Exercise 3 asks you to measure the difference.

# %% [markdown]
# ## 6. A gallery of pairs the model never saw
#
# `data.HELD_OUT` colour–shape pairs (a red triangle, a blue circle, a yellow square) never appear in
# the training captions (chapter 01). The pipeline draws them; chapter 10's reader grades each.

# %%
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
# ## 7. Try it
#
# Type a prompt (the book's vocabulary: colours red, green, blue, yellow, purple, orange; shapes circle,
# square, triangle; positions and relations left / right / above / below; backgrounds white, gray,
# black), pick a sampler, the steps, the guidance scale and a seed, and press Generate. The progress bar
# follows the sampler's steps; beside the image, what each word was attended to.
#
# The demo is a small class, exported, so the same object runs here, in a served web app
# (`python -m tinydit demo` serves it with Voilà; a test drives it in headless Chromium) and in your own
# notebooks. The image is an `ipywidgets.Image` holding the PNG itself — the browser shows it enlarged
# with crisp pixels, and a program can read back the exact picture the pipeline made.

# %%
# | export demo
DEMO_PROMPT = "a green triangle below a purple circle"  # two objects and a relation, read back right at seed 0


class GenerateDemo:
    """The chapter's widget: prompt, sampler, steps, guidance scale, seed -> the image (PNG, read back
    exactly) and the cross-attention maps. `display(GenerateDemo(pipe))`; `python -m tinydit demo` serves it."""

    def __init__(self, pipe: TextToImagePipeline, prompt: str = DEMO_PROMPT, attention: bool = True):
        import ipywidgets as widgets  # optional: the notebooks extra

        if not isinstance(pipe, TextToImagePipeline):
            raise TypeError(f"pipe: expected a TextToImagePipeline; got {type(pipe).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
        self.pipe, self.attention, self.last = pipe, attention, None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="70%"))
        flow = pipe.sampling.prediction == "flow"  # the *_rf samplers need flow times <= 1
        names = sorted(n for n in SAMPLERS if flow or not n.endswith("_rf"))
        self.sampler = widgets.Dropdown(options=names, value=pipe.sampling.sampler, description="sampler")
        self.steps = widgets.IntSlider(value=pipe.sampling.steps, min=1, max=50, description="steps")
        self.cfg = widgets.FloatSlider(value=pipe.sampling.guidance_scale, min=0, max=8, step=0.5, description="CFG")
        self.seed = widgets.IntText(value=0, description="seed")
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.progress = widgets.IntProgress(min=0, max=1, description="steps")
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="256px", height="256px"))
        self.status = widgets.HTML()  # the time taken, or the pipeline's one-line error
        self.maps = widgets.Output()
        for widget, name in [(self.prompt, "prompt"), (self.seed, "seed"), (self.button, "generate"),
                             (self.image, "image"), (self.status, "status")]:
            widget.add_class(f"tinydit-{name}")  # stable handles for a browser test
        self.button.on_click(self._clicked)
        style = widgets.HTML("<style>.tinydit-image { image-rendering: pixelated; border: 1px solid #ccc; }</style>")
        self.view = widgets.VBox([style, self.prompt, widgets.HBox([self.sampler, self.steps]),
                                  widgets.HBox([self.cfg, self.seed]), widgets.HBox([self.button, self.progress]),
                                  widgets.HBox([self.image, self.maps]), self.status])

    def generate(self) -> PipelineOutput | None:
        """Run the pipeline on the widgets' values; shows the image, the maps and the time (or the error)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.progress.max, self.progress.value = self.steps.value, 0
        self.button.disabled = True  # one run at a time: a second click while sampling would interleave
        self.status.value = "generating…"
        start = time.perf_counter()
        options = dict(seed=self.seed.value, sampler=self.sampler.value, num_inference_steps=self.steps.value,
                       guidance_scale=self.cfg.value, callback=lambda info: setattr(self.progress, "value", self.progress.value + 1))
        try:
            out, attn, words = attention_maps(self.pipe, self.prompt.value, **options)
        except (ValueError, TypeError) as e:  # the pipeline's one-line errors, shown to the reader
            self.status.value = f"<b>error</b>: {html.escape(str(e))}"
            return None
        finally:
            self.button.disabled = False
        buffer = io.BytesIO()
        out.images[0].save(buffer, format="PNG")
        self.image.value = buffer.getvalue()
        self.maps.clear_output(wait=True)
        if self.attention:
            fig = plot_attention(attn, words)
            with self.maps:
                display(fig)  # a PNG in the page; closed below so the inline backend does not draw it twice
            plt.close(fig)
        self.status.value = f"{time.perf_counter() - start:.2f} s · seed {self.seed.value} · {html.escape(self.prompt.value)}"
        self.last = out
        return out

    def _clicked(self, _button) -> None:
        """A click: any failure is shown in the page (a widget callback's exception reaches only the server's log)."""
        try:
            self.generate()
        except Exception as e:  # the page has nowhere else to say it
            self.status.value = f"<b>error</b>: {html.escape(f'{type(e).__name__}: {e}')}"

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)


# %%
demo = GenerateDemo(pipe)
display(demo)
first = demo.generate()  # one run now, so the page shows a result without a kernel
assert demo.progress.value >= demo.steps.value  # the bar followed every step (Heun-type samplers call back once a step)
reading = evaluate.read_image(evaluate.data.pil_to_tensor(Image.open(io.BytesIO(demo.image.value))))
print("the widget's PNG reads as:", [(o.color, o.shape) for o in reading.objects])
assert sorted((o.color, o.shape) for o in reading.objects) == [("green", "triangle"), ("purple", "circle")]
assert torch.equal(evaluate.data.pil_to_tensor(Image.open(io.BytesIO(demo.image.value))),
                   evaluate.data.pil_to_tensor(first.images[0]))  # the widget shows the pipeline's picture, unchanged
same, _, _ = show_attention(pipe, demo.prompt.value, seed=0)  # the printed page has no kernel: the same call, as a figure
assert same.images[0].tobytes() == first.images[0].tobytes()  # the demo is the pipeline with the widgets' values
demo.seed.value = -1  # the seed box takes any integer; the pipeline does not
assert demo.generate() is None and "seed" in demo.status.value  # the pipeline's one-line error, in the page
print(demo.status.value)
demo.seed.value = 0

# %% [markdown]
# ## 8. Bad input
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
#   VAE. Each image's noise comes from its own seed on the CPU, so an image does not depend on its batch
#   or process; the same seed gives the same image.
# - `SamplingConfig` reads diffusers scheduler configs as our samplers and sigma schedules — including
#   the detail that multistep schedulers space "linspace" timesteps over n + 1 points.
# - The pipeline speaks diffusers' layout both ways: `save_pretrained` writes a folder that diffusers'
#   `PixArtAlphaPipeline` loads and samples to our latents (3.4e-5), and diffusers' PixArt folders load
#   here with diffusers' latents (2e-5 relative, tests).
# - Cross-attention maps show what the model reads; a gallery of HELD_OUT pairs shows it composing
#   pairs it never saw; `GenerateDemo` drives it all from widgets, in a notebook or served as a web page
#   (`python -m tinydit demo`); `python -m tinydit generate` is the same call from a shell.
#
# ## Exercises
#
# 1. Time the pipeline with `enable_model_offload("cpu")` against without: what do the hooks cost per
#    image on a CPU, where the copies are free?
# 2. Give `__call__` a `sigmas=` argument that overrides the schedule, and compare Karras against
#    "trailing" spacing at 8 steps with chapter 10's reader.
# 3. Load a PixArt-style model with a bidirectional text encoder (a tiny T5, as in the tests) and compare
#    its cross-attention maps with the book model's: which is more spatial, and why?
# 4. Per-image seeds make batches reproducible for deterministic samplers. Make the ancestral samplers'
#    fresh noise per-image too (one generator per image), and test that image *i* no longer depends on
#    its batch.
