"""Hostile input (issue 10): bad input never yields a silent wrong result.

One line per case in `CASES`: `(id, callable, expected exception type(s), message regex)`.

- An *error case* passes when the callable raises the expected type with a message matching the
  regex (`re.search`). Where the package's convention applies (tinydit/validation.py) the regex is
  anchored: the message starts with the argument's name, then what was expected and what was given.
- A *behaviour case* has `None, None`: the callable checks the correct behaviour itself (eval mode
  after loading, a mask meaning "attend", equal outputs, no temporary folder left) and raises
  `AssertionError` when the result is wrong.

No case asserts on a traceback. Models are tiny and random; nothing trains (the two training
entry points are called with values that must be refused before the first step). The CLI is run
in-process through `tinydit.cli.main` (stderr captured) plus two real `python -m tinydit` runs.
`classify(case)` sorts one outcome into clear / raw / silent (used by a report script).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import gc
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tinydit import (
    attention,
    cli,
    data,
    demo,
    denoisers,
    dit,
    dual_encoder,
    embeddings,
    emoji,
    evaluate,
    flow,
    guidance,
    guidance_study,
    loading,
    offload,
    pipeline,
    precision,
    schedules,
    stepcache,
    text,
    text_training,
    textdit,
    train,
    train_recipe,
    vae,
    vae_training,
)
from tinydit.checkpoint import WeightsMismatchError


NAN, INF = float("nan"), float("inf")


def expect(ok: bool, wrong: str) -> None:
    """A behaviour check inside a one-line case."""
    if not ok:
        raise AssertionError(wrong)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine thread contention
    makes a millisecond forward take seconds. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Shared scratch: one temporary folder for the whole module, files and tiny models made lazily.
# --------------------------------------------------------------------------------------------


@functools.cache
def work() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tinydit_hostile_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _file(name: str, content: bytes) -> Path:
    path = work() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@functools.cache
def a_regular_file() -> Path:
    """A plain file: a folder below it can never be created (unwritable even for root)."""
    return _file("a_regular_file", b"not a folder")


@functools.cache
def valid_safetensors_bytes() -> bytes:
    path = work() / "_valid.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    return path.read_bytes()


@functools.cache
def valid_pickle_bytes() -> bytes:
    path = work() / "_valid.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    return path.read_bytes()


def corrupt(kind: str, suffix: str) -> Path:
    """An empty, truncated or garbage weights file (`.safetensors`, `.ckpt`, `.pt`)."""
    whole = valid_safetensors_bytes() if suffix == ".safetensors" else valid_pickle_bytes()
    content = {"empty": b"", "truncated": whole[: len(whole) // 2],
               "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))}[kind]
    return _file(f"corrupt/{kind}{suffix}", content)


class _Refused:
    """Pickles to a call of a function of a blocked module (os): a checkpoint that carries code.
    `torch.load(weights_only=True)` refuses it; tinydit must say refused, not damaged."""

    def __reduce__(self):
        return (os.getcwd, ())


@functools.cache
def code_pickle() -> Path:
    path = work() / "code.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Refused()}, path)
    return path


@functools.cache
def namespace_pickle() -> Path:
    """A training checkpoint that also pickled its argparse.Namespace (common; not code, not tensors)."""
    import argparse

    path = work() / "namespace.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)
    return path


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero and zero-init layers would hide wiring errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ---- VAE ------------------------------------------------------------------------------------

TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                sample_size=8, force_upcast=False)


@functools.cache
def tiny_vae() -> vae.AutoencoderKL:
    torch.manual_seed(0)
    return vae.AutoencoderKL(vae.VAEConfig(**TINY_VAE)).eval()


def image(b: int = 2, side: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def latent(b: int = 2, side: int = 4) -> torch.Tensor:
    return torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(2))


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[3] = value
    return x


def vae_folder(name: str, config=None, weights=None, weights_name="diffusion_pytorch_model.safetensors") -> Path:
    """A diffusers-layout VAE folder; `config` (dict or raw text) and `weights` (state dict) override."""
    folder = work() / "vae" / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_vae().config.to_diffusers() if config is None else config
    (folder / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in tiny_vae().state_dict().items()} if weights is None else weights
    if weights_name:
        save_file(sd, str(folder / weights_name))
    return folder


def vae_folder_raw_weights(name: str, content: bytes) -> Path:
    folder = vae_folder(name, weights_name=None)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(content)
    return folder


def vae_weights(transform) -> dict[str, torch.Tensor]:
    sd = {k: v.clone().contiguous() for k, v in tiny_vae().state_dict().items()}
    key = "encoder.conv_in.weight"
    sd[key] = transform(sd[key])
    return sd


def ldm_file(name: str, transform=lambda v: v) -> Path:
    """The tiny VAE in the original LDM single-file layout (nested under first_stage_model.)."""
    sd = loading.diffusers_to_ldm(tiny_vae().state_dict(), len(TINY_VAE["block_out_channels"]))
    sd = {f"first_stage_model.{k}": v.clone().contiguous() for k, v in sd.items()}
    sd["first_stage_model.encoder.conv_in.weight"] = transform(sd["first_stage_model.encoder.conv_in.weight"])
    path = work() / "ldm" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def single_file(path) -> vae.AutoencoderKL:
    return vae.AutoencoderKL.from_single_file(path, config=vae.VAEConfig(**TINY_VAE))


def _vae_dtype_behaviour(dtype):
    def check():
        m, x = tiny_vae(), image()
        ref = m.encode(x).mean
        out = m.encode(x.to(dtype)).mean
        assert out.dtype == torch.float32, f"encode({dtype}) returned {out.dtype}"
        assert torch.allclose(out, ref, atol=1e-2), f"encode({dtype}) differs from float32"
        z = m.decode(latent().to(dtype))
        assert z.dtype == torch.float32 and torch.isfinite(z).all()
    return check


def _vae_fp16_weights_load_as_float32():
    m = vae.AutoencoderKL.from_pretrained(vae_folder("fp16", weights=vae_weights(lambda v: v.half())))
    assert m.dtype == torch.float32 and torch.isfinite(m.decode(latent())).all()


def _vae_loaders_return_eval_mode():
    for m in (vae.AutoencoderKL.from_pretrained(vae_folder("ok")), single_file(ldm_file("ok.safetensors")),
              vae.load_book_vae()):
        assert not any(mod.training for mod in m.modules()), "a VAE loader returned a model in training mode"


# ---- DiT ------------------------------------------------------------------------------------

TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=3, learn_sigma=False, frequency_embedding_size=32, class_dropout_prob=0.5)


@functools.cache
def tiny_dit() -> dit.DiT:
    torch.manual_seed(0)
    return randomize(dit.DiT(dit.DiTConfig(**TINY_DIT))).eval()


def dit_call(x=None, t=None, y=None, model=None):
    model = model or tiny_dit()
    x = latent(2) if x is None else x
    t = torch.tensor([10, 500]) if t is None else t
    return model(x, t, y)


@functools.cache
def dit_original_file(name: str = "tiny.pt") -> Path:
    """The tiny DiT as a facebookresearch checkpoint (state dict, torch.save)."""
    path = work() / "dit" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_dit().state_dict(), path)
    return path


@functools.cache
def dit_book_file() -> Path:
    """A DiTConfig.preset('book') state dict: 6 heads, 192 wide, depth 6 (not a released preset)."""
    path = work() / "dit" / "book.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(dit.DiT(dit.DiTConfig.preset("book")).state_dict(), path)
    return path


def dit_weights_file(name: str, transform) -> Path:
    sd = {k: v.clone().contiguous() for k, v in tiny_dit().state_dict().items()}
    sd["blocks.0.attn.qkv.weight"] = transform(sd["blocks.0.attn.qkv.weight"])
    path = work() / "dit" / name
    save_file(sd, str(path))
    return path


@functools.cache
def dit_folder() -> Path:
    folder = work() / "dit" / "saved"
    tiny_dit().save_pretrained(folder)
    return folder


def dit_config_folder(name: str, config, weights: bytes | None = None) -> Path:
    """A transformer folder with the tiny DiT's weights (or raw `weights` bytes) and the given
    config.json (a dict, text or raw bytes)."""
    folder = work() / "dit" / name
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        shutil.copy(dit_folder() / "model.safetensors", folder / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(weights)
    if isinstance(config, bytes):
        (folder / "config.json").write_bytes(config)
    else:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def tinydit_config(**changes) -> dict:
    return {"_class": "DiT", **tiny_dit().config.to_dict(), **changes}


def diffusers_dit_config(**changes) -> dict:
    cfg = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 16,
           "in_channels": 4, "out_channels": 4, "num_layers": 2, "sample_size": 8, "patch_size": 2,
           "num_embeds_ada_norm": 3, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


def _assert_loaded_dit_behaves(model, ref, atol=1e-5):
    assert not any(m.training for m in model.modules()), "loaded model is in training mode (label dropout on)"
    x, t, y = latent(2), torch.tensor([10, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        outs = [model(x, t, y) for _ in range(8)]
        want = ref(x, t, y)
    assert all(torch.equal(o, outs[0]) for o in outs), "the same call gave different outputs"
    assert torch.allclose(outs[0], want, atol=atol), "loaded model differs from the saved one"


def _dit_bf16_weights_load_as_float32():
    path = work() / "dit" / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny_dit().state_dict().items()}, str(path))
    model = dit.DiT.from_original(path, num_heads=2)
    assert next(model.parameters()).dtype == torch.float32
    _assert_loaded_dit_behaves(model, tiny_dit(), atol=5e-2)  # bf16 rounding of the weights


def _dit_from_original_behaves():
    _assert_loaded_dit_behaves(dit.DiT.from_original(dit_original_file(), num_heads=2), tiny_dit())


def _dit_from_pretrained_behaves():
    _assert_loaded_dit_behaves(dit.DiT.from_pretrained(dit_folder()), tiny_dit())


def _load_transformer_behaves():
    _assert_loaded_dit_behaves(textdit.load_transformer(dit_original_file(), num_heads=2), tiny_dit())
    _assert_loaded_dit_behaves(textdit.load_transformer(dit_folder()), tiny_dit())


def _dit_float64_input():
    """float64 latents: either a clear error naming x, or the float32 result."""
    x = latent(2)
    try:
        out = dit_call(x=x.double())
    except (TypeError, ValueError) as e:
        if not re.match(r"x: ", str(e)):
            raise  # refused, but not by the convention: a raw error
        return
    assert torch.allclose(out.float(), dit_call(x=x), atol=1e-4), "float64 input gives another result"


def _dit_numpy_int_config():
    cfg = dit.DiTConfig(**{**TINY_DIT, "hidden_size": np.int64(32), "num_heads": np.int32(2)})
    assert type(cfg.hidden_size) is int and type(cfg.num_heads) is int


# ---- TextDiT --------------------------------------------------------------------------------

TINY_TEXTDIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                    learn_sigma=False, frequency_embedding_size=32, context_dim=16, modulation="adaln_single",
                    caption_tokens=0, pos_base_size=4, interpolation_scale=8 / 64)  # PixArt's table rule


@functools.cache
def tiny_textdit() -> textdit.TextDiT:
    torch.manual_seed(0)
    return randomize(textdit.TextDiT(textdit.TextDiTConfig(**TINY_TEXTDIT)), seed=3).eval()


def ctx(b: int = 2, t: int = 4, d: int = 16) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(4))


ADDITIVE = torch.tensor([[0.0, 0.0, -INF, -INF], [0.0, 0.0, 0.0, -INF]])  # 0 = attend, -inf = ignore
KEEP = torch.tensor([[True, True, False, False], [True, True, True, False]])


def textdit_call(context=None, context_mask=None, x=None, t=None, **kw):
    x = latent(2) if x is None else x
    t = torch.tensor([10, 500]) if t is None else t
    context = ctx() if context is None else context
    return tiny_textdit()(x, t, context=context, context_mask=context_mask, **kw)


def _textdit_bool_mask_means_attend():
    """True = real token: masked padding must not change the output (compare with it cut off)."""
    x, t, c = latent(1), torch.tensor([300]), ctx(1)
    with torch.no_grad():
        masked = tiny_textdit()(x, t, context=c, context_mask=KEEP[:1])
        cut = tiny_textdit()(x, t, context=c[:, :2])
        other_padding = tiny_textdit()(x, t, context=torch.cat([c[:, :2], -c[:, 2:]], 1), context_mask=KEEP[:1])
    assert torch.allclose(masked, cut, atol=1e-5), "a boolean mask does not mean True = attend"
    assert torch.allclose(masked, other_padding, atol=1e-5), "the model reads masked padding tokens"


def _textdit_int_mask_equals_bool():
    with torch.no_grad():
        a = textdit_call(context_mask=KEEP.long())
        b = textdit_call(context_mask=KEEP)
    assert torch.equal(a, b), "a 0/1 integer mask gives another result than the boolean mask"


def _textdit_float64_input():
    x = latent(2)
    try:
        out = textdit_call(x=x.double())
    except (TypeError, ValueError) as e:
        if not re.match(r"x: ", str(e)):
            raise  # refused, but not by the convention: a raw error
        return
    assert torch.allclose(out.float(), textdit_call(x=x), atol=1e-4), "float64 input gives another result"


@functools.cache
def textdit_folder() -> Path:
    folder = work() / "textdit" / "saved"
    tiny_textdit().save_pretrained(folder)
    return folder


@functools.cache
def pixart_original_file() -> Path:
    """The tiny TextDiT's state dict (original PixArt names) as a single file: no head count in it."""
    path = work() / "textdit" / "pixart.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_textdit().state_dict().items()}, str(path))
    return path


def pixart_weights_file(name: str, transform) -> Path:
    sd = {k: v.clone().contiguous() for k, v in tiny_textdit().state_dict().items()}
    sd["blocks.0.attn.qkv.weight"] = transform(sd["blocks.0.attn.qkv.weight"])
    path = work() / "textdit" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _textdit_loaders_behave():
    for model in (textdit.TextDiT.from_pretrained(textdit_folder()), textdit.load_transformer(textdit_folder()),
                  textdit.TextDiT.from_original(pixart_original_file(), num_heads=2)):
        assert not any(m.training for m in model.modules()), "a TextDiT loader returned training mode"
        with torch.no_grad():
            assert torch.allclose(model(latent(2), torch.tensor([10, 500]), context=ctx(), context_mask=KEEP),
                                  textdit_call(context_mask=KEEP), atol=1e-5), "loaded TextDiT differs"


# ---- attention ------------------------------------------------------------------------------


def qkv(b=2, heads=2, tq=3, tk=4, d=8):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(b, heads, tq, d, generator=g), torch.randn(b, heads, tk, d, generator=g),
            torch.randn(b, heads, tk, d, generator=g))


def _attention_3d_mask_is_per_batch():
    """A (B, T_q, T_k) mask is one mask per sample shared by the heads, also when B == heads."""
    for b, heads in ((2, 2), (3, 2), (2, 4)):
        q, k, v = qkv(b=b, heads=heads)
        g = torch.Generator().manual_seed(b * 10 + heads)
        mask = torch.rand(b, 3, 4, generator=g) > 0.5
        mask[..., 0] = True  # every query keeps one key
        want = torch.stack([  # sample by sample, written out
            (((q[i] @ k[i].transpose(-1, -2)) / math.sqrt(8)).masked_fill(~mask[i], -INF).softmax(-1) @ v[i])
            for i in range(b)])
        for backend in ("sdpa", "math"):
            got = attention.attention(q, k, v, mask=mask, backend=backend)
            assert torch.allclose(got, want, atol=1e-5), f"3-D mask not broadcast per sample (B={b}, heads={heads}, {backend})"


def _attention_2d_mask_means_attend():
    q, k, v = qkv()
    got = attention.attention(q, k, v, mask=KEEP)
    want = torch.stack([attention.attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n])[0]
                        for i, n in enumerate((2, 3))])
    assert torch.allclose(got, want, atol=1e-5), "a (B, T_k) boolean mask does not mean True = attend"


# ---- text encoders --------------------------------------------------------------------------

CAPTIONS = ["a big red circle to the left of a small blue square on a gray background",
            "a tiny green triangle", "an image of a red square on the right"]
T5_WORDS = "a an big small tiny red blue green circle square triangle left right of on the to gray".split()


@functools.cache
def book_tok():
    return text_training.build_book_tokenizer(CAPTIONS)


def tiny_clip_model(seed=0, intermediate=64, projection=True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = book_tok()
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5(seed=0):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in T5_WORDS]
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                    relative_attention_num_buckets=8)).eval()
    return model, T5Tokenizer(vocab=vocab, extra_ids=0)


@functools.cache
def clip_encoder() -> text.CLIPTextEncoder:
    return text.CLIPTextEncoder(tiny_clip_model(), book_tok())


def clip_folder(name: str, rename=None, model=None, weights_transform=None) -> Path:
    """A saved tiny CLIP text model + tokenizer; `rename` maps checkpoint keys (keys that do not fit)."""
    folder = work() / "clip" / name
    (model or tiny_clip_model()).save_pretrained(folder)
    book_tok().save_pretrained(folder)
    if rename or weights_transform:
        sd = load_file(str(folder / "model.safetensors"))
        if rename:
            sd = {rename(k): v for k, v in sd.items()}
        if weights_transform:
            sd = weights_transform(sd)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def clip_folder_with_other_config() -> Path:
    """The checkpoint of a CLIP with a 64-wide MLP under a config.json that says 48: shapes do not fit."""
    folder = clip_folder("other_width")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def clip_folder_holding_t5() -> Path:
    folder = work() / "clip" / "holds_t5"
    model, tok = tiny_t5()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def t5_folder(name: str, rename=None) -> Path:
    folder = work() / "t5" / name
    model, tok = tiny_t5()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if rename:
        sd = {rename(k): v for k, v in load_file(str(folder / "model.safetensors")).items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def corrupt_clip_folder() -> Path:
    folder = clip_folder("corrupt")
    whole = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: len(whole) // 3])
    return folder


def _clip_loads_strictly_and_in_eval_mode():
    enc = text.CLIPTextEncoder.from_pretrained(clip_folder("ok"))
    assert not any(m.training for m in enc.model.modules()), "CLIPTextEncoder.from_pretrained returned training mode"
    ref = text.CLIPTextEncoder(tiny_clip_model(), book_tok())
    assert torch.allclose(enc.encode(CAPTIONS[1:]).tokens, ref.encode(CAPTIONS[1:]).tokens, atol=1e-6), \
        "loaded CLIP encodes differently from the saved one"


def _text_embeddings_int_mask():
    e = text.TextEmbeddings(torch.zeros(2, 4, 8), KEEP.long())
    assert e.mask.dtype == torch.bool and torch.equal(e.mask, KEEP)


@contextlib.contextmanager
def private_tempdir():
    """Point `tempfile` at an empty folder for the block, so that leftovers can be counted."""
    folder = Path(tempfile.mkdtemp(dir=work()))
    old = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old


def _dual_disk_offload_cleans_up_and_leaves_callers_t5_usable():
    model, tok = tiny_t5()
    mine = text.T5TextEncoder(model, tok, max_length=8)
    before = mine.encode(["a red circle"]).tokens
    with private_tempdir() as tmp:
        dual = dual_encoder.DualTextEncoder(clip_encoder(), mine, offload="disk", device="cpu")
        dual.encode(["a red circle", "a blue square"])
        assert torch.equal(mine.encode(["a red circle"]).tokens, before), "the caller's T5 changed while offloaded"
        dual.close()
        left = sorted(p.name for p in tmp.glob("tinydit_offload_*"))
        assert not left, f"close() left temporary folders {left}"
        assert dual_encoder.where(mine) == "cpu", f"the caller's T5 is on {dual_encoder.where(mine)} after close()"
        assert torch.equal(mine.encode(["a red circle"]).tokens, before), "the caller's T5 changed after close()"
        with dual_encoder.DualTextEncoder(clip_encoder(), mine, offload="disk") as second:  # a second one around it
            second.encode(["a green triangle"])
        assert not list(tmp.glob("tinydit_offload_*")), "the with-block left a temporary folder"
        assert torch.equal(mine.encode(["a red circle"]).tokens, before)
        other = text.T5TextEncoder(tiny_t5(seed=1)[0], tok, max_length=8)
        dual_encoder.DualTextEncoder(clip_encoder(), other, offload="disk").encode(["a red circle"])  # never closed
        del other
        gc.collect()
        assert not list(tmp.glob("tinydit_offload_*")), "an unclosed, collected DualTextEncoder left its folder"


# ---- CLI ------------------------------------------------------------------------------------


class CliRefused(Exception):
    """A command that exited with a non-zero status: str() is 'exit=N lines=L <stderr lines>'."""


def _refused(code, stderr: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    raise CliRefused(f"exit={code} lines={len(lines)} " + " | ".join(lines))


def cli_main(*argv: str):
    """`tinydit.cli.main(argv)` in-process; a refusal raises CliRefused, success returns None.
    Training is replaced by an assertion: a refused --out must be found before training starts."""
    err, out = io.StringIO(), io.StringIO()
    started = AssertionError("training started before the flags were checked")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            mock.patch.object(vae_training, "train_book_vae", side_effect=started), \
            mock.patch.object(text_training, "train_book_text_encoder", side_effect=started):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        _refused(code, err.getvalue())


def cli_process(*argv: str):
    """A real `python -m tinydit ...` run."""
    proc = subprocess.run([sys.executable, "-m", "tinydit", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, cwd=work())
    if proc.returncode != 0:
        _refused(proc.returncode, proc.stderr)


def one_line(flag: str) -> str:
    """Exit status 2, one stderr line, which names `flag` after 'error:'."""
    return rf"^exit=2 lines=1 .*error: .*{re.escape(flag)}"


def unwritable(name: str) -> str:
    return str(a_regular_file() / name)


# ---- data -----------------------------------------------------------------------------------


def ds4():
    return data.ShapesDataset(4)


def imgs():
    return image(2)


def _numpy_ints_are_numbers():
    ds = data.ShapesDataset(np.int64(5), size=np.int32(16), seed=np.uint8(3))
    assert len(ds) == 5 and ds[np.int64(4)][0].shape == (3, 16, 16)
    assert data.image_grid(imgs(), cols=np.int64(1), scale=np.int16(2)).size[0] > 0


# ---- chapter 09: training and evaluation ----------------------------------------------------
# Nothing trains: a checkpoint and a snapshot are written from a freshly built Trainer (its step and
# losses set by hand), the book model is a random one-block TextDiT, images are real renders.


def train_cfg(**changes) -> train.TrainConfig:
    """A one-block, 32-wide book model on 8 scenes, 4 steps of 4 (never run to the end here)."""
    base = dict(hidden_size=32, depth=1, num_heads=2, n_train=8, steps=4, batch_size=4, warmup_steps=1,
                checkpoint_every=1, snapshot_every=0)
    return train.TrainConfig.fast(**{**base, **changes})


def _set(cfg: train.TrainConfig, **changes) -> train.TrainConfig:
    """A config changed after its checks ran (TrainConfig refuses patch_size=3 itself)."""
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def encoded_data(n: int = 8, side: int = 8, mask_dtype=torch.bool) -> train.EncodedData:
    """Random stand-ins for the encoded training set: latents (n, 4, side, side), 4 tokens of 96."""
    g = torch.Generator().manual_seed(0)
    empty_mask = torch.zeros(4, dtype=torch.bool)
    empty_mask[0] = True
    return train.EncodedData(torch.randn(n, 4, side, side, generator=g), torch.randn(n, 4, 96, generator=g),
                             torch.ones(n, 4, dtype=mask_dtype), torch.zeros(4, 96), empty_mask.to(mask_dtype))


def tiny_trainer(cfg=None, out=None, data_=None) -> train.Trainer:
    return train.Trainer(cfg or train_cfg(), out_dir=out, data=encoded_data() if data_ is None else data_,
                         device="cpu", disable=True)


@functools.cache
def tiny_run() -> Path:
    """A run folder holding checkpoints/step-0000003.pt (random weights, 3 losses) and an EMA snapshot."""
    out = work() / "train09" / "run"
    t = tiny_trainer(out=out)
    randomize(t.model)
    t.step, t.losses = 3, [1.0, 0.9, 0.8]
    t.save_checkpoint()
    t.save_snapshot()
    return out


def last_checkpoint() -> Path:
    return train.checkpoints(tiny_run() / "checkpoints")[-1]


def checkpoint_bytes(name: str, transform) -> Path:
    """The tiny run's checkpoint with its bytes transformed (truncated, emptied)."""
    return _file(f"train09/ckpt/{name}", transform(last_checkpoint().read_bytes()))


def _resume_round_trip():
    t = tiny_trainer().resume(last_checkpoint())
    saved = torch.load(last_checkpoint(), weights_only=True)
    assert t.step == 3 and t.losses == [1.0, 0.9, 0.8], f"resumed at step {t.step} with losses {t.losses}"
    assert all(torch.equal(v, saved["model"][k]) for k, v in t.model.state_dict().items()), "weights differ"


@functools.cache
def tiny_book_model() -> textdit.TextDiT:
    torch.manual_seed(0)
    return randomize(train.build_model(train_cfg())).eval()


@functools.cache
def book_model_folder() -> Path:
    return train.save_book_model(tiny_book_model(), work() / "train09" / "book" / "ok", train_cfg())


def book_model_variant(name: str, edit) -> Path:
    """A copy of the tiny book-model folder, changed by `edit(folder)`."""
    folder = work() / "train09" / "book" / name
    if not folder.exists():
        shutil.copytree(book_model_folder(), folder)
        edit(folder)
    return folder


def _replace(name: str, content):
    def edit(folder: Path) -> None:
        target = folder / name
        if content is None:
            target.unlink()
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content if isinstance(content, str) else json.dumps(content(folder)))
    return edit


BOOK_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _nan_book_weights(folder: Path) -> None:
    sd = load_file(str(folder / BOOK_WEIGHTS))
    save_file({k: torch.full_like(v, NAN) for k, v in sd.items()}, str(folder / BOOK_WEIGHTS))


def _book_model_loads_in_eval_mode():
    model, param = train.load_book_model(book_model_folder())
    assert not model.training, "load_book_model returned a model in training mode"
    assert isinstance(param, denoisers.Parametrisation), f"load_book_model returned {type(param).__name__}"
    assert param.prediction == "v_prediction", f"prediction {param.prediction!r}, saved 'v_prediction'"
    x, t, c = latent(2), torch.tensor([10, 500]), ctx(2, 4, 96)
    assert torch.allclose(model(x, t, context=c), tiny_book_model()(x, t, context=c), atol=1e-5), "weights differ"


def _atomic_write_failure_keeps_old_file():
    path = _file("train09/atomic/f.txt", b"old")

    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train.atomic_write(path, half_then_fail)
    assert path.read_text() == "old", "a failed atomic_write changed the file"
    left = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert not left, f"a failed atomic_write left {left}"


def _checkpoints_skip_temp_files():
    folder = work() / "train09" / "listing"
    for name in ("step-0000001.pt", ".step-0000002.pt.tmp-123", "notes.txt"):
        _file(f"train09/listing/{name}", b"x")
    names = [p.name for p in train.checkpoints(folder)]
    assert names == ["step-0000001.pt"], f"checkpoints() listed {names}"


@functools.cache
def book_encoders():
    return vae.load_book_vae(), text.load_book_text_encoder()


@functools.cache
def tiny_book_pipe(objective: str = "v_prediction") -> pipeline.TextToImagePipeline:
    """`train.book_pipeline` around the tiny book model (trained, says its config, for `objective`),
    the book VAE and text encoder. Shared and never changed."""
    v, enc = book_encoders()
    return train.book_pipeline(tiny_book_model(), train_cfg(objective=objective), text_encoder=enc, vae=v)


def generate_tiny(captions=None, seeds=None, objective: str = "v_prediction", **options):
    """`evaluate.pipeline_generator` (what chapter 10's evaluator draws with) on `tiny_book_pipe`,
    2 steps; image i from seeds[i] (default i); `options` go to the pipeline call."""
    captions = ["a red circle", "a blue square"] if captions is None else captions
    seeds = list(range(len(captions))) if seeds is None else seeds
    draw = evaluate.pipeline_generator(tiny_book_pipe(objective), **{"num_inference_steps": 2, **options})
    return draw(captions, seeds)


def generate_guided_tiny(captions=None, seeds=None, **kw):
    """`guidance_study.generate_guided` on `tiny_book_pipe`, 2 steps."""
    captions = ["a red circle", "a blue square"] if captions is None else captions
    return guidance_study.generate_guided(tiny_book_pipe(), captions, seeds, **{"steps": 2, **kw})


def renders(n: int = 2, side: int = 32) -> torch.Tensor:
    """Real renders (n, 3, side, side) in [-1, 1] of the first test-split scenes."""
    return torch.stack([data.pil_to_tensor(data.render_scene(data.sample_scene(0, "test", i), side)) for i in range(n)])


def render_generator(drop: int = 0):
    """A `generate` for `evaluate` that draws the real scene of each seed (dropping `drop` images)."""
    def draw(captions, seeds):
        return torch.stack([data.pil_to_tensor(data.render_scene(data.sample_scene(0, "test", s), 32))
                            for s in seeds])[drop:]
    return draw


def _read_image_float64_equals_float32():
    x = renders(1)[0]
    assert evaluate.read_image(x.double()) == evaluate.read_image(x), "a float64 image reads differently"


def _frechet_distance_of_a_set_with_itself_is_zero():
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert evaluate.frechet_distance(f, f.clone()) < 1e-6
    assert evaluate.frechet_distance(f.numpy().astype(np.float16), f.numpy().astype(np.float16)) < 1e-6


def _train_book_model_resume_nothing():
    with mock.patch.object(train, "encode_dataset", lambda *a, **k: encoded_data()):
        train.train_book_model(train_cfg(), out_dir=work() / "train09" / "no_run", resume=True, disable=True)


def cli_main_no_work(*argv: str):
    """`cli_main` with chapter 09's training and evaluation replaced by an assertion: a refused flag
    must be found before the dataset is encoded or the first image generated."""
    started = AssertionError("training or evaluation started before the flags were checked")
    with mock.patch.object(train, "train_book_model", side_effect=started), \
            mock.patch.object(evaluate, "evaluate", side_effect=started):
        cli_main(*argv)


# ---- chapter 09, second pass: edited checkpoints, mismatched models, wrong-but-plausible calls


def checkpoint_edit(name: str, edit) -> Path:
    """The tiny run's checkpoint loaded, changed by `edit(state)`, saved again."""
    state = torch.load(last_checkpoint(), weights_only=True)
    edit(state)
    path = work() / "train09" / "ckpt" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _nan_model(state: dict) -> None:
    state["model"] = {k: torch.full_like(v, NAN) for k, v in state["model"].items()}


def x0_noise_u(b: int = 2, u=None):
    x0 = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return x0, torch.randn_like(x0), torch.rand(b) if u is None else u, torch.zeros(b)


def two_models():
    return train.build_model(train_cfg()), train.build_model(train_cfg(seed=1))


def _ema_decay(decay):
    def call():
        ema, model = two_models()
        train_recipe.ema_update(ema, model, decay, 100)
        assert all(torch.isfinite(p).all() for p in ema.parameters()), f"ema_update(decay={decay}) made NaN weights"
    return call


def _save_book_model_with_other_config():
    """The weights are 32 wide, the config says 64: the folder would not rebuild these weights."""
    train.save_book_model(tiny_book_model(), work() / "train09" / "book" / "mismatch", train_cfg(hidden_size=64))


def _train_until_before_current_step():
    tiny_trainer().resume(last_checkpoint()).train(until=1)  # resumed at step 3


def _train_book_model_into_existing_run():
    out = work() / "train09" / "existing"
    if not out.exists():
        shutil.copytree(tiny_run(), out)
    with mock.patch.object(train, "encode_dataset", lambda *a, **k: encoded_data()):
        train.train_book_model(train_cfg(seed=5), out_dir=out, disable=True)


def _train_book_model_unwritable():
    with mock.patch.object(train, "encode_dataset", lambda *a, **k: encoded_data()):
        train.train_book_model(train_cfg(), out_dir=unwritable("tbm"), disable=True)


def _encode_dataset_16px():
    out = train.encode_dataset(data.ShapesDataset(2, size=16), *book_encoders(), disable=True)
    raise AssertionError(f"16x16 images encoded to latents {tuple(out.latents.shape)} (training needs 4x8x8)")


def _stream_none():
    train.StreamingData(None, *book_encoders())


def _reader_accuracy_corrupt_drops_images():
    acc = evaluate.reader_accuracy(n=3, corrupt=lambda x: x[:1])
    raise AssertionError(f"corrupt returned 1 of 3 images; scored anyway: {acc['seen']}")


def _book_pipeline_one_string_is_one_prompt():
    out = tiny_book_pipe()("a red", num_inference_steps=2, disable=True, output_type="latent")
    assert out.prompts == ["a red"] and len(out.latents) == 1, \
        f"prompt='a red' made {len(out.latents)} images for prompts {out.prompts} (one per character?)"


def _book_pipeline_denoise_cond_list():
    pipe = tiny_book_pipe()
    pipe.denoise(latent(2, 8), [torch.zeros(2, 4, 96)], pipe.schedule(2), disable=True)


def _evaluate_run_snapshot_name():
    run = work() / "train09" / "run_badname"
    target = run / "snapshots" / "step-final"
    if not target.exists():
        shutil.copytree(book_model_folder(), target)
    with mock.patch.object(evaluate, "evaluate_model", return_value=mock.Mock(as_dict=dict)):
        evaluate.evaluate_run(run, n=1)


def _noised_u_negative():
    _, step, _ = denoisers.Parametrisation().noised(*x0_noise_u(u=torch.tensor([-0.5, 0.5])))
    assert (step >= 0).all(), f"u=-0.5 gave DDPM step {step.tolist()} (a negative index wraps around)"


def dit_x0_3d():
    x0 = torch.zeros(4, 8, 8)
    return denoisers.Parametrisation().noised(x0, x0, torch.rand(4), torch.zeros(4))


# ---- chapter 12: offloading, fp8 storage, the step cache; chapter 13: the pipeline ------------
# Every model that a case changes (offloaded, cast, cached) is built fresh: the cached tiny models
# above are shared by other cases and must stay untouched.


class OffToy(torch.nn.Module):
    """An embedding, `depth` blocks in a ModuleList, a head and a float buffer (a DiT's skeleton)."""

    def __init__(self, depth: int = 3, d: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(8, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU())
                                          for _ in range(depth))
        self.head = torch.nn.Linear(d, 8)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        x = self.embed(x) * self.scale
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def off_toy(seed: int = 0, depth: int = 3) -> OffToy:
    torch.manual_seed(seed)
    return randomize(OffToy(depth), seed=seed, std=0.3).eval()


def toy_x() -> torch.Tensor:
    return torch.randn(2, 8, generator=torch.Generator().manual_seed(6))


def cpu_offload(model, mode: str = "block", **options):
    return offload.offload(model, mode, device="cpu", **options)


def absent_cuda() -> str:
    """A CUDA device this machine does not have."""
    return "cuda" if not torch.cuda.is_available() else "cuda:99"


def _offload_absent_device_then_call():
    m = off_toy()
    offload.ModelOffload({"m": m}, device=absent_cuda(), pin_memory=False)
    m(toy_x())


def _model_offload_same_module_twice():
    m = off_toy()
    offload.ModelOffload([m, m], device="cpu")


def _model_offload_component_inside_another():
    m = off_toy()
    offload.ModelOffload({"whole": m, "head": m.head}, device="cpu")


def _leaf_offload_inside_block_offload():
    m = off_toy()
    cpu_offload(m, "block")
    cpu_offload(m.head, "leaf")


def _block_offload_around_leaf_offload():
    m = off_toy()
    cpu_offload(m.head, "leaf")
    cpu_offload(m, "block")


def _block_offload_foreign_blocks():
    cpu_offload(off_toy(), "block", blocks=off_toy(seed=1).blocks)


def _offload_parameter_replaced():
    m = off_toy()
    cpu_offload(m, "block")
    m.head.weight = torch.nn.Parameter(torch.zeros(8, 16))  # the offloader still holds the old one
    m(toy_x())


def _offload_close_twice_and_offload_again():
    m, x = off_toy(), toy_x()
    with torch.no_grad():
        want = m(x)
        for mode in ("block", "leaf", "model"):
            off = cpu_offload({"m": m} if mode == "model" else m, mode)
            assert torch.equal(m(x), want), f"{mode} offload changed the output"
            off.close()
            off.close()
            assert not m._forward_pre_hooks and not m.head._forward_pre_hooks, f"{mode}: close() left hooks"
            assert torch.equal(m(x), want), f"the output changed after closing {mode} offload twice"


def _offload_load_state_dict_while_offloaded():
    m, other, x = off_toy(), off_toy(seed=1), toy_x()
    off = cpu_offload(m, "block")
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x), other(x)), "weights loaded while offloaded are not the ones used"
    off.close()
    with torch.no_grad():
        assert torch.equal(m(x), other(x)), "close() put the old weights back"


def _block_offload_numpy_group_size():
    m, x = off_toy(), toy_x()
    with torch.no_grad():
        want = m(x)
        cpu_offload(m, "block", group_size=np.int64(2))
        assert torch.equal(m(x), want)


def _enter_use(off, name):
    with off.use(name):
        pass


def _pin_sdpa(backend):
    with precision.pin_sdpa(backend):
        pass


def fresh_tiny_textdit() -> textdit.TextDiT:
    return copy.deepcopy(tiny_textdit())


def _layerwise_skip_one_string():
    """skip="head": one pattern (keep `head` in the compute dtype), not the letters h, e, a, d."""
    try:
        cast = precision.LayerwiseCasting(off_toy(), compute_dtype="fp32", skip="head")
    except TypeError as e:
        if not re.match(r"skip: ", str(e)):
            raise
        return
    names = [n for n, _ in cast.layers]
    assert "head" not in names and "embed" in names, f"skip='head' cast {names}"


def _layerwise_beyond_fp8_range():
    m = off_toy()
    with torch.no_grad():
        m.head.weight.mul_(5000)  # |w| up to ~5000; fp8_e4m3 ends at 448
    precision.LayerwiseCasting(m, compute_dtype="fp32")


def _layerwise_close_twice_and_again():
    m, x = off_toy(), toy_x()
    with torch.no_grad():
        want = m(x)
        cast = precision.LayerwiseCasting(m, compute_dtype="fp32")
        close = m(x)
        cast.close()
        cast.close()
        assert all(p.dtype == torch.float32 for p in m.parameters()), "close() left fp8 weights"
        assert torch.equal(m(x), close), "the output changed after close()"
        err = float((close - want).norm() / want.norm())  # measured 0.030 (fp8_e4m3: 3 mantissa bits); 2x margin
        assert err < 0.06, f"fp8 storage is {err:.3f} (relative) from the fp32 output"
        precision.LayerwiseCasting(m, compute_dtype="fp32").close()  # on again after close


def _stepcache_threshold_zero_exact_and_close_twice():
    m, x = off_toy(), toy_x()
    keys = list(m.state_dict())
    with torch.no_grad():
        want = m(x)
        cache = stepcache.StepCache(m, threshold=np.float32(0.0))
        assert list(m.state_dict()) == keys, "the state dict keys changed while the cache is on"
        assert torch.equal(m(x), want) and torch.equal(m(x), want), "threshold=0 changed the output"
        cache.close()
        cache.close()
        assert type(m.blocks) is torch.nn.ModuleList, f"close() left {type(m.blocks).__name__}"
        stepcache.StepCache(m).close()  # on again after close
        assert torch.equal(m(x), want)


def _stepcache_empty_blocks():
    m = off_toy(depth=0)
    stepcache.StepCache(m, blocks=m.blocks)
    m(toy_x())


def _stepcache_then_block_offload():
    """A block offload on a model whose blocks are cached: works (same output) or says why not."""
    m, x = off_toy(), toy_x()
    with torch.no_grad():
        want = m(x)
        stepcache.StepCache(m, threshold=0)
        try:
            cpu_offload(m, "block")
        except ValueError as e:
            if not re.match(r"(model|blocks): ", str(e)):
                raise
            return
        assert torch.equal(m(x), want), "block offload over a step cache changed the output"


def _stepcache_then_cross_attention_maps():
    m = fresh_tiny_textdit()
    stepcache.StepCache(m, threshold=0)
    with demo.CrossAttentionMaps(m) as maps, torch.no_grad():
        m(latent(2), torch.tensor([10, 500]), context=ctx())
    assert len(maps.calls) == len(m.blocks), f"{len(maps.calls)} maps recorded for {len(m.blocks)} blocks"


# ---- chapter 13: the pipeline (the shipped book model; a saved copy for folder edits) --------


@functools.cache
def book_pipe() -> pipeline.TextToImagePipeline:
    """Shared and never changed: cases that offload or move a pipeline use `fresh_pipe()`."""
    return pipeline.TextToImagePipeline.from_pretrained()


def pipe_call(prompt="a red circle", **kw):
    """The book pipeline, 2 steps, latents only unless `output_type` says otherwise."""
    return book_pipe()(prompt, **{"num_inference_steps": 2, "disable": True, "output_type": "latent", **kw})


@functools.cache
def pipeline_folder() -> Path:
    return book_pipe().save_pretrained(work() / "pipe12" / "ok")


def fresh_pipe() -> pipeline.TextToImagePipeline:
    return pipeline.TextToImagePipeline.from_pretrained(pipeline_folder())


def pipeline_variant(name: str, edit) -> Path:
    """A copy of the saved pipeline folder, changed by `edit(folder)` (see `_replace`)."""
    folder = work() / "pipe12" / name
    if not folder.exists():
        shutil.copytree(pipeline_folder(), folder)
        edit(folder)
    return folder


def _index_with(**changes):
    return _replace("model_index.json", lambda f: {**json.loads((f / "model_index.json").read_text()), **changes})


def _scheduler_with(**changes):
    name = "scheduler/scheduler_config.json"
    return _replace(name, lambda f: {**json.loads((f / name).read_text()), **changes})


def _sampling_saved(**changes):
    def edit(f: Path) -> dict:
        index = json.loads((f / "model_index.json").read_text())
        index["_tinydit"]["sampling"].update(changes)
        return index
    return _replace("model_index.json", edit)


def _pipe_width_only():
    """height=None, width=24: the default height (32) beside width 24, or a clear refusal."""
    try:
        out = pipe_call(width=24, output_type="pil")
    except ValueError as e:
        if not re.match(r"(height|width): ", str(e)):
            raise
        return
    assert out.images[0].size == (24, 32), f"width=24 with the default height gave {out.images[0].size}"


def _pipe_sampler_none_is_default():
    a = pipe_call(seed=0, sampler=None).latents
    b = pipe_call(seed=0, sampler=book_pipe().sampling.sampler).latents
    assert torch.equal(a, b), "sampler=None is not the pipeline's default sampler"


def _pipe_numpy_seed_and_count():
    a = pipe_call(seed=np.int64(3), num_images_per_prompt=np.int32(2))
    b = pipe_call(seed=3, num_images_per_prompt=2)
    assert a.seeds == [3, 4] and torch.equal(a.latents, b.latents), f"numpy seed gave seeds {a.seeds}"


def _pipe_refuses_before_drawing_noise(**kw):
    """A request far beyond memory must be refused before the noise is drawn."""
    drawn = AssertionError("the noise was drawn before the request size was checked")
    with mock.patch.object(torch, "randn", side_effect=drawn):
        pipe_call(**kw)


def _pipe_enable_model_offload_twice():
    """A second enable_model_offload: the same images, or a refusal that says it is already on."""
    p = fresh_pipe()
    want = p("a red circle", seed=0, num_inference_steps=2, disable=True, output_type="latent").latents
    p.enable_model_offload("cpu")
    try:
        p.enable_model_offload("cpu")
    except ValueError as e:
        if "already" not in str(e):
            raise
    got = p("a red circle", seed=0, num_inference_steps=2, disable=True, output_type="latent").latents
    assert torch.equal(got, want), "model offload (enabled twice) changed the latents"


# --------------------------------------------------------------------------------------------
# The table: (id, callable, expected exception type(s), message regex); None, None = behaviour.
# --------------------------------------------------------------------------------------------

VE, TE = ValueError, TypeError
CASES = [
    # ---- tinydit.data -----------------------------------------------------------------------
    ("data.ShapesDataset.n_1e20", lambda: data.ShapesDataset(10**20), VE, r"^n: "),
    ("data.ShapesDataset.n_zero", lambda: data.ShapesDataset(0), VE, r"^n: "),
    ("data.ShapesDataset.n_negative", lambda: data.ShapesDataset(-5), VE, r"^n: "),
    ("data.ShapesDataset.n_float", lambda: data.ShapesDataset(2.5), TE, r"^n: "),
    ("data.ShapesDataset.n_str", lambda: data.ShapesDataset("10"), TE, r"^n: "),
    ("data.ShapesDataset.n_bool", lambda: data.ShapesDataset(True), TE, r"^n: "),
    ("data.ShapesDataset.size_huge", lambda: data.ShapesDataset(4, size=10**6), VE, r"^size\b.*memory"),
    ("data.ShapesDataset.size_tiny", lambda: data.ShapesDataset(4, size=4), VE, r"^size: "),
    ("data.ShapesDataset.size_float", lambda: data.ShapesDataset(4, size=32.0), TE, r"^size: "),
    ("data.ShapesDataset.split_unknown", lambda: data.ShapesDataset(4, split="val"), VE, r"^split: "),
    ("data.ShapesDataset.seed_negative", lambda: data.ShapesDataset(4, seed=-1), VE, r"^seed: "),
    ("data.ShapesDataset.seed_float", lambda: data.ShapesDataset(4, seed=1.5), TE, r"^seed: "),
    ("data.ShapesDataset.index_out_of_range", lambda: ds4()[10], IndexError, r"^index: "),
    ("data.ShapesDataset.index_float", lambda: ds4()[1.0], TE, r"^index: "),
    ("data.ShapesDataset.index_str", lambda: ds4()["0"], TE, r"^index: "),
    ("data.numpy_integers_are_numbers", _numpy_ints_are_numbers, None, None),
    ("data.image_grid.caption_none", lambda: data.image_grid(imgs(), captions=["a", None]), TE, r"^captions\[1\]: "),
    ("data.image_grid.captions_count", lambda: data.image_grid(imgs(), captions=["a"]), VE, r"^captions: "),
    ("data.image_grid.captions_str", lambda: data.image_grid(imgs(), captions="ab"), TE, r"^captions: "),
    ("data.image_grid.cols_float", lambda: data.image_grid(imgs(), cols=2.5), TE, r"^cols: "),
    ("data.image_grid.cols_zero", lambda: data.image_grid(imgs(), cols=0), VE, r"^cols: "),
    ("data.image_grid.scale_huge", lambda: data.image_grid(imgs(), scale=10**5), VE, r"^(images|scale)\b.*memory"),
    ("data.image_grid.path", lambda: data.image_grid("grid.png"), TE, r"^images: .*path"),
    ("data.image_grid.path_list", lambda: data.image_grid(["a.png", "b.png"]), TE, r"^images\[0\]: "),
    ("data.image_grid.numpy", lambda: data.image_grid(np.zeros((2, 8, 8, 3))), TE, r"^images: .*numpy"),
    ("data.image_grid.empty_list", lambda: data.image_grid([]), VE, r"^images: "),
    ("data.image_grid.one_channel", lambda: data.image_grid(torch.zeros(2, 1, 8, 8)), VE, r"^images: "),
    ("data.image_grid.nan_pixels", lambda: data.image_grid(with_value(imgs(), NAN)), VE, r"^(images|x): .*(NaN|finite)"),
    ("data.dataset_grid.n_zero", lambda: data.dataset_grid(ds4(), n=0), VE, r"^n: "),
    ("data.dataset_grid.n_float", lambda: data.dataset_grid(ds4(), n=2.0), TE, r"^n: "),
    ("data.dataset_grid.cols_none", lambda: data.dataset_grid(ds4(), cols=None), TE, r"^cols: "),
    ("data.dataset_grid.not_a_dataset", lambda: data.dataset_grid("abc"), TE, r"^ds: "),
    ("data.pil_to_tensor.path", lambda: data.pil_to_tensor("image.png"), TE, r"^img: "),
    ("data.tensor_to_pil.batch", lambda: data.tensor_to_pil(imgs()), VE, r"^x: "),
    ("emoji.find_emoji_font.missing", lambda: emoji.find_emoji_font("/no/such/font.ttf"), FileNotFoundError, r"font_path"),

    # ---- tinydit.vae: inputs ----------------------------------------------------------------
    ("vae.encode.uint8", lambda: tiny_vae().encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TE, r"^x: .*dtype"),
    ("vae.encode.float64_is_cast", _vae_dtype_behaviour(torch.float64), None, None),
    ("vae.encode.float16_is_cast", _vae_dtype_behaviour(torch.float16), None, None),
    ("vae.encode.batch_zero", lambda: tiny_vae().encode(torch.zeros(0, 3, 8, 8)), VE, r"^x: "),
    ("vae.encode.nan_pixel", lambda: tiny_vae().encode(with_value(image(), NAN)), VE, r"^x: .*NaN"),
    ("vae.encode.inf_pixel", lambda: tiny_vae().encode(with_value(image(), INF)), VE, r"^x: .*infinite"),
    ("vae.encode.three_dims", lambda: tiny_vae().encode(torch.zeros(3, 8, 8)), VE, r"^x: "),
    ("vae.encode.channels", lambda: tiny_vae().encode(torch.zeros(1, 4, 8, 8)), VE, r"^x: "),
    ("vae.encode.odd_side", lambda: tiny_vae().encode(torch.zeros(1, 3, 9, 8)), VE, r"^x: .*divisible"),
    ("vae.encode.0_255_range", lambda: tiny_vae().encode(torch.full((1, 3, 8, 8), 200.0)), VE, r"^x: .*0-255"),
    ("vae.encode.numpy", lambda: tiny_vae().encode(np.zeros((1, 3, 8, 8), np.float32)), TE, r"^x: "),
    ("vae.encode.list", lambda: tiny_vae().encode([[0.0]]), TE, r"^x: "),
    ("vae.decode.nan", lambda: tiny_vae().decode(with_value(latent(), NAN)), VE, r"^z: .*NaN"),
    ("vae.decode.channels", lambda: tiny_vae().decode(torch.zeros(1, 16, 4, 4)), VE, r"^z: "),
    ("vae.decode.batch_zero", lambda: tiny_vae().decode(torch.zeros(0, 4, 4, 4)), VE, r"^z: "),
    ("vae.decode.int", lambda: tiny_vae().decode(torch.zeros(1, 4, 4, 4, dtype=torch.int64)), TE, r"^z: "),
    ("vae.to_latent.nan", lambda: tiny_vae().to_latent(with_value(image(), NAN)), VE, r"^x: .*NaN"),
    ("vae.to_latent.batch_zero", lambda: tiny_vae().to_latent(torch.zeros(0, 3, 8, 8)), VE, r"^x: "),
    ("vae.from_latent.inf", lambda: tiny_vae().from_latent(with_value(latent(), -INF)), VE, r"^z: .*infinite"),
    ("vae.from_latent.nan", lambda: tiny_vae().from_latent(with_value(latent(), NAN)), VE, r"^z: .*NaN"),
    # ---- tinydit.vae: config ----------------------------------------------------------------
    ("vae.VAEConfig.groups_zero", lambda: vae.VAEConfig(norm_num_groups=0), VE, r"^norm_num_groups: "),
    ("vae.VAEConfig.latent_float", lambda: vae.VAEConfig(latent_channels=2.5), TE, r"^latent_channels: "),
    ("vae.VAEConfig.layers_str", lambda: vae.VAEConfig(layers_per_block="2"), TE, r"^layers_per_block: "),
    ("vae.VAEConfig.widths_indivisible", lambda: vae.VAEConfig(block_out_channels=(8, 12), norm_num_groups=8), VE, r"^block_out_channels: "),
    ("vae.VAEConfig.widths_int", lambda: vae.VAEConfig(block_out_channels=64), TE, r"^block_out_channels: "),
    ("vae.VAEConfig.widths_empty", lambda: vae.VAEConfig(block_out_channels=()), VE, r"^block_out_channels: "),
    ("vae.VAEConfig.scaling_nan", lambda: vae.VAEConfig(scaling_factor=NAN), VE, r"^scaling_factor: "),
    ("vae.VAEConfig.scaling_zero", lambda: vae.VAEConfig(scaling_factor=0), VE, r"^scaling_factor: "),
    ("vae.VAEConfig.shift_inf", lambda: vae.VAEConfig(shift_factor=INF), VE, r"^shift_factor: "),
    ("vae.VAEConfig.preset_unknown", lambda: vae.VAEConfig.preset("sd5"), VE, r"^(name|preset): "),
    # ---- tinydit.vae: loaders ---------------------------------------------------------------
    ("vae.from_pretrained.missing", lambda: vae.AutoencoderKL.from_pretrained(work() / "nope"), FileNotFoundError, r"^path_or_id: "),
    ("vae.from_pretrained.no_config", lambda: vae.AutoencoderKL.from_pretrained(Path(tempfile.mkdtemp(dir=work()))), FileNotFoundError, r"^path_or_id: .*config\.json"),
    ("vae.from_pretrained.config_unparsable", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("bad_json", "{not json")), VE, r"^path_or_id: .*config\.json"),
    ("vae.from_pretrained.config_list", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("list_json", "[1, 2]")), (VE, TE), r"^(path_or_id|config): .*(object|dict)"),
    ("vae.from_pretrained.config_str_ints", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("str_ints", {**tiny_vae().config.to_diffusers(), "layers_per_block": "1"})), TE, r"^layers_per_block: "),
    ("vae.from_pretrained.config_other_class", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("unet", {"_class_name": "UNet2DConditionModel"})), VE, r"^config: .*AutoencoderKL"),
    ("vae.from_pretrained.weights_empty", lambda: vae.AutoencoderKL.from_pretrained(vae_folder_raw_weights("empty_w", b"")), VE, r"^path: .*corrupt"),
    ("vae.from_pretrained.weights_truncated", lambda: vae.AutoencoderKL.from_pretrained(vae_folder_raw_weights("trunc_w", valid_safetensors_bytes()[:100])), VE, r"^path: .*corrupt"),
    ("vae.from_pretrained.weights_int8", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("int8", weights=vae_weights(lambda v: v.to(torch.int8)))), VE, r"safetensors: expected floating-point weights"),
    ("vae.from_pretrained.weights_int32", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("int32", weights=vae_weights(lambda v: v.to(torch.int32)))), VE, r"safetensors: expected floating-point weights"),
    ("vae.from_pretrained.weights_nan", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("nan", weights=vae_weights(lambda v: torch.full_like(v, NAN)))), VE, r"NaN or infinite"),
    ("vae.from_pretrained.weights_wrong_keys", lambda: vae.AutoencoderKL.from_pretrained(vae_folder("keys", weights={"x": torch.zeros(1)})), WeightsMismatchError, r"does not fit.*\n.*missing keys"),
    ("vae.from_single_file.empty_safetensors", lambda: single_file(corrupt("empty", ".safetensors")), VE, r"^path: .*corrupt"),
    ("vae.from_single_file.truncated_safetensors", lambda: single_file(corrupt("truncated", ".safetensors")), VE, r"^path: .*corrupt"),
    ("vae.from_single_file.garbage_safetensors", lambda: single_file(corrupt("garbage", ".safetensors")), VE, r"^path: .*corrupt"),
    ("vae.from_single_file.empty_ckpt", lambda: single_file(corrupt("empty", ".ckpt")), VE, r"^path: .*damaged"),
    ("vae.from_single_file.truncated_ckpt", lambda: single_file(corrupt("truncated", ".ckpt")), VE, r"^path: .*damaged"),
    ("vae.from_single_file.garbage_pt", lambda: single_file(corrupt("garbage", ".pt")), VE, r"^path: .*damaged"),
    ("vae.from_single_file.code_pickle", lambda: single_file(code_pickle()), VE, r"^path: .*refused"),
    ("vae.from_single_file.namespace_pickle", lambda: single_file(namespace_pickle()), VE, r"^path: .*refused"),
    ("vae.from_single_file.txt_suffix", lambda: single_file(_file("weights.txt", b"hello")), VE, r"^path: .*safetensors"),
    ("vae.from_single_file.missing", lambda: single_file(work() / "none.safetensors"), FileNotFoundError, r"^path: "),
    ("vae.from_single_file.wrong_preset", lambda: vae.AutoencoderKL.from_single_file(ldm_file("ok.safetensors"), preset="sdxl"), WeightsMismatchError, r"preset='sdxl'"),
    ("vae.from_single_file.unknown_preset", lambda: vae.AutoencoderKL.from_single_file(ldm_file("ok.safetensors"), preset="sd9"), VE, r"^preset: "),
    ("vae.from_single_file.int8", lambda: single_file(ldm_file("int8.safetensors", lambda v: v.to(torch.int8))), VE, r"expected floating-point weights"),
    ("vae.from_single_file.nan", lambda: single_file(ldm_file("nan.safetensors", lambda v: torch.full_like(v, NAN))), VE, r"NaN or infinite"),
    ("vae.loaders_return_eval_mode", _vae_loaders_return_eval_mode, None, None),
    ("vae.from_pretrained.fp16_weights_upcast", _vae_fp16_weights_load_as_float32, None, None),
    ("vae_training.train_book_vae.lr_nan", lambda: vae_training.train_book_vae(steps=1, batch_size=2, lr=NAN, n_images=4, disable=True), VE, r"^lr: "),
    ("vae_training.train_book_vae.steps_zero", lambda: vae_training.train_book_vae(steps=0, n_images=4, disable=True), VE, r"^steps: "),

    # ---- tinydit.embeddings -----------------------------------------------------------------
    ("embeddings.timestep_embedding.t_nan", lambda: embeddings.timestep_embedding(torch.tensor([1.0, NAN]), 8), VE, r"^t: "),
    ("embeddings.timestep_embedding.t_inf", lambda: embeddings.timestep_embedding(INF, 8), VE, r"^t: "),
    ("embeddings.timestep_embedding.t_2d", lambda: embeddings.timestep_embedding(torch.zeros(2, 2), 8), VE, r"^t: "),
    ("embeddings.timestep_embedding.t_str", lambda: embeddings.timestep_embedding("5", 8), (TE, VE), r"^t: "),
    ("embeddings.timestep_embedding.dim_zero", lambda: embeddings.timestep_embedding(torch.ones(2), 0), VE, r"^dim: "),
    ("embeddings.timestep_embedding.dim_float", lambda: embeddings.timestep_embedding(torch.ones(2), 8.0), TE, r"^dim: "),
    ("embeddings.timestep_embedding.max_period_nan", lambda: embeddings.timestep_embedding(torch.ones(2), 8, max_period=NAN), VE, r"^max_period: "),
    ("embeddings.timestep_embedding.shift_too_big", lambda: embeddings.timestep_embedding(torch.ones(2), 8, downscale_freq_shift=4), VE, r"^downscale_freq_shift: "),
    ("embeddings.timestep_embedding.scale_inf", lambda: embeddings.timestep_embedding(torch.ones(2), 8, scale=INF), VE, r"^scale: "),
    ("embeddings.TimestepEmbedder.hidden_zero", lambda: embeddings.TimestepEmbedder(0), VE, r"^hidden_size: "),
    ("embeddings.TimestepEmbedder.t_nan", lambda: embeddings.TimestepEmbedder(8, 16)(torch.tensor([NAN])), VE, r"^t: "),
    ("embeddings.sincos_pos_embed_2d.dim_not_4k", lambda: embeddings.sincos_pos_embed_2d(6, 4), VE, r"^embed_dim: "),
    ("embeddings.sincos_pos_embed_2d.grid_zero", lambda: embeddings.sincos_pos_embed_2d(8, 0), VE, r"^grid_size: "),
    ("embeddings.sincos_pos_embed_2d.grid_triple", lambda: embeddings.sincos_pos_embed_2d(8, (2, 2, 2)), VE, r"^grid_size: "),
    ("embeddings.sincos_pos_embed_2d.grid_float", lambda: embeddings.sincos_pos_embed_2d(8, 4.0), TE, r"^grid_size: "),
    ("embeddings.sincos_pos_embed_2d.scale_nan", lambda: embeddings.sincos_pos_embed_2d(8, 4, interpolation_scale=NAN), VE, r"^interpolation_scale: "),
    ("embeddings.sincos_pos_embed_2d.base_inf", lambda: embeddings.sincos_pos_embed_2d(8, 4, base_size=INF), VE, r"^base_size: "),
    ("embeddings.sincos_embed_1d.pos_nan", lambda: embeddings.sincos_embed_1d(8, torch.tensor([0.0, NAN])), VE, r"^pos: "),
    ("embeddings.rope_frequencies.pos_nan", lambda: embeddings.rope_frequencies(torch.tensor([0.0, NAN]), 8), VE, r"^pos: "),
    ("embeddings.rope_frequencies.dim_odd", lambda: embeddings.rope_frequencies(torch.arange(4), 5), VE, r"^dim: "),
    ("embeddings.rope_frequencies.theta_zero", lambda: embeddings.rope_frequencies(torch.arange(4), 8, theta=0), VE, r"^theta: "),
    ("embeddings.rope_2d.h_zero", lambda: embeddings.rope_2d(0, 2, 8), VE, r"^h: "),
    ("embeddings.rope_axial.ids_shape", lambda: embeddings.rope_axial(torch.zeros(4, 3), (4, 4)), VE, r"^ids: "),
    ("embeddings.apply_rope.int_x", lambda: embeddings.apply_rope(torch.zeros(4, 8, dtype=torch.long), *embeddings.rope_frequencies(torch.arange(4), 8)), TE, r"^x: "),
    ("embeddings.apply_rope.shapes", lambda: embeddings.apply_rope(torch.zeros(5, 8), *embeddings.rope_frequencies(torch.arange(4), 8)), VE, r"^x\b"),

    # ---- tinydit.schedules ------------------------------------------------------------------
    ("schedules.make_betas.name_unknown", lambda: schedules.make_betas("sigmoid"), VE, r"^name: "),
    ("schedules.make_betas.T_one", lambda: schedules.make_betas("linear", 1), VE, r"^num_train_timesteps: "),
    ("schedules.make_betas.T_float", lambda: schedules.make_betas("linear", 1000.0), TE, r"^num_train_timesteps: "),
    ("schedules.make_betas.T_huge", lambda: schedules.make_betas("linear", 10**13), VE, r"^num_train_timesteps\b"),
    ("schedules.make_betas.T_numpy", lambda: expect(schedules.make_betas("linear", np.int64(10)).shape == (10,), "numpy T refused"), None, None),
    ("schedules.make_betas.start_nan", lambda: schedules.make_betas("linear", beta_start=NAN), VE, r"^beta_start: "),
    ("schedules.make_betas.start_above_end", lambda: schedules.make_betas("linear", beta_start=0.1, beta_end=0.01), VE, r"^beta_start\b"),
    ("schedules.make_betas.end_one", lambda: schedules.make_betas("scaled_linear", beta_end=1.0), VE, r"^beta_start, beta_end: "),
    ("schedules.make_betas.cosine_with_range", lambda: schedules.make_betas("cosine", beta_start=0.1), VE, r"^beta_start\b"),
    ("schedules.alphas_cumprod.betas_above_one", lambda: schedules.alphas_cumprod(torch.tensor([0.5, 1.5])), VE, r"^betas: "),
    ("schedules.alphas_cumprod.betas_nan", lambda: schedules.alphas_cumprod(torch.tensor([0.5, NAN])), VE, r"^betas: "),
    ("schedules.karras_sigmas.rho_nan", lambda: schedules.karras_sigmas(10, 0.1, 10.0, rho=NAN), VE, r"^rho: "),
    ("schedules.karras_sigmas.rho_zero", lambda: schedules.karras_sigmas(10, 0.1, 10.0, rho=0), VE, r"^rho: "),
    ("schedules.karras_sigmas.sigma_max_inf", lambda: schedules.karras_sigmas(10, 0.1, INF), VE, r"^sigma_max: "),
    ("schedules.karras_sigmas.sigma_min_zero", lambda: schedules.karras_sigmas(10, 0.0, 10.0), VE, r"^sigma_min: "),
    ("schedules.karras_sigmas.min_above_max", lambda: schedules.karras_sigmas(10, 10.0, 0.1), VE, r"^sigma_min, sigma_max: "),
    ("schedules.karras_sigmas.n_zero", lambda: schedules.karras_sigmas(0, 0.1, 10.0), VE, r"^n: "),
    ("schedules.karras_sigmas.n_float", lambda: schedules.karras_sigmas(10.0, 0.1, 10.0), TE, r"^n: "),
    ("schedules.karras_sigmas.n_huge", lambda: schedules.karras_sigmas(10**13, 0.1, 10.0), VE, r"^n\b"),
    ("schedules.karras_sigmas.numpy_numbers", lambda: expect(len(schedules.karras_sigmas(np.int64(5), np.float32(0.1), np.float64(10))) == 6, "wrong length"), None, None),
    ("flow.flow_sigmas.shift_nan", lambda: flow.flow_sigmas(10, shift=NAN), VE, r"^shift: "),
    ("flow.flow_sigmas.shift_zero", lambda: flow.flow_sigmas(10, shift=0), VE, r"^shift: "),
    ("flow.flow_sigmas.shift_negative", lambda: flow.flow_sigmas(10, shift=-3.0), VE, r"^shift: "),
    ("flow.flow_sigmas.mu_nan", lambda: flow.flow_sigmas(10, mu=NAN), VE, r"^mu: "),
    ("flow.flow_sigmas.steps_zero", lambda: flow.flow_sigmas(0), VE, r"^num_inference_steps: "),
    ("flow.shift_sigmas.shift_inf", lambda: flow.shift_sigmas(torch.tensor([0.5]), INF), VE, r"^shift: "),
    ("flow.shift_sigmas.t_nan", lambda: flow.shift_sigmas(torch.tensor([NAN]), 3.0), VE, r"^t: "),
    ("flow.shift_sigmas.t_above_one", lambda: flow.shift_sigmas(torch.tensor([1.5]), 3.0), VE, r"^t: "),
    ("flow.time_shift_exponential.t_nan", lambda: flow.time_shift_exponential(torch.tensor([NAN]), 1.0), VE, r"^t: "),
    ("flow.time_shift_exponential.mu_inf", lambda: flow.time_shift_exponential(torch.tensor([0.5]), INF), VE, r"^mu: "),
    ("schedules.rescale_zero_terminal_snr.one_beta", lambda: schedules.rescale_zero_terminal_snr(torch.tensor([0.02])), VE, r"^betas: "),
    ("schedules.rescale_zero_terminal_snr.nan", lambda: schedules.rescale_zero_terminal_snr(torch.tensor([0.01, NAN, 0.02])), VE, r"^betas: "),
    ("schedules.rescale_zero_terminal_snr.zeros", lambda: schedules.rescale_zero_terminal_snr(torch.zeros(10)), VE, r"^betas: "),
    ("schedules.rescale_zero_terminal_snr.list", lambda: schedules.rescale_zero_terminal_snr([0.01, 0.02]), TE, r"^betas: "),
    ("schedules.rescale_zero_terminal_snr.int", lambda: schedules.rescale_zero_terminal_snr(torch.tensor([0, 1])), TE, r"^betas: "),
    ("schedules.add_noise.t_equals_T", lambda: schedules.add_noise(image(), 1000, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^t: "),
    ("schedules.add_noise.t_negative", lambda: schedules.add_noise(image(), torch.tensor([-1, 5]), schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^t: "),
    ("schedules.add_noise.t_fractional", lambda: schedules.add_noise(image(), 0.5, schedules.alphas_cumprod(schedules.make_betas("linear"))), (VE, TE), r"^t: "),
    ("schedules.add_noise.t_bool", lambda: schedules.add_noise(image(), True, schedules.alphas_cumprod(schedules.make_betas("linear"))), (VE, TE), r"^t: "),
    ("schedules.add_noise.t_batch", lambda: schedules.add_noise(image(2), torch.tensor([1, 2, 3]), schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^t: "),
    ("schedules.add_noise.x0_nan", lambda: schedules.add_noise(with_value(image(), NAN), 5, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^x0: "),
    ("schedules.add_noise.x0_int", lambda: schedules.add_noise(torch.zeros(2, 3, dtype=torch.long), 5, schedules.alphas_cumprod(schedules.make_betas("linear"))), TE, r"^x0: "),
    ("schedules.add_noise.noise_shape", lambda: schedules.add_noise(image(), 5, schedules.alphas_cumprod(schedules.make_betas("linear")), noise=torch.zeros(3)), VE, r"^noise: "),
    ("schedules.add_noise.noise_nan", lambda: schedules.add_noise(image(), 5, schedules.alphas_cumprod(schedules.make_betas("linear")), noise=with_value(image(), NAN)), VE, r"^noise: "),
    ("flow.flow_add_noise.t_above_one", lambda: flow.flow_add_noise(image(), 1.5), VE, r"^t: "),
    ("flow.flow_add_noise.t_nan", lambda: flow.flow_add_noise(image(), NAN), VE, r"^t: "),
    ("flow.flow_add_noise.x0_nan", lambda: flow.flow_add_noise(with_value(image(), NAN), 0.5), VE, r"^x0: "),
    ("schedules.t_to_sigma.t_equals_T", lambda: schedules.t_to_sigma(1000, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^t: "),
    ("schedules.t_to_sigma.t_nan", lambda: schedules.t_to_sigma(NAN, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^t: "),
    ("schedules.sigma_to_t.sigma_nan", lambda: schedules.sigma_to_t(NAN, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^sigma: "),
    ("schedules.sigma_to_t.sigma_negative", lambda: schedules.sigma_to_t(-1.0, schedules.alphas_cumprod(schedules.make_betas("linear"))), VE, r"^sigma: "),
    ("schedules.timestep_spacing.offset_past_T", lambda: schedules.timestep_spacing(10, 1000, "leading", steps_offset=200), VE, r"^steps_offset: "),
    ("schedules.timestep_spacing.offset_negative", lambda: schedules.timestep_spacing(10, 1000, "leading", steps_offset=-1), VE, r"^steps_offset: "),
    ("schedules.timestep_spacing.offset_float", lambda: schedules.timestep_spacing(10, 1000, "leading", steps_offset=1.5), TE, r"^steps_offset: "),
    ("schedules.timestep_spacing.steps_above_T", lambda: schedules.timestep_spacing(2000, 1000), VE, r"^num_inference_steps: "),
    ("schedules.timestep_spacing.spacing_unknown", lambda: schedules.timestep_spacing(10, spacing="karras"), VE, r"^spacing: "),
    ("schedules.discrete_sigmas.offset_past_T", lambda: schedules.discrete_sigmas(schedules.alphas_cumprod(schedules.make_betas("linear")), 10, "leading", steps_offset=500), VE, r"^steps_offset: "),
    ("schedules.discrete_sigmas.rho_nan", lambda: schedules.discrete_sigmas(schedules.alphas_cumprod(schedules.make_betas("linear")), 10, karras=True, rho=NAN), VE, r"^rho: "),
    ("flow.logit_normal_timesteps.std_zero", lambda: flow.logit_normal_timesteps(5, std=0), VE, r"^std: "),
    ("schedules.min_snr_weights.gamma_nan", lambda: schedules.min_snr_weights(torch.ones(3), gamma=NAN), VE, r"^gamma: "),
    ("schedules.min_snr_weights.prediction_type", lambda: schedules.min_snr_weights(torch.ones(3), prediction_type="x0"), VE, r"^prediction_type: "),

    # ---- tinydit.attention ------------------------------------------------------------------
    ("attention.additive_float_mask", lambda: attention.attention(*qkv(), mask=torch.zeros(2, 4).masked_fill(~KEEP, -INF)), (VE, TE), r"^mask: "),
    ("attention.float_ones_mask", lambda: attention.attention(*qkv(), mask=torch.ones(2, 4)), (VE, TE), r"^mask: "),
    ("attention.float_mask_math_backend", lambda: attention.attention(*qkv(), mask=torch.zeros(2, 3, 4), backend="math"), (VE, TE), r"^mask: "),
    ("attention.3d_mask_per_batch", _attention_3d_mask_is_per_batch, None, None),
    ("attention.2d_mask_means_attend", _attention_2d_mask_means_attend, None, None),
    ("attention.mask_shape", lambda: attention.attention(*qkv(), mask=torch.ones(3, 4, dtype=torch.bool)), VE, r"^mask: "),
    ("attention.mask_row_all_false", lambda: attention.attention(*qkv(), mask=torch.tensor([[True] * 4, [False] * 4])), VE, r"^mask: "),
    ("attention.q_3d", lambda: attention.attention(torch.zeros(2, 3, 8), *qkv()[1:]), VE, r"^q: "),
    ("attention.head_dim_mismatch", lambda: attention.attention(qkv(d=8)[0], *qkv(d=4)[1:]), VE, r"^q, k, v: "),
    ("attention.dtype_mismatch", lambda: attention.attention(qkv()[0].double(), *qkv()[1:]), (VE, TE), r"^q, k, v\b|^q: "),
    ("attention.backend_unknown", lambda: attention.attention(*qkv(), backend="cuda"), VE, r"^backend: "),
    ("attention.flash_on_cpu", lambda: attention.attention(*qkv(), backend="flash"), VE, r"^backend: "),
    ("attention.attention_weights.float_mask", lambda: attention.attention_weights(*qkv()[:2], mask=torch.zeros(2, 4)), (VE, TE), r"^mask: "),
    ("attention.Attention.heads_zero", lambda: attention.Attention(32, 0), VE, r"^num_heads: "),
    ("attention.Attention.heads_indivisible", lambda: attention.Attention(32, 3), VE, r"^num_heads: "),
    ("attention.Attention.heads_float", lambda: attention.Attention(32, 2.0), TE, r"^num_heads: "),
    ("attention.Attention.float_mask", lambda: attention.Attention(16, 2)(torch.zeros(2, 4, 16), mask=torch.zeros(2, 4)), (VE, TE), r"^mask: "),

    # ---- tinydit.dit: config ----------------------------------------------------------------
    ("dit.DiTConfig.heads_zero", lambda: dit.DiTConfig(**{**TINY_DIT, "num_heads": 0}), VE, r"^num_heads: "),
    ("dit.DiTConfig.heads_indivisible", lambda: dit.DiTConfig(**{**TINY_DIT, "num_heads": 3}), VE, r"^num_heads: "),
    ("dit.DiTConfig.mlp_ratio_negative", lambda: dit.DiTConfig(**{**TINY_DIT, "mlp_ratio": -1.0}), VE, r"^mlp_ratio: "),
    ("dit.DiTConfig.mlp_ratio_nan", lambda: dit.DiTConfig(**{**TINY_DIT, "mlp_ratio": NAN}), VE, r"^mlp_ratio: "),
    ("dit.DiTConfig.depth_str", lambda: dit.DiTConfig(**{**TINY_DIT, "depth": "2"}), TE, r"^depth: "),
    ("dit.DiTConfig.hidden_float", lambda: dit.DiTConfig(**{**TINY_DIT, "hidden_size": 32.0}), TE, r"^hidden_size: "),
    ("dit.DiTConfig.numpy_ints", _dit_numpy_int_config, None, None),
    ("dit.DiTConfig.input_not_multiple", lambda: dit.DiTConfig(**{**TINY_DIT, "input_size": 9}), VE, r"^input_size: "),
    ("dit.DiTConfig.classes_zero", lambda: dit.DiTConfig(**{**TINY_DIT, "num_classes": 0}), VE, r"^num_classes: "),
    ("dit.DiTConfig.dropout_above_one", lambda: dit.DiTConfig(**{**TINY_DIT, "class_dropout_prob": 1.5}), VE, r"^class_dropout_prob: "),
    ("dit.DiTConfig.backend_unknown", lambda: dit.DiTConfig(**{**TINY_DIT, "attn_backend": "xformers"}), VE, r"^attn_backend: "),
    ("dit.DiTConfig.qk_norm_str", lambda: dit.DiTConfig(**{**TINY_DIT, "qk_norm": "false"}), TE, r"^qk_norm: "),
    ("dit.DiTConfig.learn_sigma_str", lambda: dit.DiTConfig(**{**TINY_DIT, "learn_sigma": "False"}), TE, r"^learn_sigma: "),
    ("dit.DiTConfig.preset_unknown", lambda: dit.DiTConfig.preset("DiT-XXL/2"), VE, r"^name: "),
    ("dit.DiTConfig.preset_override_zero", lambda: dit.DiTConfig.preset("book", depth=0), VE, r"^depth: "),
    ("dit.DiTConfig.preset_override_unknown", lambda: dit.DiTConfig.preset("book", heads=4), TE, r"heads"),
    ("dit.DiT.config_str", lambda: dit.DiT("DiT-XL/2"), TE, r"^config: "),
    # ---- tinydit.dit: forward ---------------------------------------------------------------
    ("dit.forward.t_nan", lambda: dit_call(t=torch.tensor([NAN, 1.0])), VE, r"^t: "),
    ("dit.forward.t_inf", lambda: dit_call(t=INF), VE, r"^t: "),
    ("dit.forward.t_bool", lambda: dit_call(t=torch.tensor([True, False])), TE, r"^t: "),
    ("dit.forward.t_str", lambda: dit_call(t="10"), (TE, VE), r"^t: "),
    ("dit.forward.t_batch", lambda: dit_call(t=torch.tensor([1, 2, 3])), VE, r"^t: "),
    ("dit.forward.x_nan", lambda: dit_call(x=with_value(latent(), NAN)), VE, r"^x: "),
    ("dit.forward.y_bool", lambda: dit_call(y=torch.tensor([True, False])), (TE, VE), r"^y: "),
    ("dit.forward.y_float", lambda: dit_call(y=torch.tensor([1.0, 2.0])), (TE, VE), r"^y: "),
    ("dit.forward.y_too_big", lambda: dit_call(y=torch.tensor([0, 99])), VE, r"^y: "),
    ("dit.forward.y_negative", lambda: dit_call(y=torch.tensor([-1, 0])), VE, r"^y: "),
    ("dit.forward.batch_zero", lambda: dit_call(x=torch.zeros(0, 4, 8, 8), t=torch.zeros(0)), VE, r"^x: "),
    ("dit.forward.float64", _dit_float64_input, None, None),
    ("dit.forward.x_int", lambda: dit_call(x=torch.zeros(2, 4, 8, 8, dtype=torch.long)), TE, r"^x: "),
    ("dit.forward.x_channels", lambda: dit_call(x=torch.zeros(2, 3, 8, 8)), VE, r"^x: "),
    ("dit.forward.x_too_large", lambda: dit_call(x=torch.zeros(2, 4, 16, 16)), VE, r"^x: "),
    ("dit.forward.x_odd", lambda: dit_call(x=torch.zeros(2, 4, 7, 8)), VE, r"^x: "),
    # ---- tinydit.dit: loaders ---------------------------------------------------------------
    ("dit.from_original.heads_not_stored_book", lambda: dit.DiT.from_original(dit_book_file()), VE, r"^num_heads: "),
    ("dit.from_original.heads_not_stored_tiny", lambda: dit.DiT.from_original(dit_original_file()), VE, r"^num_heads: "),
    ("dit.from_original.heads_indivisible", lambda: dit.DiT.from_original(dit_original_file(), num_heads=3), VE, r"^num_heads: "),
    ("dit.from_original.heads_zero", lambda: dit.DiT.from_original(dit_original_file(), num_heads=0), VE, r"^num_heads: "),
    ("dit.from_original.heads_float", lambda: dit.DiT.from_original(dit_original_file(), num_heads=2.0), TE, r"^num_heads: "),
    ("dit.from_original.eval_and_equal", _dit_from_original_behaves, None, None),
    ("dit.from_original.truncated_pt", lambda: dit.DiT.from_original(corrupt("truncated", ".pt"), num_heads=2), VE, r"^path: .*damaged"),
    ("dit.from_original.empty_safetensors", lambda: dit.DiT.from_original(corrupt("empty", ".safetensors"), num_heads=2), VE, r"^path: .*corrupt"),
    ("dit.from_original.code_pickle", lambda: dit.DiT.from_original(code_pickle(), num_heads=2), VE, r"^path: .*refused"),
    ("dit.from_original.int8", lambda: dit.DiT.from_original(dit_weights_file("int8.safetensors", lambda v: v.to(torch.int8)), num_heads=2), VE, r"expected floating-point weights"),
    ("dit.from_original.bf16_weights_upcast", _dit_bf16_weights_load_as_float32, None, None),
    ("dit.from_original.nan", lambda: dit.DiT.from_original(dit_weights_file("nan.safetensors", lambda v: torch.full_like(v, NAN)), num_heads=2), VE, r"NaN or infinite"),
    ("dit.from_original.not_a_dit", lambda: dit.DiT.from_original(ldm_file("ok.safetensors"), num_heads=2), VE, r"^(path|checkpoint): .*not a DiT"),
    ("dit.from_pretrained.eval_and_equal", _dit_from_pretrained_behaves, None, None),
    ("dit.from_pretrained.config_unparsable", lambda: dit.DiT.from_pretrained(dit_config_folder("bad_json", "{oops")), VE, r"^path_or_id: .*config\.json"),
    ("dit.from_pretrained.config_list", lambda: dit.DiT.from_pretrained(dit_config_folder("list_json", "[1]")), (VE, TE), r"^path_or_id: .*config\.json"),
    ("dit.from_pretrained.config_binary", lambda: dit.DiT.from_pretrained(dit_config_folder("bin_json", b"\xff\xfe{\x00")), VE, r"^path_or_id: .*config\.json"),
    ("dit.from_pretrained.no_num_attention_heads", lambda: dit.DiT.from_pretrained(dit_config_folder("no_heads", diffusers_dit_config(num_attention_heads=None))), VE, r"^(config|path_or_id)\b.*num_attention_heads"),
    ("dit.from_pretrained.diffusers_layers_float", lambda: dit.DiT.from_pretrained(dit_config_folder("layers_float", diffusers_dit_config(num_layers=2.5))), TE, r"^(depth|num_layers|config\.num_layers): "),
    ("dit.from_pretrained.diffusers_heads_str", lambda: dit.DiT.from_pretrained(dit_config_folder("heads_str", diffusers_dit_config(num_attention_heads="2"))), TE, r"num_attention_heads: "),
    ("dit.from_pretrained.tinydit_heads_zero", lambda: dit.DiT.from_pretrained(dit_config_folder("heads_zero", tinydit_config(num_heads=0))), VE, r"^num_heads: "),
    ("dit.from_pretrained.tinydit_depth_str", lambda: dit.DiT.from_pretrained(dit_config_folder("depth_str", tinydit_config(depth="2"))), TE, r"^depth: "),
    ("dit.from_pretrained.tinydit_unknown_field", lambda: dit.DiT.from_pretrained(dit_config_folder("unknown_field", tinydit_config(heads=2))), VE, r"^config: .*heads"),
    ("dit.from_pretrained.vae_folder", lambda: dit.DiT.from_pretrained(vae_folder("ok")), VE, r"^path_or_id: "),
    ("dit.from_pretrained.empty_folder", lambda: dit.DiT.from_pretrained(Path(tempfile.mkdtemp(dir=work()))), FileNotFoundError, r"^path_or_id: "),
    ("dit.from_pretrained.weights_truncated", lambda: dit.DiT.from_pretrained(dit_config_folder("trunc_w", tinydit_config(), weights=valid_safetensors_bytes()[:100])), VE, r"^path: .*corrupt"),

    # ---- tinydit.textdit ----------------------------------------------------------------------
    ("textdit.forward.additive_float_mask", lambda: textdit_call(context_mask=ADDITIVE), (TE, VE), r"^context_mask: "),
    ("textdit.forward.float_ones_mask", lambda: textdit_call(context_mask=KEEP.float()), (TE, VE), r"^context_mask: "),
    ("textdit.forward.bool_mask_means_attend", _textdit_bool_mask_means_attend, None, None),
    ("textdit.forward.int_mask_equals_bool", _textdit_int_mask_equals_bool, None, None),
    ("textdit.forward.int_mask_values", lambda: textdit_call(context_mask=KEEP.long() * 2), VE, r"^context_mask: "),
    ("textdit.forward.mask_shape", lambda: textdit_call(context_mask=KEEP[:, :3]), VE, r"^context_mask: "),
    ("textdit.forward.mask_row_all_padding", lambda: textdit_call(context_mask=torch.tensor([[True] * 4, [False] * 4])), VE, r"^context_mask: "),
    ("textdit.forward.mask_without_context", lambda: tiny_textdit()(latent(2), 5, context=None, context_mask=KEEP), VE, r"^context_mask: "),
    ("textdit.forward.context_width", lambda: textdit_call(context=ctx(d=24)), VE, r"^context: .*width"),
    ("textdit.forward.context_batch", lambda: textdit_call(context=ctx(b=3)), VE, r"^context: "),
    ("textdit.forward.context_2d", lambda: textdit_call(context=torch.zeros(2, 16)), VE, r"^context: "),
    ("textdit.forward.context_nan", lambda: textdit_call(context=with_value(ctx(), NAN)), VE, r"^context: "),
    ("textdit.forward.context_none_no_null", lambda: tiny_textdit()(latent(2), 5), VE, r"^context: "),
    ("textdit.forward.embeddings_float_mask", lambda: textdit_call(context=text.TextEmbeddings(ctx(), ADDITIVE)), (TE, VE), r"^mask: "),
    ("textdit.forward.t_nan", lambda: textdit_call(t=torch.tensor([NAN, 1.0])), VE, r"^t: "),
    ("textdit.forward.t_bool", lambda: textdit_call(t=torch.tensor([True, True])), TE, r"^t: "),
    ("textdit.forward.x_nan", lambda: textdit_call(x=with_value(latent(), NAN)), VE, r"^x: "),
    ("textdit.forward.batch_zero", lambda: tiny_textdit()(torch.zeros(0, 4, 8, 8), torch.zeros(0), context=torch.zeros(0, 4, 16)), VE, r"^x: "),
    ("textdit.forward.float64", _textdit_float64_input, None, None),
    ("textdit.forward.pooled_unexpected", lambda: textdit_call(pooled=torch.zeros(2, 8)), VE, r"^pooled: "),
    ("textdit.forward.micro_unexpected", lambda: textdit_call(resolution=[[64.0, 64.0]]), VE, r"^resolution"),
    ("textdit.TextDiTConfig.context_zero", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "context_dim": 0}), VE, r"^context_dim: "),
    ("textdit.TextDiTConfig.context_float", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "context_dim": 16.0}), TE, r"^context_dim: "),
    ("textdit.TextDiTConfig.modulation", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "modulation": "film"}), VE, r"^modulation: "),
    ("textdit.TextDiTConfig.heads_zero", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "num_heads": 0}), VE, r"^num_heads: "),
    ("textdit.TextDiTConfig.micro_width", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "micro_conditions": True}), VE, r"^micro_conditions: "),
    ("textdit.TextDiTConfig.interp_nan", lambda: textdit.TextDiTConfig(**{**TINY_TEXTDIT, "interpolation_scale": NAN}), VE, r"^interpolation_scale: "),
    ("textdit.TextDiT.dit_config", lambda: textdit.TextDiT(dit.DiTConfig(**TINY_DIT)), TE, r"^config: "),
    ("textdit.loaders.eval_and_equal", _textdit_loaders_behave, None, None),
    ("textdit.from_original.heads_not_stored", lambda: textdit.TextDiT.from_original(pixart_original_file()), VE, r"^num_heads: "),
    ("textdit.from_original.nan", lambda: textdit.TextDiT.from_original(pixart_weights_file("nan.safetensors", lambda v: torch.full_like(v, NAN)), num_heads=2), VE, r"NaN or infinite"),
    ("textdit.from_original.int32", lambda: textdit.TextDiT.from_original(pixart_weights_file("int32.safetensors", lambda v: v.to(torch.int32)), num_heads=2), VE, r"expected floating-point weights"),
    ("textdit.from_original.dit_file", lambda: textdit.TextDiT.from_original(dit_original_file(), num_heads=2), VE, r"^path: "),
    ("textdit.load_transformer.heads_not_stored", lambda: textdit.load_transformer(pixart_original_file()), VE, r"^num_heads: "),
    ("textdit.load_transformer.dit_heads_not_stored", lambda: textdit.load_transformer(dit_original_file()), VE, r"^num_heads: "),
    ("textdit.load_transformer.behaves", _load_transformer_behaves, None, None),
    ("textdit.load_transformer.garbage_pt", lambda: textdit.load_transformer(corrupt("garbage", ".pt")), VE, r"^path: .*damaged"),
    ("textdit.load_transformer.empty_ckpt", lambda: textdit.load_transformer(corrupt("empty", ".ckpt")), VE, r"^path: .*damaged"),
    ("textdit.load_transformer.truncated_safetensors", lambda: textdit.load_transformer(corrupt("truncated", ".safetensors")), VE, r"^path: .*corrupt"),
    ("textdit.load_transformer.code_pickle", lambda: textdit.load_transformer(code_pickle()), VE, r"^path: .*refused"),
    ("textdit.load_transformer.txt_file", lambda: textdit.load_transformer(_file("junk.txt", b"junk")), VE, r"^path: "),
    ("textdit.load_transformer.vae_file", lambda: textdit.load_transformer(ldm_file("ok.safetensors"), num_heads=2), VE, r"^(path|checkpoint): .*not a DiT"),
    ("textdit.load_transformer.missing", lambda: textdit.load_transformer(work() / "no_such_model"), FileNotFoundError, r"^path_or_id: "),
    ("textdit.load_transformer.config_junk", lambda: textdit.load_transformer(dit_config_folder("junk_json", "junk")), VE, r"^path_or_id: .*config\.json"),
    ("textdit.load_transformer.config_unet", lambda: textdit.load_transformer(dit_config_folder("unet_json", {"_class_name": "UNet2DConditionModel"})), VE, r"^path_or_id: "),
    ("textdit.load_transformer.file_with_subfolder", lambda: textdit.load_transformer(dit_original_file(), subfolder="transformer"), VE, r"^subfolder: "),
    ("textdit.load_transformer.folder_with_heads", lambda: textdit.load_transformer(dit_folder(), num_heads=2), VE, r"^num_heads: "),

    # ---- tinydit.text -----------------------------------------------------------------------
    ("text.TextEmbeddings.additive_float_mask", lambda: text.TextEmbeddings(torch.zeros(2, 4, 8), ADDITIVE), TE, r"^mask: "),
    ("text.TextEmbeddings.float_ones_mask", lambda: text.TextEmbeddings(torch.zeros(2, 4, 8), KEEP.float()), TE, r"^mask: "),
    ("text.TextEmbeddings.int_mask_values", lambda: text.TextEmbeddings(torch.zeros(2, 4, 8), KEEP.long() * 2), VE, r"^mask: "),
    ("text.TextEmbeddings.int_mask_is_converted", _text_embeddings_int_mask, None, None),
    ("text.TextEmbeddings.mask_shape", lambda: text.TextEmbeddings(torch.zeros(2, 4, 8), KEEP[:, :3]), VE, r"^tokens, mask: "),
    ("text.TextEmbeddings.tokens_list", lambda: text.TextEmbeddings([[0.0]], KEEP), TE, r"^tokens: "),
    ("text.TextEmbeddings.pooled_batch", lambda: text.TextEmbeddings(torch.zeros(2, 4, 8), KEEP, torch.zeros(3, 8)), VE, r"^pooled: "),
    ("text.CLIPTextEncoder.from_pretrained.eval_and_equal", _clip_loads_strictly_and_in_eval_mode, None, None),
    ("text.CLIPTextEncoder.from_pretrained.keys_do_not_fit", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder("renamed", rename=lambda k: k.replace("text_model.", "txt_model."))), WeightsMismatchError, r"^CLIPTextEncoder: .*does not fit"),
    ("text.CLIPTextEncoder.from_pretrained.plain_model_keys_do_not_fit", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder("plain_renamed", model=tiny_clip_model(projection=False), rename=lambda k: k.replace("embeddings.", "embedding."))), WeightsMismatchError, r"^CLIPTextEncoder: .*does not fit CLIPTextModel\b"),
    ("text.CLIPTextEncoder.from_pretrained.keys_missing", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder("dropped", weights_transform=lambda sd: {k: v for k, v in sd.items() if "layers.0.mlp" not in k})), WeightsMismatchError, r"^CLIPTextEncoder: .*does not fit"),
    ("text.CLIPTextEncoder.from_pretrained.shapes_do_not_fit", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder_with_other_config()), WeightsMismatchError, r"^CLIPTextEncoder: .*does not fit"),
    ("text.CLIPTextEncoder.from_pretrained.t5_folder", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder_holding_t5()), (WeightsMismatchError, VE), r"^CLIPTextEncoder: "),
    ("text.CLIPTextEncoder.from_pretrained.nan_weights", lambda: text.CLIPTextEncoder.from_pretrained(clip_folder("nan_w", weights_transform=lambda sd: {k: torch.full_like(v, NAN) if "embeddings" in k and v.is_floating_point() else v for k, v in sd.items()})), VE, r"^CLIPTextEncoder: .*NaN"),
    ("text.CLIPTextEncoder.from_pretrained.truncated_weights", lambda: text.CLIPTextEncoder.from_pretrained(corrupt_clip_folder()), (VE, OSError), r"^(CLIPTextEncoder|path_or_id|path): .*(corrupt|damaged|truncated)"),
    ("text.CLIPTextEncoder.from_pretrained.missing", lambda: text.CLIPTextEncoder.from_pretrained(work() / "no_clip_here"), OSError, r"^(CLIPTextEncoder: )?path_or_id: "),
    ("text.CLIPTextEncoder.layer_unknown", lambda: text.CLIPTextEncoder(tiny_clip_model(), book_tok(), layer="middle"), VE, r"^layer: "),
    ("text.CLIPTextEncoder.max_length_too_big", lambda: text.CLIPTextEncoder(tiny_clip_model(), book_tok(), max_length=1000), VE, r"^max_length: "),
    ("text.CLIPTextEncoder.max_length_float", lambda: text.CLIPTextEncoder(tiny_clip_model(), book_tok(), max_length=8.0), TE, r"^max_length: "),
    ("text.CLIPTextEncoder.pooled_unknown", lambda: text.CLIPTextEncoder(tiny_clip_model(), book_tok(), pooled="mean"), VE, r"^pooled: "),
    ("text.encode.dict_prompts", lambda: clip_encoder().encode({"a red circle": 1}), (VE, TE), r"^prompts: "),
    ("text.encode.empty_list", lambda: clip_encoder().encode([]), VE, r"^prompts: "),
    ("text.encode.none_prompt", lambda: clip_encoder().encode(["a", None]), (VE, TE), r"^prompts\[1\]: "),
    ("text.T5TextEncoder.from_pretrained.keys_do_not_fit", lambda: text.T5TextEncoder.from_pretrained(t5_folder("renamed", rename=lambda k: k.replace("encoder.", "enc."))), WeightsMismatchError, r"^T5TextEncoder: .*does not fit"),
    ("text.T5TextEncoder.max_length_zero", lambda: text.T5TextEncoder(*tiny_t5(), max_length=0), VE, r"^max_length: "),
    ("dual_encoder.DualTextEncoder.offload_unknown", lambda: dual_encoder.DualTextEncoder(clip_encoder(), text.T5TextEncoder(*tiny_t5()), offload="gpu"), VE, r"^offload: "),
    ("dual_encoder.DualTextEncoder.width_too_small", lambda: dual_encoder.DualTextEncoder(clip_encoder(), None, width=8, offload=None), VE, r"^width: "),
    ("dual_encoder.DualTextEncoder.width_float", lambda: dual_encoder.DualTextEncoder(clip_encoder(), None, width=64.0, offload=None), TE, r"^width: "),
    ("dual_encoder.DualTextEncoder.cache_negative", lambda: dual_encoder.DualTextEncoder(clip_encoder(), None, cache_size=-1, offload=None), VE, r"^cache_size: "),
    ("dual_encoder.DualTextEncoder.disk_offload_cleans_up", _dual_disk_offload_cleans_up_and_leaves_callers_t5_usable, None, None),
    ("text_training.train_book_text_encoder.lr_nan", lambda: text_training.train_book_text_encoder(steps=1, batch_size=2, n_train=4, lr=NAN, disable=True), VE, r"^lr: "),
    ("text_training.train_book_text_encoder.batch_above_n", lambda: text_training.train_book_text_encoder(steps=1, batch_size=8, n_train=4, disable=True), VE, r"^batch_size: "),

    # ---- CLI ----------------------------------------------------------------------------------
    ("cli.dataset.size_huge", lambda: cli_main("dataset", "--size", "100000", "--out", work() / "g.png"), CliRefused, one_line("--size")),
    ("cli.dataset.scale_huge", lambda: cli_main("dataset", "--scale", "100000", "--out", work() / "g.png"), CliRefused, one_line("--scale")),
    ("cli.dataset.n_huge", lambda: cli_main("dataset", "--n", "1000000000", "--out", work() / "g.png"), CliRefused, one_line("--n")),
    ("cli.dataset.n_zero", lambda: cli_main("dataset", "--n", "0", "--out", work() / "g.png"), CliRefused, one_line("--n")),
    ("cli.dataset.n_text", lambda: cli_main("dataset", "--n", "abc", "--out", work() / "g.png"), CliRefused, one_line("--n")),
    ("cli.dataset.seed_overflow", lambda: cli_main("dataset", "--seed", str(2**70), "--out", work() / "g.png"), CliRefused, one_line("--seed")),
    ("cli.dataset.seed_negative", lambda: cli_main("dataset", "--seed", "-1", "--out", work() / "g.png"), CliRefused, one_line("--seed")),
    ("cli.dataset.grid_too_big", lambda: cli_main("dataset", "--n", "4096", "--size", "1024", "--out", work() / "g.png"), CliRefused, one_line("--size")),
    ("cli.dataset.split_unknown", lambda: cli_main("dataset", "--split", "val", "--out", work() / "g.png"), CliRefused, one_line("--split")),
    ("cli.dataset.dataset_unknown", lambda: cli_main("dataset", "--dataset", "mnist", "--out", work() / "g.png"), CliRefused, one_line("--dataset")),
    ("cli.dataset.out_txt", lambda: cli_main("dataset", "--n", "2", "--out", work() / "grid.txt"), CliRefused, one_line("--out")),
    ("cli.dataset.out_folder", lambda: cli_main("dataset", "--n", "2", "--out", work()), CliRefused, one_line("--out")),
    ("cli.dataset.out_unwritable", lambda: cli_main("dataset", "--n", "2", "--out", unwritable("grid.png")), CliRefused, one_line("--out")),
    ("cli.dataset.unknown_flag", lambda: cli_main("dataset", "--bogus"), CliRefused, one_line("--bogus")),
    ("cli.unknown_command", lambda: cli_main("paint"), CliRefused, one_line("paint")),
    ("cli.no_command", lambda: cli_main(), CliRefused, r"^exit=2 lines=1 .*error: "),
    ("cli.train_vae.out_unwritable", lambda: cli_main("train-vae", "--steps", "1", "--out", unwritable("vae")), CliRefused, one_line("--out")),
    ("cli.train_vae.steps_zero", lambda: cli_main("train-vae", "--steps", "0"), CliRefused, one_line("--steps")),
    ("cli.train_vae.batch_huge", lambda: cli_main("train-vae", "--batch-size", "1000000"), CliRefused, one_line("--batch-size")),
    ("cli.train_vae.seed_overflow", lambda: cli_main("train-vae", "--seed", str(2**64)), CliRefused, one_line("--seed")),
    ("cli.train_text_encoder.out_unwritable", lambda: cli_main("train-text-encoder", "--steps", "1", "--out", unwritable("enc")), CliRefused, one_line("--out")),
    ("cli.train_text_encoder.batch_zero", lambda: cli_main("train-text-encoder", "--batch-size", "0"), CliRefused, one_line("--batch-size")),
    ("cli.train_text_encoder.steps_negative", lambda: cli_main("train-text-encoder", "--steps", "-3"), CliRefused, one_line("--steps")),
    ("cli.process.dataset_size_huge", lambda: cli_process("dataset", "--size", "100000"), CliRefused, one_line("--size")),
    ("cli.process.train_vae_out_unwritable", lambda: cli_process("train-vae", "--steps", "1", "--out", unwritable("vae")), CliRefused, one_line("--out")),

    # ---- chapter 09: training and evaluation (tinydit.train, tinydit.evaluate, the CLI) ------
    ("train.TrainConfig.hidden_zero", lambda: train.TrainConfig(hidden_size=0), VE, r"^hidden_size: "),
    ("train.TrainConfig.hidden_bool", lambda: train.TrainConfig(hidden_size=True), TE, r"^hidden_size: "),
    ("train.TrainConfig.depth_float", lambda: train.TrainConfig(depth=2.0), TE, r"^depth: "),
    ("train.TrainConfig.heads_indivisible", lambda: train.TrainConfig(hidden_size=64, num_heads=5), VE, r"^hidden_size, num_heads: "),
    ("train.TrainConfig.steps_zero", lambda: train.TrainConfig(steps=0), VE, r"^steps: "),
    ("train.TrainConfig.steps_str", lambda: train.TrainConfig(steps="100"), TE, r"^steps: "),
    ("train.TrainConfig.batch_negative", lambda: train.TrainConfig(batch_size=-4), VE, r"^batch_size: "),
    ("train.TrainConfig.n_train_bool", lambda: train.TrainConfig(n_train=True), TE, r"^n_train: "),
    ("train.TrainConfig.keep_last_zero", lambda: train.TrainConfig(keep_last=0), VE, r"^keep_last: "),
    ("train.TrainConfig.seed_negative", lambda: train.TrainConfig(seed=-1), VE, r"^seed: "),
    ("train.TrainConfig.warmup_float", lambda: train.TrainConfig(warmup_steps=0.5), TE, r"^warmup_steps: "),
    ("train.TrainConfig.objective_unknown", lambda: train.TrainConfig(objective="x0"), VE, r"^objective: "),
    ("train.TrainConfig.mixed_precision_fp16", lambda: train.TrainConfig(mixed_precision="fp16"), VE, r"^mixed_precision: "),
    ("train.TrainConfig.lr_nan", lambda: train.TrainConfig(lr=NAN), VE, r"^lr: "),
    ("train.TrainConfig.lr_zero", lambda: train.TrainConfig(lr=0), VE, r"^lr: "),
    ("train.TrainConfig.lr_str", lambda: train.TrainConfig(lr="1e-4"), TE, r"^lr: "),
    ("train.TrainConfig.caption_dropout_above_1", lambda: train.TrainConfig(caption_dropout=1.5), VE, r"^caption_dropout: "),
    ("train.TrainConfig.ema_decay_nan", lambda: train.TrainConfig(ema_decay=NAN), VE, r"^ema_decay: "),
    ("train.TrainConfig.ema_decay_above_1", lambda: train.TrainConfig(ema_decay=1.5), VE, r"^ema_decay: "),
    ("train.TrainConfig.grad_clip_zero", lambda: train.TrainConfig(grad_clip=0), VE, r"^grad_clip: "),
    ("train.TrainConfig.grad_clip_inf", lambda: train.TrainConfig(grad_clip=INF), VE, r"^grad_clip: "),
    ("train.TrainConfig.min_snr_nan", lambda: train.TrainConfig(min_snr_gamma=NAN), VE, r"^min_snr_gamma: "),
    ("train.TrainConfig.zero_snr_str", lambda: train.TrainConfig(zero_terminal_snr="false"), TE, r"^zero_terminal_snr: "),
    ("train.TrainConfig.zero_snr_epsilon", lambda: train.TrainConfig(objective="epsilon", zero_terminal_snr=True), VE, r"^zero_terminal_snr: "),
    ("train.TrainConfig.fast_unknown_field", lambda: train.TrainConfig.fast(stepz=5), TE, r"\bstepz\b"),
    ("train.TrainConfig.fast_bad_override", lambda: train.TrainConfig.fast(steps=0), VE, r"^steps: "),
    ("denoisers.Parametrisation.prediction_unknown", lambda: denoisers.Parametrisation("x0"), VE, r"^prediction: "),
    ("denoisers.Parametrisation.timesteps_one", lambda: denoisers.Parametrisation(num_train_timesteps=1), VE, r"^num_train_timesteps: "),
    ("train.TrainConfig.min_snr_negative", lambda: train.TrainConfig(min_snr_gamma=-1), VE, r"^min_snr_gamma: "),
    ("train.encode_dataset.empty", lambda: train.encode_dataset([], *book_encoders()), VE, r"^dataset: .*no samples"),
    ("train.encode_dataset.caption_none", lambda: train.encode_dataset([(renders(1)[0], "a"), (renders(1)[0], None)], *book_encoders(), disable=True), (VE, TE), r"^prompts\[1\]: "),
    ("train.encode_dataset.image_0_255", lambda: train.encode_dataset([(renders(1)[0] * 127.5 + 127.5, "a")], *book_encoders(), disable=True), VE, r"^x: .*0-255"),
    ("train.StreamingData.empty", lambda: train.StreamingData([], *book_encoders()), VE, r"^dataset: .*no samples"),
    ("train.build_model.context_zero", lambda: train.build_model(train_cfg(), context_dim=0), VE, r"^context_dim: "),
    ("train.build_model.context_float", lambda: train.build_model(train_cfg(), context_dim=96.0), TE, r"^context_dim: "),
    ("train.build_model.patch_size_3", lambda: train.build_model(_set(train_cfg(), patch_size=3)), VE, r"^input_size: .*patch_size=3"),
    ("train.atomic_write.failure_keeps_old_file", _atomic_write_failure_keeps_old_file, None, None),
    ("train.save_book_model.unwritable", lambda: train.save_book_model(tiny_book_model(), unwritable("book"), train_cfg()), OSError, r"a_regular_file"),
    ("train.read_train_config.missing", lambda: train.read_train_config(work() / "train09" / "nothing"), FileNotFoundError, r"^folder: .*training\.json"),
    ("train.read_train_config.bad_value", lambda: train.read_train_config(book_model_variant("train_steps_0", _replace("training.json", lambda f: {"config": {"steps": 0}}))), VE, r"^steps: "),
    ("train.load_book_model.behaves", _book_model_loads_in_eval_mode, None, None),
    ("train.load_book_model.missing", lambda: train.load_book_model(work() / "train09" / "no_book"), FileNotFoundError, r"^folder: no book model"),
    ("train.load_book_model.a_file", lambda: train.load_book_model(a_regular_file()), FileNotFoundError, r"^folder: no book model"),
    ("train.load_book_model.no_weights", lambda: train.load_book_model(book_model_variant("no_weights", _replace(BOOK_WEIGHTS, None))), FileNotFoundError, r"^path_or_id: no diffusion_pytorch_model"),
    ("train.load_book_model.empty_weights", lambda: train.load_book_model(book_model_variant("empty_weights", _replace(BOOK_WEIGHTS, b""))), VE, r"^path: .*corrupt"),
    ("train.load_book_model.truncated_weights", lambda: train.load_book_model(book_model_variant("truncated_weights", _replace(BOOK_WEIGHTS, valid_safetensors_bytes()[:500]))), VE, r"^path: .*corrupt"),
    ("train.load_book_model.nan_weights", lambda: train.load_book_model(book_model_variant("nan_weights", _nan_book_weights)), VE, r"NaN or infinite"),
    ("train.load_book_model.config_junk", lambda: train.load_book_model(book_model_variant("config_junk", _replace("config.json", "junk"))), VE, r"^path_or_id: .*config\.json"),
    ("train.load_book_model.config_deeper", lambda: train.load_book_model(book_model_variant("config_deeper", _replace("config.json", lambda f: {**json.loads((book_model_folder() / "config.json").read_text()), "num_layers": 2}))), WeightsMismatchError, r"does not fit"),
    ("train.load_book_model.no_training_json", lambda: train.load_book_model(book_model_variant("no_training_json", _replace("training.json", None))), FileNotFoundError, r"^folder: no training\.json"),
    ("train.checkpoints.skip_temp_files", _checkpoints_skip_temp_files, None, None),
    ("train.Trainer.mask_float", lambda: tiny_trainer(data_=encoded_data(mask_dtype=torch.float32)).train(until=1), TE, r"^context_mask: "),
    ("train.train.until_negative", lambda: tiny_trainer().train(until=-1), VE, r"^until: "),
    ("train.train.until_beyond_steps", lambda: tiny_trainer().train(until=5), VE, r"^until: .*<= 4"),
    ("train.train.until_float", lambda: tiny_trainer().train(until=1.0), TE, r"^until: "),
    ("train.train.until_bool", lambda: tiny_trainer().train(until=True), TE, r"^until: "),
    ("train.resume.round_trip", _resume_round_trip, None, None),
    ("train.resume.missing_file", lambda: tiny_trainer().resume(work() / "train09" / "nope.pt"), FileNotFoundError, r"^resume: no checkpoint file"),
    ("train.resume.a_folder", lambda: tiny_trainer().resume(work()), FileNotFoundError, r"^resume: no checkpoint file"),
    ("train.resume.no_out_dir", lambda: tiny_trainer().resume(), FileNotFoundError, r"^resume: no checkpoint"),
    ("train.resume.empty_run", lambda: tiny_trainer(out=work() / "train09" / "empty_run").resume(), FileNotFoundError, r"^resume: no checkpoint \(step-\*\.pt\)"),
    ("train.resume.other_seed", lambda: tiny_trainer(train_cfg(seed=3)).resume(last_checkpoint()), VE, r"^resume: .*different run \(seed: checkpoint 0, this run 3\)"),
    ("train.resume.other_width", lambda: tiny_trainer(train_cfg(hidden_size=64)).resume(last_checkpoint()), VE, r"^resume: .*different run \(hidden_size: checkpoint 32, this run 64\)"),
    ("train.train_book_model.resume_nothing", _train_book_model_resume_nothing, FileNotFoundError, r"^resume: no checkpoint"),
    ("guidance.CFGDenoiser.scale_nan", lambda: guidance.CFGDenoiser(torch.nn.Identity(), NAN), VE, r"^scale: "),
    ("guidance.CFGDenoiser.scale_negative", lambda: guidance.CFGDenoiser(torch.nn.Identity(), -1), VE, r"^scale: "),
    ("guidance.CFGDenoiser.scale_str", lambda: guidance.CFGDenoiser(torch.nn.Identity(), "3"), TE, r"^scale: "),
    ("guidance.CFGDenoiser.scale_bool", lambda: guidance.CFGDenoiser(torch.nn.Identity(), True), TE, r"^scale: "),
    ("evaluate.pipeline_generator.seeds_too_many", lambda: generate_tiny(seeds=[1, 2, 3]), VE, r"^seed: .*\(2\), got 3"),
    ("evaluate.pipeline_generator.seeds_too_few", lambda: generate_tiny(seeds=[1]), VE, r"^seed: .*\(2\), got 1"),
    ("evaluate.pipeline_generator.guidance_nan", lambda: generate_tiny(guidance_scale=NAN), VE, r"^guidance_scale: "),
    ("evaluate.pipeline_generator.guidance_inf", lambda: generate_tiny(guidance_scale=INF), VE, r"^guidance_scale: "),
    ("evaluate.pipeline_generator.guidance_negative", lambda: generate_tiny(guidance_scale=-2.0), VE, r"^guidance_scale: "),
    ("evaluate.pipeline_generator.captions_empty", lambda: generate_tiny(captions=[]), VE, r"^prompt: "),
    ("evaluate.pipeline_generator.caption_none", lambda: generate_tiny(captions=["a red circle", None]), TE, r"^prompt: .*1: NoneType"),
    ("evaluate.pipeline_generator.sampler_unknown", lambda: generate_tiny(sampler="ddim_magic"), VE, r"^sampler: .*ddim_magic"),
    ("evaluate.read_image.uint8", lambda: evaluate.read_image(torch.zeros(3, 32, 32, dtype=torch.uint8)), TE, r"^image: .*floating"),
    ("evaluate.read_image.bool", lambda: evaluate.read_image(torch.zeros(3, 32, 32, dtype=torch.bool)), TE, r"^image: .*floating"),
    ("evaluate.read_image.batch", lambda: evaluate.read_image(renders(1)), VE, r"^image: .*\(3, H, W\).*\(1, 3, 32, 32\)"),
    ("evaluate.read_image.hwc", lambda: evaluate.read_image(renders(1)[0].permute(1, 2, 0)), VE, r"^image: .*\(32, 32, 3\)"),
    ("evaluate.read_image.one_channel", lambda: evaluate.read_image(torch.zeros(1, 32, 32)), VE, r"^image: "),
    ("evaluate.read_image.too_small", lambda: evaluate.read_image(torch.zeros(3, 4, 4)), VE, r"^image: .*>= 8"),
    ("evaluate.read_image.nan", lambda: evaluate.read_image(with_value(renders(1)[0], NAN)), VE, r"^image: .*NaN"),
    ("evaluate.read_image.numpy", lambda: evaluate.read_image(np.zeros((3, 32, 32), np.float32)), TE, r"^image: .*ndarray"),
    ("evaluate.read_image.pil", lambda: evaluate.read_image(data.render_scene(data.sample_scene(0, "test", 0), 32)), TE, r"^image: "),
    ("evaluate.read_image.float64", _read_image_float64_equals_float32, None, None),
    ("evaluate.read_images.single", lambda: evaluate.read_images(renders(1)[0]), VE, r"^images: .*\(B, 3, H, W\)"),
    ("evaluate.read_images.uint8", lambda: evaluate.read_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TE, r"^images: "),
    ("evaluate.eval_indices.group_unknown", lambda: evaluate.eval_indices("unseen", 3), VE, r"^group: "),
    ("evaluate.eval_indices.n_zero", lambda: evaluate.eval_indices("seen", 0), VE, r"^n: "),
    ("evaluate.eval_indices.n_bool", lambda: evaluate.eval_indices("seen", True), TE, r"^n: "),
    ("evaluate.eval_indices.seed_negative", lambda: evaluate.eval_indices("seen", 2, seed=-1), VE, r"^seed: "),
    ("evaluate.eval_scenes.n_negative", lambda: evaluate.eval_scenes("two", -3), VE, r"^n: "),
    ("evaluate.eval_scenes.n_float", lambda: evaluate.eval_scenes("two", 2.0), TE, r"^n: "),
    ("evaluate.score_scene.reading_tensor", lambda: evaluate.score_scene(data.sample_scene(0, "test", 0), renders(1)[0]), TE, r"^reading: "),
    ("evaluate.score_scene.scene_str", lambda: evaluate.score_scene("a red circle", evaluate.read_image(renders(1)[0])), TE, r"^scene: "),
    ("evaluate.reader_accuracy.n_zero", lambda: evaluate.reader_accuracy(n=0), VE, r"^n: "),
    ("evaluate.image_features.size_16", lambda: evaluate.image_features(renders(2, 16)), VE, r"^images: .*32x32"),
    ("evaluate.image_features.batch_zero", lambda: evaluate.image_features(renders(2), batch_size=0), VE, r"^batch_size: "),
    ("evaluate.image_features.encoder_str", lambda: evaluate.image_features(renders(2), encoder="clip"), TE, r"^encoder: "),
    ("evaluate.image_features.uint8", lambda: evaluate.image_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), TE, r"^images: "),
    ("evaluate.image_features.nan", lambda: evaluate.image_features(with_value(renders(2), NAN)), VE, r"^images: .*NaN"),
    ("evaluate.frechet_distance.one_sample", lambda: evaluate.frechet_distance(torch.randn(1, 8), torch.randn(5, 8)), VE, r"^feats_a: .*at least 2"),
    ("evaluate.frechet_distance.one_sample_b", lambda: evaluate.frechet_distance(torch.randn(5, 8), torch.randn(1, 8)), VE, r"^feats_b: .*at least 2"),
    ("evaluate.frechet_distance.widths", lambda: evaluate.frechet_distance(torch.randn(5, 8), torch.randn(5, 6)), VE, r"^feats_b: .*8 features"),
    ("evaluate.frechet_distance.nan", lambda: evaluate.frechet_distance(with_value(torch.randn(5, 8), NAN), torch.randn(5, 8)), VE, r"^feats_a: .*NaN"),
    ("evaluate.frechet_distance.inf_b", lambda: evaluate.frechet_distance(torch.randn(5, 8), with_value(torch.randn(5, 8), INF)), VE, r"^feats_b: .*infinite"),
    ("evaluate.frechet_distance.one_d", lambda: evaluate.frechet_distance(torch.randn(5), torch.randn(5)), VE, r"^feats_a: .*2-D"),
    ("evaluate.frechet_distance.list", lambda: evaluate.frechet_distance([[0.0, 1.0]] * 3, [[0.0, 1.0]] * 3), TE, r"^feats_a: "),
    ("evaluate.frechet_distance.self_is_zero", _frechet_distance_of_a_set_with_itself_is_zero, None, None),
    ("evaluate.evaluate.n_zero", lambda: evaluate.evaluate(render_generator(), n=0), VE, r"^n: "),
    ("evaluate.evaluate.n_bool", lambda: evaluate.evaluate(render_generator(), n=True), TE, r"^n: "),
    ("evaluate.evaluate.batch_zero", lambda: evaluate.evaluate(render_generator(), n=1, batch_size=0), VE, r"^batch_size: "),
    ("evaluate.evaluate.not_callable", lambda: evaluate.evaluate("book_model", n=1), TE, r"^generate: .*callable"),
    ("evaluate.evaluate.returns_too_few", lambda: evaluate.evaluate(render_generator(drop=1), n=2, disable=True), VE, r"^generate: .*\(2, 3, 32, 32\).*got shape \(1, "),
    ("evaluate.evaluate.returns_list", lambda: evaluate.evaluate(lambda c, s: [torch.zeros(3, 32, 32)] * len(c), n=1, disable=True), TE, r"^generate: .*got list"),
    ("evaluate.evaluate.returns_uint8", lambda: evaluate.evaluate(lambda c, s: torch.zeros(len(c), 3, 32, 32, dtype=torch.uint8), n=1, disable=True), TE, r"^generate: .*floating"),
    ("evaluate.evaluate.returns_nan", lambda: evaluate.evaluate(lambda c, s: torch.full((len(c), 3, 32, 32), NAN), n=1, disable=True), VE, r"^generate: .*NaN"),
    ("evaluate.evaluate.returns_64px", lambda: evaluate.evaluate(lambda c, s: torch.zeros(len(c), 3, 64, 64), n=1, disable=True), VE, r"^generate: .*got shape \(1, 3, 64, 64\)"),
    ("evaluate.evaluate_model.batch_zero", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=1, batch_size=0, disable=True), VE, r"^batch_size: "),
    ("evaluate.evaluate_model.n_zero", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=0), VE, r"^n: "),
    ("evaluate.evaluate_model.guidance_nan", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=1, guidance_scale=NAN, disable=True), VE, r"^guidance_scale: "),
    ("evaluate.evaluate_model.sampler_unknown", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=1, sampler="nope", disable=True), VE, r"^sampler: .*nope"),
    ("evaluate.evaluate_run.missing", lambda: evaluate.evaluate_run(work() / "train09" / "no_run"), FileNotFoundError, r"^run_dir: no snapshots"),
    ("evaluate.evaluate_run.a_file", lambda: evaluate.evaluate_run(a_regular_file()), FileNotFoundError, r"^run_dir: no snapshots"),
    ("evaluate.evaluate_run.n_zero", lambda: evaluate.evaluate_run(tiny_run(), n=0), VE, r"^n: "),
    ("evaluate.evaluate_run.unknown_setting", lambda: evaluate.evaluate_run(tiny_run(), n=1, stepz=2), TE, r"\bstepz\b"),
    ("cli.train.steps_zero", lambda: cli_main_no_work("train", "--steps", "0"), CliRefused, one_line("--steps")),
    ("cli.train.batch_zero", lambda: cli_main_no_work("train", "--batch-size", "0"), CliRefused, one_line("--batch-size")),
    ("cli.train.seed_negative", lambda: cli_main_no_work("train", "--seed", "-2"), CliRefused, one_line("--seed")),
    ("cli.train.objective_unknown", lambda: cli_main_no_work("train", "--objective", "x0"), CliRefused, one_line("--objective")),
    ("cli.train.out_unwritable", lambda: cli_main_no_work("train", "--out", unwritable("run")), CliRefused, one_line("--out")),
    ("cli.train.out_holds_a_run", lambda: cli_main_no_work("train", "--out", tiny_run()), CliRefused, one_line("--out") + r".*--resume"),
    ("cli.evaluate.n_zero", lambda: cli_main_no_work("evaluate", "--n", "0"), CliRefused, one_line("--n")),
    ("cli.evaluate.steps_zero", lambda: cli_main_no_work("evaluate", "--steps", "0"), CliRefused, one_line("--steps")),
    ("cli.evaluate.cfg_text", lambda: cli_main_no_work("evaluate", "--cfg", "high"), CliRefused, one_line("--cfg")),
    ("cli.evaluate.json_unwritable", lambda: cli_main_no_work("evaluate", "--n", "1", "--json", unwritable("r.json")), CliRefused, one_line("--json")),
    ("cli.evaluate.model_truncated", lambda: cli_main_no_work("evaluate", "--n", "1", "--model", book_model_variant("cli_truncated", _replace(BOOK_WEIGHTS, b"\0" * 10))), CliRefused, one_line("--model") + r": path: .*corrupt"),
    # second pass (hostile_findings_09): refused up front, before data is encoded or a step taken
    ("train.TrainConfig.min_lr_ratio_nan", lambda: train.TrainConfig(min_lr_ratio=NAN), VE, r"^min_lr_ratio: "),
    ("train.TrainConfig.min_lr_ratio_negative", lambda: train.TrainConfig(min_lr_ratio=-1.0), VE, r"^min_lr_ratio: "),
    ("train.TrainConfig.min_lr_ratio_above_1", lambda: train.TrainConfig(min_lr_ratio=2.0), VE, r"^min_lr_ratio: "),
    ("train.TrainConfig.weight_decay_nan", lambda: train.TrainConfig(weight_decay=NAN), VE, r"^weight_decay: "),
    ("train.TrainConfig.weight_decay_negative", lambda: train.TrainConfig(weight_decay=-0.1), VE, r"^weight_decay: "),
    ("train.TrainConfig.beta_schedule_unknown", lambda: train.TrainConfig(beta_schedule="sigmoid"), VE, r"^beta_schedule: "),
    ("train.TrainConfig.cache_str", lambda: train.TrainConfig(cache="no"), TE, r"^cache: "),
    ("train.TrainConfig.compile_str", lambda: train.TrainConfig(compile="no"), TE, r"^compile: "),
    ("train.TrainConfig.patch_size_3", lambda: train.TrainConfig(patch_size=3), VE, r"^patch_size: "),
    ("train.TrainConfig.patch_size_16", lambda: train.TrainConfig(patch_size=16), VE, r"^patch_size: "),
    ("train.TrainConfig.hidden_huge", lambda: train.TrainConfig(hidden_size=2**20, num_heads=1), VE, r"^hidden_size\b.*memory"),
    ("train.TrainConfig.zero_snr_flow", lambda: train.TrainConfig(objective="flow", zero_terminal_snr=True), VE, r"^zero_terminal_snr: "),
    ("train.TrainConfig.min_snr_flow", lambda: train.TrainConfig(objective="flow", min_snr_gamma=5.0), VE, r"^min_snr_gamma: "),
    # Parametrisation (chapter 08; train.parametrisation builds one from a TrainConfig)
    ("denoisers.Parametrisation.beta_schedule_unknown", lambda: denoisers.Parametrisation(beta_schedule="sigmoid"), VE, r"^beta_schedule: "),
    ("denoisers.Parametrisation.shift_zero", lambda: denoisers.Parametrisation("flow", shift=0), VE, r"^shift: "),
    ("denoisers.Parametrisation.sigma_schedule_unknown", lambda: denoisers.Parametrisation(sigma_schedule="cosine"), VE, r"^sigma_schedule: "),
    ("train.parametrisation.cfg_dict", lambda: train_recipe.parametrisation({"objective": "flow"}), TE, r"^cfg: .*TrainConfig"),
    ("denoisers.Parametrisation.noised.u_negative", _noised_u_negative, VE, r"^u: "),
    ("denoisers.Parametrisation.noised.u_above_1", lambda: denoisers.Parametrisation().noised(*x0_noise_u(u=torch.tensor([0.5, 3.0]))), VE, r"^u: "),
    ("denoisers.Parametrisation.noised.noise_broadcast", lambda: denoisers.Parametrisation().noised(torch.zeros(2, 4, 8, 8), torch.ones(1, 4, 8, 8), torch.rand(2), torch.zeros(2)), VE, r"^noise: "),
    ("denoisers.Parametrisation.noised.x0_3d", dit_x0_3d, VE, r"^x0: "),
    ("denoisers.Parametrisation.noised.u_batch", lambda: denoisers.Parametrisation().noised(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.rand(3), torch.zeros(3)), VE, r"^u: "),
    ("denoisers.Parametrisation.noised.x0_int", lambda: denoisers.Parametrisation().noised(torch.zeros(2, 4, 8, 8, dtype=torch.long), torch.zeros(2, 4, 8, 8), torch.rand(2), torch.zeros(2)), TE, r"^x0: "),
    ("denoisers.Parametrisation.noised.x0_nan", lambda: denoisers.Parametrisation().noised(with_value(torch.zeros(2, 4, 8, 8), NAN), torch.zeros(2, 4, 8, 8), torch.rand(2), torch.zeros(2)), VE, r"^x0: "),
    ("denoisers.Parametrisation.denoiser.not_a_model", lambda: denoisers.Parametrisation().denoiser("model"), TE, r"^model: "),
    ("denoisers.Parametrisation.sigmas.steps_zero", lambda: denoisers.Parametrisation().sigmas(denoisers.Parametrisation().denoiser(tiny_book_model()), 0), VE, r"^steps: "),
    ("denoisers.Parametrisation.sigmas.flow_steps_zero", lambda: denoisers.Parametrisation("flow").sigmas(denoisers.Parametrisation("flow").denoiser(tiny_book_model()), 0), VE, r"^steps: "),
    ("denoisers.Parametrisation.sigmas.steps_bool", lambda: denoisers.Parametrisation().sigmas(denoisers.Parametrisation().denoiser(tiny_book_model()), True), TE, r"^steps: "),
    # encode_dataset / StreamingData
    ("train.encode_dataset.none", lambda: train.encode_dataset(None, *book_encoders()), TE, r"^dataset: "),
    ("train.encode_dataset.batch_zero", lambda: train.encode_dataset(data.ShapesDataset(2), *book_encoders(), batch_size=0, disable=True), VE, r"^batch_size: "),
    ("train.encode_dataset.batch_negative", lambda: train.encode_dataset(data.ShapesDataset(2), *book_encoders(), batch_size=-1, disable=True), VE, r"^batch_size: "),
    ("train.encode_dataset.batch_float", lambda: train.encode_dataset(data.ShapesDataset(2), *book_encoders(), batch_size=2.0, disable=True), TE, r"^batch_size: "),
    ("train.encode_dataset.image_16px", _encode_dataset_16px, VE, r"^dataset: .*32"),
    ("train.encode_dataset.not_pairs", lambda: train.encode_dataset([renders(1)[0]] * 2, *book_encoders(), disable=True), TE, r"^dataset(\[0\])?: .*\(image, caption\)"),
    ("train.StreamingData.none", _stream_none, TE, r"^dataset: "),
    # batch_indices / step_generator / lr_factor / ema_update
    ("train.batch_indices.n_zero", lambda: train_recipe.batch_indices(0, 0, 4, 0), VE, r"^n: "),
    ("train.batch_indices.batch_zero", lambda: train_recipe.batch_indices(0, 8, 0, 0), VE, r"^batch_size: "),
    ("train.batch_indices.step_negative", lambda: train_recipe.batch_indices(-1, 8, 4, 0), VE, r"^step: "),
    ("train.batch_indices.step_float", lambda: train_recipe.batch_indices(1.5, 8, 4, 0), TE, r"^step: "),
    ("train.batch_indices.n_float", lambda: train_recipe.batch_indices(0, 8.0, 4, 0), TE, r"^n: "),
    ("train.step_generator.seed_float", lambda: train_recipe.step_generator(1.5, 0), TE, r"^seed: "),
    ("train.step_generator.seed_huge", lambda: train_recipe.step_generator(2**70, 0), VE, r"^seed: "),
    ("train.step_generator.step_negative", lambda: train_recipe.step_generator(0, -1), VE, r"^step: "),
    ("train.lr_factor.warmup_negative", lambda: train_recipe.lr_factor(0, -5, 10, 0.1), VE, r"^warmup: "),
    ("train.lr_factor.min_ratio_nan", lambda: train_recipe.lr_factor(8, 2, 10, NAN), VE, r"^min_ratio: "),
    ("train.lr_factor.step_negative", lambda: train_recipe.lr_factor(-3, 0, 10, 0.1), VE, r"^step: "),
    ("train.ema_update.mismatched_models", lambda: train_recipe.ema_update(train.build_model(train_cfg(depth=1)), train.build_model(train_cfg(depth=2)), 0.9, 100), VE, r"^(ema|model): "),
    ("train.ema_update.decay_nan", _ema_decay(NAN), VE, r"^decay: "),
    ("train.ema_update.decay_negative", _ema_decay(-1.0), VE, r"^decay: "),
    ("train.ema_update.step_minus_10", lambda: train_recipe.ema_update(*two_models(), 0.9, -10), VE, r"^step: "),
    # build_model / book_model_config / pixart_to_diffusers / atomic_write / save / read config
    ("train.build_model.config_dict", lambda: train.build_model({"hidden_size": 32}), TE, r"^cfg: "),
    ("train.book_model_config.none", lambda: train.book_model_config(None), TE, r"^cfg: "),
    ("loading.pixart_to_diffusers.dit_weights", lambda: loading.pixart_to_diffusers(tiny_dit().state_dict()), VE, r"^sd: .*y_embedder"),
    ("loading.pixart_to_diffusers.unknown_key", lambda: loading.pixart_to_diffusers({"foo.weight": torch.zeros(1)}), VE, r"^sd: .*foo\.weight"),
    ("loading.pixart_to_diffusers.not_a_dict", lambda: loading.pixart_to_diffusers(tiny_book_model()), TE, r"^sd: "),
    ("train.atomic_write.writer_writes_nothing", lambda: train.atomic_write(work() / "g.txt", lambda p: None), (OSError, VE), r"^write: "),
    ("train.atomic_write.not_callable", lambda: train.atomic_write(work() / "train09" / "h.txt", "text"), TE, r"^write: "),
    ("train.atomic_write.missing_folder", lambda: train.atomic_write(work() / "no_such_dir" / "h.txt", lambda p: Path(p).write_text("x")), FileNotFoundError, r"^path: .*no_such_dir"),
    ("train.save_book_model.dit_model", lambda: train.save_book_model(tiny_dit(), work() / "train09" / "book" / "dit", train_cfg()), TE, r"^model: "),
    ("train.save_book_model.mismatched_cfg", _save_book_model_with_other_config, VE, r"^(cfg|model): .*hidden_size"),
    ("train.read_train_config.corrupt_json", lambda: train.read_train_config(book_model_variant("training_junk", _replace("training.json", "{oops"))), VE, r"^folder: .*training\.json"),
    ("train.read_train_config.no_config_key", lambda: train.read_train_config(book_model_variant("training_empty", _replace("training.json", "{}"))), VE, r"^folder: .*training\.json"),
    ("train.read_train_config.unknown_field", lambda: train.read_train_config(book_model_variant("training_extra", _replace("training.json", lambda f: {"config": {"bogus": 1}}))), VE, r"^folder: .*training\.json.*bogus"),
    ("train.checkpoints.none", lambda: train.checkpoints(None), TE, r"^folder: "),
    # Trainer
    ("train.Trainer.config_dict", lambda: train.Trainer({"steps": 2}, data=encoded_data()), TE, r"^config: "),
    ("train.Trainer.data_str", lambda: tiny_trainer(data_="latents.pt"), TE, r"^data: "),
    ("train.Trainer.data_empty", lambda: tiny_trainer(data_=encoded_data(n=0)), VE, r"^data: "),
    ("train.Trainer.data_latents_4x4", lambda: tiny_trainer(data_=encoded_data(side=4)), VE, r"^data: .*\(N, 4, 8, 8\)"),
    ("train.Trainer.data_rows_differ", lambda: tiny_trainer(data_=train.EncodedData(*[v[:4] if i in (1, 2) else v for i, v in enumerate(vars(encoded_data()).values())])), VE, r"^data: "),
    ("train.Trainer.data_nan", lambda: tiny_trainer(data_=train.EncodedData(with_value(encoded_data().latents, NAN), *list(vars(encoded_data()).values())[1:])), VE, r"^data: .*NaN"),
    ("train.Trainer.device_unknown", lambda: train.Trainer(train_cfg(), data=encoded_data(), device="tpu", disable=True), VE, r"^device: "),
    ("train.Trainer.device_cuda_absent", lambda: train.Trainer(train_cfg(), data=encoded_data(), device="cuda" if not torch.cuda.is_available() else "cuda:99", disable=True), VE, r"^device: "),
    ("train.train.until_before_step", _train_until_before_current_step, VE, r"^until: .*step 3"),
    ("train.train.callback_not_callable", lambda: tiny_trainer().train(callback=5), TE, r"^callback: "),
    ("train.save_checkpoint.no_out_dir", lambda: tiny_trainer().save_checkpoint(), VE, r"^out_dir: "),
    ("train.resume.truncated", lambda: tiny_trainer().resume(checkpoint_bytes("truncated.pt", lambda b: b[: len(b) // 2])), VE, r"^resume: .*(damaged|truncated)"),
    ("train.resume.empty", lambda: tiny_trainer().resume(checkpoint_bytes("empty.pt", lambda b: b"")), VE, r"^resume: .*(damaged|empty)"),
    ("train.resume.garbage", lambda: tiny_trainer().resume(corrupt("garbage", ".pt")), VE, r"^resume: .*damaged"),
    ("train.resume.code_pickle", lambda: tiny_trainer().resume(code_pickle()), VE, r"^resume: .*refused"),
    ("train.resume.safetensors_file", lambda: tiny_trainer().resume(book_model_folder() / BOOK_WEIGHTS), VE, r"^resume: .*not a training checkpoint"),
    ("train.resume.state_dict_only", lambda: tiny_trainer().resume(dit_original_file()), VE, r"^resume: .*not a training checkpoint"),
    ("train.resume.no_model_key", lambda: tiny_trainer().resume(checkpoint_edit("no_model.pt", lambda s: s.pop("model"))), VE, r"^resume: .*model"),
    ("train.resume.nan_weights", lambda: tiny_trainer().resume(checkpoint_edit("nan.pt", _nan_model)), VE, r"^resume: .*NaN"),
    ("train.resume.step_beyond_steps", lambda: tiny_trainer(train_cfg(steps=2)).resume(last_checkpoint()), VE, r"^(resume|steps): .*step 3"),
    # sampling a book model: train.book_pipeline, evaluate.pipeline_generator, guidance_study.generate_guided
    ("evaluate.pipeline_generator.steps_zero", lambda: generate_tiny(num_inference_steps=0), VE, r"^num_inference_steps: "),
    ("evaluate.pipeline_generator.steps_float", lambda: generate_tiny(num_inference_steps=2.0), TE, r"^num_inference_steps: "),
    ("train.book_pipeline.flow_schedule_steps_zero", lambda: tiny_book_pipe("flow").schedule(0), VE, r"^steps: "),
    ("evaluate.pipeline_generator.seeds_float", lambda: generate_tiny(seeds=[0.5, 1.5]), TE, r"^seed\[0\]: "),
    ("evaluate.pipeline_generator.seeds_negative", lambda: generate_tiny(seeds=[-1, 2]), VE, r"^seed\[0\]: "),
    ("evaluate.pipeline_generator.seeds_bool", lambda: generate_tiny(seeds=[True, False]), TE, r"^seed\[0\]: "),
    ("evaluate.pipeline_generator.seeds_huge", lambda: generate_tiny(seeds=[2**70, 1]), VE, r"^seed\[0\]: "),
    ("train.book_pipeline.prompt_str_is_one_prompt", _book_pipeline_one_string_is_one_prompt, None, None),
    ("evaluate.pipeline_generator.pipe_none", lambda: evaluate.pipeline_generator(None), TE, r"^pipe: .*got NoneType"),
    ("evaluate.pipeline_generator.pipe_dit", lambda: evaluate.pipeline_generator(tiny_dit()), TE, r"^pipe: .*got DiT"),
    ("train.book_pipeline.cfg_dict", lambda: train.book_pipeline(tiny_book_model(), {"objective": "flow"}), TE, r"^cfg: .*TrainConfig"),
    ("train.book_pipeline.cfg_parametrisation", lambda: train.book_pipeline(tiny_book_model(), train_recipe.parametrisation(train_cfg())), TE, r"^cfg: .*got Parametrisation"),
    ("train.book_pipeline.cure_not_callable", lambda: generate_tiny(cure=3.0), TE, r"^cure: "),
    ("evaluate.pipeline_generator.callback_not_callable", lambda: generate_tiny(callback=[]), TE, r"^callback: "),
    ("train.book_pipeline.denoise_cond_list", _book_pipeline_denoise_cond_list, TE, r"^cond: expected the dict encode_prompt returns"),
    # checks a review of the floor-plan change found missing (raw AttributeError / silent results before)
    ("train.book_pipeline.model_none", lambda: train.book_pipeline(None), TE, r"^model: .*got NoneType"),
    ("train.book_pipeline.model_dit", lambda: train.book_pipeline(tiny_dit()), TE, r"^model: .*got DiT"),
    ("evaluate.evaluate_model.pipe_str", lambda: evaluate.evaluate_model("book"), TE, r"^pipe: .*got str"),
    ("evaluate.pipeline_generator.captions_str", lambda: evaluate.pipeline_generator(tiny_book_pipe())("a red circle", [0]), TE, r"^captions: expected a list"),
    ("evaluate.pipeline_generator.seeds_int", lambda: evaluate.pipeline_generator(tiny_book_pipe())(["a red circle"], 5), TE, r"^seeds: expected a list"),
    ("guidance_study.generate_guided.pipe_none", lambda: guidance_study.generate_guided(None, ["a red circle"]), TE, r"^pipe: .*got NoneType"),
    ("guidance_study.generate_guided.seeds_int", lambda: generate_guided_tiny(["a red circle"], 5), TE, r"^seeds: expected a list"),
    ("denoisers.Parametrisation.zero_snr_str", lambda: denoisers.Parametrisation(zero_terminal_snr="no"), TE, r"^zero_terminal_snr: expected True or False"),
    ("denoisers.Parametrisation.quantize_int", lambda: denoisers.Parametrisation(quantize=1), TE, r"^quantize: expected True or False"),
    # the pipeline's public steps called directly (chapter 13), and the scheduler-config writer (chapter 08)
    ("pipeline.prepare_latents.shape_3d", lambda: tiny_book_pipe().prepare_latents((1, 4, 8), seed=0), VE, r"^shape: expected the latents' \(B, C, h, w\)"),
    ("pipeline.prepare_latents.batch_zero", lambda: tiny_book_pipe().prepare_latents((0, 4, 8, 8), seed=0), VE, r"^shape\[0\]: "),
    ("pipeline.denoise.cond_empty", lambda: tiny_book_pipe().denoise(torch.zeros(1, 4, 8, 8), {}, tiny_book_pipe().schedule(2), disable=True), TE, r"^cond: expected the dict encode_prompt returns"),
    ("pipeline.denoise.sigmas_list", lambda: tiny_book_pipe().denoise(torch.zeros(1, 4, 8, 8), tiny_book_pipe().encode_prompt(["a"], [""]), [1.0, 0.0], disable=True), TE, r"^sigmas: "),
    ("pipeline.denoise.wrap_int", lambda: tiny_book_pipe().denoise(torch.zeros(1, 4, 8, 8), tiny_book_pipe().encode_prompt(["a"], [""]), tiny_book_pipe().schedule(2), wrap=3, disable=True), TE, r"^wrap: "),
    ("pipeline.decode.clamp_str", lambda: tiny_book_pipe().decode(torch.zeros(1, 4, 8, 8), clamp="no"), TE, r"^clamp: "),
    ("pipeline.encode_prompt.none_in_list", lambda: tiny_book_pipe().encode_prompt(["a", None], ["", ""]), TE, r"^prompt: "),
    ("denoisers.Parametrisation.scheduler_config.sampler_unknown", lambda: denoisers.Parametrisation().scheduler_config("nope"), VE, r"^sampler: "),
    ("denoisers.Parametrisation.from_scheduler_config.shift_str", lambda: denoisers.Parametrisation.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "x"}), TE, r"^shift: "),
    ("train.loss_weight.gamma_negative", lambda: train_recipe.loss_weight(train_recipe.parametrisation(train_cfg()), torch.tensor([5]), -1.0), VE, r"^min_snr_gamma: "),
    ("guidance_study.generate_guided.seeds_negative", lambda: generate_guided_tiny(seeds=[-1, 2]), VE, r"^seed\[0\]: "),
    ("guidance_study.generate_guided.seeds_float", lambda: generate_guided_tiny(seeds=[0.5, 1.5]), TE, r"^seed\[0\]: "),
    ("guidance_study.generate_guided.scale_nan", lambda: generate_guided_tiny(scale=NAN), VE, r"^guidance_scale: "),
    ("guidance_study.generate_guided.seeds_too_many", lambda: generate_guided_tiny(seeds=[1, 2, 3]), VE, r"^seed: .*\(2\), got 3"),
    ("guidance_study.generate_guided.seeds_too_few", lambda: generate_guided_tiny(seeds=[1]), VE, r"^seed: .*\(2\), got 1"),
    ("guidance_study.generate_guided.cure_str", lambda: generate_guided_tiny(cure="rescale"), TE, r"^cure: .*'rescale'"),
    ("guidance_study.generate_guided.interval_reversed", lambda: generate_guided_tiny(interval=(5.0, 1.0)), VE, r"^interval: "),
    ("guidance_study.generate_guided.steps_zero", lambda: generate_guided_tiny(steps=0), VE, r"^num_inference_steps: "),
    # train_book_model
    ("train.train_book_model.config_dict", lambda: train.train_book_model({"steps": 1}, out_dir=work() / "train09" / "tbm"), TE, r"^config: "),
    ("train.train_book_model.out_unwritable", _train_book_model_unwritable, (OSError, VE), r"^out_dir: "),
    ("train.train_book_model.existing_run_not_resumed", _train_book_model_into_existing_run, VE, r"^out_dir: .*checkpoints"),
    ("train.train_book_model.resume_str", lambda: train.train_book_model(train_cfg(), out_dir=work() / "train09" / "tbm2", resume="no"), TE, r"^resume: expected True or False"),
    # evaluate.py
    ("evaluate.read_image.0_255_range", lambda: evaluate.read_image(renders(1)[0] * 127.5 + 127.5), VE, r"^image: .*\[-1, 1\]"),
    ("evaluate.read_images.0_255_range", lambda: evaluate.read_images(renders(2) * 127.5 + 127.5), VE, r"^images: .*\[-1, 1\]"),
    ("evaluate.evaluate.returns_0_255", lambda: evaluate.evaluate(lambda c, s: render_generator()(c, s) * 127.5 + 127.5, n=1, disable=True), VE, r"^generate: .*\[-1, 1\]"),
    ("evaluate.reader_accuracy.corrupt_0_255", lambda: evaluate.reader_accuracy(n=2, corrupt=lambda x: x * 127.5 + 127.5), VE, r"^(corrupt|images): .*\[-1, 1\]"),
    ("evaluate.eval_indices.n_huge", lambda: evaluate.eval_indices("held_out", 10**9), VE, r"^n: "),
    ("evaluate.reader_accuracy.corrupt_not_callable", lambda: evaluate.reader_accuracy(n=2, corrupt=0.1), TE, r"^corrupt: "),
    ("evaluate.reader_accuracy.corrupt_drops_images", _reader_accuracy_corrupt_drops_images, VE, r"^corrupt: .*\(3, 3, 32, 32\)"),
    ("evaluate.image_features.encoder_no_params", lambda: evaluate.image_features(renders(2), encoder=torch.nn.Flatten()), (TE, VE), r"^encoder: "),
    ("evaluate.image_features.empty", lambda: evaluate.image_features(torch.zeros(0, 3, 32, 32)), VE, r"^images: "),
    ("evaluate.frechet_distance.zero_width", lambda: evaluate.frechet_distance(torch.zeros(4, 0), torch.zeros(4, 0)), VE, r"^feats_a: "),
    ("evaluate.frechet_distance.bool", lambda: evaluate.frechet_distance(torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)), TE, r"^feats_a: "),
    ("evaluate.evaluate_model.seed_negative", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=1, seed=-1, disable=True), VE, r"^seed: "),
    ("evaluate.evaluate_model.steps_zero", lambda: evaluate.evaluate_model(tiny_book_pipe(), n=1, steps=0, disable=True), VE, r"^num_inference_steps: "),
    ("evaluate.pipeline_generator.pipe_model", lambda: evaluate.pipeline_generator(tiny_book_model()), TE, r"^pipe: .*got TextDiT"),
    ("evaluate.evaluate_run.snapshot_name", _evaluate_run_snapshot_name, VE, r"^run_dir: .*step-final"),
    # CLI (tinydit/cli.py is hand-written)
    ("cli.train.resume_nothing", lambda: cli_main_no_work("train", "--resume", "--out", work() / "train09" / "no_run_here"), CliRefused, one_line("--resume")),
    ("cli.train.resume_unwritable", lambda: cli_main_no_work("train", "--resume", "--out", unwritable("run")), CliRefused, one_line("--out")),
    ("cli.evaluate.cfg_nan", lambda: cli_main_no_work("evaluate", "--n", "1", "--cfg", "nan"), CliRefused, one_line("--cfg")),
    ("cli.evaluate.cfg_negative", lambda: cli_main_no_work("evaluate", "--n", "1", "--cfg", "-1"), CliRefused, one_line("--cfg")),
    ("cli.evaluate.sampler_unknown", lambda: cli_main_no_work("evaluate", "--n", "1", "--sampler", "magic"), CliRefused, one_line("--sampler")),
    ("cli.evaluate.model_missing", lambda: cli_main_no_work("evaluate", "--n", "1", "--model", work() / "no_model"), CliRefused, one_line("--model")),
    ("cli.evaluate.run_missing", lambda: cli_main_no_work("evaluate", "--n", "1", "--run", work() / "no_run"), CliRefused, one_line("--run")),
    ("cli.evaluate.run_and_model", lambda: cli_main_no_work("evaluate", "--n", "1", "--run", tiny_run(), "--model", book_model_folder()), CliRefused, one_line("--model")),
    ("cli.evaluate.json_is_a_folder", lambda: cli_main_no_work("evaluate", "--n", "1", "--json", work()), CliRefused, one_line("--json")),
    # ---- tinydit.offload (chapter 12) ---------------------------------------------------------
    ("offload.ModelOffload.models_none", lambda: offload.ModelOffload(None, device="cpu"), TE, r"^models: "),
    ("offload.ModelOffload.models_one_module", lambda: offload.ModelOffload(off_toy(), device="cpu"), TE, r"^models: .*dict or list"),
    ("offload.ModelOffload.models_empty", lambda: offload.ModelOffload({}, device="cpu"), VE, r"^models: "),
    ("offload.ModelOffload.models_str", lambda: offload.ModelOffload(["m"], device="cpu"), TE, r"^models\[.*\]: expected an nn.Module"),
    ("offload.ModelOffload.same_module_twice", _model_offload_same_module_twice, VE, r"^models: "),
    ("offload.ModelOffload.component_inside_another", _model_offload_component_inside_another, VE, r"^models: "),
    ("offload.ModelOffload.use_unknown", lambda: _enter_use(offload.ModelOffload({"a": off_toy()}, device="cpu"), "b"), VE, r"^name: .*\['a'\].*'b'"),
    ("offload.ModelOffload.use_none", lambda: _enter_use(offload.ModelOffload({"a": off_toy()}, device="cpu"), None), VE, r"^name: "),
    ("offload.ModelOffload.device_absent", _offload_absent_device_then_call, VE, r"^device: "),
    ("offload.ModelOffload.device_default_cuda_absent", lambda: offload.ModelOffload({"a": off_toy()}, device=absent_cuda()), VE, r"^device: "),
    ("offload.offload.device_tpu", lambda: offload.offload(off_toy(), "leaf", device="tpu"), VE, r"^device: .*'tpu'"),
    ("offload.offload.device_int", lambda: offload.offload(off_toy(), "leaf", device=3) if not torch.cuda.is_available() else offload.offload(off_toy(), "leaf", device=99), VE, r"^device: "),
    ("offload.offload.device_none", lambda: offload.offload(off_toy(), "leaf", device=None), VE, r"^device: "),
    ("offload.offload.mode_none", lambda: offload.offload(off_toy(), None, device="cpu"), VE, r"^mode: "),
    ("offload.offload.mode_capitalised", lambda: offload.offload(off_toy(), "Block", device="cpu"), VE, r"^mode: .*'Block'"),
    ("offload.offload.option_of_another_mode", lambda: cpu_offload(off_toy(), "leaf", group_size=2), TE, r"group_size"),
    ("offload.BlockOffload.group_size_bool", lambda: cpu_offload(off_toy(), group_size=True), TE, r"^group_size: "),
    ("offload.BlockOffload.group_size_str", lambda: cpu_offload(off_toy(), group_size="2"), TE, r"^group_size: "),
    ("offload.BlockOffload.group_size_negative", lambda: cpu_offload(off_toy(), group_size=-1), VE, r"^group_size: "),
    ("offload.BlockOffload.group_size_numpy", _block_offload_numpy_group_size, None, None),
    ("offload.BlockOffload.stream_str", lambda: cpu_offload(off_toy(), stream="no"), TE, r"^stream: expected True"),
    ("offload.BlockOffload.pin_memory_str", lambda: cpu_offload(off_toy(), pin_memory="false"), TE, r"^pin_memory: expected True"),
    ("offload.BlockOffload.blocks_foreign", _block_offload_foreign_blocks, VE, r"^blocks: "),
    ("offload.BlockOffload.blocks_list_of_str", lambda: cpu_offload(off_toy(), blocks=["a", "b"]), TE, r"^blocks: "),
    ("offload.BlockOffload.blocks_empty", lambda: cpu_offload(off_toy(), blocks=torch.nn.ModuleList()), VE, r"^blocks: "),
    ("offload.BlockOffload.model_none", lambda: cpu_offload(None), TE, r"^model: "),
    ("offload.BlockOffload.model_no_blocks", lambda: cpu_offload(torch.nn.Linear(2, 2)), VE, r"^model: .*ModuleList"),
    ("offload.BlockOffload.twice", lambda: [cpu_offload(m) for m in [off_toy()] * 2], VE, r"^model: already offloaded"),
    ("offload.LeafOffload.inside_block_offload", _leaf_offload_inside_block_offload, VE, r"^model: .*already offloaded"),
    ("offload.BlockOffload.around_leaf_offload", _block_offload_around_leaf_offload, VE, r"^model: .*already offloaded"),
    ("offload.Offloader.parameter_replaced", _offload_parameter_replaced, VE, r"^model: .*replaced"),
    ("offload.Offloader.close_twice_then_again", _offload_close_twice_and_offload_again, None, None),
    ("offload.Offloader.load_state_dict_while_offloaded", _offload_load_state_dict_while_offloaded, None, None),
    # ---- tinydit.precision (chapter 12) -------------------------------------------------------
    ("precision.LayerwiseCasting.storage_float8", lambda: precision.LayerwiseCasting(off_toy(), storage_dtype="float8"), VE, r"^storage_dtype: .*'float8'"),
    ("precision.LayerwiseCasting.storage_torch_dtype", lambda: precision.LayerwiseCasting(off_toy(), storage_dtype=torch.float8_e4m3fn), VE, r"^storage_dtype: "),
    ("precision.LayerwiseCasting.storage_list", lambda: precision.LayerwiseCasting(off_toy(), storage_dtype=["fp8_e4m3"]), (TE, VE), r"^storage_dtype: "),
    ("precision.LayerwiseCasting.storage_none", lambda: precision.LayerwiseCasting(off_toy(), storage_dtype=None), VE, r"^storage_dtype: "),
    ("precision.LayerwiseCasting.compute_fp64", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="fp64"), VE, r"^compute_dtype: .*'fp64'"),
    ("precision.LayerwiseCasting.compute_half", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="half"), VE, r"^compute_dtype: .*'half'"),
    ("precision.LayerwiseCasting.compute_float8", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="float8"), VE, r"^compute_dtype: "),
    ("precision.LayerwiseCasting.compute_torch_float64", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype=torch.float64), VE, r"^compute_dtype: .*float64"),
    ("precision.LayerwiseCasting.compute_int8", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype=torch.int8), VE, r"^compute_dtype: "),
    ("precision.LayerwiseCasting.compute_none", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype=None), VE, r"^compute_dtype: "),
    ("precision.LayerwiseCasting.skip_one_string", _layerwise_skip_one_string, None, None),
    ("precision.LayerwiseCasting.skip_int", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="fp32", skip=(1,)), TE, r"^skip: "),
    ("precision.LayerwiseCasting.skip_invalid_regex", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="fp32", skip=("[",)), VE, r"^skip: .*'\['"),
    ("precision.LayerwiseCasting.skip_everything", lambda: precision.LayerwiseCasting(off_toy(), compute_dtype="fp32", skip=("",)), VE, r"^skip: "),
    ("precision.LayerwiseCasting.model_no_linear", lambda: precision.LayerwiseCasting(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.GELU())), VE, r"^model: .*(Linear|Conv)"),
    ("precision.LayerwiseCasting.model_none", lambda: precision.LayerwiseCasting(None), TE, r"^model: "),
    ("precision.LayerwiseCasting.weights_beyond_fp8_range", _layerwise_beyond_fp8_range, VE, r"^model: .*(range|448)"),
    ("precision.LayerwiseCasting.close_twice_then_again", _layerwise_close_twice_and_again, None, None),
    ("precision.weight_bytes.model_none", lambda: precision.weight_bytes(None), TE, r"^model: "),
    ("precision.pin_sdpa.upper_case", lambda: _pin_sdpa("FLASH"), VE, r"^backend: .*'FLASH'"),
    ("precision.pin_sdpa.none", lambda: _pin_sdpa(None), VE, r"^backend: "),
    ("precision.sdpa_backends.q_list", lambda: precision.sdpa_backends([[1.0]], *qkv()[1:]), (VE, TE), r"^q: "),
    ("precision.sdpa_backends.head_dims_differ", lambda: precision.sdpa_backends(qkv()[0], qkv(d=16)[1], qkv()[2]), VE, r"^q, k, v: shapes do not fit"),
    # ---- tinydit.stepcache (chapter 12) -------------------------------------------------------
    ("stepcache.StepCache.threshold_str", lambda: stepcache.StepCache(off_toy(), threshold="0.1"), TE, r"^threshold: "),
    ("stepcache.StepCache.threshold_nan", lambda: stepcache.StepCache(off_toy(), threshold=NAN), VE, r"^threshold: "),
    ("stepcache.StepCache.threshold_inf", lambda: stepcache.StepCache(off_toy(), threshold=INF), VE, r"^threshold: "),
    ("stepcache.StepCache.threshold_none", lambda: stepcache.StepCache(off_toy(), threshold=None), TE, r"^threshold: "),
    ("stepcache.StepCache.threshold_bool", lambda: stepcache.StepCache(off_toy(), threshold=True), TE, r"^threshold: "),
    ("stepcache.StepCache.warmup_float", lambda: stepcache.StepCache(off_toy(), warmup=1.5), TE, r"^warmup: "),
    ("stepcache.StepCache.warmup_bool", lambda: stepcache.StepCache(off_toy(), warmup=True), TE, r"^warmup: "),
    ("stepcache.StepCache.model_no_blocks", lambda: stepcache.StepCache(torch.nn.Linear(2, 2)), VE, r"^model: .*ModuleList"),
    ("stepcache.StepCache.model_none", lambda: stepcache.StepCache(None), TE, r"^model: "),
    ("stepcache.StepCache.blocks_str", lambda: stepcache.StepCache(off_toy(), blocks="blocks"), (TE, VE), r"^blocks: "),
    ("stepcache.StepCache.blocks_empty", _stepcache_empty_blocks, VE, r"^blocks: "),
    ("stepcache.StepCache.twice", lambda: [stepcache.StepCache(m) for m in [off_toy()] * 2], VE, r"^model: a step cache is already on"),
    ("stepcache.StepCache.threshold_zero_exact_close_twice", _stepcache_threshold_zero_exact_and_close_twice, None, None),
    ("stepcache.StepCache.then_block_offload", _stepcache_then_block_offload, None, None),
    ("stepcache.StepCache.then_cross_attention_maps", _stepcache_then_cross_attention_maps, None, None),
    # ---- tinydit.pipeline (chapter 13): a call --------------------------------------------------
    ("pipeline.call.width_only", _pipe_width_only, None, None),
    ("pipeline.call.height_not_multiple", lambda: pipe_call(height=33), VE, r"^height: .*multiple of 8.*33"),
    ("pipeline.call.height_zero", lambda: pipe_call(height=0), VE, r"^height: "),
    ("pipeline.call.height_float", lambda: pipe_call(height=32.0), TE, r"^height: "),
    ("pipeline.call.height_huge", lambda: _pipe_refuses_before_drawing_noise(height=800_000), VE, r"^height: "),
    ("pipeline.call.num_images_zero", lambda: pipe_call(num_images_per_prompt=0), VE, r"^num_images_per_prompt: "),
    ("pipeline.call.num_images_float", lambda: pipe_call(num_images_per_prompt=2.5), TE, r"^num_images_per_prompt: "),
    ("pipeline.call.num_images_bool", lambda: pipe_call(num_images_per_prompt=True), TE, r"^num_images_per_prompt: "),
    ("pipeline.call.num_images_huge", lambda: _pipe_refuses_before_drawing_noise(num_images_per_prompt=10**6), VE, r"^num_images_per_prompt: "),
    ("pipeline.call.numpy_seed_and_count", _pipe_numpy_seed_and_count, None, None),
    ("pipeline.call.steps_zero", lambda: pipe_call(num_inference_steps=0), VE, r"^num_inference_steps: "),
    ("pipeline.call.steps_str", lambda: pipe_call(num_inference_steps="2"), TE, r"^num_inference_steps: "),
    ("pipeline.call.guidance_nan", lambda: pipe_call(guidance_scale=NAN), VE, r"^guidance_scale: "),
    ("pipeline.call.guidance_inf", lambda: pipe_call(guidance_scale=INF), VE, r"^guidance_scale: "),
    ("pipeline.call.guidance_negative", lambda: pipe_call(guidance_scale=-1.0), VE, r"^guidance_scale: "),
    ("pipeline.call.sampler_none_is_default", _pipe_sampler_none_is_default, None, None),
    ("pipeline.call.sampler_unknown", lambda: pipe_call(sampler="DPM++ 2M"), VE, r"^sampler: .*'DPM\+\+ 2M'"),
    ("pipeline.call.seed_bool", lambda: pipe_call(seed=True), TE, r"^seed: "),
    ("pipeline.call.seed_float", lambda: pipe_call(seed=2.0), TE, r"^seed: "),
    ("pipeline.call.seed_str", lambda: pipe_call(seed="3"), TE, r"^seed: "),
    ("pipeline.call.seed_negative", lambda: pipe_call(seed=-1), VE, r"^seed: "),
    ("pipeline.call.seed_huge", lambda: pipe_call(seed=2**70), VE, r"^seed: "),
    ("pipeline.call.seed_last_overflows", lambda: pipe_call(seed=2**64 - 1, num_images_per_prompt=2), VE, r"^seed: "),
    ("pipeline.call.seeds_too_few", lambda: pipe_call(seed=[1], num_images_per_prompt=2), VE, r"^seed: .*\(2\), got 1"),
    ("pipeline.call.generator_and_seed", lambda: pipe_call(seed=3, generator=torch.Generator().manual_seed(4)), VE, r"^(seed|generator): "),
    ("pipeline.call.generator_int", lambda: pipe_call(generator=0), TE, r"^generator: "),
    ("pipeline.call.latents_nan", lambda: pipe_call(latents=with_value(torch.randn(1, 4, 8, 8), NAN)), VE, r"^latents: .*NaN"),
    ("pipeline.call.latents_shape", lambda: pipe_call(latents=torch.randn(1, 4, 4, 4)), VE, r"^latents: .*\(1, 4, 8, 8\)"),
    ("pipeline.call.latents_numpy", lambda: pipe_call(latents=np.zeros((1, 4, 8, 8), np.float32)), (TE, VE), r"^latents: "),
    ("pipeline.call.output_type_np", lambda: pipe_call(output_type="np"), VE, r"^output_type: .*'np'"),
    ("pipeline.call.callback_not_callable", lambda: pipe_call(callback=5), TE, r"^callback: "),
    ("pipeline.call.negative_prompt_int", lambda: pipe_call(negative_prompt=123), (TE, VE), r"^negative_prompt: "),
    ("pipeline.call.negative_prompt_list_of_lists", lambda: pipe_call(negative_prompt=[["blurry"]]), (TE, VE), r"^negative_prompt: "),
    ("pipeline.call.negative_prompt_too_many", lambda: pipe_call(negative_prompt=["a", "b"]), VE, r"^negative_prompt: .*\(1\)"),
    ("pipeline.call.prompt_list_of_lists", lambda: pipe_call([["a red circle"]]), TE, r"^prompt: .*0: list"),
    ("pipeline.call.prompt_empty_list", lambda: pipe_call([]), VE, r"^prompt: "),
    ("pipeline.call.prompt_none", lambda: pipe_call(None), (TE, VE), r"^prompt: "),
    ("pipeline.call.prompt_int", lambda: pipe_call(5), (TE, VE), r"^prompt: "),
    # ---- tinydit.pipeline (chapter 13): loading, saving, offloading -----------------------------
    ("pipeline.from_pretrained.a_file", lambda: pipeline.TextToImagePipeline.from_pretrained(a_regular_file()), FileNotFoundError, r"^path_or_id: expected a folder"),
    ("pipeline.from_pretrained.path_int", lambda: pipeline.TextToImagePipeline.from_pretrained(123), TE, r"^path_or_id: "),
    ("pipeline.from_pretrained.no_folder", lambda: pipeline.TextToImagePipeline.from_pretrained(work() / "pipe12" / "none"), FileNotFoundError, r"^path_or_id: "),
    ("pipeline.from_pretrained.index_not_json", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("index_junk", _replace("model_index.json", "{oops"))), VE, r"^path_or_id: .*model_index\.json.*not valid JSON"),
    ("pipeline.from_pretrained.index_not_object", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("index_list", _replace("model_index.json", "[1, 2]"))), VE, r"^path_or_id: .*JSON object"),
    ("pipeline.from_pretrained.text_encoder_unknown", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("te_bert", _index_with(text_encoder=["transformers", "BertModel"]))), VE, r"^path_or_id: .*'BertModel'"),
    ("pipeline.from_pretrained.text_encoder_int", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("te_int", _index_with(text_encoder=5))), VE, r"^path_or_id: .*text_encoder"),
    ("pipeline.from_pretrained.tinydit_key_str", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("tinydit_str", _index_with(_tinydit="junk"))), VE, r"^path_or_id: .*_tinydit"),
    ("pipeline.from_pretrained.no_scheduler_config", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("no_sched", _replace("scheduler/scheduler_config.json", None))), FileNotFoundError, r"^path_or_id: .*scheduler_config\.json"),
    ("pipeline.from_pretrained.scheduler_unknown", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("sched_lms", _scheduler_with(_class_name="LMSDiscreteScheduler"))), VE, r"^(scheduler|path_or_id): .*'LMSDiscreteScheduler'"),
    ("pipeline.from_pretrained.scheduler_prediction_unknown", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("sched_pred", _scheduler_with(prediction_type="x0"))), VE, r"^(scheduler|path_or_id): .*'x0'"),
    ("pipeline.from_pretrained.saved_steps_str", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_variant("steps_str", _sampling_saved(steps="many"))), (TE, VE), r"^(path_or_id|steps): .*'many'"),
    ("pipeline.from_pretrained.default_steps_zero", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), steps=0), VE, r"^steps: "),
    ("pipeline.from_pretrained.default_sampler_unknown", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), sampler="magic"), VE, r"^sampler: "),
    ("pipeline.from_pretrained.default_guidance_nan", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), guidance_scale=NAN), VE, r"^guidance_scale: "),
    ("pipeline.from_pretrained.dtype_float8", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), dtype="float8"), VE, r"^dtype: .*'float8'"),
    ("pipeline.from_pretrained.dtype_fp64", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), dtype="fp64"), VE, r"^dtype: .*'fp64'"),
    ("pipeline.from_pretrained.dtype_half", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), dtype="half"), VE, r"^dtype: .*'half'"),
    ("pipeline.from_pretrained.device_absent", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), device=absent_cuda()), VE, r"^device: "),
    ("pipeline.from_pretrained.device_tpu", lambda: pipeline.TextToImagePipeline.from_pretrained(pipeline_folder(), device="tpu"), VE, r"^device: .*'tpu'"),
    ("pipeline.save_pretrained.into_a_file", lambda: book_pipe().save_pretrained(a_regular_file()), (VE, OSError), r"^folder: "),
    ("pipeline.save_pretrained.none", lambda: book_pipe().save_pretrained(None), TE, r"^folder: "),
    ("demo.GenerateDemo.not_a_pipeline", lambda: demo.GenerateDemo("a red circle"), TE, r"^pipe: .*got str"),
    ("demo.GenerateDemo.prompt_int", lambda: demo.GenerateDemo(book_pipe(), prompt=3), TE, r"^prompt: .*got int"),
    ("demo.attention_maps.prompt_list", lambda: demo.attention_maps(book_pipe(), ["a", "b"]), TE, r"^prompt: expected one string"),
    ("pipeline.enable_model_offload.device_tpu", lambda: fresh_pipe().enable_model_offload("tpu"), VE, r"^device: "),
    ("pipeline.enable_model_offload.device_absent", lambda: fresh_pipe().enable_model_offload(absent_cuda()), VE, r"^device: "),
    ("pipeline.enable_model_offload.twice", _pipe_enable_model_offload_twice, None, None),
]


# --------------------------------------------------------------------------------------------


def classify(case) -> tuple[str, str]:
    """('clear' | 'raw' | 'silent', what happened) for one case.

    clear: the expected error type with a message matching the pattern, or the correct behaviour;
    raw: another exception (deep inside torch / safetensors / PIL, or a message that does not match);
    silent: no error where one is due, or a behaviour check that found a wrong result.
    """
    _, call, exc, pattern = case
    try:
        call()
    except AssertionError as e:
        return "silent", f"wrong result: {str(e).splitlines()[0] if str(e) else 'AssertionError'}"
    except Exception as e:  # noqa: BLE001 - sorting every outcome is the point
        first = str(e).splitlines()[0] if str(e) else ""
        what = f"{type(e).__name__}: {first}"
        if exc is not None and isinstance(e, exc) and re.search(pattern, str(e)):
            return "clear", what
        return "raw", what
    if exc is None:
        return "clear", "behaves correctly"
    return "silent", "no error"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case):
    _, call, exc, pattern = case
    if exc is None:  # behaviour case: the callable asserts the correct result itself
        call()
        return
    with pytest.raises(exc, match=pattern):
        call()


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
