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
# # 12b · Efficiency, part 2: fewer bits, fewer blocks, one graph
#
# Part 1 (12a) made models that do not fit run anyway, by moving weights only while they work. This
# part makes each step cheaper, and measures what each trick costs in adherence:
#
# 1. **precision**: fp16 / bf16 weights, and **fp8 storage** upcast layer by layer at forward time;
#    which attention kernel runs for which inputs;
# 2. **step caching**: skip the deep blocks when the first block's output barely moved since the last
#    step (first-block cache), measured as model evaluations saved against adherence lost;
# 3. **compilation**: one graph per forward, and what `torch.compile` buys for the sampling loop.
#
# It exports `tinydit.precision` and `tinydit.stepcache`. The CUDA-only parts (fp8 matmul speed) are
# measured by `benchmarks/precision.py` where a GPU is available.

# %%
import os
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.manual_seed(0)

# %% [markdown]
# ## 2. Precision: fewer bits per weight
#
# A float has a sign, an exponent (the range) and a mantissa (the precision). Halving the bits
# halves the memory and the bytes each matmul reads; what we lose depends on which part shrinks:

# %%
# | export precision
"""Weights in fewer bits (chapter 12): dtype names, fp8 storage with a per-layer upcast at forward
time (diffusers' layerwise casting), which modules stay in the compute dtype per model, and which
attention kernel runs for which inputs."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.attention import _check_qkv
from tinydit.checkpoint import resolve_dtype
from tinydit.offload import nbytes, set_data, tensors_of


FP8 = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}  # name -> torch attribute (torch >= 2.1)


def fp8_dtype(name: str) -> torch.dtype:
    """The float8 storage dtype `name` ("fp8_e4m3": more precision; "fp8_e5m2": more range)."""
    if not isinstance(name, str) or name not in FP8:
        raise ValueError(f"storage_dtype: expected one of {sorted(FP8)}, got {name!r}")
    if not hasattr(torch, FP8[name]):
        raise RuntimeError(f"storage_dtype: this torch ({torch.__version__}) has no {FP8[name]}; fp8 storage needs "
                           "torch >= 2.1")
    return getattr(torch, FP8[name])

# %%
# | export precision
def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return model

# %%
# | export precision
def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (fp8 layers count 1 byte a value)."""
    return nbytes(tensors_of([_check_model(model)]))

# %%
from tinydit.precision import FP8, fp8_dtype, weight_bytes  # noqa: E402


w = torch.randn(512, 512) * 0.05  # a weight matrix's typical scale
print(f"{'dtype':9} {'bits':>4} {'largest':>9} {'eps':>9} {'weight error (rel.)':>20}")
round_trip = {}
for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                    ("fp8_e4m3", fp8_dtype("fp8_e4m3")), ("fp8_e5m2", fp8_dtype("fp8_e5m2"))]:
    info = torch.finfo(dtype)
    round_trip[name] = ((w.to(dtype).float() - w).norm() / w.norm()).item()  # relative error of a round trip
    print(f"{name:9} {info.bits:4} {info.max:9.3g} {info.eps:9.3g} {round_trip[name]:20.2e}")
assert round_trip["fp32"] == 0 < round_trip["fp16"] < round_trip["bf16"] < round_trip["fp8_e4m3"] < round_trip["fp8_e5m2"]

# %% [markdown]
# - **bf16** keeps fp32's 8 exponent bits: the same range, 3 significant digits. Training and
#   inference are safe in it; it is the default on GPUs that have it.
# - **fp16** has 5 exponent bits: more digits, but nothing above 65,504. Activations that grow large —
#   the SDXL VAE's decoder is the famous case — overflow to `inf`, then NaN. Chapter 02's VAE detects
#   that, warns once, and decodes again in fp32 (below).
# - **fp8** (e4m3 / e5m2) is *storage*: ~6 % error per weight, too coarse to compute in without
#   scaled-matmul kernels, but fine to **store** weights in and upcast each layer to bf16 just before
#   it runs — half of bf16's memory. That is diffusers' *layerwise casting*, and our next export.
#
# Which layers must not be stored in fp8? The ones whose small errors are amplified: normalisation
# parameters, the embeddings of the timestep and position, the patch embedding and the final
# projection (diffusers skips `pos_embed`, `patch_embed`, `norm`, `proj_in`, `proj_out`). Each model
# declares its list.

# %%
# | export precision
SKIP_LAYERWISE = {  # module-name patterns kept in the compute dtype, per model class
    "DiT": ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "norm", "final_layer"),
    "TextDiT": ("pos_embed", "x_embedder", "t_embedder", "t_block", "y_embedder", "csize_embedder", "ar_embedder",
                "pooled_embedder", "norm", "final_layer"),
    "AutoencoderKL": ("conv_in", "conv_out", "norm", "quant_conv"),
    "default": ("pos_embed", "patch_embed", "embed", "norm", "proj_in", "proj_out"),
}
CASTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose weights fp8 can store


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The SKIP_LAYERWISE entry of the model's class (or the default)."""
    return SKIP_LAYERWISE.get(type(model).__name__, SKIP_LAYERWISE["default"])

# %%
# | export precision
def _check_skip(skip) -> tuple[str, ...]:
    """One pattern or a sequence of regular expressions (strings)."""
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (tuple, list)) or not all(isinstance(p, str) for p in skip):
        raise TypeError(f"skip: expected a regular expression or a list of them (module names), got {skip!r}")
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"skip: invalid regular expression {pattern!r} ({e})") from None
    return tuple(skip)

# %%
# | export precision
def _castable_layers(model: nn.Module, skip: tuple[str, ...], storage: torch.dtype) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv layers to store in fp8: not skipped, and with weights inside its range."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, CASTABLE)]
    if not candidates:
        raise ValueError(f"model: {type(model).__name__} has no Linear/Conv layer whose weights fp8 could store")
    layers = [(n, m) for n, m in candidates if not any(re.search(p, n) for p in skip)]
    if not layers:
        raise ValueError(f"skip: {skip!r} matches every one of the {len(candidates)} Linear/Conv layers; nothing "
                         "would be stored in fp8")
    limit = torch.finfo(storage).max
    for name, m in layers:
        if any(t.is_meta for t in tensors_of([m], recurse=False)):
            continue  # no values to check (a model built to count bytes)
        big = max(float(t.detach().abs().max()) for t in tensors_of([m], recurse=False))
        if big > limit:
            raise ValueError(f"model: layer {name!r} has weights up to {big:.4g}, beyond {storage}'s range ({limit:g}); "
                             "skip it (skip=...) or store in fp8_e5m2")
    return layers

# %%
# | export precision
class LayerwiseCasting:
    """Store the weights of every Linear / Conv layer in `storage_dtype` (fp8) and upcast each layer to
    `compute_dtype` right before its forward, dropping the upcast copy after it. Layers whose name
    matches `skip` (default: the model's SKIP_LAYERWISE) and all other modules are held in
    `compute_dtype`. Weight memory ≈ 1 byte a value; `close()` leaves the model in `compute_dtype`."""

    def __init__(self, model: nn.Module, storage_dtype: str = "fp8_e4m3", compute_dtype="bf16",
                 skip: tuple[str, ...] | None = None):
        self.storage = fp8_dtype(storage_dtype)
        self.compute = resolve_dtype(compute_dtype, "compute_dtype")
        if self.compute not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype: expected fp32, fp16 or bf16, got {compute_dtype!r}")
        if getattr(_check_model(model), "_tinydit_casting", None) is not None:
            raise ValueError("model: layerwise casting is already on; call close() on it first")
        skip = skip_patterns(model) if skip is None else _check_skip(skip)
        self.layers = _castable_layers(model, skip, self.storage)  # every check before the model changes
        model.to(self.compute)
        self.model, self.hooks = model, []
        for _, m in self.layers:
            with torch.no_grad():
                for t in tensors_of([m], recurse=False):
                    set_data(t, t.data.to(self.storage))
            self.hooks.append(m.register_forward_pre_hook(self._upcast))
            self.hooks.append(m.register_forward_hook(self._downcast))
        model._tinydit_casting = self

    def _upcast(self, m: nn.Module, args) -> None:
        if not hasattr(m, "_fp8"):  # still there when the last forward raised before _downcast ran
            m._fp8 = [t.data for t in tensors_of([m], recurse=False)]  # the stored copies, kept aside
        for t, stored in zip(tensors_of([m], recurse=False), m._fp8):
            set_data(t, stored.to(self.compute))

    def _downcast(self, m: nn.Module, args, out) -> None:
        for t, stored in zip(tensors_of([m], recurse=False), m._fp8):
            set_data(t, stored)  # the bf16 copy is dropped, nothing is re-rounded
        del m._fp8

# %%
# | export precision
@add_to_class(LayerwiseCasting)
def close(self) -> None:
    for h in self.hooks:
        h.remove()
    with torch.no_grad():
        for _, m in self.layers:
            for t in tensors_of([m], recurse=False):
                set_data(t, t.data.to(self.compute))
    self.model._tinydit_casting, self.hooks, self.layers = None, [], []

# %% [markdown]
# ### The book model in four precisions
#
# The same EMA weights, loaded in fp32, bf16 and fp16 (every loader takes `dtype=` and converts
# tensor by tensor while reading, so a large model never has an fp32 copy in memory), and stored in
# fp8 with layerwise casting. For each: the weight bytes, the error of one forward against fp32, the
# CPU time of a forward at batch 16, and the adherence of the images (chapter 10's reader).

# %%
from tinydit import evaluate  # noqa: E402
from tinydit.checkpoint import BOOK_MODEL_DIR  # noqa: E402
from tinydit.precision import LayerwiseCasting  # noqa: E402
from tinydit.text import load_book_text_encoder  # noqa: E402
from tinydit.textdit import TextDiT  # noqa: E402
from tinydit.train import book_pipeline  # noqa: E402
from tinydit.vae import load_book_vae  # noqa: E402


torch.set_num_threads(1)  # a 4 M-parameter model: one thread beats two contending
vae, encoder = load_book_vae(), load_book_text_encoder()
N_EVAL = 8 if FAST else 100  # prompts per group


def draw_with(model):
    """evaluate's generate(captions, seeds) for `model`: chapter 13's pipeline, the book encoder and VAE."""
    return evaluate.pipeline_generator(book_pipeline(model, text_encoder=encoder, vae=vae))


def book_model(precision: str):
    """The shipped book model in `precision` ("fp32", "bf16", "fp16" or "fp8": e4m3 storage, bf16 compute)."""
    dtype = "bf16" if precision == "fp8" else precision
    model = TextDiT.from_pretrained(BOOK_MODEL_DIR, dtype=dtype).eval()
    if precision == "fp8":
        LayerwiseCasting(model, "fp8_e4m3", compute_dtype="bf16")
    return model


emb = encoder(["a red circle above a blue square"] * 16)
x16, t16 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((16,), 500)
with torch.no_grad():
    reference = book_model("fp32")(x16, t16, context=emb.tokens, context_mask=emb.mask)
precision_rows = {}
for precision in ["fp32", "bf16", "fp16", "fp8"]:
    model = book_model(precision)
    with torch.no_grad():
        out = model(x16, t16, context=emb.tokens, context_mask=emb.mask).float()
        start = time.perf_counter()
        for _ in range(3):
            model(x16, t16, context=emb.tokens, context_mask=emb.mask)
        seconds = (time.perf_counter() - start) / 3
    report = evaluate.evaluate(draw_with(model), n=N_EVAL, disable=True)
    precision_rows[precision] = dict(mb=weight_bytes(model) / 1e6, error=((out - reference).norm() / reference.norm()).item(),
                                     ms=1e3 * seconds, pair=report.accuracy["held_out"]["pair"],
                                     both=report.accuracy["two"]["both"])
    print(f"{precision:5} {precision_rows[precision]['mb']:6.2f} MB  error {precision_rows[precision]['error']:.2e}  "
          f"forward {precision_rows[precision]['ms']:6.1f} ms  HELD_OUT pair {100 * precision_rows[precision]['pair']:5.1f} %  "
          f"two objects {100 * precision_rows[precision]['both']:5.1f} %")

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
names = list(precision_rows)
for ax, key, label in zip(axes, ["mb", "ms", "pair"], ["weights (MB)", "CPU forward, batch 16 (ms)",
                                                        "HELD_OUT pair accuracy"]):
    ax.bar(names, [precision_rows[n][key] for n in names], color=["#555", "#2a7", "#27a", "#a52"])
    ax.set_title(label)
fig.suptitle("the book model: memory, CPU time and adherence per precision")
plt.tight_layout()
plt.show()

# %%
rows = precision_rows
assert rows["fp8"]["mb"] <= 0.52 * rows["bf16"]["mb"] + 0.35  # the skipped embeddings/norms stay bf16 (0.3 MB)
assert rows["bf16"]["mb"] <= 0.5 * rows["fp32"]["mb"] + 1e-6
# measured errors vs fp32: fp16 ~1e-3, bf16 ~7e-3, fp8 ~5e-2; a 3x margin each
assert rows["fp16"]["error"] < 3e-3 and rows["bf16"]["error"] < 2e-2 and rows["fp8"]["error"] < 0.15
assert max(abs(rows[p]["pair"] - rows["fp32"]["pair"]) for p in rows) <= (0.5 if FAST else 0.1)


# %% [markdown]
# ## 3. Step caching: skip the deep blocks when nothing changed
#
# Between two sampler steps the input changes a little, and so does every block's output. The
# *first-block cache* (ParaAttention's FBCache; TeaCache, Liu et al. 2024, uses the same signal on the
# timestep-modulated input) runs the first block, compares its residual (output − input) with the one
# of the last fully computed step, and when the relative change is below a threshold, skips every
# other block and adds the residual they produced last time. The whole rule:

# %%
def lesson_step(blocks, x, cache, threshold):
    """One forward through `blocks` with a first-block cache (`cache`: a dict kept across steps)."""
    h = blocks[0](x)  # (B, T, D)
    r1 = h - x  # the first block's residual
    prev = cache.get("r1")
    if prev is not None and ((r1 - prev).abs().mean() / prev.abs().mean()) < threshold:
        return h + cache["deep"], True  # skipped: the deep blocks' residual of the last full step
    out = h
    for block in blocks[1:]:
        out = block(out)  # (B, T, D)
    cache.update(r1=r1, deep=out - h)
    return out, False


toy_blocks = [nn.Linear(16, 16) for _ in range(4)]
cache, x = {}, torch.randn(2, 16)
full, skipped1 = lesson_step(toy_blocks, x, cache, 0.1)  # the first call always computes
near, skipped2 = lesson_step(toy_blocks, x + 1e-4, cache, 0.1)  # almost the same input: reuse
far, skipped3 = lesson_step(toy_blocks, -x, cache, 0.1)  # a different input: compute
assert (skipped1, skipped2, skipped3) == (False, True, False)
torch.testing.assert_close(near, full, atol=1e-3, rtol=0)

# %% [markdown]
# The production version must not change the model's code either. It replaces the model's block
# list by a `CachedBlocks` list holding the **same** block modules (same parameters, same state-dict
# keys) whose iteration yields small callables applying the rule; any model whose forward loops
# `for block in self.blocks` gets the cache. `reset()` starts a new image.

# %%
# | export stepcache
"""Step caching for DiTs (chapter 12): the first-block cache. When the first block's residual moved
less than `threshold` (relative L1) since the last fully computed step, the other blocks are skipped
and their last residual reused (ParaAttention's FBCache; the TeaCache rule, Liu et al. 2024)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tinydit.offload import find_blocks
from tinydit.validation import check_float, check_int


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old| (one device sync per step)."""
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()

# %%
# | export stepcache
class CachedBlocks(nn.ModuleList):
    """The model's blocks, the same modules under the same keys; iterating yields cached calls."""

    def __init__(self, blocks: nn.ModuleList, cache: StepCache):
        super().__init__(list(blocks))
        object.__setattr__(self, "cache", cache)  # not a submodule

    def __iter__(self):
        blocks = list(super().__iter__())
        yield partial(self.cache.first, blocks[0])
        for i, block in enumerate(blocks[1:], start=1):
            yield partial(self.cache.deep, block, i == len(blocks) - 1)

# %%
# | export stepcache
class StepCache:
    """A first-block cache on `model.blocks` (or `blocks=`, an nn.ModuleList inside it). `threshold`: the
    largest relative change of the first block's residual that still reuses the deep blocks (0: never);
    `warmup`: calls after each `reset()` that always compute. `close()` puts the original list back."""

    def __init__(self, model: nn.Module, threshold: float = 0.1, warmup: int = 1, blocks: nn.ModuleList | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.threshold = check_float("threshold", threshold, minimum=0)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.original = find_blocks(model) if blocks is None else blocks
        if not isinstance(self.original, nn.ModuleList) or len(self.original) == 0:
            raise ValueError(f"blocks: expected a non-empty nn.ModuleList, got {self.original!r}")
        self.parent, self.attr = next(((m, n) for m in model.modules() for n, c in m.named_children()
                                       if c is self.original), (None, None))
        if self.parent is None:
            raise ValueError("blocks: not a child list of model")
        if isinstance(self.original, CachedBlocks):
            raise ValueError("model: a step cache is already on; call close() on it first")
        setattr(self.parent, self.attr, CachedBlocks(self.original, self))
        self.depth, self.calls, self.skipped = len(self.original), 0, 0
        self.reset()

    def reset(self) -> None:
        """Forget the cached residuals (a new image, or a new batch)."""
        self.r1 = self.start = self.deep_residual = None
        self.since_reset, self.skip = 0, False

    def first(self, block: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = block(x, *args, **kwargs)  # (B, T, D)
        r1 = h - x
        fits = self.r1 is not None and self.r1.shape == r1.shape and self.since_reset >= self.warmup
        fits = fits and self.deep_residual is not None  # (None when the last full call raised midway)
        self.skip = fits and self.depth > 1 and relative_change(r1, self.r1) < self.threshold
        if not self.skip:
            self.r1, self.start = r1, h
        self.calls, self.skipped, self.since_reset = self.calls + 1, self.skipped + self.skip, self.since_reset + 1
        return h

# %%
# | export stepcache
@add_to_class(StepCache)
def deep(self, block: nn.Module, last: bool, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.skip:
        return x + self.deep_residual if last else x  # (B, T, D): the deep blocks' last residual
    out = block(x, *args, **kwargs)  # (B, T, D)
    if last:
        self.deep_residual = out - self.start
    return out

# %%
# | export stepcache
@add_to_class(StepCache)
def saved(self) -> float:
    """The fraction of block evaluations skipped so far."""
    return self.skipped * (self.depth - 1) / max(1, self.calls * self.depth)

# %%
# | export stepcache
@add_to_class(StepCache)
def close(self) -> None:
    setattr(self.parent, self.attr, self.original)

# %%
# | export stepcache
@add_to_class(StepCache)
def __enter__(self) -> StepCache:
    return self

# %%
# | export stepcache
@add_to_class(StepCache)
def __exit__(self, *exc) -> None:
    self.close()

# %%
from tinydit.stepcache import StepCache  # noqa: E402


model = book_model("fp32")
emb2 = encoder(["a red circle above a blue square", ""])
args = dict(context=emb2.tokens, context_mask=emb2.mask)
with torch.no_grad():
    plain = [model(x16[:2], torch.full((2,), t), **args) for t in (500, 499, 100)]
    with StepCache(model, threshold=0.05) as cache:
        cached = [model(x16[:2], torch.full((2,), t), **args) for t in (500, 499, 100)]
        assert [cache.calls, cache.skipped] == [3, 1]  # t=499 is next to t=500: reused; t=100 is not
        assert sorted(model.state_dict()) == sorted(book_model("fp32").state_dict())  # same keys while on
torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=0)  # computed steps are exact
torch.testing.assert_close(cached[2], plain[2], rtol=0, atol=0)
print(f"reused step: relative error {((cached[1] - plain[1]).norm() / plain[1].norm()).item():.2e}")
assert isinstance(model.blocks, nn.ModuleList) and not hasattr(model.blocks, "cache")  # close() put the list back

# %% [markdown]
# ### Evaluations saved against adherence lost
#
# The book model with DPM++ 2M at 20 steps and guidance 2, for thresholds from 0 (never skip) up.
# "Saved" counts block evaluations (a skipped step still runs 1 of the 6 blocks, the embeddings and the
# final layer); adherence is chapter 10's reader on HELD_OUT pairs and two-object scenes.

# %%
thresholds = [0.0, 0.05, 0.1, 0.2, 0.3] if FAST else [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
cache_curve = []
for threshold in thresholds:
    model = book_model("fp32")
    draw = draw_with(model)
    with StepCache(model, threshold) as cache:
        def generate(captions, seeds, draw=draw, cache=cache):
            cache.reset()  # a new batch of images: nothing to reuse
            return draw(captions, seeds)

        start = time.perf_counter()
        report = evaluate.evaluate(generate, n=N_EVAL, disable=True)
        seconds = time.perf_counter() - start
    cache_curve.append(dict(threshold=threshold, saved=cache.saved(), seconds=seconds,
                            pair=report.accuracy["held_out"]["pair"], both=report.accuracy["two"]["both"]))
    print(f"threshold {threshold:4.2f}: {100 * cache.saved():5.1f} % of block evaluations skipped, "
          f"{seconds:5.1f} s, HELD_OUT pair {100 * cache_curve[-1]['pair']:5.1f} %, "
          f"two objects {100 * cache_curve[-1]['both']:5.1f} %")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([100 * r["saved"] for r in cache_curve], [100 * r["pair"] for r in cache_curve], "o-", label="HELD_OUT pair")
ax.plot([100 * r["saved"] for r in cache_curve], [100 * r["both"] for r in cache_curve], "s-", label="two objects: both")
for r in cache_curve:
    ax.annotate(f"{r['threshold']:g}", (100 * r["saved"], 100 * r["pair"]), textcoords="offset points", xytext=(3, 4))
ax.set_xlabel("block evaluations skipped (%)")
ax.set_ylabel("accuracy (%)")
ax.set_title("first-block cache on the book model (labels: threshold)")
ax.legend()
plt.show()

# %%
assert cache_curve[0]["saved"] == 0  # threshold 0 never skips
assert all(a["saved"] <= b["saved"] for a, b in zip(cache_curve, cache_curve[1:]))  # more threshold, more skipped
assert cache_curve[-1]["saved"] > 0.2  # measured: a large threshold skips a third or more


# %% [markdown]
# Skipping is nearly free here: the book model's adherence does not move until most deep-block
# evaluations are skipped, because a 20-step DPM++ 2M trajectory changes slowly in its middle. The
# default of `StepCache` (0.1) is conservative; chapter 13's pipeline leaves the cache off unless asked.
#
# ## 4. Attention kernels and compilation
#
# `F.scaled_dot_product_attention` dispatches to one of several kernels — flash, memory-efficient,
# cuDNN, or the plain math — depending on the device, the dtype, the head size and whether there is
# a mask. Which one ran is invisible, yet it decides speed and memory. We ask each backend in turn:

# %%
# | export precision
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"backend: expected one of {SDPA_BACKENDS}, got {name!r}")
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]

# %%
# | export precision
def sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, bool]:
    """Which SDPA kernels accept these inputs (each tried alone), and "auto": the one torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _check_qkv(q, k, v)
    accepts = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel([_sdp_backend(name)]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            accepts[name] = True
        except RuntimeError:  # "No available kernel": this backend refuses these inputs
            accepts[name] = False
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None))
    auto = next((n for n in SDPA_BACKENDS if _sdp_backend(n) == choice), "math")
    return {**accepts, "auto": auto}

# %%
# | export precision
@contextmanager
def pin_sdpa(backend: str):
    """Run the block with one SDPA kernel only (an error where it refuses the inputs, never a silent fallback)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdp_backend(backend)]):
        yield

# %%
from tinydit.precision import pin_sdpa, sdpa_backends  # noqa: E402


print(f"{'dtype':8} {'mask':5} {'head':>4}  " + " ".join(f"{n:9}" for n in ["flash", "efficient", "cudnn", "math", "auto"]))
for dtype in [torch.float32, torch.bfloat16]:
    for masked in [False, True]:
        for head in [32, 64, 256]:
            q = torch.randn(2, 4, 16, head, dtype=dtype)
            mask = torch.ones(2, 1, 16, 16, dtype=torch.bool) if masked else None
            b = sdpa_backends(q, q, q, mask)
            print(f"{str(dtype)[6:]:8} {str(masked):5} {head:4}  " + " ".join(f"{str(b[n]):9}" for n in
                                                                            ["flash", "efficient", "cudnn", "math", "auto"]))
q = torch.randn(2, 4, 16, 32)
with pin_sdpa("math"):
    pinned = F.scaled_dot_product_attention(q, q, q)
torch.testing.assert_close(pinned, F.scaled_dot_product_attention(q, q, q), atol=1e-5, rtol=0)
assert sdpa_backends(q, q, q)["math"]  # the math kernel accepts everything

# %% [markdown]
# On this CPU, flash runs for everything (PyTorch ships a CPU flash kernel). On an H100/H200 the
# table is the one to read before a benchmark: with a boolean padding mask the flash kernel refuses
# and the memory-efficient or cuDNN kernel runs instead (`benchmarks/precision.py` prints it there).
#
# **Compilation.** `torch.compile` traces the forward into one graph and fuses the elementwise
# operations between matmuls (the modulation, the gates, GELU). It needs a forward without
# Python-level decisions on tensor values: every value check (NaN in the input, an empty mask row)
# would be a graph break *and* a device→host sync. Chapters 05–07 run those checks only in eager
# calls (`torch.compiler.is_compiling()`); while writing this chapter, `torch._dynamo.explain` found
# one more, in the timestep embedding's finiteness check for float times, now skipped when compiling
# too. The book model's forward, as the samplers call it:

# %%
model = book_model("fp32")
x_t, t_t = torch.randn(4, 4, 8, 8), torch.tensor([999.0, 500.5, 10.25, 0.0])  # float times, as samplers pass
emb4 = encoder(["a red circle", "a blue square above a green triangle", "", "a tiny purple star"])
torch._dynamo.reset()
explanation = torch._dynamo.explain(model)(x_t, t_t, context=emb4.tokens, context_mask=emb4.mask)
print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
assert explanation.graph_break_count == 0

# %%
captions = ["a red circle above a blue square"] * 8
eager_model, compiled_model = book_model("fp32"), book_model("fp32")
compiled_model.compile()  # in place: still a TextDiT, so the pipeline takes it
times = {}
for name, m in [("eager", eager_model), ("compiled (first call)", compiled_model), ("eager", eager_model),
                ("compiled", compiled_model)]:
    start = time.perf_counter()
    images = draw_with(m)(captions, list(range(8)))
    times[name] = time.perf_counter() - start
    if name == "eager":
        eager_images = images
print("  ".join(f"{k}: {v:.2f} s" for k, v in times.items()), f"-> compiled / eager = {times['compiled'] / times['eager']:.2f}")
torch.testing.assert_close(images, eager_images, atol=1 / 127.5 + 1e-6, rtol=0)  # 8-bit pictures: ~2e-6 apart before rounding, at most one level after

# %% [markdown]
# On this 2-core CPU the compiled sampling loop of the book model takes about two thirds of the eager
# time once compiled (the first call pays ~15–25 s of compilation); the images agree to 1e-5. On a GPU
# the gain comes from the same fusions plus CUDA graphs (`mode="reduce-overhead"`); `benchmarks/precision.py`
# compares tinydit and diffusers compiled on the same weights.

# %% [markdown]
# ## Summary
#
# - **Precision** (`tinydit.precision`): every loader takes `dtype=` and converts while reading; fp8
#   storage with per-layer upcast (`LayerwiseCasting`) stores the book model in 4.3 MB against 7.9 MB
#   in bf16 and 15.7 MB in fp32, with adherence unchanged at the measured sample size; which SDPA
#   kernel runs for which inputs (`sdpa_backends`) and how to pin one (`pin_sdpa`).
# - **Step caching** (`tinydit.stepcache.StepCache`): the first-block cache skips up to ~57 % of block
#   evaluations of a 20-step DPM++ 2M run on the book model before adherence moves.
# - **Compilation**: the book model's forward is one graph (`torch._dynamo.explain`: 0 breaks, float
#   times included), and the compiled sampling loop is faster on this CPU.
# - Not measured here (no GPU in this session): fp8 speed on tensor cores, CUDA graphs; `benchmarks/precision.py`
#   prints them on a GPU.
#
# ## Exercises
#
# 1. TeaCache rescales the first-block distance with a polynomial fitted per model and *accumulates*
#    it across skipped steps. Implement the accumulation in `StepCache` and compare its curve with
#    the one above.
# 2. Store the book model in `fp8_e5m2` instead of `fp8_e4m3`. Which is closer to fp32, and why
#    (look at the weights' range against each format's largest value and epsilon)?
# 3. Compile the book model with `mode="max-autotune-no-cudagraphs"` and with `dynamic=True`; how do
#    compile time and the sampling loop's time change on your machine?
