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
# # 14 · Editing: img2img and inpainting with the ordinary model
#
# A text-to-image model starts from noise. Start it from a *noised image* instead and it keeps the
# image's layout and repaints the details (**img2img**, SDEdit: Meng et al. 2021). Keep part of the image
# fixed at every step and it fills in only the rest (**inpainting**) — no special 9-channel inpainting
# model needed. This chapter builds both on chapter 13's pipeline, sharing its weights, and measures
# on the book world what they preserve and what they change. It exports `tinydit.edit`.

# %%
# | default_exp edit
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from PIL import Image

from tinydit import data, evaluate
from tinydit.guidance import CFGDenoiser
from tinydit.pipeline import TextToImagePipeline
from tinydit.samplers import sample_dpmpp_2m
from tinydit.validation import expect_error


torch.set_num_threads(1)  # a 4 M-parameter model on 16 tokens: one thread beats two contending
pipe = TextToImagePipeline.from_pretrained()

# %% [markdown]
# ## 1. SDEdit in ten lines
#
# Noise the source's latents to a level σ_start chosen by `strength` (0: the source itself, 1: pure
# noise), then run the sampler's remaining steps from there. The lower the strength, the less the
# sampler can move away from the source.

# %%
def lesson_img2img(pipe, prompt, image, strength, seed=0, steps=20):
    z = pipe.vae.to_latent(image[None])  # (1, 4, 8, 8) the source's latents
    denoiser = pipe.sampling.denoiser(pipe.transformer)
    sigmas = pipe.sampling.sigmas(denoiser, steps)[steps - int(steps * strength):]  # the last steps only
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    x = z + noise * sigmas[0]  # the source, noised to sigma_start
    cond = pipe.encode_prompt([prompt], [""])  # the pipeline's public step: tokens and the empty prompt's
    z = sample_dpmpp_2m(CFGDenoiser(denoiser, pipe.sampling.guidance_scale), x, sigmas, extra_args=cond, disable=True)
    return pipe.vae.from_latent(z).clamp(-1, 1)[0]  # (3, 32, 32)


source_scene = data.sample_scene(0, "test", 5)
source = data.pil_to_tensor(data.render_scene(source_scene, 32))  # (3, 32, 32) in [-1, 1]
with torch.no_grad():
    edits = [lesson_img2img(pipe, "a green circle on a black background", source, s) for s in (0.2, 0.5, 0.8, 1.0)]
fig, axes = plt.subplots(1, 5, figsize=(9, 2))
for ax, img, title in zip(axes, [source, *edits], ["source", "strength 0.2", "0.5", "0.8", "1.0"]):
    ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
plt.show()
print("source:", source_scene.caption)
assert (edits[0] - source).abs().mean() < (edits[-1] - source).abs().mean()  # low strength stays close

# %% [markdown]
# The production version follows diffusers' img2img: `strength` keeps the last `int(steps × strength)`
# steps of the schedule (`get_timesteps`), so 20 steps at strength 0.6 run 12 model evaluations, and
# strength 1 starts from pure noise — exactly text-to-image. It takes PIL images (any mode, converted
# to RGB), paths or tensors, and shares the text-to-image pipeline's components (no second copy of the
# weights): `Img2ImgPipeline(**pipe.components)`.

# %%
# | export
"""Editing with an ordinary text-to-image model (chapter 15): img2img (SDEdit, Meng et al. 2021) and
inpainting by latent blending, with soft masks (differential diffusion), RePaint resampling and
cropping to the mask; both share a TextToImagePipeline's components."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from tinydit.data import pil_to_tensor, rgb_of
from tinydit.guidance import DEFAULT_CURE
from tinydit.pipeline import PipelineOutput, TextToImagePipeline, to_pil
from tinydit.validation import check_bool, check_finite, check_float, check_int


def load_rgb(name: str, image) -> Image.Image:
    """A PIL image in RGB from a PIL image of any mode, a path, or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{name}: no image file at {str(image)!r}")
        image = Image.open(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"{name}: expected a (3, H, W) float tensor in [-1, 1], got {tuple(image.shape)} {image.dtype}")
        check_finite(name, image)  # NaN pixels would become black, then be edited
        lo, hi = float(image.min()), float(image.max())
        if lo < -1.01 or hi > 1.01:  # a 0-255 (or 0-1 shifted) tensor would be clamped without a word
            raise ValueError(f"{name}: expected values in [-1, 1], got values from {lo:.3g} to {hi:.3g}"
                             + ("; a 0-255 image becomes x / 127.5 - 1" if hi > 2 else ""))
        return to_pil(image[None].float().cpu())[0]
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, a path or a (3, H, W) tensor, got {type(image).__name__}")
    return rgb_of(image)  # any mode -> RGB: 16-bit greyscale scaled, never clipped to white

# %%
# | export
def load_mask(mask_image, size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) in [0, 1], white = repaint; a mask of another size than the image is resized to it
    (bilinear), with a warning."""
    if isinstance(mask_image, torch.Tensor):
        mask = mask_image.float().cpu()
        mask = mask[None] if mask.ndim == 2 else mask
        if mask.ndim != 3 or mask.shape[0] != 1:
            raise ValueError(f"mask_image: expected an (H, W) or (1, H, W) tensor in [0, 1], got {tuple(mask_image.shape)}")
        if not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask_image: expected values in [0, 1] (1 = repaint)")
    else:
        if isinstance(mask_image, (str, os.PathLike)) and not os.path.isfile(mask_image):
            raise FileNotFoundError(f"mask_image: no image file at {str(mask_image)!r}")
        img = Image.open(mask_image) if isinstance(mask_image, (str, os.PathLike)) else mask_image
        if not isinstance(img, Image.Image):
            raise TypeError(f"mask_image: expected a PIL image, a path or a tensor, got {type(mask_image).__name__}")
        mask = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255)[None]  # (1, H, W)
    if tuple(mask.shape[1:]) != size:
        warnings.warn(f"mask_image: {tuple(mask.shape[1:])} differs from the image's {size}; resized to it", stacklevel=3)
        mask = F.interpolate(mask[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return mask

# %%
# | export
def start_index(steps: int, strength: float) -> int:
    """Where img2img enters a `steps`-step schedule: the last int(steps * strength) steps run (diffusers)."""
    return steps - min(int(steps * strength), steps)

# %% [markdown]
# ## 2. Inpainting by latent blending
#
# The mask (white = repaint) shrinks to the latent grid: a latent cell is repainted when any pixel of
# its 4×4 block is (no seam of half-kept cells). Then, at **every** denoiser call, the kept cells of the
# sampler's input are replaced by the source's latents noised to the current σ with the run's own
# noise, and the denoiser answers the source itself there. For a deterministic sampler that keeps the
# kept cells *exactly* on the path source + σ·noise, so they land on the source at σ = 0; the repainted
# cells see a consistent neighbourhood at every step, which is what makes them fit in.
#
# Two refinements. **Soft masks** (differential diffusion, Levin & Fried 2023): a cell with mask value m
# follows the source until the run's progress reaches 1 − m, so grey means "change a little". **RePaint**
# (Lugmayr et al. 2022): after every `jump` steps, noise the sample back up and run those steps again
# (`n_sample` times): the repainted region gets more chances to agree with the kept one.

# %%
# | export
class LatentBlend:
    """A denoiser for inpainting with an ordinary model: where `keep` (B, 1, h, w) is 1 the input is the
    source noised to sigma with `noise`, and the output is the source; elsewhere the wrapped denoiser.
    `soft`: keep is (progress < 1 - mask), progress = the step's place in `sigmas` (0 first, 1 last)."""

    def __init__(self, denoiser, source: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                 sigmas: torch.Tensor, soft: bool = False):
        self.denoiser, self.source, self.noise, self.mask, self.soft = denoiser, source, noise, mask, soft
        self.levels = sigmas[:-1].tolist()  # the schedule's non-zero noise levels, descending

    def keep(self, sigma: torch.Tensor) -> torch.Tensor:
        if not self.soft:
            return (self.mask == 0).to(self.source.dtype)  # (B, 1, h, w)
        s = float(sigma.max())
        step = sum(level > s * (1 + 1e-6) for level in self.levels)  # steps already taken
        progress = step / max(1, len(self.levels))
        return (progress < 1 - self.mask).to(self.source.dtype)  # (B, 1, h, w)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        keep = self.keep(sigma)  # (B, 1, h, w)
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        x = keep * (self.source + s * self.noise) + (1 - keep) * x  # kept cells: the source at this noise level
        return keep * self.source + (1 - keep) * self.denoiser(x, sigma, **cond)  # (B, C, h, w)

# %%
# | export
@torch.no_grad()
def sample_repaint(model, x, sigmas, extra_args=None, callback=None, disable=None, jump: int = 2, n_sample: int = 2,
                   generator=None):
    """Euler steps with RePaint's resampling (Lugmayr et al. 2022): every `jump` steps, noise back up and redo them."""
    jump, n_sample = check_int("jump", jump, minimum=1), check_int("n_sample", n_sample, minimum=1)
    s, extra, ones, n = sigmas.tolist(), extra_args or {}, x.new_ones(len(x)), len(sigmas) - 1
    i, calls = 0, 0
    while i < n:
        end = min(i + jump, n)
        for r in range(n_sample):
            for j in range(i, end):
                denoised = model(x, s[j] * ones, **extra)
                x = x + (s[j + 1] - s[j]) * (x - denoised) / s[j]  # an Euler (DDIM) step
                calls += 1
                if callback is not None:
                    callback({"x": x, "i": j, "sigma": sigmas[j], "denoised": denoised})
            if r < n_sample - 1 and s[end] > 0:  # back up to sigma_i with fresh noise
                x = x + torch.randn(x.shape, generator=generator).to(x) * (s[i] ** 2 - s[end] ** 2) ** 0.5
        i = end
    return x

# %%
# | export
def _check_strength(strength, steps: int) -> float:
    """A strength in (0, 1] that runs at least one of `steps` steps (img2img runs int(steps * strength))."""
    strength = check_float("strength", strength)
    if not 0 < strength <= 1:
        raise ValueError(f"strength: expected a number in (0, 1] (0 would return the source unchanged), got {strength}")
    if int(steps * strength) < 1:
        raise ValueError(f"strength: {strength} of {steps} steps runs no step; use strength >= {1 / steps:.3g} "
                         "or more steps")
    return strength

# %%
# | export
def _check_edit_options(soft, blur, repaint) -> tuple[bool, float, tuple[int, int] | None]:
    """`soft` a bool, `blur` pixels >= 0, `repaint` None or (jump, n_sample) of two integers >= 1."""
    soft, blur = check_bool("soft", soft), check_float("blur", blur, minimum=0)
    if repaint is not None:
        if not isinstance(repaint, (tuple, list)) or len(repaint) != 2:
            raise ValueError(f"repaint: expected (jump, n_sample), two integers >= 1, got {repaint!r}")
        repaint = (check_int("repaint jump", repaint[0], minimum=1), check_int("repaint n_sample", repaint[1], minimum=1))
    return soft, blur, repaint

# %%
# | export
def mask_bbox(mask: torch.Tensor, padding: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the mask's non-zero pixels, grown by `padding`, squared and rounded
    out to `multiple`, inside the image."""
    H, W = mask.shape[-2:]
    rows, cols = mask[0].amax(1).nonzero()[:, 0], mask[0].amax(0).nonzero()[:, 0]
    top, bottom = int(rows.min()) - padding, int(rows.max()) + 1 + padding
    left, right = int(cols.min()) - padding, int(cols.max()) + 1 + padding
    side = max(bottom - top, right - left, multiple)
    side = min(-(-side // multiple) * multiple, H, W)
    top = min(max(0, (top + bottom - side) // 2), H - side)
    left = min(max(0, (left + right - side) // 2), W - side)
    return top, left, top + side, left + side

# %%
# | export
class EditPipeline(TextToImagePipeline):
    """The shared core of img2img and inpainting (built from a TextToImagePipeline's components)."""

# %%
# | export
@add_to_class(EditPipeline)
def _check_source(self, source: torch.Tensor) -> torch.Tensor:
    """The source (3, H, W): sides that are multiples of the model's patch in pixels; one far larger
    than the model's images (4x its side) is resized down to them, with a one-line warning, before any
    work (a 2048-pixel source for the 32-pixel book model would run for many minutes)."""
    H, W = source.shape[1:]
    native = self.sampling.sample_size
    if max(H, W) > 4 * native:
        scale = native / max(H, W)
        h, w = (max(self.multiple, round(s * scale / self.multiple) * self.multiple) for s in (H, W))
        warnings.warn(f"image: {W}x{H} is far larger than the {native}-pixel images this model draws; resized to "
                      f"{w}x{h} (pass a smaller image to choose the size yourself)", stacklevel=4)
        source = F.interpolate(source[None], size=(h, w), mode="area")[0]  # (3, h, w)
        H, W = h, w
    if H % self.multiple or W % self.multiple or min(H, W) < self.multiple:
        raise ValueError(f"image: expected sides that are multiples of {self.multiple} (at least {self.multiple}), "
                         f"got {W}x{H}; resize it first")
    return source

# %%
# | export
@add_to_class(EditPipeline)
def edit(self, prompt, image, mask_image=None, strength: float = 1.0, negative_prompt=None,
         num_inference_steps=None, guidance_scale=None, sampler=None, seed=None, generator=None,
         num_images_per_prompt: int = 1, callback=None, cure=DEFAULT_CURE, soft: bool = False, blur: float = 0.0,
         repaint: tuple[int, int] | None = None, disable=None, output_type: str = "pil",
         safety: bool | None = None) -> PipelineOutput:
    r = self.check_inputs(prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
                          sampler, callback=callback, output_type=output_type)  # the pipeline's own checks
    safety, strength = self._check_safety(safety), _check_strength(strength, r.steps)
    soft, blur, repaint = _check_edit_options(soft, blur, repaint)
    source = self._check_source(pil_to_tensor(load_rgb("image", image)))  # (3, H, W) in [-1, 1]
    H, W = source.shape[1:]
    mask = None if mask_image is None else load_mask(mask_image, (H, W))  # (1, H, W)
    B, C, h, w = len(r.prompts), self.transformer.config.in_channels, H // self.factor, W // self.factor
    if mask is not None and float(mask.max()) == 0:  # nothing to repaint: the source, exactly
        z = self.vae.to_latent(source[None].to(self.device)).repeat(B, 1, 1, 1)
        return self.finish(to_pil(source[None].repeat(B, 1, 1, 1)), z, r.prompts, [None] * B, safety)
    start = self.prepare_latents((B, C, h, w), seed, generator)  # unit noise (B, C, h, w), seeds
    z_src = self.vae.to_latent(source[None].to(self.device)).float().cpu().repeat(B, 1, 1, 1)  # (B, C, h, w)
    full = self.schedule(r.steps)
    sigmas = full[start_index(r.steps, strength):]
    x = start.noise * sigmas[0] if strength == 1 else z_src + start.noise * sigmas[0]  # strength 1: text-to-image's start
    wrap = None
    if mask is not None:
        latent_mask = F.interpolate(mask[None], size=(h, w), mode="area")  # (1, 1, h, w)
        latent_mask = (latent_mask if soft else (latent_mask > 0).float()).to(self.device)
        wrap = lambda guided: LatentBlend(guided, z_src.to(self.device), start.noise.to(self.device), latent_mask,
                                          full, soft)
    sample = r.sampler if repaint is None else functools.partial(sample_repaint, jump=repaint[0], n_sample=repaint[1])
    z = self.denoise(x, self.encode_prompt(r.prompts, r.negatives), sigmas, r.guidance_scale, sample, cure=cure,
                     span=full, wrap=wrap, generator=start.generator, callback=callback, disable=disable)
    prompts, seeds = r.prompts, start.seeds
    if output_type == "latent":
        return PipelineOutput([], z, prompts, seeds)
    images = self.decode(z)  # (B, 3, H, W)
    if mask is not None:
        images = composite(images, source, mask, blur)
    return self.finish(to_pil(images), z, prompts, seeds, safety)

# %%
# | export
def composite(images: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, blur: float = 0.0) -> torch.Tensor:
    """Pixels where the mask is 0 come from the source exactly; `blur` (pixels) feathers the edge inward only."""
    m, blur = mask, check_float("blur", blur, minimum=0, maximum=max(mask.shape[-2:]))  # wider: no edge left
    if blur > 0:
        soft = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        m = torch.from_numpy(np.asarray(soft, dtype=np.float32) / 255)[None] * (mask > 0)  # never outside the mask
    return m * images + (1 - m) * source  # (B, 3, H, W)

# %%
# | export
class Img2ImgPipeline(EditPipeline):
    """SDEdit: `strength` in (0, 1] picks the starting noise level (1 = text-to-image from pure noise)."""

    def __call__(self, prompt, image, strength: float = 0.6, **options) -> PipelineOutput:
        return self.edit(prompt, image, None, strength, **options)

# %%
# | export
class InpaintPipeline(EditPipeline):
    """Repaint where `mask_image` is white, keep the rest: latent blending at every step, then the decoded
    image composited onto the source (`blur` feathers the edge). `soft=True`: grey = change a little
    (differential diffusion); `repaint=(jump, n_sample)`: RePaint resampling; `crop_padding`: inpaint only
    the mask's bounding box (grown by that many pixels), upscaled to the model's size, pasted back."""

    def __call__(self, prompt, image, mask_image, strength: float = 1.0, crop_padding: int | None = None,
                 **options) -> PipelineOutput:
        if mask_image is None:  # without it the call would quietly be img2img (or text-to-image)
            raise ValueError("mask_image: inpainting needs a mask (white = repaint); to change the whole image, "
                             "use Img2ImgPipeline")
        if crop_padding is None:
            return self.edit(prompt, image, mask_image, strength, **options)
        return self._cropped(prompt, image, mask_image, strength, check_int("crop_padding", crop_padding, minimum=0),
                             options)

    def _cropped(self, prompt, image, mask_image, strength, padding, options) -> PipelineOutput:
        src = load_rgb("image", image)
        mask = load_mask(mask_image, (src.height, src.width))  # (1, H, W)
        if float(mask.max()) == 0:
            return self.edit(prompt, src, mask, strength, **options)
        top, left, bottom, right = mask_bbox(mask, padding, self.multiple)
        size = self.sampling.sample_size
        crop = src.crop((left, top, right, bottom)).resize((size, size), Image.BICUBIC)
        crop_mask = F.interpolate(mask[None, :, top:bottom, left:right], size=(size, size), mode="bilinear")[0]
        safety = self._check_safety(options.pop("safety", None))  # checked on the pasted result, not the crop
        logged, self._safety_off_logged = self._safety_off_logged, True  # the inner call's "off" is ours, not the user's
        try:
            out = self.edit(prompt, crop, crop_mask.clamp(0, 1), strength, **{**options, "output_type": "pil"}, safety=False)
        finally:
            self._safety_off_logged = logged
        images, full = [], pil_to_tensor(src)
        for im in out.images:
            patch = pil_to_tensor(im.resize((right - left, bottom - top), Image.BICUBIC))  # (3, h_c, w_c)
            canvas = full.clone()
            m = mask[:, top:bottom, left:right]
            canvas[:, top:bottom, left:right] = m * patch + (1 - m) * full[:, top:bottom, left:right]
            images.append(canvas)
        return self.finish(to_pil(torch.stack(images)), out.latents, out.prompts, out.seeds, safety)

# %%
from tinydit.edit import Img2ImgPipeline, InpaintPipeline  # noqa: E402


img2img, inpaint = Img2ImgPipeline(**pipe.components), InpaintPipeline(**pipe.components)
assert img2img.transformer is pipe.transformer  # one copy of the weights
a = pipe("a green circle", seed=0, disable=True, output_type="latent").latents
b = img2img("a green circle", source, strength=1.0, seed=0, disable=True, output_type="latent").latents
assert torch.equal(a, b)  # strength 1 is text-to-image, bit for bit

# %% [markdown]
# ## 3. Measured: what inpainting keeps and what it changes
#
# The test: two-object scenes of the test split. One object is replaced by a prompted colour–shape pair
# (a third of them HELD_OUT pairs, never seen in training); the mask is the half of the image that holds
# that object (left / right / top / bottom, from the relation). The prompt describes the new scene. We
# read the result back with chapter 10's reader and check (1) the new object is there, in the masked
# half, with the prompted colour and shape, (2) the kept object is still there, and (3) how close the
# kept half is to the source before compositing (PSNR of the decoded image) and after (exact).

# %%
def half_of(obj, other) -> str:
    """Which half of the image holds `obj` relative to `other`: the axis on which they differ most."""
    dx, dy = obj.cx - other.cx, obj.cy - other.cy
    return ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("bottom" if dy > 0 else "top")


def half_mask(half: str, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    box = {"left": (slice(None), slice(0, size // 2)), "right": (slice(None), slice(size // 2, None)),
           "top": (slice(0, size // 2), slice(None)), "bottom": (slice(size // 2, None), slice(None))}[half]
    mask[0][box] = 1.0
    return mask


def replacement_task(scene, index: int):
    """(new scene, mask, half) replacing the scene's second object by another colour-shape pair."""
    rng = torch.Generator().manual_seed(index)
    kept, old = scene.objects
    pairs = [(c, s) for c in data.COLORS for s in data.SHAPES if c != kept.color and (c, s) != (old.color, old.shape)]
    held = [p for p in pairs if p in data.HELD_OUT]
    pool = held if index % 3 == 0 and held else pairs  # every third task asks for a HELD_OUT pair
    color, shape = pool[int(torch.randint(len(pool), (), generator=rng))]
    new = data.ShapeObject(shape, color, old.size, old.position, old.cx, old.cy)
    relation = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[half_of(kept, new)]
    caption = data.make_caption(__import__("numpy").random.default_rng(index), scene.background, [kept, new], relation)
    return data.Scene(scene.background, (kept, new), caption), half_mask(half_of(new, kept))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / ((a - b) ** 2).mean().clamp_min(1e-12))).item()  # images in [-1, 1]: peak 2


N_TASKS = 12 if FAST else 150


def replacement_study(n: int, **options) -> list[dict]:
    """Run the replacement task on n two-object test scenes with inpainting `options`."""
    results = []
    for i, scene in enumerate(evaluate.eval_scenes("two", n, seed=1)):
        target, mask = replacement_task(scene, i)
        src = data.pil_to_tensor(data.render_scene(scene, 32))  # (3, 32, 32)
        out = inpaint(target.caption, src, mask, seed=i, disable=True, **options)
        image, raw = data.pil_to_tensor(out.images[0]), pipe.decode(out.latents)[0]  # after / before compositing
        keep = (mask == 0).expand_as(src)
        found = {(o.color, o.shape) for o in evaluate.read_image(image).objects}
        new, kept = target.objects[1], target.objects[0]
        results.append(dict(new=(new.color, new.shape) in found, kept=(kept.color, kept.shape) in found,
                            held_out=(new.color, new.shape) in data.HELD_OUT, psnr_raw=psnr(raw[keep], src[keep]),
                            exact=bool(torch.equal(image[keep], src[keep]))))
    return results


studies = {}
for name, options in [("latent blending", {}), ("+ RePaint (jump 4, 4 samples)", {"repaint": (4, 4)})]:
    start = time.perf_counter()
    results = studies[name] = replacement_study(N_TASKS, **options)
    held = [r for r in results if r["held_out"]]
    raw_psnr = torch.tensor([r["psnr_raw"] for r in results])
    print(f"{name}: {len(results)} replacements in {time.perf_counter() - start:.0f} s; new object drawn "
          f"{100 * sum(r['new'] for r in results) / len(results):.1f} % (HELD_OUT pairs "
          f"{100 * sum(r['new'] for r in held) / max(1, len(held)):.1f} % of {len(held)}), new and kept both read "
          f"{100 * sum(r['new'] and r['kept'] for r in results) / len(results):.1f} %")
    print(f"   kept half before compositing: PSNR median {raw_psnr.median():.1f} dB, "
          f"{100 * (raw_psnr >= 35).float().mean():.0f} % of images >= 35 dB; after compositing exact in "
          f"{sum(r['exact'] for r in results)} / {len(results)}")
    assert all(r["exact"] for r in results)  # where the mask is 0 the result is the source, bit for bit
rate = {k: sum(r["new"] for r in v) / len(v) for k, v in studies.items()}
assert min(rate.values()) >= (0.4 if FAST else 0.65)  # measured 0.707 / 0.780 on 150 tasks; CI's 12 are noisy

# %% [markdown]
# Two honest caveats. **Before compositing**, the kept half is *not* pixel-exact even though its latents
# are: the book VAE's decoder has a global self-attention block in its middle (chapter 02), so every
# decoded pixel depends on every latent, and the repainted half leaks into the kept one (median
# ~35 dB). Compositing makes it exact. **RePaint** buys adherence with model calls: 4 resamples of each
# 4-step segment is ~4× the evaluations of plain blending.

# %% [markdown]
# ## 4. img2img: how much of the source survives each strength
#
# Single-object test scenes, re-prompted with another colour (same shape, same place). For each
# strength: the *similarity* to the source (PSNR, and whether the object is still read where it was)
# against the *adherence* to the new prompt (the reader sees the new colour).

# %%
strengths = [0.2, 0.4, 0.6, 0.8, 1.0] if FAST else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
N_I2I = 8 if FAST else 60
singles = [s for s in evaluate.eval_scenes("seen", N_I2I, seed=2)]
curve = []
for strength in strengths:
    sims, moved, hits = [], [], []
    for i, scene in enumerate(singles):
        obj = scene.objects[0]
        color = [c for c in data.COLORS if c not in (obj.color, scene.background)][i % 4]
        prompt = scene.caption.replace(obj.color, color, 1)
        src = data.pil_to_tensor(data.render_scene(scene, 32))
        out = data.pil_to_tensor(img2img(prompt, src, strength=strength, seed=i, disable=True).images[0])
        read = evaluate.read_image(out).objects
        sims.append(psnr(out, src))
        hits.append(any(o.color == color and o.shape == obj.shape for o in read))
        moved.append(not any(abs(o.cx - obj.cx) < 0.1 and abs(o.cy - obj.cy) < 0.1 for o in read))
    curve.append(dict(strength=strength, psnr=sum(sims) / len(sims), adherence=sum(hits) / len(hits),
                      kept_place=1 - sum(moved) / len(moved)))
    print(f"strength {strength:.1f}: PSNR to source {curve[-1]['psnr']:5.1f} dB, object where it was "
          f"{100 * curve[-1]['kept_place']:5.1f} %, new colour read {100 * curve[-1]['adherence']:5.1f} %")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(strengths, [100 * c["adherence"] for c in curve], "o-", label="new colour read (%)")
ax.plot(strengths, [100 * c["kept_place"] for c in curve], "s-", label="object kept its place (%)")
ax2 = ax.twinx()
ax2.plot(strengths, [c["psnr"] for c in curve], "k--", label="PSNR to source (dB)")
ax.set_xlabel("strength")
ax.set_ylabel("%")
ax2.set_ylabel("dB")
ax.legend(loc="center left", fontsize=8)
ax.set_title("img2img on the book model: similarity against adherence")
plt.show()
assert curve[0]["psnr"] > curve[-1]["psnr"]  # more strength, further from the source
assert curve[-1]["adherence"] >= curve[0]["adherence"]  # ... and closer to the prompt

# %% [markdown]
# ## 5. Try it
#
# Pick a test scene, the half to repaint and a prompt for the whole new scene; the mask is shown over
# the source in red.

# %%
demo_index = evaluate.eval_indices("two", 1, seed=1)[0]  # a two-object test scene
demo_target, demo_mask = replacement_task(data.sample_scene(0, "test", demo_index), 0)
demo_half = half_of(demo_target.objects[1], demo_target.objects[0])
scene_box = widgets.IntSlider(value=demo_index, min=0, max=500, description="scene")
region_box = widgets.ToggleButtons(options=["left", "right", "top", "bottom"], value=demo_half, description="repaint")
prompt_box = widgets.Text(value=demo_target.caption, description="prompt", layout=widgets.Layout(width="70%"))
repaint_box = widgets.Checkbox(value=True, description="RePaint")
button = widgets.Button(description="Inpaint", button_style="primary")
result = widgets.Output()


def on_inpaint(_):
    result.clear_output(wait=True)
    with result:
        scene = data.sample_scene(0, "test", scene_box.value)
        src, mask = data.pil_to_tensor(data.render_scene(scene, 32)), half_mask(region_box.value)
        start = time.perf_counter()
        out = inpaint(prompt_box.value, src, mask, seed=0, disable=True, repaint=(4, 4) if repaint_box.value else None)
        overlay = ((src + 1) / 2).permute(1, 2, 0).clone()
        overlay[mask[0] > 0] = 0.6 * overlay[mask[0] > 0] + 0.4 * torch.tensor([1.0, 0, 0])
        fig, axes = plt.subplots(1, 3, figsize=(6, 2.2))
        for ax, img, title in zip(axes, [(src + 1) / 2, overlay, out.images[0]], ["source", "mask", "result"]):
            ax.imshow(img.permute(1, 2, 0) if isinstance(img, torch.Tensor) and img.shape[0] == 3 else img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        plt.show()
        print(f"{scene.caption!r} -> {prompt_box.value!r}: {time.perf_counter() - start:.2f} s; read: "
              f"{[(o.color, o.shape) for o in evaluate.read_image(data.pil_to_tensor(out.images[0])).objects]}")


button.on_click(on_inpaint)
display(widgets.VBox([widgets.HBox([scene_box, region_box]), prompt_box, widgets.HBox([repaint_box, button]), result]))
on_inpaint(None)  # one run now, so the page shows a result without a kernel

# %% [markdown]
# ## 6. Bad input
#
# Decisions, written down: a mask of another size than the image is **resized** to it with a warning
# (masks are often drawn at another resolution); an all-black mask returns the source untouched; an
# all-white mask with strength 1 is text-to-image; a non-RGB source (RGBA, greyscale, palette) is
# converted to RGB; strength must lie in (0, 1].

# %%
expect_error(lambda: img2img("a red circle", source, strength=0), r"strength: expected a number in \(0, 1\]")
expect_error(lambda: img2img("a red circle", "missing.png"), "image: no image file at", FileNotFoundError)
expect_error(lambda: inpaint("a red circle", source, torch.full((32, 32), 2.0)), r"mask_image: expected values in \[0, 1\]")
black = inpaint("a red circle", source, torch.zeros(32, 32), seed=0, disable=True)
assert torch.equal(data.pil_to_tensor(black.images[0]), data.pil_to_tensor(data.render_scene(source_scene, 32)))

# %% [markdown]
# ## Summary
#
# - `Img2ImgPipeline` (SDEdit) and `InpaintPipeline` (`tinydit.edit`) reuse the text-to-image pipeline's
#   components. img2img runs the last `int(steps × strength)` steps from the noised source; strength 1
#   is text-to-image bit for bit.
# - Inpainting with the ordinary model: at every step the kept latent cells are the source noised to the
#   current σ, and the denoiser returns the source there; kept latents land exactly on the source, and
#   compositing makes kept pixels exact. Soft masks (differential diffusion), RePaint resampling and
#   cropping to the mask are options.
# - Measured on the book world (150 two-object scenes, full settings): replacing one object by a
#   prompted pair, the new object is drawn in 70.7 % of cases with plain blending and 78.0 % with
#   RePaint (HELD_OUT pairs: 59 % / 61 %); kept pixels are exact after compositing, median 34.8 dB
#   before it (the VAE's global attention leaks the edit). img2img: strength 0.4 keeps the object in
#   place in 93 % of scenes and recolours it in 92 %.
#
# ## Exercises
#
# 1. Replace the compositing with `decode(source latents)` in the kept region instead of the source
#    pixels. What PSNR does the kept half reach, and what does the seam look like?
# 2. Make RePaint's jumps stochastic (DDPM ancestral steps instead of Euler) as in the paper, and compare
#    adherence at equal model evaluations.
# 3. Use a soft mask that fades from 1 to 0 over 8 pixels around the object: does the seam disappear?
# 4. img2img with strength 0.6 runs 12 of 20 steps. Compare with running 20 steps over the same σ range
#    (`num_inference_steps=34`): is the extra compute worth it on the reader's scores?
