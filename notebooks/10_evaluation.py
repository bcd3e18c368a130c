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
# # 10 · Grading the book model: a pixel reader, adherence and a Fréchet distance
#
# Chapter 09 trained the book model; a loss curve cannot say whether "a red triangle" comes out red
# and triangular. This chapter builds the judge: (1) a **pixel reader** that reads a picture of the
# shapes world back into objects, colours, shapes and places, checked on renders whose answer is
# known; (2) **adherence** GenEval-style on three groups of test prompts — seen colour–shape pairs,
# pairs the model never saw in training (`data.HELD_OUT`: compositional generalisation is the point)
# and two objects with a relation; (3) a **Fréchet distance** in the book image tower's space. What is
# graded is the pipeline's own pictures (chapter 13's `TextToImagePipeline`, which the package already
# holds): `evaluate_model` draws through it, so a grade is of what `python -m tinydit generate` writes.
# It exports `tinydit.evaluate`.

# %%
# | default_exp evaluate

# %%
import os


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from tinydit import data
from tinydit.checkpoint import BOOK_MODEL_DIR
from tinydit.data import image_grid
from tinydit.validation import expect_error


torch.set_num_threads(1 if FAST else torch.get_num_threads())  # CI shares 2 cores with other jobs

# %% [markdown]
# ## 1. Grading pictures by their pixels
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
# | export
"""Grading prompt adherence (chapter 10): a pixel reader for the shapes world, scoring of test prompts
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


# %%
# | export
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

# %%
# | export
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

# %%
# | export
@dataclass
class Reading:
    """Everything the pixel reader saw in one image."""

    background: str | None  # the named background that explains the border, None if none does
    objects: list[ObjectReading]  # largest first: a single-object prompt is judged on objects[0]

# %%
# | export
def max3x3(a: np.ndarray) -> np.ndarray:
    """Maximum over each pixel's 3x3 neighbourhood (zero-padded): dilates a mask or spreads labels."""
    h, w = a.shape
    p = np.pad(a, 1)  # (H + 2, W + 2)
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)  # (H, W)

# %%
# | export
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

# %%
# | export
def read_background(rgb: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The border's median colour (3,) and the named background within BACKGROUND_MATCH of it."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (2H + 2W - 4, 3)
    median = np.median(border, axis=0)  # (3,) robust to an object that reaches the edge
    names = list(data.BACKGROUNDS)
    dist = np.linalg.norm(np.array([data.BACKGROUNDS[b] for b in names]) - median, axis=1)  # (3,)
    return median, (names[int(dist.argmin())] if dist.min() < BACKGROUND_MATCH else None)

# %%
# | export
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

# %%
# | export
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
# | export
def shape_from_profile(fill: float, skew: float) -> str:
    """Name a shape by how much of its box it fills and how bottom-heavy it is."""
    # Fill alone is not enough: a 2x blur lifts a small triangle's fill to ~0.86, among the circles.
    # Blur keeps the triangle's skew: a symmetric blur adds nothing to the third cumulant.
    if fill < TRIANGLE_FILL or skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"

# %%
# | export
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

# %%
# | export
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

# %%
# | export
def read_image(image: torch.Tensor) -> Reading:
    """Read one (3, H, W) image in [-1, 1]: its background and its objects, largest first."""
    x = _check_image("image", image).detach().to("cpu", torch.float64).clamp(-1, 1)
    rgb = ((x + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 255]
    bg, background = read_background(rgb)  # the median border colour is the blend's other end
    colour, cover = classify_pixels(rgb, bg)  # (H, W), (H, W, K)
    min_area = max(1, round(MIN_AREA_FRACTION * colour.size))
    objects = [describe_object(m, colour, cover) for m in split_components(colour, min_area)]
    return Reading(background, sorted(objects, key=lambda o: -o.area))

# %%
# | export
def read_images(images: torch.Tensor) -> list[Reading]:
    """`read_image` on each of (B, 3, H, W) images."""
    return [read_image(x) for x in _check_image("images", images, ndim=4)]

# %%
# | export
def scene_group(scene: Scene) -> str:
    """Which evaluation group a scene belongs to: "seen", "held_out" or "two"."""
    if len(scene.objects) == 2:
        return "two"
    o = scene.objects[0]
    return "held_out" if (o.color, o.shape) in data.HELD_OUT else "seen"

# %%
# | export
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

# %%
# | export
def eval_scenes(group: str, n: int, seed: int = 0) -> list[Scene]:
    """`n` deterministic test-split prompts (with their ground truth) of one group."""
    return [data.sample_scene(seed, "test", i) for i in eval_indices(group, n, seed)]

# %%
# | export
def names_position(scene: Scene) -> bool:
    """Does the caption of a one-object scene say where the object is?"""
    return any(p in scene.caption for p in data.POSITION_PHRASES[scene.objects[0].position])

# %%
# | export
def nearest_position(cx: float, cy: float) -> str:
    """The named region (data.POSITIONS) whose centre is closest to (cx, cy)."""
    return min(data.POSITIONS, key=lambda p: (data.POSITIONS[p][0] - cx) ** 2 + (data.POSITIONS[p][1] - cy) ** 2)

# %%
# | export
def relation_of(scene: Scene) -> str:
    """The relation a two-object scene was drawn with (its positions determine it)."""
    where = (scene.objects[0].position, scene.objects[1].position)
    return next(r for r, pos in data.RELATIONS.items() if pos == where)

# %%
# | export
def _find(reading: Reading, color: str, shape: str) -> ObjectReading | None:
    return next((o for o in reading.objects if (o.color, o.shape) == (color, shape)), None)

# %%
# | export
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

# %%
# | export
def summarise(scores: list[dict[str, bool]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per check: the fraction of scenes that pass, and how many scenes were scored on it."""
    counts = {k: sum(k in s for s in scores) for s in scores for k in s}
    return {k: sum(s.get(k, False) for s in scores) / c for k, c in counts.items()}, counts

# %%
# | export
def render_scenes(scenes: list[Scene]) -> torch.Tensor:
    """Real renders of scenes at the book's size: (N, 3, 32, 32) in [-1, 1]."""
    return torch.stack([data.pil_to_tensor(data.render_scene(s, IMAGE_SIZE)) for s in scenes])  # (N, 3, 32, 32)

# %%
# | export
def _corrupted(corrupt, images: torch.Tensor) -> torch.Tensor:
    """corrupt(images), which must keep one image per scene: (n, 3, H, W)."""
    out = corrupt(images)
    if isinstance(out, torch.Tensor) and (out.ndim != 4 or out.shape[:2] != images.shape[:2]):
        raise ValueError(f"corrupt: expected it to return (n, 3, H, W) images like its input {tuple(images.shape)}, "
                         f"got shape {tuple(out.shape)}")
    return out

# %%
# | export
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
# | export
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

# %%
# | export
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

# %%
# | export
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

# %%
# | export
def sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (D, D) by eigendecomposition."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(0, None))) @ v.T  # (D, D); tiny negative eigenvalues are round-off

# %%
# | export
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
# | export
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

# %%
# | export
def _check_generated(images, count: int) -> torch.Tensor:
    """`count` finite float (3, 32, 32) images from `generate`, on the CPU, clipped to [-1, 1]."""
    want = f"a ({count}, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) float tensor in [-1, 1] (one image per caption)"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"generate: expected it to return {want}, got {type(images).__name__}")
    if tuple(images.shape) != (count, 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"generate: expected it to return {want}, got shape {tuple(images.shape)}")
    _check_image("generate", images, ndim=4)
    return images.detach().cpu().float().clamp(-1, 1)  # (count, 3, 32, 32)

# %%
# | export
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
# | export
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

    return draw

# %%
# | export
def _snapshot_step(snap: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", snap.name)
    if match is None or not snap.is_dir():
        raise ValueError(f"run_dir: {str(snap)!r} is not a snapshot folder step-NNNNNNN (as Trainer writes them)")
    return int(match.group(1))

# %%
# | export
def evaluate_model(pipe: TextToImagePipeline | None = None, n: int = 300, steps: int | None = None,
                   guidance_scale: float | None = None, sampler: str | None = None, seed: int = 0,
                   batch_size: int = 100, disable: bool | None = None) -> EvalReport:
    """`evaluate` a pipeline (default: the shipped book model's) at one sampler setting; None takes the
    pipeline's defaults, as `python -m tinydit generate` does."""
    pipe = TextToImagePipeline.from_pretrained() if pipe is None else pipe
    options = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance_scale),
                                 ("sampler", sampler)) if v is not None}
    draw = pipeline_generator(pipe, **options)  # checks `pipe`
    pipe.check_inputs(["a red circle"], **options)  # a bad setting fails here, not after the first batch
    return evaluate(draw, n=n, seed=seed, batch_size=batch_size, disable=disable)

# %%
# | export
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
# ## 2. The book model
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
# (chapter 11 chose the scale; the sweep below shows why). The middle row asks for colour–shape pairs the model **never saw**: no red
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
# HELD_OUT 88.3 %, two objects both 79.7 % / relation 64.0 %, FD 0.647 (the pipeline's 8-bit pictures, this stop).
# Margins ~3 binomial standard errors.
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
# (±2.7 points at n = 300); 2 has the lower FD, so it is the default. Chapter 11 looks at the cures.

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
# ## 3. Bad input gets a clear error

# %%
expect_error(lambda: evaluate(lambda captions, seeds: torch.zeros(1, 3, 32, 32), n=2), r"generate: expected .*\(2, 3, 32, 32\)")
expect_error(lambda: read_image(torch.zeros(32, 32)), r"image: expected a \(3, H, W\)")
expect_error(lambda: eval_scenes("three", 5), r"group")
expect_error(lambda: pipeline_generator("a pipeline"), r"pipe: expected a TextToImagePipeline", TypeError)
expect_error(lambda: pipeline_generator(book_pipe)("a red circle", [0]), r"captions: expected a list", TypeError)
expect_error(lambda: read_image(probe_images[0] * 127.5 + 127.5), r"image: expected values in \[-1, 1\]")

# %% [markdown]
# ## Summary
#
# - `tinydit.evaluate` reads pictures back by their pixels (100 % on real renders, clean, noisy or
#   blurred) and grades a generator GenEval-style on seen pairs, HELD_OUT pairs and two-object
#   relations, with a Fréchet distance in the book image encoder's space.
# - `evaluate_model(pipe)` grades a pipeline's own 8-bit pictures (`pipeline_generator`), image by
#   image from its seed: `tests/test_floor_plan.py` checks they are the PNGs `generate` writes.
# - The measured table of the shipped model is in section 2; the adherence-vs-training curve shows
#   where an hour of CPU gets you, and what it does not reach.
#
# ## Exercises
#
# 1. Train with `objective="epsilon"` and with `"flow"` for the same number of steps (`python -m
#    tinydit train --objective flow --out runs/flow`) and compare `python -m tinydit evaluate` tables.
#    Which group moves most?
# 2. Evaluate the model with `guidance_scale=1` (no guidance). How much of the HELD_OUT accuracy is
#    the model and how much is guidance? (Chapter 11 continues from here.)
# 3. The reader is tuned to renders. Where does it disagree with your own eyes on generated pictures?
#    Collect ten, and decide whether the reader or the model is wrong.
