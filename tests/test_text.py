"""tinydit.text: the encoder interface, CLIP / T5 loading, the dual encoder with offloading, the
book encoder, and bad input. Real models are tiny random `transformers` models saved to tmp_path."""

import gc
import json
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from tinydit import dual_encoder, text, text_training


WORDS = "a an big small tiny red blue green circle square triangle left right of on the to gray background".split()


@pytest.fixture(scope="module")
def book_tok():
    return text_training.build_book_tokenizer(["a big red circle to the left of a small blue square on a gray background",
                                      "a tiny green triangle", "an image of a red square on the right"])


def tiny_clip(tok, projection=True, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=40, d_kv=10, d_ff=64, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8)).eval()
    return model, T5Tokenizer(vocab=vocab, extra_ids=0)


def test_text_embeddings_checks_shapes_and_mask_dtype():
    e = text.TextEmbeddings(torch.zeros(2, 5, 8), torch.tensor([[1] * 5, [1] * 3 + [0] * 2]), torch.zeros(2, 3))
    assert e.mask.dtype == torch.bool and len(e) == 2 and e.mask.sum().item() == 8  # 0/1 integers: converted
    with pytest.raises(ValueError, match="tokens, mask"):
        text.TextEmbeddings(torch.zeros(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pooled"):
        text.TextEmbeddings(torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.zeros(3, 3))
    # a float mask is ambiguous (additive masks use 0 = keep, -inf = drop; .bool() would flip them)
    additive = torch.zeros(2, 5).masked_fill(torch.tensor([[False] * 5, [False] * 3 + [True] * 2]), -torch.inf)
    for float_mask in (additive, torch.ones(2, 5)):
        with pytest.raises(TypeError, match=r"mask: expected a boolean mask .* got dtype torch.float32"):
            text.TextEmbeddings(torch.zeros(2, 5, 8), float_mask)
    with pytest.raises(ValueError, match=r"mask: expected 0/1 values"):
        text.TextEmbeddings(torch.zeros(2, 5, 8), torch.full((2, 5), 2))


def test_text_encoder_is_callable_like_a_module(book_tok):
    enc = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    called, encoded = enc(["a red circle", "a blue square"]), enc.encode(["a red circle", "a blue square"])
    assert isinstance(called, text.TextEmbeddings)
    assert torch.equal(called.tokens, encoded.tokens) and torch.equal(called.pooled, encoded.pooled)
    one = enc("a red circle")  # a bare string is one prompt (as in diffusers), never its characters
    assert one.tokens.shape[0] == 1 and torch.equal(one.tokens, enc(["a red circle"]).tokens)


def test_clip_encoder_layers_pooling_and_mask(book_tok):
    model = tiny_clip(book_tok)
    enc = text.CLIPTextEncoder(model, book_tok, padding="max_length")
    e = enc.encode(["a red circle", "a big blue square on the left"])
    assert e.tokens.shape == (2, 16, 32) and e.mask.shape == (2, 16) and e.pooled.shape == (2, 24)
    assert e.mask.sum(1).tolist() == [5, 9]
    ids = book_tok(["a red circle", "a big blue square on the left"], padding="max_length", max_length=16,
                   return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(e.tokens, ref.last_hidden_state, atol=1e-6)
    assert torch.allclose(e.pooled, ref.text_embeds, atol=1e-6)  # projected EOS state
    pen = text.CLIPTextEncoder(model, book_tok, layer="penultimate", pooled="eos").encode(["a red circle"])
    assert torch.allclose(pen.tokens[0], ref.hidden_states[-2][0], atol=1e-6)
    eos_pos = 4  # <bos> a red circle <eos>
    assert torch.allclose(pen.pooled[0], ref.last_hidden_state[0, eos_pos], atol=1e-6)
    # causal: the real tokens do not depend on how much padding follows
    longest = text.CLIPTextEncoder(model, book_tok, padding="longest").encode(["a red circle", "a big blue square on the left"])
    assert torch.allclose(longest.tokens[0, :5], e.tokens[0, :5], atol=1e-6)
    with pytest.raises(ValueError, match="projected"):
        text.CLIPTextEncoder(tiny_clip(book_tok, projection=False), book_tok, pooled="projected")
    with pytest.raises(ValueError, match="layer"):
        text.CLIPTextEncoder(model, book_tok, layer="first")


def test_clip_and_t5_load_from_saved_folders(book_tok, tmp_path):
    model = tiny_clip(book_tok)
    model.save_pretrained(tmp_path / "text_encoder")  # a diffusers pipeline's layout: sibling tokenizer folder
    book_tok.save_pretrained(tmp_path / "tokenizer")
    loaded = text.CLIPTextEncoder.from_pretrained(tmp_path, subfolder="text_encoder")
    direct = text.CLIPTextEncoder(model, book_tok)
    a, b = loaded.encode(["a tiny green triangle"]), direct.encode(["a tiny green triangle"])
    assert isinstance(loaded.model, CLIPTextModelWithProjection)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)

    t5, t5_tok = tiny_t5()
    t5.save_pretrained(tmp_path / "t5")
    t5_tok.save_pretrained(tmp_path / "t5")
    enc = text.T5TextEncoder.from_pretrained(tmp_path / "t5", max_length=12)
    e = enc.encode(["a red circle", "a big blue square on the left of a green triangle"])
    assert e.tokens.shape == (2, 12, 40) and e.pooled is None and e.mask.sum(1).tolist() == [4, 12]
    with torch.no_grad():  # T5 is bidirectional: the mask must reach the model
        ids = t5_tok(["a red circle"], return_tensors="pt")["input_ids"]
        ref = t5(input_ids=ids).last_hidden_state
    assert torch.allclose(e.tokens[0, :4], ref[0], atol=1e-5)


def test_clip_text_tower_loads_from_a_full_clip_model_folder(book_tok, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text_cfg = dict(vocab_size=len(book_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      image_size=32, patch_size=8)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=24)).eval()
    full.save_pretrained(tmp_path)  # the layout of e.g. openai/clip-vit-large-patch14
    book_tok.save_pretrained(tmp_path)
    enc = text.CLIPTextEncoder.from_pretrained(tmp_path)
    e = enc.encode(["a red circle"])
    ids = book_tok(["a red circle"], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = full.get_text_features(input_ids=ids)
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    assert e.pooled.shape == (1, 24) and torch.allclose(e.pooled, ref, atol=1e-5)


def test_from_pretrained_refuses_checkpoints_whose_keys_do_not_fit(book_tok, tmp_path):
    # transformers only logs a report and leaves the unmatched weights random: we must raise instead
    tiny_clip(book_tok).save_pretrained(tmp_path / "clip")
    book_tok.save_pretrained(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    sd = load_file(weights)
    save_file({k.replace("text_model.", "txt."): v for k, v in sd.items()}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)CLIPTextEncoder: .*does not fit CLIPTextModelWithProjection.*"
                                         r"missing keys.*text_model\.embeddings\.token_embedding\.weight.*"
                                         r"unexpected keys.*txt\.embeddings\.token_embedding\.weight"):
        text.CLIPTextEncoder.from_pretrained(tmp_path / "clip")

    tiny_clip(book_tok).save_pretrained(tmp_path / "shape")  # same keys, another MLP width in the config
    book_tok.save_pretrained(tmp_path / "shape")
    cfg = json.loads((tmp_path / "shape" / "config.json").read_text())
    (tmp_path / "shape" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*mlp\.fc1\.weight: checkpoint \(64, 32\) vs model \(48, 32\)"):
        text.CLIPTextEncoder.from_pretrained(tmp_path / "shape")

    t5, t5_tok = tiny_t5()
    t5.save_pretrained(tmp_path / "t5")
    t5_tok.save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"(?s)CLIPTextEncoder: .*missing keys.*unexpected keys.*encoder\.block\.0"):
        text.CLIPTextEncoder.from_pretrained(tmp_path / "t5")  # the wrong subfolder of a pipeline
    weights = tmp_path / "t5" / "model.safetensors"
    sd = load_file(weights)
    save_file({k.replace("encoder.block.1.", "encoder.blocks.1."): v for k, v in sd.items()}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)T5TextEncoder: .*does not fit T5EncoderModel.*missing keys.*"
                                         r"encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight"):
        text.T5TextEncoder.from_pretrained(tmp_path / "t5")


def test_load_book_text_encoder_shows_no_progress_bar_and_restores_settings(capfd):
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    text.load_book_text_encoder()
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled() == bar


def test_unreachable_hub_id_gives_one_line_error():
    for cls in (text.CLIPTextEncoder, text.T5TextEncoder):
        with pytest.raises(OSError) as info:
            cls.from_pretrained("openai/clip-vit-large-patch14")
        msg = str(info.value)
        assert "\n" not in msg and "local folder" in msg and cls.__name__ in msg


def test_bad_prompts_and_truncation_warning(book_tok):
    enc = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"prompts\[1\]: expected a string, got int"):
        enc.encode(["a red circle", 3])
    long = " ".join(["a big red circle"] * 5)  # 20 words + 2 special = 22 tokens, limit 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = enc.encode([long, "a red circle"])
    msgs = [str(w.message) for w in caught]
    assert msgs == ["prompts[0]: 22 tokens is more than the CLIP text encoder's limit of 16; truncated, "
                    "dropping the last 6 tokens"]
    assert e.tokens.shape[1] == 16 and e.mask[0].all()


def test_dual_encoder_concatenates_and_pads_widths(book_tok):
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok, padding="longest")
    t5, t5_tok = tiny_t5()
    t5_enc = text.T5TextEncoder(t5, t5_tok, max_length=10)
    dual = dual_encoder.DualTextEncoder(clip, t5_enc, offload=None)
    prompts = ["a red circle", "a big blue square on the left"]
    e, c, t = dual.encode(prompts), clip.encode(prompts), t5_enc.encode(prompts)
    assert dual.width == 40 and e.tokens.shape == (2, c.tokens.shape[1] + 10, 40)
    assert torch.equal(e.tokens[:, :c.tokens.shape[1], :32], c.tokens)
    assert (e.tokens[:, :c.tokens.shape[1], 32:] == 0).all()  # zero-padded as SD3
    assert torch.equal(e.tokens[:, c.tokens.shape[1]:], t.tokens)
    assert torch.equal(e.mask, torch.cat([c.mask, t.mask], 1)) and torch.equal(e.pooled, c.pooled)
    only = dual_encoder.DualTextEncoder(clip, None, width=48).encode(prompts)
    assert only.tokens.shape == (2, c.tokens.shape[1], 48)
    with pytest.raises(ValueError, match="width"):
        dual_encoder.DualTextEncoder(clip, t5_enc, width=33)
    with pytest.raises(ValueError, match="offload: expected one of None, 'cpu', 'disk', got 'gpu'"):
        dual_encoder.DualTextEncoder(clip, t5_enc, offload="gpu")
    with pytest.raises(ValueError, match="cache_size: expected an integer >= 0"):
        dual_encoder.DualTextEncoder(clip, t5_enc, cache_size=-1)
    joined = dual_encoder.join_embeddings([c, t], 40)  # the same join as a function
    assert torch.equal(joined.tokens, e.tokens) and torch.equal(joined.mask, e.mask)


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_t5_offloading_places_weights_before_during_after(book_tok, tmp_path, offload):
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    t5, t5_tok = tiny_t5()
    reference = text.T5TextEncoder(tiny_t5()[0], t5_tok, max_length=10).encode(["a red circle"])
    t5_enc = text.T5TextEncoder(t5, t5_tok, max_length=10)
    # "disk": parked on meta (no storage at all), run on cpu: a real move without a GPU. "cpu": parked
    # in CPU memory; without a GPU park and compute device coincide, so only the bookkeeping is checked.
    dual = dual_encoder.DualTextEncoder(clip, t5_enc, offload=offload, device="cpu", offload_dir=tmp_path, cache_size=4)
    seen = []
    hook = t5.register_forward_pre_hook(lambda m, a: seen.append(
        {str(p.device) for p in m.parameters()}))
    parked = {str(p.device) for p in t5.parameters()}
    e = dual.encode(["a red circle", "a blue square"])
    after = {str(p.device) for p in t5.parameters()}
    hook.remove()
    assert seen == [{"cpu"}]  # during encode: every T5 weight on the compute device
    if offload == "disk":
        assert parked == after == {"meta"}  # before and after: no storage (weights on disk)
        assert (tmp_path / "secondary.safetensors").is_file()
    else:
        assert parked == after == {"cpu"}
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # weight tying survives the moves
    assert torch.allclose(e.tokens[:1, -10:], reference.tokens, atol=1e-6)  # same numbers as never offloaded
    # repeated prompt: served from the cache, T5 is not brought in
    calls = len(seen)
    hook = t5.register_forward_pre_hook(lambda m, a: seen.append(None))
    e2 = dual.encode(["a blue square"])
    hook.remove()
    assert len(seen) == calls and dual.cache_hits == 1 and torch.equal(e2.tokens[0], e.tokens[1])
    assert [s for s, _ in dual.events] == ["released", "built", "brought in", "encoding", "released",
                                           "all prompts cached"]


def test_disk_offload_cleans_up_and_keeps_the_callers_encoder_usable(book_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts tinydit_offload_*
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    t5, t5_tok = tiny_t5()
    mine = text.T5TextEncoder(t5, t5_tok, max_length=10)
    before = mine.encode(["a red circle"])
    dual = dual_encoder.DualTextEncoder(clip, mine, offload="disk", device="cpu")
    assert [p.name[:16] for p in tmp_path.iterdir()] == ["tinydit_offload_"] and dual_encoder.where(mine) == "meta"
    for _ in range(2):  # my own reference still encodes (it brings itself in) and goes back out
        assert torch.equal(mine.encode(["a red circle"]).tokens, before.tokens) and dual_encoder.where(mine) == "meta"
        dual.encode(["a red circle", "a blue square"])
    dual.close()
    assert not list(tmp_path.iterdir()) and dual_encoder.where(mine) == "cpu" and mine.offloader is None
    assert torch.equal(mine(["a red circle"]).tokens, before.tokens)
    assert torch.allclose(dual.encode(["a red circle"]).tokens[:, -10:], before.tokens, atol=1e-6)  # cached in a batch
    dual.close()  # twice is fine

    with dual_encoder.DualTextEncoder(clip, mine, offload="disk") as d:
        d.encode(["a green triangle"])
        assert len(list(tmp_path.iterdir())) == 1
    assert not list(tmp_path.iterdir()) and dual_encoder.where(mine) == "cpu"

    other = text.T5TextEncoder(tiny_t5(seed=1)[0], t5_tok, max_length=10)
    dual_encoder.DualTextEncoder(clip, other, offload="disk")  # never closed: garbage collection removes the folder
    assert len(list(tmp_path.iterdir())) == 1
    del other
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_disk_offload_folder_is_removed_at_interpreter_exit(tmp_path):
    script = """
import tempfile
from pathlib import Path
from transformers import T5Config, T5EncoderModel, T5Tokenizer
from tinydit import dual_encoder, text
vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581red", -1.0), ("\u2581circle", -1.0)]
t5 = T5EncoderModel(T5Config(vocab_size=5, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
secondary = text.T5TextEncoder(t5, T5Tokenizer(vocab=vocab, extra_ids=0), max_length=4)
dual = dual_encoder.DualTextEncoder(text.load_book_text_encoder(), secondary, offload="disk")
dual.encode(["red circle"])
assert [p.name[:16] for p in Path(tempfile.gettempdir()).iterdir()] == ["tinydit_offload_"]
print("ok")  # exits without close()
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    assert not list(tmp_path.glob("tinydit_offload_*"))


def test_offload_refuses_a_secondary_already_offloaded(book_tok, tmp_path):
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    t5, t5_tok = tiny_t5()
    mine = text.T5TextEncoder(t5, t5_tok, max_length=8)
    first = dual_encoder.DualTextEncoder(clip, mine, offload="cpu")
    with pytest.raises(ValueError, match="secondary: already offloaded by another DualTextEncoder; call its close"):
        dual_encoder.DualTextEncoder(clip, mine, offload="disk", offload_dir=tmp_path)
    first.close()
    dual_encoder.DualTextEncoder(clip, mine, offload="disk", offload_dir=tmp_path).close()


def test_disk_offload_overwrites_a_stale_weights_file(book_tok, tmp_path):
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    (t5_a, tok), (t5_b, _) = tiny_t5(seed=0), tiny_t5(seed=1)
    ref = text.T5TextEncoder(tiny_t5(seed=1)[0], tok, max_length=8).encode(["a red circle"])
    dual_encoder.DualTextEncoder(clip, text.T5TextEncoder(t5_a, tok, max_length=8), offload="disk", offload_dir=tmp_path)
    dual = dual_encoder.DualTextEncoder(clip, text.T5TextEncoder(t5_b, tok, max_length=8), offload="disk", offload_dir=tmp_path)
    assert torch.equal(dual.encode(["a red circle"]).tokens[:, -8:], ref.tokens)  # not the other model's file


def test_dual_cache_is_lru_and_bounded(book_tok):
    clip = text.CLIPTextEncoder(tiny_clip(book_tok), book_tok)
    t5, t5_tok = tiny_t5()
    dual = dual_encoder.DualTextEncoder(clip, text.T5TextEncoder(t5, t5_tok, max_length=8), offload="cpu", cache_size=2)
    dual.encode(["a", "a red circle", "a blue square"])
    assert list(dual.cache) == ["a red circle", "a blue square"]
    dual.encode(["a red circle", "a green triangle"])
    assert list(dual.cache) == ["a red circle", "a green triangle"] and dual.cache_misses == 4


def test_book_tokenizer_round_trip(book_tok, tmp_path):
    ids = book_tok("A big red circle, on the left")["input_ids"]
    toks = book_tok.convert_ids_to_tokens(ids)
    assert toks == ["<|startoftext|>", "a", "big", "red", "circle", "<unk>", "on", "the", "left", "<|endoftext|>"]
    assert book_tok.eos_token_id == 3 != 2  # transformers' CLIP pools at argmax(id) when eos_token_id == 2
    book_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a big red circle")["input_ids"] == book_tok("a big red circle")["input_ids"]
    with pytest.raises(ValueError, match="captions"):
        text_training.build_book_tokenizer([])


def test_book_training_runs_and_saves(tmp_path):
    result = text_training.train_book_text_encoder(out_dir=tmp_path, steps=3, batch_size=16, n_train=64, disable=True)
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["settings"]["steps"] == 3 and len(info["losses"]) == 3
    enc = text.load_book_text_encoder(tmp_path)
    img = text.load_book_image_encoder(tmp_path)
    e = enc.encode(["a red circle"])
    assert torch.allclose(e.pooled, result.text_encoder.encode(["a red circle"]).pooled)
    assert img(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="batch_size"):
        text_training.train_book_text_encoder(steps=1, batch_size=100, n_train=10)
    with pytest.raises(FileNotFoundError, match="train one"):
        text.load_book_text_encoder(tmp_path / "nothing")


def test_shipped_book_encoder_is_accurate_including_held_out_pairs():
    enc = text.load_book_text_encoder()
    assert enc.width == 96 and enc.pooled_width == 64
    size = sum(f.stat().st_size for f in text.BOOK_TEXT_ENCODER_DIR.iterdir())
    assert size < 5 * 2**20  # a packaging budget (measured 1.87 MB), not an accuracy threshold
    m = text_training.evaluate_book_encoders(enc, text.load_book_image_encoder(), n=300, seed=7)
    assert m["heldout_queries"] == 64  # how many of these 300 test captions name a HELD_OUT pair
    # Measured on CPU (float32) with these weights: value = hits / count. Margin: 2 of `count`
    # (queries or images), either way, for near-tied similarities that may flip on another CPU or BLAS.
    measured = {  # name: (hits, count)
        "retrieval_top1_exact": (240, 300),
        "retrieval_top1_semantic": (294, 300),
        "heldout_retrieval_top1_exact": (54, 64),
        "heldout_retrieval_top1_semantic": (62, 64),
        "attributes.color": (189, 190),
        "attributes.shape": (188, 190),
        "heldout_attributes.color": (29, 29),
        "heldout_attributes.shape": (27, 29),
    }
    for name, (hits, count) in measured.items():
        group, _, key = name.rpartition(".")
        value = m[group][key] if group else m[name]
        assert value == pytest.approx(hits / count, abs=2 / count + 1e-9), (name, value, hits / count)
