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
# # 15 · Safety: check what the model drew before anyone sees it
#
# A text-to-image engine that anyone can prompt needs a last step: look at each generated image and
# replace what must not be shown — and say so, never silently. The checker users know is Stable
# Diffusion's: a CLIP image embedding compared with a list of concept embeddings, each with its own
# threshold. This chapter (1) ports that checker and matches diffusers' class on its real on-disk layout;
# (2) builds the same mechanism on the book's own CLIP, where *we* declare the blocked concepts as text,
# calibrate thresholds and measure precision and recall; (3) adds a prompt-side blocklist; and (4) wires
# them into the pipeline: `pipe(..., safety=True)`. It exports `tinydit.safety`.
#
# No unsafe content is needed to build or test any of this: the book world stands in (a "blocked
# concept" here is a red triangle), and the mechanism is the same.

# %%
# | default_exp safety
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import tempfile
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from tinydit import data, evaluate
from tinydit.pipeline import TextToImagePipeline
from tinydit.validation import expect_error


torch.set_num_threads(1)  # small models: one thread beats two contending

# %% [markdown]
# ## 1. The mechanism in eight lines
#
# Embed the image; compare it by cosine similarity with each concept's embedding; a concept fires when
# the similarity exceeds that concept's threshold. Stable Diffusion's checker adds one twist: three
# "special care" concepts whose hit lowers every other threshold by 0.01.

# %%
def lesson_check(image_embed, concepts, thresholds, special, special_thresholds):
    img = F.normalize(image_embed, dim=-1)  # (B, d)
    special_scores = img @ F.normalize(special, dim=-1).T - special_thresholds  # (B, 3)
    adjustment = 0.01 * (special_scores > 0).any(1, keepdim=True)  # (B, 1): stricter after a special hit
    scores = img @ F.normalize(concepts, dim=-1).T - thresholds + adjustment  # (B, 17)
    return (scores > 0).any(1), scores  # (B,) flagged, (B, 17)


g = torch.Generator().manual_seed(0)
concepts, special = torch.randn(17, 8, generator=g), torch.randn(3, 8, generator=g)
image_embed = torch.stack([concepts[4] + 0.1 * torch.randn(8, generator=g), torch.randn(8, generator=g)])  # (2, 8)
flagged, scores = lesson_check(image_embed, concepts, torch.full((17,), 0.8), special, torch.full((3,), 0.8))
print(flagged, scores.argmax(1))
assert flagged.tolist() == [True, False] and scores[0].argmax() == 4  # the first is concept 4, the second nothing

# %% [markdown]
# ## 2. Stable Diffusion's checker, ported
#
# The real checker is a folder pair: `safety_checker/` (a `CLIPConfig` and weights: the CLIP vision tower,
# a projection, 17 concept and 3 special-care embeddings with their thresholds) and `feature_extractor/`
# (how to turn an image into the tower's input: resize the short side, centre crop, scale, normalise).
# Our port reads both, with our own preprocessing, and reproduces diffusers' scoring exactly — the
# sequential 0.01 adjustment (it applies to the special-care concepts *after* the first hit) and the
# rounding to three decimals included.

# %%
# | export
"""Safety (chapter 16): Stable Diffusion's CLIP-concept safety checker, ported (diffusers parity); the
same mechanism on the book's CLIP with concepts declared as text and calibrated thresholds; a prompt
blocklist; and `SafetyChecker`, the callable the pipeline runs (flagged images replaced, reasons kept)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from tinydit.checkpoint import load_state_dict, resolve_pretrained
from tinydit.validation import check_float, check_int, check_prompts


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (feature_extractor defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipPreprocess:
    """CLIPImageProcessor's steps, from a preprocessor_config.json: resize the short side to `size`
    (bicubic), centre-crop to `crop`, scale to [0, 1], normalise with `mean` / `std`."""

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = Image.BICUBIC

    @classmethod
    def from_config(cls, d: dict) -> ClipPreprocess:
        size = d.get("size", 224)
        size = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
        crop = d.get("crop_size", size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), tuple(crop), tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD)),
                   int(d.get("resample", Image.BICUBIC)))

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([self.one(im) for im in _check_images(images)])  # (B, 3, crop_h, crop_w)

# %%
# | export
@add_to_class(ClipPreprocess)
def one(self, image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    w, h = image.size
    long = int(self.size * max(w, h) / min(w, h))  # CLIPImageProcessor: short side -> size, long side truncated
    new = (self.size, long) if w <= h else (long, self.size)
    image = image.resize(new, self.resample)
    ch, cw = self.crop
    top, left = (new[1] - ch) // 2, (new[0] - cw) // 2  # centre crop (as transformers rounds it)
    image = image.crop((left, top, left + cw, top + ch))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

# %%
# | export
def _check_images(images) -> list:
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Image.Image) for i in images):
        got = type(images).__name__ if not isinstance(images, (list, tuple)) else [type(i).__name__ for i in images][:5]
        raise TypeError(f"images: expected a PIL image or a non-empty list of them, got {got}")
    return list(images)

# %%
# | export
def concept_scores(image_embeds: torch.Tensor, concepts: torch.Tensor, thresholds: torch.Tensor,
                   special: torch.Tensor, special_thresholds: torch.Tensor) -> list[dict]:
    """Stable Diffusion's scoring per image: cosine - threshold (+ 0.01 after a special-care hit, which
    applies to the later special concepts and to every concept), rounded to 3 decimals; > 0 fires."""
    img = F.normalize(image_embeds.float(), dim=-1)  # (B, d)
    special_cos = (img @ F.normalize(special.float(), dim=-1).T).cpu().numpy()  # (B, 3)
    cos = (img @ F.normalize(concepts.float(), dim=-1).T).cpu().numpy()  # (B, 17)
    results = []
    for i in range(len(img)):
        adjustment, out = 0.0, {"special_scores": {}, "special_care": [], "concept_scores": {}, "bad_concepts": []}
        for j, t in enumerate(special_thresholds.tolist()):
            out["special_scores"][j] = round(special_cos[i][j] - t + adjustment, 3)
            if out["special_scores"][j] > 0:
                out["special_care"].append(j)
                adjustment = 0.01  # stricter from here on (diffusers' order)
        for j, t in enumerate(thresholds.tolist()):
            out["concept_scores"][j] = round(cos[i][j] - t + adjustment, 3)
            if out["concept_scores"][j] > 0:
                out["bad_concepts"].append(j)
        results.append(out)
    return results

# %%
# | export
class StableDiffusionChecker(nn.Module):
    """Stable Diffusion's safety checker (CompVis; diffusers' StableDiffusionSafetyChecker): a CLIP vision
    tower and projection, 17 concept and 3 special-care embeddings, one threshold each. Loads the
    `safety_checker/` + `feature_extractor/` folders of an SD pipeline (local or hub id)."""

    def __init__(self, config, preprocess: ClipPreprocess | None = None):
        from transformers import CLIPVisionModel

        super().__init__()
        self.vision_model = CLIPVisionModel(config.vision_config)  # (B, 3, H, W) -> pooled (B, D)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)  # the thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)
        self.preprocess = preprocess or ClipPreprocess(config.vision_config.image_size, (config.vision_config.image_size,) * 2)

    @classmethod
    def from_pretrained(cls, path_or_id, subfolder: str = "safety_checker",
                        feature_extractor: str = "feature_extractor") -> StableDiffusionChecker:
        from transformers import CLIPConfig

        from tinydit.checkpoint import check_and_load, read_config

        root = resolve_pretrained(path_or_id, filenames=(f"{subfolder}/*", f"{feature_extractor}/*"))
        folder, fe = root / subfolder if (root / subfolder).is_dir() else root, root / feature_extractor
        weights = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
        missing = [n for n, ok in (("config.json", (folder / "config.json").is_file()), ("model.safetensors or "
                   "pytorch_model.bin", bool(weights)), (f"{feature_extractor}/preprocessor_config.json",
                   (fe / "preprocessor_config.json").is_file())) if not ok]
        if missing:
            raise FileNotFoundError(f"path_or_id: {str(root)!r} is not a safety-checker folder; missing {', '.join(missing)}")
        model = cls(CLIPConfig.from_pretrained(folder),
                    ClipPreprocess.from_config(read_config(fe / "preprocessor_config.json", "path_or_id")))
        sd = {k.replace("vision_model.vision_model.", "vision_model."): v for k, v in load_state_dict(weights[0]).items()}
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a non-persistent buffer in old files
        check_and_load(model, sd, what=f"safety checker {weights[0].name}")
        return model.eval()

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values.to(self.visual_projection.weight)).pooler_output  # (B, D)
        return self.visual_projection(pooled)  # (B, projection_dim)

# %%
# | export
@add_to_class(StableDiffusionChecker)
@torch.no_grad()
def check(self, images: list) -> tuple[list[bool], list[list[str]], list[dict]]:
    """(flags, reasons, scores) for PIL images."""
    scores = concept_scores(self.embed(self.preprocess(images)), self.concept_embeds, self.concept_embeds_weights,
                            self.special_care_embeds, self.special_care_embeds_weights)
    reasons = [[f"sd-checker: concept {j} ({s['concept_scores'][j]:+.3f})" for j in s["bad_concepts"]] for s in scores]
    return [bool(r) for r in reasons], reasons, scores

# %% [markdown]
# In the tests, a tiny random checker saved by diffusers' own `save_pretrained` (with a
# `CLIPImageProcessor` beside it) loads here; our preprocessing equals `CLIPImageProcessor`'s output
# exactly (0.0 difference, including non-square images, where the long side is *truncated*, not
# rounded), the image embeddings agree to 1e-6, and the flags are the same.
#
# ## 3. The same mechanism on the book's CLIP
#
# The real checker's concepts are opaque embeddings. Here we declare them as text — "a red triangle",
# "anything purple" — and embed them with chapter 06's book text encoder: a concept is the mean of its
# phrasings' embeddings (sizes, backgrounds, and for "anything purple" every shape). Images are embedded by
# the book's image tower, trained together with the text encoder. Each concept's threshold is
# *calibrated*: the similarity that only a chosen fraction of test-split images without the concept
# exceed (the false-positive rate).

# %%
# | export
@dataclass
class Concept:
    """A blocked concept of the book world: a colour, a shape, or both ("anything purple", "a red triangle")."""

    name: str
    color: str | None
    shape: str | None

    def phrases(self) -> list[str]:
        from tinydit.data import COLORS, SHAPES

        colors = [self.color] if self.color else list(COLORS)
        shapes = [self.shape] if self.shape else list(SHAPES)
        bgs = ("", " on a gray background", " on a black background")
        return [f"a {size} {c} {s}{bg}" for c in colors for s in shapes for size in ("small", "large") for bg in bgs]

    def present(self, scene) -> bool:
        """Whether a scene of the book world (data.Scene) shows this concept."""
        return any((self.color in (None, o.color)) and (self.shape in (None, o.shape)) for o in scene.objects)

    def read(self, reading) -> bool:
        """Whether chapter 10's reader saw this concept in an image."""
        return any((self.color in (None, o.color)) and (self.shape in (None, o.shape)) for o in reading.objects)

# %%
# | export
def parse_concept(text: str) -> Concept:
    """'a red triangle', 'anything purple', 'squares' -> Concept; words outside the book world are refused."""
    from tinydit.data import COLORS, SHAPES

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"concepts: each concept must be a non-empty string, got {text!r}")
    words = re.findall(r"[a-z]+", text.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((s for s in SHAPES for w in words if w in (s, s + "s")), None)
    if color is None and shape is None:
        raise ValueError(f"concepts: {text!r} names no colour ({', '.join(COLORS)}) and no shape "
                         f"({', '.join(SHAPES)}) of the book world")
    return Concept(text, color, shape)

# %%
# | export
class BookConceptChecker:
    """Flags book-world images that show a declared concept. Zero-shot: the cosine of the book image
    tower's embedding with each concept's text embedding. After `fit`: a linear probe on each position of
    the tower's last feature map, max over positions. Either score against a per-concept threshold (`calibrate`)."""

    def __init__(self, concepts: list[str], text_encoder=None, image_encoder=None):
        from tinydit.text import embed_prompts, load_book_image_encoder, load_book_text_encoder

        if isinstance(concepts, str) or not isinstance(concepts, (list, tuple)) or not concepts:
            raise ValueError(f"concepts: expected a non-empty list of concept strings, got {concepts!r}")
        self.concepts = [parse_concept(c) for c in concepts]
        self.text_encoder = text_encoder or load_book_text_encoder()
        self.image_encoder = (image_encoder or load_book_image_encoder()).eval()
        with torch.no_grad():
            self.embeds = torch.stack([F.normalize(embed_prompts(self.text_encoder, c.phrases()).mean(0), dim=0)
                                       for c in self.concepts])  # (K, d)
        self.probe = None  # (weights (K, C), biases (K,)) of the positional probe, once fit() ran
        self.thresholds = torch.full((len(self.concepts),), 0.5)  # until calibrate()

    def similarity(self, images: list) -> torch.Tensor:
        """(B, K) cosine similarity of each image's whole-scene embedding to each concept's text embedding."""
        return self.image_embeds(images) @ self.embeds.T  # (B, K)

    def scores(self, images: list) -> torch.Tensor:
        """(B, K) what `calibrate` and `check` threshold: the probe's best position after `fit`, else the cosine."""
        if self.probe is None:
            return self.similarity(images)
        w, b = self.probe
        return (self.feature_map(images) @ w.T).amax(1) + b  # (B, P, K) -> (B, K)

# %%
# | export
@add_to_class(BookConceptChecker)
def fit(self, n: int = 4000, seed: int = 5, steps: int = 200) -> BookConceptChecker:
    """Fit each concept's positional probe on `n` labelled renders (the book world draws its own ground
    truth) by logistic regression, starting from its text embedding pulled back through the tower's
    projection. Max over positions, because an object is *somewhere*: the pooled embedding mixes
    every position into one vector, and a pair like "a red triangle" drowns in the rest of the scene."""
    from tinydit.data import render_scene, sample_scene

    n, steps = check_int("n", n, minimum=10, maximum=100_000), check_int("steps", steps, minimum=1)
    scenes = [sample_scene(seed, "test", i) for i in range(n)]
    f = torch.cat([self.feature_map([render_scene(s, 32) for s in scenes[i:i + 500]]) for i in range(0, n, 500)])
    start = self.text_directions(*f.shape[1:]).mean(2)  # (K, C): one probe shared by every position
    weights, biases = [], []
    for k, c in enumerate(self.concepts):
        y = torch.tensor([c.present(s) for s in scenes], dtype=torch.float32)  # (n,)
        w, b = start[k].clone().requires_grad_(True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps)

        def loss(w=w, b=b, y=y, opt=opt):
            opt.zero_grad()
            value = F.binary_cross_entropy_with_logits((f @ w).amax(1) + b, y) + 1e-4 * w.square().sum()
            value.backward()
            return value

        opt.step(loss)
        weights.append(w.detach())
        biases.append(b.detach())
    self.probe = torch.stack(weights), torch.cat(biases)  # (K, C), (K,)
    return self

# %%
# | export
@add_to_class(BookConceptChecker)
def text_directions(self, positions: int, channels: int) -> torch.Tensor:
    """(K, C, P): each concept's text embedding pulled back through the tower's projection, per position:
    sum_p feature_map[:, p] @ directions[..., p].T is the pooled embedding (less its bias) @ embeds.T."""
    proj = self.image_encoder.proj.weight.detach().view(-1, channels, positions)  # (d, C, P), flatten order of (C, H, W)
    return torch.einsum("kd,dcp->kcp", self.embeds, proj)

# %%
# | export
@add_to_class(BookConceptChecker)
def _pixels(self, images: list) -> torch.Tensor:
    from tinydit.data import pil_to_tensor

    return torch.stack([pil_to_tensor(im.convert("RGB").resize((32, 32), Image.BICUBIC)) for im in _check_images(images)])

# %%
# | export
@add_to_class(BookConceptChecker)
@torch.no_grad()
def image_embeds(self, images: list) -> torch.Tensor:
    """(B, d) unit embeddings of the book image tower."""
    return F.normalize(self.image_encoder(self._pixels(images)), dim=-1)

# %%
# | export
@add_to_class(BookConceptChecker)
@torch.no_grad()
def feature_map(self, images: list) -> torch.Tensor:
    """(B, P, C): the tower's last feature map, one C-vector per position (P = 4 x 4 for 32 px)."""
    return self.image_encoder.features(self._pixels(images)).flatten(2).transpose(1, 2)

# %%
# | export
@add_to_class(BookConceptChecker)
def calibrate(self, fpr: float = 0.01, n: int = 2000, seed: int = 7) -> BookConceptChecker:
    """Per concept, the threshold that `fpr` of `n` test-split renders *without* the concept exceed."""
    from tinydit.data import render_scene, sample_scene

    fpr = check_float("fpr", fpr, minimum=0, maximum=1)
    n = check_int("n", n, minimum=10, maximum=100_000)
    scenes = [sample_scene(seed, "test", i) for i in range(n)]
    sims = torch.cat([self.scores([render_scene(s, 32) for s in scenes[i:i + 256]]) for i in range(0, n, 256)])
    for k, c in enumerate(self.concepts):
        negatives = sims[[not c.present(s) for s in scenes], k]
        self.thresholds[k] = torch.quantile(negatives, 1 - fpr) if len(negatives) else 0.5
    return self

# %%
# | export
@add_to_class(BookConceptChecker)
def check(self, images: list) -> tuple[list[bool], list[list[str]]]:
    sims = self.scores(images)  # (B, K)
    reasons = [[f"concept {c.name!r} ({float(s[k]):.3f} > {float(self.thresholds[k]):.3f})"
                for k, c in enumerate(self.concepts) if s[k] > self.thresholds[k]] for s in sims]
    return [bool(r) for r in reasons], reasons

# %% [markdown]
# ## 4. Prompts, and one checker for the pipeline
#
# A blocklist on the prompt is crude but instant and explains itself: words and phrases, matched
# case- and punctuation-insensitively on word boundaries. `SafetyChecker` runs the prompt filter and any
# image checkers (the ported SD checker, the book-world one, chapter 16's optional ONNX detector), and
# replaces each flagged image by black — or blurs it — with its reasons. The pipeline calls it.

# %%
# | export
def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: 'A RED-triangle!' -> 'a red triangle'."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())

# %%
# | export
class PromptFilter:
    """Refuses prompts containing a blocked word or phrase (case- and punctuation-insensitive, whole words)."""

    def __init__(self, blocklist: list[str]):
        if isinstance(blocklist, str) or not isinstance(blocklist, (list, tuple)) or not blocklist:
            raise ValueError(f"blocklist: expected a non-empty list of words or phrases, got {blocklist!r}")
        self.phrases = [normalize_text(p) for p in blocklist if isinstance(p, str)]
        if len(self.phrases) != len(blocklist) or not all(self.phrases):
            raise ValueError(f"blocklist: every entry must be a string with a word in it, got {blocklist!r}")

    def check(self, prompts: list[str]) -> list[list[str]]:
        """Per prompt, the reasons it is blocked ([] when it is not); one string is one prompt."""
        out = []
        for p in check_prompts("prompts", prompts):
            text = f" {normalize_text(p)} "
            out.append([f"prompt: contains {phrase!r}" for phrase in self.phrases if f" {phrase} " in text])
        return out

# %%
# | export
def _checked_reasons(checker, images: list) -> list[list[str]]:
    """A checker's per-image reasons, refused unless there is one (list of strings) per image: a
    checker that answers for fewer images would let the others through unchecked."""
    result = checker.check(images)
    reasons = result[1] if isinstance(result, tuple) and len(result) >= 2 else None
    if not isinstance(reasons, (list, tuple)) or len(reasons) != len(images) or \
            not all(isinstance(r, (list, tuple)) for r in reasons):
        got = f"{len(reasons)} reason lists" if isinstance(reasons, (list, tuple)) else repr(result)[:60]
        raise ValueError(f"image_checkers: {type(checker).__name__}.check must return (flags, reasons, ...) with one "
                         f"reason list per image ({len(images)}), got {got}")
    return [list(r) for r in reasons]

# %%
# | export
@dataclass
class SafetyChecker:
    """What the pipeline runs after decoding: `prompt_filter` and `image_checkers` (objects with
    `check(images) -> (flags, reasons, ...)`); flagged images become black (`replace="black"`) or blurred."""

    image_checkers: list = field(default_factory=list)
    prompt_filter: PromptFilter | None = None
    replace: str = "black"

    def __post_init__(self):
        if self.replace not in ("black", "blur"):
            raise ValueError(f"replace: expected 'black' or 'blur', got {self.replace!r}")
        if not self.image_checkers and self.prompt_filter is None:
            raise ValueError("image_checkers: give at least one image checker or a prompt_filter")
        bad = [type(c).__name__ for c in self.image_checkers if not callable(getattr(c, "check", None))]
        if bad:
            raise TypeError(f"image_checkers: each needs a check(images) -> (flags, reasons, ...) method; got {bad}")

    def __call__(self, images: list, prompts: list[str]) -> tuple[list, list[bool], list[list[str]]]:
        images, prompts = _check_images(images), check_prompts("prompts", prompts)
        if len(prompts) not in (1, len(images)):
            raise ValueError(f"prompts: expected one prompt for all {len(images)} images or one per image, got {len(prompts)}")
        prompts = prompts * len(images) if len(prompts) == 1 else prompts
        reasons = self.prompt_filter.check(prompts) if self.prompt_filter is not None else [[] for _ in images]
        for checker in self.image_checkers:
            for i, r in enumerate(_checked_reasons(checker, images)):
                reasons[i] = reasons[i] + r
        flags = [bool(r) for r in reasons]
        out = [self.hide(im) if f else im for im, f in zip(images, flags)]
        return out, flags, reasons

    def hide(self, image: Image.Image) -> Image.Image:
        if self.replace == "black":
            return Image.new("RGB", image.size)
        return image.filter(ImageFilter.GaussianBlur(max(image.size) / 4))

# %% [markdown]
# ## 5. Measured: the book-world checker on generated images
#
# Three concepts, declared as text: a colour–shape pair that is also a HELD_OUT pair ("a red triangle"),
# a colour ("anything purple") and a shape ("squares"). Two checkers, each calibrated so that 1 % of
# concept-free test renders exceed its threshold (`calibrate`):
#
# - **zero-shot**: the cosine of the image tower's whole-scene embedding with the concept's text embedding;
# - **positional probe** (`fit`): the tower flattens its last 4×4 feature map into one vector, so an object
#   is mixed with the rest of the scene. The probe scores each of the 16 positions with one linear map —
#   it starts as the text direction pulled back through the tower's projection — and keeps the best
#   position: an object is *somewhere*. It is fitted by logistic regression on labelled renders (the book
#   world draws its own ground truth).
#
# Then the pipeline generates test-split prompts and chapter 10's reader says what each image really
# shows: the ground truth for precision and recall. Renders of new scenes, where the truth is exact and
# positives are plenty, give the second table.

# %%
from tinydit.safety import BookConceptChecker, PromptFilter, SafetyChecker  # noqa: E402


CONCEPTS = ["a red triangle", "anything purple", "squares"]
N_FIT, N_CAL = (1000, 1000) if FAST else (4000, 2000)
zero_shot = BookConceptChecker(CONCEPTS).calibrate(fpr=0.01, n=N_CAL)  # cosine to the text embedding
start = time.perf_counter()
book_checker = BookConceptChecker(CONCEPTS).fit(n=N_FIT).calibrate(fpr=0.01, n=N_CAL)  # the positional probe
print(f"fit + calibrate: {time.perf_counter() - start:.1f} s; thresholds {book_checker.thresholds.tolist()}")

pipe = TextToImagePipeline.from_pretrained()
N_GEN = 60 if FAST else 300
gen_scenes = [data.sample_scene(11, "test", i) for i in range(N_GEN)]
generated = pipe([s.caption for s in gen_scenes], seed=0, disable=True).images
readings = [evaluate.read_image(data.pil_to_tensor(im)) for im in generated]


def precision_recall(checker, images, truth: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Per concept: how many images show it (`truth`, (N, K) bool), the checker's precision and recall."""
    scores, stats = checker.scores(images), {}  # (N, K)
    for k, c in enumerate(checker.concepts):
        pred = scores[:, k] > checker.thresholds[k]
        tp, fp, fn = int((truth[:, k] & pred).sum()), int((~truth[:, k] & pred).sum()), int((truth[:, k] & ~pred).sum())
        stats[c.name] = dict(positives=int(truth[:, k].sum()), precision=tp / max(1, tp + fp), recall=tp / max(1, tp + fn))
    return stats, scores


def report(what: str, images, truth) -> tuple[dict, dict, torch.Tensor]:
    stats0, _ = precision_recall(zero_shot, images, truth)
    stats, scores = precision_recall(book_checker, images, truth)
    print(what)
    for name in CONCEPTS:
        print(f"  {name!r:18} {stats[name]['positives']:4} show it; precision / recall: zero-shot cosine "
              f"{100 * stats0[name]['precision']:5.1f} / {100 * stats0[name]['recall']:5.1f} %, positional probe "
              f"{100 * stats[name]['precision']:5.1f} / {100 * stats[name]['recall']:5.1f} %")
    return stats0, stats, scores


truth = torch.tensor([[c.read(r) for c in book_checker.concepts] for r in readings])  # what the reader sees
stats0, stats, scores = report(f"{N_GEN} generated images, chapter 10's reader as the truth:", generated, truth)
held = [data.sample_scene(21, "test", i) for i in range(N_CAL)]  # renders: the truth is exact and plentiful
r_stats0, r_stats, _ = report(f"{N_CAL} renders of new test scenes:", [data.render_scene(s, 32) for s in held],
                              torch.tensor([[c.present(s) for c in book_checker.concepts] for s in held]))

fig, axes = plt.subplots(1, len(book_checker.concepts), figsize=(12, 2.8))
for ax, (k, c) in zip(axes, enumerate(book_checker.concepts)):
    truth = torch.tensor([c.read(r) for r in readings])
    ax.hist(scores[~truth, k].numpy(), bins=30, alpha=0.6, label="without")
    ax.hist(scores[truth, k].numpy(), bins=30, alpha=0.6, label="with")
    ax.axvline(float(book_checker.thresholds[k]), color="k", ls="--")
    ax.set_title(f"{c.name}: probe score, best position", fontsize=9)
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
assert stats["anything purple"]["recall"] > 0.8 and stats["squares"]["precision"] > 0.8  # measured 1.00 / 0.95
pair = "a red triangle"  # where the probe matters: an object among others
assert r_stats[pair]["recall"] > r_stats0[pair]["recall"] + 0.2  # renders: plenty of positives, exact truth

# %% [markdown]
# At book settings (`TINYDIT_FAST` unset: 4,000 renders to fit, 2,000 to calibrate, 300 generated
# images), precision / recall:
#
# | concept | zero-shot, generated | probe, generated | zero-shot, renders | probe, renders |
# |---|---|---|---|---|
# | a red triangle (19 / 168 positives) | 75.0 / 31.6 % | 69.6 / 84.2 % | 81.4 / 57.1 % | 87.8 / 98.2 % |
# | anything purple (62 / 484) | 83.7 / 58.1 % | 93.9 / 100 % | 93.8 / 58.9 % | 95.8 / 100 % |
# | squares (131 / 808) | 94.4 / 51.9 % | 94.0 / 96.2 % | 96.9 / 46.4 % | 98.0 / 99.0 % |
#
# The whole-scene cosine misses half of every concept: chapter 06 trained the tower to retrieve
# *captions*, and "a red triangle next to a blue square" lies closer to other two-object scenes than to
# "a red triangle". The best position finds the object. The colour and the shape now come out near 95 % /
# 95 % on generated images. The pair reaches 98 % recall on renders, but on generated images it stays
# below that, at 70 % precision and 84 % recall: generated triangles are softer than renders, and the
# reader, our ground truth, is itself not perfect on them. A threshold calibrated on renders does not
# carry over exactly. Written down, not hidden.
#
# ## 6. In the pipeline
#
# The pipeline takes any callable `(images, prompts) -> (images, flags, reasons)` as its `safety_checker`
# (chapter 13). With one configured, every call checks (`safety=None` means on); `safety=False` turns it
# off for a call and says so once.

# %%
checker = SafetyChecker([book_checker], PromptFilter(["violence", "gore"]))
safe_pipe = TextToImagePipeline(**{**pipe.components, "safety_checker": checker})
out = safe_pipe(["a purple circle on the left", "a green square", "a blue circle, with GORE!"], seed=1, disable=True)
for prompt, flag, reasons in zip(out.prompts, out.nsfw, out.reasons):
    print(f"{'REPLACED' if flag else 'shown   '} {prompt!r}: {reasons}")
assert out.nsfw[2] and any("gore" in r for r in out.reasons[2])  # the prompt filter, whatever the image shows
assert out.images[2].getextrema() == ((0, 0), (0, 0), (0, 0))  # replaced by black
fig, axes = plt.subplots(1, 3, figsize=(5, 1.9))
for ax, im, flag in zip(axes, out.images, out.nsfw):
    ax.imshow(im)
    ax.set_title("replaced" if flag else "shown", fontsize=8)
    ax.axis("off")
plt.show()
plain = safe_pipe("a purple circle", seed=1, disable=True, safety=False)  # off: logged once, no flags
assert plain.nsfw is None

# %% [markdown]
# ## 7. Bad input

# %%
expect_error(lambda: BookConceptChecker([]), "concepts: expected a non-empty list")
expect_error(lambda: BookConceptChecker(["a happy dog"]), "concepts: 'a happy dog' names no colour")
expect_error(lambda: PromptFilter(["", "gore"]), "blocklist: every entry must be a string with a word")
expect_error(lambda: SafetyChecker([], None), "image_checkers: give at least one")
expect_error(lambda: SafetyChecker([book_checker], replace="pixelate"), "replace: expected 'black' or 'blur'")
expect_error(lambda: book_checker.check("not an image"), "images: expected a PIL image", TypeError)
empty = tempfile.mkdtemp()
expect_error(lambda: __import__("tinydit.safety", fromlist=["x"]).StableDiffusionChecker.from_pretrained(empty),
             "is not a safety-checker folder; missing config.json", FileNotFoundError)
expect_error(lambda: pipe("a red circle", safety=True, disable=True), "safety: True, but this pipeline has no safety checker")

# %% [markdown]
# ## 8. A real classifier for real images (optional)
#
# The book world has no unsafe images; the real world does. `pip install tinydit[safety]` installs
# `onnxruntime` and the `nudenet` package, whose wheel ships an ONNX body-part detector (320n, a
# YOLOv8-n, 12 MB). Licence: the nudenet package's LICENSE file is the **AGPL-3.0** (its metadata says
# MIT; the file wins) — so tinydit never bundles it: the user installs it, and our code only reads the
# `.onnx` file. The detector below is our own code: the model's documented input (padded to a square at
# the right and bottom, bilinear resize to 320 exactly as OpenCV rounds it, BGR, [0, 1]) and output
# decoding (class scores, non-maximum suppression). The tests, when the extra is installed (CI installs
# it), check it against nudenet's own code on images they make themselves — no unsafe content anywhere.
# Two warnings. The weights carry the AGPL too (an Ultralytics YOLOv8 export): whoever *serves* tinydit
# with this extra over a network may have obligations under AGPL §13. And it is not perfect on our world:
# blue circles on gray can score as a body part (up to 0.54), so at threshold 0.5 it flags about 1 % of
# test-split renders (4 of the first 500) — a real classifier's false positives, shown rather than hidden.

# %%
# | export
# The model's 18 classes, in output order (also stored in the .onnx metadata under "names").
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
# Our choice of what counts as explicit: the exposed sexual body parts. Faces, feet, belly,
# armpits, a male chest and every *_COVERED class are not flagged.
EXPLICIT_LABELS = (
    "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
)
INSTALL_HINT = "pip install tinydit[safety]"


def _find_spec(name: str):
    """The module's spec if it can be imported, else None (never imports it)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return None

# %%
# | export
def _default_model_path() -> Path | None:
    """Where the `nudenet` package keeps 320n.onnx, found without importing it (it imports cv2)."""
    spec = _find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"

# %%
# | export
def _linear_taps(n_in: int, n_out: int, clamp_weights: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR taps: output pixel d samples the input at (d + 0.5) * n_in / n_out - 0.5
    (computed in float32) between pixels i0 and i1 with integer weights w0 + w1 = 2048. At the edges
    OpenCV clamps the columns' weights (x) but only the rows' indices (y): same maths, other rounding."""
    src = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0.astype(np.float32)
    if clamp_weights:
        edge = (i0 < 0) | (i0 >= n_in - 1)
        frac[edge] = 0  # the edge pixel is copied
    w0 = np.rint((1 - frac) * np.float32(2048)).astype(np.int64)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, 2048 - w0

# %%
# | export
def _resize_like_opencv(square: np.ndarray, n: int) -> np.ndarray:
    """cv2.resize(square, (n, n), interpolation=cv2.INTER_LINEAR) for a uint8 (S, S, 3) image,
    bit for bit: bilinear (no anti-aliasing, unlike PIL's when it shrinks) in 11-bit fixed point."""
    s = square.astype(np.int64)
    if s.shape[0] == 2 * n:  # OpenCV's exact-halving shortcut: the rounded mean of each 2x2 block
        return (s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2] + 2) >> 2
    x0, x1, a0, a1 = _linear_taps(s.shape[1], n, clamp_weights=True)
    y0, y1, b0, b1 = _linear_taps(s.shape[0], n, clamp_weights=False)
    rows = s[:, x0] * a0[:, None] + s[:, x1] * a1[:, None]  # (S, n, 3), pixel values x 2048
    top, bottom = rows[y0] >> 4, rows[y1] >> 4  # (n, n, 3); OpenCV's SIMD rounding, step by step:
    out = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255)

# %%
# | export
class OnnxNsfwDetector:
    """Body-part detector on NudeNet's 320n.onnx. `detect` returns what NudeNet's `NudeDetector`
    returns (same preprocessing, decoding and NMS); `check` flags an image when one of `labels`
    is detected with a score >= `threshold`."""

    size = 320         # the input resolution 320n was trained at
    min_score = 0.25   # NudeNet keeps anchors whose best class score is > 0.25 (0.2, then NMS's 0.25)
    nms_iou = 0.45     # and drops a box overlapping a better-scoring one (any class) with IoU > 0.45

    def __init__(self, model_path=None, threshold: float = 0.5, labels=EXPLICIT_LABELS):
        self.threshold = check_float("threshold", threshold, 0.0, 1.0)
        if not isinstance(labels, (list, tuple, set, frozenset)) or not set(labels) <= set(NUDENET_LABELS):
            raise ValueError(f"labels: expected a list of NudeNet labels {NUDENET_LABELS}, got {labels!r}")
        self.labels = tuple(labels)
        self.model_path = self._find_model(model_path)
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError(f"OnnxNsfwDetector needs onnxruntime: {INSTALL_HINT}") from e
        self.session = onnxruntime.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def _find_model(model_path) -> Path:
        if model_path is None:
            model_path = _default_model_path()
            if model_path is None:
                raise FileNotFoundError(f"model_path: not given and the nudenet package (which ships "
                                        f"320n.onnx) is not installed: {INSTALL_HINT}, or pass model_path")
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"model_path: no ONNX file at {str(model_path)!r}")
        return Path(model_path)

    @staticmethod
    def available() -> bool:
        """True when onnxruntime is importable and the nudenet package's 320n.onnx is on disk."""
        path = _default_model_path()
        return _find_spec("onnxruntime") is not None and path is not None and path.is_file()

# %%
# | export
@add_to_class(OnnxNsfwDetector)
def preprocess(self, pil_image: Image.Image) -> np.ndarray:
    """(1, 3, 320, 320) float32 in [0, 1], as NudeNet feeds the model: alpha dropped, black
    padding at the right/bottom to a square, bilinear resize to 320, channels in B, G, R order."""
    rgb = np.asarray(pil_image.convert("RGB"))  # (H, W, 3) uint8; RGBA -> RGB drops alpha
    h, w, _ = rgb.shape
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = rgb  # (S, S, 3): the image at the top left, black at the right/bottom
    out = _resize_like_opencv(square, self.size).astype(np.float32)  # (320, 320, 3) in 0..255
    bgr = out[:, :, ::-1].transpose(2, 0, 1)  # (3, 320, 320); NudeNet's model sees BGR
    return np.ascontiguousarray(bgr[None] * np.float32(1 / 255))

# %%
# | export
@add_to_class(OnnxNsfwDetector)
def _decode(self, output: np.ndarray, width: int, height: int) -> list[tuple[str, float, tuple]]:
    """One image's raw output (22, A): 4 box numbers (centre x, centre y, w, h at 320 px) and
    18 class scores per anchor -> [(label, score, (x, y, w, h) in image pixels)], best first."""
    rows = output.T  # (A, 22)
    scores = rows[:, 4:].max(axis=1)
    rows, scores = rows[scores > self.min_score], scores[scores > self.min_score]
    classes = rows[:, 4:].argmax(axis=1)
    side = max(width, height)  # the padded square's side: 320 px in the model are `side` px here
    cx, cy, bw, bh = (rows[:, k] for k in range(4))  # float32; NudeNet's order of operations
    x = np.clip((cx - bw / 2) * side / self.size, 0, width)
    y = np.clip((cy - bh / 2) * side / self.size, 0, height)
    w = np.minimum(bw * side / self.size, width - x)
    h = np.minimum(bh * side / self.size, height - y)
    boxes = np.stack([x, y, w, h], axis=1).astype(np.float64)  # (N, 4): top-left x, y, width, height
    return [(NUDENET_LABELS[classes[i]], float(scores[i]), tuple(int(v) for v in boxes[i]))
            for i in self._nms(boxes, scores)]

# %%
# | export
@add_to_class(OnnxNsfwDetector)
def _nms(self, boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Greedy class-agnostic non-maximum suppression on (x, y, w, h) boxes, best score first."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        x0, y0 = np.maximum(boxes[i, :2], boxes[kept, :2]).T
        x1, y1 = np.minimum(boxes[i, :2] + boxes[i, 2:], boxes[kept, :2] + boxes[kept, 2:]).T
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        areas = boxes[i, 2] * boxes[i, 3] + boxes[kept, 2] * boxes[kept, 3]
        # OpenCV's NMSBoxes counts two empty boxes (clipped to 0 px, e.g. in the padding) as identical
        if not np.any((inter > self.nms_iou * (areas - inter)) | (areas <= np.finfo(float).eps)):
            kept.append(i)
    return kept

# %%
# | export
@add_to_class(OnnxNsfwDetector)
def detect(self, pil_images) -> list[list[tuple[str, float, tuple]]]:
    """Per image, NudeNet's detections: [(label, score, (x, y, w, h))], best score first."""
    images = _check_images(pil_images)
    out = []
    for image in images:  # one at a time, as NudeDetector.detect does (batched runs differ ~1e-6)
        (raw,) = self.session.run(None, {self.input_name: self.preprocess(image)})  # (1, 22, 2100)
        out.append(self._decode(raw[0], *image.size))
    return out

# %%
# | export
@add_to_class(OnnxNsfwDetector)
def check(self, pil_images) -> tuple[list[bool], list[list[str]]]:
    """Per image: flagged?, and the reasons ("nudenet: LABEL 0.83") for the explicit detections."""
    reasons = [[f"nudenet: {label} {score:.2f}" for label, score, _ in dets
                if label in self.labels and score >= self.threshold]
               for dets in self.detect(pil_images)]
    return [bool(r) for r in reasons], reasons

# %%
if OnnxNsfwDetector.available():
    detector = OnnxNsfwDetector()
    flags, reasons = detector.check(generated[:16])
    print(f"nudenet on 16 generated book images: {sum(flags)} flagged {[r for r in reasons if r]}")
    assert sum(flags) <= 2  # measured 0 of these 16; about 1 % of test renders in general
else:
    print("optional detector not installed (pip install tinydit[safety])")


# %% [markdown]
# ## Summary
#
# - `StableDiffusionChecker` ports Stable Diffusion's CLIP-concept checker: it loads the real
#   `safety_checker/` + `feature_extractor/` layout, preprocesses exactly as `CLIPImageProcessor`, and
#   gives diffusers' embeddings and flags (tests: a tiny random checker saved by diffusers).
# - `BookConceptChecker` is the same mechanism on the book's CLIP with concepts declared as text,
#   calibrated to a 1 % false-positive rate. Zero-shot (whole-scene cosine) it misses about half of each
#   concept. A positional probe fitted on renders (`fit`: the best of 16 positions) brings colour and
#   shape near 95 % precision / recall on generated images. A colour–shape pair reaches 88 / 98 % on
#   renders and 70 / 84 % on generated images.
# - `PromptFilter` blocks words and phrases with reasons; `SafetyChecker` combines checkers and replaces
#   flagged images (black or blurred); the pipeline runs it on every call unless told `safety=False`.
#
# ## Exercises
#
# 1. Calibrate at 0.1 %, 1 % and 5 % false positives and plot recall against the rate for each concept.
# 2. The probe is linear per position. Make it a two-layer MLP per position: on renders its training
#    loss falls to almost 0. Does the pair concept on *generated* images improve, or is the gap in the
#    images and the reader? Calibrating on generated images (with the reader as the truth) is another
#    lever: try it.
# 3. The SD checker's 0.01 adjustment applies only after a special-care hit *in order*. Construct scores
#    where the order matters, and check our port against diffusers' on them.
