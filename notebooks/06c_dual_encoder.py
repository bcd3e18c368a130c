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
# # 06c · Two text encoders at once, and keeping the big one out of the way
#
# SD3 (Esser et al., 2024) reads a prompt with CLIP *and* T5: CLIP's tokens and pooled vector plus
# T5's tokens, joined into one sequence. T5-XXL alone is 4.8 B parameters (9.5 GB in bf16), run once
# per new prompt. This sitting builds the join and a dual encoder that keeps the big one on the CPU or
# on disk until it is needed, with the bookkeeping that makes it safe. It exports
# `tinydit.dual_encoder`.

# %%
# | default_exp dual_encoder
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import tempfile

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn


torch.manual_seed(0)

# %%
from tinydit.data import ShapesDataset
from tinydit.text import T5TextEncoder, TextEmbeddings, load_book_text_encoder


book_text = load_book_text_encoder()  # 06a: the shipped book encoder, the primary below
te, captions = book_text, ["a red circle", "a big blue square on the left"]
tokens = te(captions).tokens  # what an encoder that never moves gives
train_caps = [ShapesDataset(2000, seed=0)[i][1] for i in range(2000)]  # words for a tiny T5's vocabulary

# %% [markdown]
# ## 1. Two encoders at once
#
# SD3 reads CLIP for the pooled vector and short tokens, and T5-XXL for long, detailed token
# sequences. Our `DualTextEncoder` has one CLIP as the **primary** (its pooled vector conditions
# adaLN) and T5 as the optional **secondary**, whose tokens join the sequence after CLIP's. The widths
# differ (768 vs 4096 at real scale), so each side is **zero-padded** to the common width, as SD3 pads
# CLIP's states to T5's, and the masks are concatenated the same way:

# %%
clip_tokens, t5_tokens = torch.randn(2, 5, 96), torch.randn(2, 7, 64)  # (B, T1, D1), (B, T2, D2)
D = max(clip_tokens.shape[-1], t5_tokens.shape[-1])
joint = torch.cat([F.pad(clip_tokens, (0, D - 96)), F.pad(t5_tokens, (0, D - 64))], dim=1)  # (B, T1 + T2, D)
assert joint.shape == (2, 12, 96) and (joint[:, 5:, 64:] == 0).all()

# %% [markdown]
# **Offloading.** T5-XXL's encoder has about 4.7 B parameters: 9.5 GB in bf16, more than the whole
# DiT. It runs once per prompt, not once per denoising step, so it does not need to *live* on the
# GPU. The idea is three lines: move it in, run, move it back out.

# %%
def encode_offloaded(encoder, prompts, device):
    encoder.to(device)  # 1. bring the weights in
    try:
        return encoder.encode(prompts)  # 2. run
    finally:
        encoder.to("cpu")  # 3. send them back out, even if the run failed


e = encode_offloaded(te, captions, "cpu")  # no GPU here: the same path, a move to where it already is
torch.testing.assert_close(e.tokens, tokens)

# %% [markdown]
# Production needs three more things. (1) Parking in CPU memory still costs 9.5 GB of RAM; with
# `offload="disk"` the weights are written once to a safetensors file and the parameters become
# storage-less `meta` tensors. (2) `.to()` **unties** shared weights: T5 uses one embedding as
# `shared` and `encoder.embed_tokens`, and after `.to("meta")` they are two tensors (see below). So we
# swap each *unique* parameter in place (`torch.utils.swap_tensors`): every module holding it sees the
# new storage. (3) The temporary folder must go away (on `close()`, at garbage collection, at exit),
# and an encoder offloaded on your behalf must still work when you call it yourself: it carries its
# `Offloader` and brings itself in for the call.

# %%
from transformers import T5Config, T5EncoderModel, T5Tokenizer


torch.manual_seed(0)
t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in sorted({w for c in train_caps for w in c.split()})]
tiny_t5 = T5TextEncoder(T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_heads=4, relative_attention_num_buckets=8)),
                        T5Tokenizer(vocab=t5_vocab, extra_ids=0), max_length=24)
untied = T5EncoderModel(tiny_t5.model.config).to("meta")
print("tied after .to('meta')?", untied.shared.weight is untied.encoder.embed_tokens.weight)
assert tiny_t5.model.shared.weight is tiny_t5.model.encoder.embed_tokens.weight

# %%
# | export
"""Two text encoders at once (SD3, Esser et al. 2024): CLIP's tokens and pooled vector plus T5's
tokens, joined; the secondary offloaded to the CPU or to disk between encodes (`Offloader`)."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.text import PromptCache, TextEmbeddings, TextEncoder
from tinydit.validation import check_choice, check_device, check_int


# %%
# | export
def where(module: nn.Module) -> str:
    """The device(s) a module's parameters live on, e.g. 'cpu', 'meta' or 'cuda:0'."""
    devices = sorted({str(p.device) for p in module.parameters()})
    return "+".join(devices) if devices else "no parameters"

# %%
# | export
def _swap_tensors(module: nn.Module, make) -> None:
    """Replace every unique parameter and buffer by `make(name, tensor)`, in place, so that tied
    weights stay tied (each Python object keeps its identity; only its storage changes)."""
    with torch.no_grad():
        for name, p in list(module.named_parameters()):
            torch.utils.swap_tensors(p, nn.Parameter(make(name, p), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers()):
            torch.utils.swap_tensors(b, make(name, b))

# %%
swapped = T5EncoderModel(tiny_t5.model.config)
_swap_tensors(swapped, lambda name, t: torch.empty_like(t, device="meta"))
print("tied after swapping to meta?", swapped.shared.weight is swapped.encoder.embed_tokens.weight, where(swapped))
assert swapped.shared.weight is swapped.encoder.embed_tokens.weight and where(swapped) == "meta"

# %%
# | export
class Offloader:
    """Keeps `module`'s weights off the compute `device` between calls: `with offloader:` brings them
    in and sends them back out after, even when the call fails. Tied weights stay tied.

    `mode`: "cpu" (they wait in CPU memory) or "disk" (written to `folder/{name}.safetensors` on the
    first release; the parameters become storage-less `meta` tensors). Without `folder`, a temporary
    `tinydit_offload_*` folder is made and deleted by `close()`, when the offloader is garbage
    collected, or at interpreter exit. `close()` puts the weights back where they were, for good.
    """

    MODES = ("cpu", "disk")

    def __init__(self, module: nn.Module, mode: str = "cpu", device: str | torch.device | None = None,
                 folder: str | Path | None = None, name: str = "weights", events: list | None = None):
        self.module, self.mode = module, check_choice("mode", mode, self.MODES)
        self.home = next(module.parameters(), torch.empty(0)).device  # where close() puts the weights
        self.device = check_device("device", device) if device is not None else self.home
        self.events = [] if events is None else events  # (step, where the weights are) after each move
        self.closed, self._written, self._remove_folder = False, False, None
        if mode == "disk" and folder is None:
            folder = tempfile.mkdtemp(prefix="tinydit_offload_")
            self._remove_folder = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        self.file = Path(folder) / f"{name}.safetensors" if mode == "disk" else None
        self.release()

    def __enter__(self) -> nn.Module:
        self.bring_in()
        return self.module

    def __exit__(self, *exc) -> None:
        self.release()

    def bring_in(self, device: str | torch.device | None = None) -> None:
        if self.closed:
            return
        device = self.device if device is None else check_device("device", device)
        if self.mode == "disk":
            from safetensors.torch import load_file

            weights = load_file(str(self.file), device=str(device))
            _swap_tensors(self.module, lambda name, t: weights[name])
        else:
            _swap_tensors(self.module, lambda name, t: t.detach().to(device))
        self.events.append(("brought in", where(self.module)))

# %%
# | export
@add_to_class(Offloader)
def release(self) -> None:
    if self.closed:
        return
    if self.mode == "disk":
        if not self._written:  # once per offloader, overwriting an older file of that name
            from safetensors.torch import save_file

            self.file.parent.mkdir(parents=True, exist_ok=True)
            state = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(self.file))
            self._written = True
        _swap_tensors(self.module, lambda name, t: torch.empty_like(t, device="meta"))
    else:
        _swap_tensors(self.module, lambda name, t: t.detach().to("cpu"))
    self.events.append(("released", where(self.module)))

# %%
# | export
@add_to_class(Offloader)
def close(self) -> None:
    """Bring the weights home for good and delete the temporary folder; safe to call twice."""
    if not self.closed:
        self.bring_in(self.home)
        self.closed = True
    if self._remove_folder is not None:
        self._remove_folder()

# %% [markdown]
# `DualTextEncoder` gives its secondary such an offloader and keeps a small LRU cache of the
# secondary's outputs, so a repeated prompt (the negative prompt, a prompt re-run with another seed)
# does not bring T5 in at all. The sequence joining is the five lines above, as a function.

# %%
# | export
def join_embeddings(parts: list[TextEmbeddings], width: int, device=None) -> TextEmbeddings:
    """SD3's joint sequence: each part's tokens zero-padded on the right to `width` and concatenated
    along the sequence, masks concatenated, pooled from the first part."""
    dtype = parts[0].tokens.dtype
    tokens = [F.pad(p.tokens.to(device, dtype), (0, width - p.tokens.shape[-1])) for p in parts]  # (B, Ti, width)
    mask = torch.cat([p.mask.to(device) for p in parts], dim=1)  # (B, T1 + T2 + ...)
    return TextEmbeddings(torch.cat(tokens, dim=1), mask, parts[0].pooled)  # tokens (B, T1 + T2 + ..., width)

# %%
# | export
class DualTextEncoder(TextEncoder):
    """A primary encoder (CLIP: tokens + pooled) and an optional secondary (T5: tokens), joined as
    SD3 does (Esser et al. 2024; `join_embeddings`), with an LRU cache of `cache_size` prompts.

    `offload`: None (the secondary stays on `device`), "cpu" or "disk" (see `Offloader`; in
    `offload_dir` or a temporary folder), or a callable `offload(module, device=...)` returning an
    offloader of your own (a context manager with `close()` and a `device`: chapter 12's
    `BlockOffload` streams it in block by block). The secondary is offloaded *in place*; it still
    encodes (it brings itself in). `close()` or the end of a `with` block gives it back with its
    weights where they were. `events`: where its weights were, step by step."""

    OFFLOAD = (None, "cpu", "disk")
    cache_hits = property(lambda self: self.cache.hits)
    cache_misses = property(lambda self: self.cache.misses)

    def __init__(self, primary: TextEncoder, secondary: TextEncoder | None = None, width: int | None = None,
                 offload: str | None = "cpu", device: str | torch.device | None = None,
                 offload_dir: str | Path | None = None, cache_size: int = 32):
        super().__init__()
        self.offload = offload if callable(offload) else check_choice("offload", offload, self.OFFLOAD)
        self.cache = PromptCache(check_int("cache_size", cache_size, minimum=0))
        widths = [primary.width] + ([secondary.width] if secondary is not None else [])
        self.width = max(widths) if width is None else check_int("width", width)
        if self.width < max(widths):
            raise ValueError(f"width: expected at least the widest encoder's {max(widths)}, got {width}")
        if secondary is not None and secondary.offloader is not None:
            raise ValueError("secondary: already offloaded by another DualTextEncoder; call its close() first")
        self.primary = primary
        object.__setattr__(self, "secondary", secondary)  # not a submodule: .to() must not move it
        self.compute_device = check_device("device", device) if device is not None else primary.device
        self.primary.to(self.compute_device)
        self.pooled_width = primary.pooled_width
        self.max_length = primary.max_length + (secondary.max_length if secondary is not None else 0)
        self.events: list[tuple[str, str]] = []
        if secondary is not None:
            self._take_secondary(secondary, offload_dir)

# %%
# | export
@add_to_class(DualTextEncoder)
def _apply(self, fn, *args, **kwargs):
    """`.to(device)` moves the primary (a submodule); follow it with the secondary."""
    super(DualTextEncoder, self)._apply(fn, *args, **kwargs)  # noqa: UP008 (the kernel runs this outside the class)
    self.compute_device = self.primary.device
    if self.secondary is not None and self.secondary.offloader is not None:
        self.secondary.offloader.device = self.compute_device  # brought in there from now on
    elif self.secondary is not None:
        self.secondary.to(self.compute_device)
    return self

# %%
# | export
@add_to_class(DualTextEncoder)
def _take_secondary(self, secondary: TextEncoder, offload_dir: str | Path | None) -> None:
    """Put the secondary where `self.offload` says: its own offloader, CPU/disk, or the device."""
    if callable(self.offload):  # an offloader factory (chapter 12), e.g. tinydit.offload.BlockOffload
        secondary.offloader = self.offload(secondary, device=self.compute_device)
    elif self.offload:
        secondary.offloader = Offloader(secondary, self.offload, self.compute_device, offload_dir,
                                        "secondary", self.events)
    else:
        secondary.to(self.compute_device)
    self._log("built")

# %%
# | export
@add_to_class(DualTextEncoder)
@property
def device(self) -> torch.device:
    return self.compute_device

# %%
# | export
@add_to_class(DualTextEncoder)
def where(self) -> dict[str, str]:
    """Where each encoder's weights are right now."""
    return {"primary": where(self.primary), "secondary": where(self.secondary) if self.secondary is not None else "-"}

# %%
# | export
@add_to_class(DualTextEncoder)
def close(self) -> None:
    """Give the secondary back (weights where they were before, no offloader) and delete the
    temporary offload folder; encoding still works afterwards, without offloading."""
    if self.secondary is not None and self.secondary.offloader is not None:
        self.secondary.offloader.close()
        self.secondary.offloader = None

# %%
# | export
@add_to_class(DualTextEncoder)
def __enter__(self) -> DualTextEncoder:
    return self

# %%
# | export
@add_to_class(DualTextEncoder)
def __exit__(self, *exc) -> None:
    self.close()

# %%
# | export
@add_to_class(DualTextEncoder)
def _log(self, step: str) -> None:
    self.events.append((step, where(self.secondary)))

# %%
# | export
@add_to_class(DualTextEncoder)
def _encode(self, prompts: list[str]) -> TextEmbeddings:
    parts = [self.primary.encode(prompts)]  # tokens (B, T1, D1), pooled (B, Dp)
    if self.secondary is not None:
        misses = self.cache.misses
        hooks = [m.register_forward_pre_hook(lambda m, a: self._log("encoding")) for m in self.secondary.children()]
        try:
            parts.append(self.cache.encode(self.secondary, prompts))  # tokens (B, T2, D2); offloader moves it
        finally:
            for h in hooks:
                h.remove()
        if self.cache.misses == misses:
            self._log("all prompts cached")
    return join_embeddings(parts, self.width, self.compute_device)

# %% [markdown]
# ### The offloading timeline
#
# We have no T5-XXL here (9.5 GB, and no network), so the secondary is the tiny random T5 built
# above with `transformers`: the same class, the same code path, the same tied embedding. The primary
# is the book's CLIP, and we ask for `offload="disk"`. `events` records where the T5 weights were;
# the hook inside `encode` logs them at the moment T5 actually runs.

# %%
dual = DualTextEncoder(book_text, tiny_t5, offload="disk", device="cpu", cache_size=8)
folder = dual.secondary.offloader.file.parent
e1 = dual.encode(["a red circle", "a blue square on a black background"])
e2 = dual(["a red circle", "a blue square on a black background"])  # same prompts: cached
e3 = dual.encode(["a red circle", "a green triangle at the top"])  # one new prompt
print(f"tokens {tuple(e1.tokens.shape)}: CLIP's {book_text.width}-wide and T5's {tiny_t5.width}-wide tokens "
      f"joined at width {dual.width}; mask {tuple(e1.mask.shape)}; pooled {tuple(e1.pooled.shape)}")
print(f"cache: {dual.cache_hits} hits, {dual.cache_misses} misses; weights file in {folder.name}/")
events = list(dual.events)  # (step, where the T5 weights were)
states = [d for _, d in events]
assert states[0] == "meta" and [d for s, d in events if s == "encoding"] == ["cpu", "cpu"]
assert states[-1] == "meta" and dual.cache_hits == 3 and dual.cache_misses == 3
assert torch.equal(e1.tokens, e2.tokens) and tiny_t5.model.shared.weight is tiny_t5.model.encoder.embed_tokens.weight
two_parts = [TextEmbeddings(x, torch.ones(x.shape[:2], dtype=torch.bool)) for x in (clip_tokens, t5_tokens)]
assert torch.equal(join_embeddings(two_parts, D).tokens, joint)  # the five-line join of section 7
plain = join_embeddings([book_text.encode(["a red circle"]), tiny_t5.encode(["a red circle"])], dual.width)
torch.testing.assert_close(e1.tokens[:1, -24:], plain.tokens[:, -24:])  # T5's 24 tokens, as if never offloaded

fig, ax = plt.subplots(figsize=(8, 1.8))
ax.step(range(len(states)), [{"meta": 0, "cpu": 1}[s] for s in states], where="mid", color="C3")
ax.set_xticks(range(len(states)), [s for s, _ in events], rotation=30, ha="right", fontsize=7)
ax.set_yticks([0, 1], ["disk (meta)", "compute device (cpu)"])
ax.set_ylim(-0.3, 1.3)
ax.set_title("where the T5 weights are, step by step (offload='disk')", fontsize=9)
plt.show()

# %% [markdown]
# The last check called `tiny_t5.encode` directly while the dual encoder had it offloaded: it
# brought itself in from disk and went back out (`where(tiny_t5)` is still `meta`). `close()` hands
# it back in memory and deletes the temporary folder; the end of a `with` block does the same.

# %%
assert where(tiny_t5) == "meta" and folder.is_dir()
dual.close()
print("after close:", dual.where(), "| temporary folder exists:", folder.is_dir())
assert where(tiny_t5) == "cpu" and not folder.exists() and tiny_t5.offloader is None
with DualTextEncoder(book_text, tiny_t5, offload="disk") as d:
    torch.testing.assert_close(d.encode(["a red circle"]).tokens, plain.tokens)
assert not d.secondary.offloader and where(tiny_t5) == "cpu"

# %% [markdown]
# On a GPU the same mechanism keeps T5 off the card: with `offload="cpu"` the weights wait in CPU
# memory and visit the GPU only during `encode`, so the GPU's memory during denoising is the DiT's
# alone. This runs only where a GPU is present.

# %%
if torch.cuda.is_available():
    for mode in (None, "cpu"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with DualTextEncoder(book_text, tiny_t5, offload=mode, device="cuda", cache_size=0) as d:
            d.encode(["a red circle"])
            print(f"offload={mode}: resident after encode {torch.cuda.memory_allocated() / 2**20:.1f} MiB, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
        tiny_t5.to("cpu")
    book_text.to("cpu")
else:
    print("no CUDA device here: the GPU memory comparison is skipped")

# %% [markdown]
# ## Summary
#
# - **Built** (in `tinydit.dual_encoder`): `join_embeddings`, `Offloader` (CPU or disk, unique
#   parameters swapped in place, tied weights kept tied, temporary files removed) and
#   `DualTextEncoder` (CLIP primary, T5 secondary brought in only while it encodes, with a prompt
#   cache).
# - **Checked here**: the five-line join equals what `DualTextEncoder` returns; with
#   `offload="disk"` the T5 weights are on `meta` except while T5 runs, a repeated prompt is served
#   from the cache, and `close()` leaves no temporary folder.
#
# ## Exercises
#
# 1. Time `DualTextEncoder(..., offload="disk")` and `offload="cpu"` on 20 distinct prompts with
#    `cache_size=0` and with the default cache. Where does the time go, and when does the cache help?
