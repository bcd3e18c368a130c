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
# # 17b · Appendix: reading weights safely — `tinydit.checkpoint`
#
# A reader may skip this appendix. Every loader in the book (this VAE, the DiT, PixArt, the text encoders) needs the same three
# things, so they live in one small module exported here:
#
# - **Files.** safetensors first: a flat table of tensors that cannot run code when read. Pickle
#   files (`.pt`, `.pth`, `.ckpt`, `.bin`) are read only with `torch.load(weights_only=True)`; when
#   it refuses a file the error says so rather than falling back to unsafe loading. A file that
#   cannot be read at all (empty, truncated, garbage) is reported as corrupt / damaged, with its size.
# - **Where.** A local folder, or a Hugging Face hub id fetched with `huggingface_hub` when online.
#   Offline, the error is one line that says how to download the files and pass the folder instead.
# - **Keys and values.** Every missing key, unexpected key and shape mismatch is listed in one
#   error; weights of a non-floating dtype, or holding NaN / inf, are refused before they are copied.
# - **Precision.** `load_state_dict(path, dtype="bf16")` converts each tensor as it is read, and
#   `load_model` builds the model empty (on the `meta` device) in that dtype, so a float32 copy of
#   the model is never in memory. Every loader of the book takes this `dtype=`; dtype=None keeps the
#   file's float32. In fp16, SDXL's VAE decoder overflows (activations beyond 65504): `decode` then
#   warns once and moves the decoder to float32 for good (`tests/test_dtype_loading.py` provokes it).


# %%
import os
import tempfile
from pathlib import Path

import torch

from tinydit.vae import AutoencoderKL, VAEConfig


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
book = AutoencoderKL(VAEConfig.preset("book")).eval()  # chapter 02a's book-sized VAE, random weights

# %%
# | export checkpoint
"""Reading weights safely: safetensors or `torch.load(weights_only=True)`, local folders or hub
ids, and key/shape/value checks that list everything that does not fit (chapter 02)."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

import tinydit


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# The book's trained weights ship inside the package; inference owns their paths (training writes new ones).
ASSETS = Path(tinydit.__file__).resolve().parent / "assets"
BOOK_VAE_DIR = ASSETS / "book_vae"  # chapter 02
BOOK_TEXT_ENCODER_DIR = ASSETS / "book_text_encoder"  # chapter 06 (and its image tower)
BOOK_MODEL_DIR = ASSETS / "book_model"  # chapter 09's TextDiT, in diffusers' PixArt layout
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
WRAPPER_KEYS = ("state_dict", "ema", "model", "module")  # how training code nests a state dict
# How torch.load(weights_only=True) says that a readable file holds something other than tensors
# (garbage bytes fail inside the same unpickler, with "Unsupported operand" instead).
_REFUSED = re.compile(r"unsupported (global|class)|not an allowed global|safe_globals|is blocked", re.I)


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: lists missing / unexpected keys and shape mismatches."""

# %%
# | export checkpoint
def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Peel training-checkpoint wrappers ({'state_dict': ...}, {'ema': ...}) off a state dict."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"checkpoint: found no tensors; top-level keys are {sorted(obj)[:10]}")
        obj = inner
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning (the original LDM .ckpt files)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

# %%
# | export checkpoint
def _read_pickle(path: Path, mmap: bool = False):
    """torch.load(weights_only=True); a refusal and an unreadable file get different errors.
    `mmap=True` leaves the tensors in the file (zip-format files only) until they are used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, OSError or RuntimeError from a broken zip, garbage
        if isinstance(e, pickle.UnpicklingError) and _REFUSED.search(str(e)):
            raise ValueError(f"path: torch.load(weights_only=True) refused {path.name} ({type(e).__name__}); it "
                             "holds more than tensors. Convert it to .safetensors with a tool you trust.") from None
        raise ValueError(f"path: {path.name} ({path.stat().st_size:,} bytes) is damaged: truncated or not a "
                         f"PyTorch checkpoint ({type(e).__name__}); download it again") from None

# %%
# | export checkpoint
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None (keep the file's precision), a floating-point torch dtype, or a name in `DTYPES`."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"{name}: expected one of fp32, fp16, bf16 (or a torch dtype), got {dtype!r}")

# %%
# | export checkpoint
def _converted(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy of `t` (never a view into the file) in `dtype`; integer tensors keep theirs."""
    if not t.is_floating_point():
        return t.clone()
    out = t.to(dtype, copy=True)
    if dtype == torch.float16 and not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise ValueError(f"dtype: {key} holds values beyond float16's range (65504); load this checkpoint "
                         "with dtype='bf16' (float32's range) or 'fp32'")
    return out

# %%
# | export checkpoint
def load_state_dict(path: str | os.PathLike, dtype=None) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file, or a pickle file via `torch.load(weights_only=True)`.
    `dtype` ("bf16", torch.float16, ...): every floating-point tensor is converted while reading,
    one at a time, so the file's own copy is never in memory whole (old non-zip pickles excepted)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            if dtype is None:
                return load_file(str(path))
            with safe_open(str(path), framework="pt") as f:  # get_tensor: a view of the mapped file
                return {k: _converted(k, f.get_tensor(k), dtype) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"path: {path.name} ({path.stat().st_size:,} bytes) is corrupt: truncated or not a "
                             f"safetensors file ({e}); download it again") from None
    if path.suffix in PICKLE_SUFFIXES:
        if dtype is None:
            return unwrap_state_dict(_read_pickle(path))
        sd = unwrap_state_dict(_read_pickle(path, mmap=zipfile.is_zipfile(path)))
        return {k: _converted(k, v, dtype) for k, v in sd.items()}
    raise ValueError(f"path: expected a .safetensors file or one of {PICKLE_SUFFIXES}, got {path.name!r}")

# %%
# | export checkpoint
def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. 'first_stage_model.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

# %%
# | export checkpoint
def read_config(path: str | os.PathLike, name: str = "path_or_id") -> dict:
    """The JSON object in a `config.json`; a damaged or non-object file names `name` and the path."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: expected a JSON object in {str(path)!r}, got {type(config).__name__}")
    return config

# %%
# | export checkpoint
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

# %%
# | export checkpoint
def resolve_pretrained(path_or_id: str | os.PathLike, subfolder: str | None = None,
                       filenames: tuple[str, ...] = ("config.json", "*.safetensors", "*.bin")) -> Path:
    """A local folder for `path_or_id`: the folder itself, or a hub snapshot (only `filenames`)."""
    local = Path(path_or_id)
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"path_or_id: expected a folder, got {str(folder)!r}")
        return folder
    repo_id = str(path_or_id)
    if not HUB_ID.match(repo_id):
        raise FileNotFoundError(f"path_or_id: no local folder {repo_id!r}, and it is not a hub id (owner/name)")
    how = (f"download it where the Hub is reachable (`hf download {repo_id} --local-dir <folder>`) and pass "
           "that folder instead: from_pretrained('<folder>'" + (f", subfolder={subfolder!r})" if subfolder else ")"))
    if hub_offline():
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and the Hugging Face Hub is offline "
                      f"(HF_HUB_OFFLINE=1); {how}")
    try:
        patterns = [f"{subfolder}/{f}" if subfolder else f for f in filenames]
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # no network, unknown or gated repo, ...
        raise OSError(f"path_or_id: {repo_id!r} is not a local folder and could not be fetched from the "
                      f"Hugging Face Hub ({type(e).__name__}); {how}") from None
    return root / subfolder if subfolder else root

# %%
# | export checkpoint
def _listing(title: str, items: list[str]) -> str:
    """A titled list for an error message, one item a line, cut after 20; "" for no items."""
    if not items:
        return ""
    more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {k}" for k in items[:20]) + more

# %%
# | export checkpoint
def _check_weight_values(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str) -> None:
    """Where the model holds floats, the checkpoint must too, and they must be finite."""
    keys = sorted(k for k in sd if own[k].is_floating_point())
    wrong = [f"{k}: {sd[k].dtype}" for k in keys if not sd[k].is_floating_point()]
    if wrong:
        raise ValueError(f"{what}: expected floating-point weights, got another dtype in" + _listing("tensors", wrong))
    bad = [k for k in keys if not torch.isfinite(sd[k] if sd[k].element_size() > 1 else sd[k].float()).all()]
    if bad:
        raise ValueError(f"{what}: weights hold NaN or infinite values (a corrupt file or a diverged training run) in"
                         + _listing("tensors", bad))

# %%
# | export checkpoint
def check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint",
                   assign: bool = False) -> None:
    """`model.load_state_dict(sd, strict=True)`, after one error that lists every problem.
    `assign=True` (for an `empty_model`): the model takes `sd`'s tensors themselves, no copy."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise WeightsMismatchError(f"{what} does not fit the model" + _listing("missing keys", missing)
                                   + _listing("unexpected keys", unexpected) + _listing("shape mismatches", shapes))
    _check_weight_values(sd, own, what)
    if assign:
        model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}, strict=True, assign=True)
    else:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)

# %% [markdown]
# Loading in another precision without a float32 copy: build the model on the `meta` device
# (shapes, no memory), cast it, give it uninitialised CPU storage, and let the strict
# `check_and_load` *assign* the tensors just read: every parameter and buffer is replaced (a missing
# key raises first), so the weights exist once, in the target dtype. What a state dict does not hold
# (a plain tensor attribute, a non-persistent buffer) would stay uninitialised: `empty_model` refuses it.

# %%
# | export checkpoint
def empty_model(build: Callable[[], nn.Module], dtype) -> nn.Module:
    """`build()` without its weights: made on the meta device, cast to `dtype`, then given
    uninitialised CPU storage (`to_empty`) for a strict `check_and_load(..., assign=True)` to fill.
    `dtype=None` keeps the dtypes `build` gives."""
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = build()
    model = (model if dtype is None else model.to(dtype)).to_empty(device="cpu")
    unfilled = []
    for name, m in model.named_modules():
        plain = [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]  # still on the meta device
        unfilled += [f"{name}.{k}" if name else k for k in plain + sorted(m._non_persistent_buffers_set)]
    if unfilled:
        raise RuntimeError(f"build: {type(model).__name__} holds tensors that no state dict fills (left on the "
                           f"meta device or uninitialised): {unfilled[:10]}; load it with dtype=None")
    return model

# %%
# | export checkpoint
def load_model(build: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str = "checkpoint",
               dtype=None) -> nn.Module:
    """`build()` filled from `sd` by the strict `check_and_load`, in eval mode. With `dtype`, an
    `empty_model` in that dtype takes `sd`'s tensors (read in `dtype`): no float32 copy, no init."""
    dtype = resolve_dtype(dtype)
    if dtype is None:  # the model's own init, then a copy: what every loader did before dtype=
        model = build()
        check_and_load(model, sd, what)
    else:
        model = empty_model(build, dtype)
        check_and_load(model, sd, what, assign=True)
    return model.eval()

# %% [markdown]
# A damaged download, a checkpoint that would run code, and a NaN in the weights, each met with an
# error that says what is wrong with the file:

# %%
with tempfile.TemporaryDirectory() as tmp:
    good = book.save_pretrained(f"{tmp}/good") / "diffusion_pytorch_model.safetensors"
    (Path(tmp) / "cut.safetensors").write_bytes(good.read_bytes()[:1000])  # a download cut short
    (Path(tmp) / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "callback": Exception("not a tensor")}, f"{tmp}/code.ckpt")
    nan_sd = {k: v.clone() for k, v in book.state_dict().items()}
    nan_sd["decoder.conv_out.bias"][0] = float("nan")
    cases = [(lambda: load_state_dict(f"{tmp}/cut.safetensors"), r"cut\.safetensors \(1,000 bytes\) is corrupt"),
             (lambda: load_state_dict(f"{tmp}/empty.ckpt"), r"empty\.ckpt \(0 bytes\) is damaged"),
             (lambda: load_state_dict(f"{tmp}/code.ckpt"), r"weights_only=True\) refused code\.ckpt"),
             (lambda: check_and_load(AutoencoderKL(), nan_sd), r"(?s)NaN or infinite.*decoder\.conv_out\.bias"),
             (lambda: load_state_dict(good, dtype="int8"), r"^dtype: expected one of fp32, fp16, bf16")]
    for call, pattern in cases:
        try:
            call()
        except ValueError as e:
            assert re.search(pattern, str(e)), (pattern, str(e))
            print(f"ValueError: {e}")
        else:
            raise AssertionError(f"no error raised; expected {pattern!r}")

# %% [markdown]
# **Looking at it.** The same book-sized VAE written as safetensors in three precisions: the file
# shrinks with the bits per weight, and `load_state_dict(..., dtype=)` reads each back as asked.

# %%
import matplotlib.pyplot as plt
from safetensors.torch import save_file


sizes = {}
with tempfile.TemporaryDirectory() as tmp:
    for name in ("fp32", "bf16", "fp16"):
        path = Path(tmp) / f"{name}.safetensors"
        save_file({k: v.to(resolve_dtype(name)).contiguous() for k, v in book.state_dict().items()}, path)
        sizes[name] = path.stat().st_size / 1e6
        assert all(t.dtype == torch.float32 for t in load_state_dict(path, dtype="fp32").values())
assert sizes["bf16"] < 0.6 * sizes["fp32"]  # half the bytes per weight, plus the same small header
plt.figure(figsize=(5, 2.4))
plt.barh(list(sizes), list(sizes.values()), color="tab:green")
plt.xlabel("file size (MB)")
plt.title("the book-sized VAE in three precisions")
plt.gca().invert_yaxis()
plt.show()

# %% [markdown]
# The original LDM / SGM single-file layout that `from_single_file` reads, its key map both ways and
# its parity with diffusers' own converter are in chapter 17a, the loading appendix.

# %% [markdown]
# ## Summary
#
# - **Built** (`tinydit.checkpoint`): `load_state_dict` (safetensors first; pickles only through
#   `torch.load(weights_only=True)`; dtype while reading), `resolve_pretrained` (folders and hub ids,
#   one line offline), `check_and_load` (missing, unexpected, mis-shaped and non-finite tensors named),
#   `load_model` / `empty_model` (built on `meta`, filled in the target dtype, no float32 copy).
