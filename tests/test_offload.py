"""tinydit.offload: model, block and leaf offloading with hooks. On this CPU-only machine the same
hooks run with device="cpu" (outputs must equal the plain model's exactly) and device="meta" (no
storage: the ledger's byte counts are exact, the copies free). The CUDA paths (pinned memory, the
side stream) run in benchmarks/offload.py when a GPU is present."""

import pytest
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from tinydit import dual_encoder, text
from tinydit import offload as off
from tinydit.textdit import TextDiT, TextDiTConfig


WORDS = "a red blue circle square left right of".split()


class Toy(nn.Module):
    def __init__(self, d=32, depth=6):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                    for _ in range(depth))
        self.head = nn.Linear(d, 8)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        x = self.embed(x) * self.scale
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=40, d_kv=10, d_ff=64, num_layers=4, num_heads=4,
                                    relative_attention_num_buckets=8)).eval()
    return text.T5TextEncoder(model, T5Tokenizer(vocab=vocab, extra_ids=0), max_length=10)


def text_dit():
    torch.manual_seed(0)
    model = TextDiT(TextDiTConfig.preset("book-text", depth=4)).eval()
    for p in model.parameters():  # PixArt's init zeroes some layers: make every weight count
        nn.init.normal_(p, std=0.05)
    return model


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 96, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    return x, torch.tensor([10, 500]), dict(context=ctx, context_mask=mask, pooled=torch.randn(2, 64, generator=g))


@pytest.mark.parametrize("mode,options", [("block", {"group_size": 1}), ("block", {"group_size": 3}),
                                          ("leaf", {}), ("model", {})])
def test_offloaded_text_dit_gives_exactly_the_same_output(mode, options):
    model = text_dit()
    x, t, cond = dit_inputs()
    with torch.no_grad():
        expected = model(x, t, **cond)
        o = off.offload({"dit": model} if mode == "model" else model, mode, device="cpu", **options)
        out = model(x, t, **cond)
        o.release()
        assert o.ledger.loads > 0 and o.ledger.resident == 0
        o.close()
        again = model(x, t, **cond)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert model._tinydit_offload is None and not model._forward_pre_hooks  # close() undid it


@pytest.mark.parametrize("mode,group_size,peak_blocks,loads", [("block", 1, 1, 7), ("block", 2, 2, 4),
                                                                ("block", 6, 6, 2)])
def test_block_offload_peak_is_the_rest_plus_one_group(mode, group_size, peak_blocks, loads):
    model = Toy()
    total = off.nbytes(off.tensors_of([model]))
    block = off.nbytes(off.tensors_of([model.blocks[0]]))
    o = off.offload(model, mode, device="meta", group_size=group_size)
    with torch.no_grad():
        out = model(torch.randn(3, 8))
    assert out.is_meta and out.shape == (3, 8)
    rest = total - 6 * block
    assert o.ledger.peak == rest + peak_blocks * block, (o.ledger.peak, rest, block)
    assert o.ledger.loads == loads and o.ledger.resident == 0  # the model's end sent the rest out
    o.close()
    assert {str(p.device) for p in model.parameters()} == {"cpu"}  # back home, with data
    assert torch.equal(model(torch.ones(1, 8)), model(torch.ones(1, 8)))


def test_leaf_and_model_offload_peaks():
    model = Toy()
    leaf = off.LeafOffload(model, device="meta")
    with torch.no_grad():
        model(torch.randn(3, 8))
    largest = max(off.nbytes(off.tensors_of([m], recurse=False)) for m in model.blocks.modules())
    own = off.nbytes(off.tensors_of([model], recurse=False))  # the model's own buffer, present for its whole call
    assert leaf.ledger.peak == own + largest and leaf.ledger.resident == 0
    leaf.close()
    a, b = Toy(depth=2), Toy(depth=4)
    both = off.ModelOffload({"a": a, "b": b}, device="meta")
    with torch.no_grad():
        for _ in range(3):
            b(a(torch.randn(1, 8)))
    size_b = off.nbytes(off.tensors_of([b]))
    assert both.ledger.peak == size_b and both.ledger.loads == 6  # one copy per call of a component
    with both.use("a") as device:
        assert device.type == "meta" and both.active.name == "a"
    assert [e[1] for e in both.ledger.events[-2:]] == ["b", "a"]  # b out, a in
    both.close()


def test_dual_text_encoder_streams_t5_block_by_block():
    clip_free = tiny_t5()  # primary: any TextEncoder; a second T5 keeps the test small
    reference = tiny_t5().encode(["a red circle", "a blue square"])
    t5 = tiny_t5()
    dual = dual_encoder.DualTextEncoder(clip_free, t5, device="cpu",
                                offload=lambda m, device: off.BlockOffload(m, device=device, group_size=1))
    o = t5.offloader
    assert isinstance(o, off.BlockOffload) and len(o.block_groups) == 4
    e = dual.encode(["a red circle", "a blue square"])
    assert torch.equal(e.tokens[:, -10:], reference.tokens)
    assert o.ledger.resident == 0 and o.ledger.loads == 5  # rest + 4 blocks, all sent out after the call
    dual.close()
    assert t5.offloader is None and t5.model.shared.weight is t5.model.encoder.embed_tokens.weight
    assert torch.equal(t5.encode(["a red circle", "a blue square"]).tokens, reference.tokens)


def test_t5_block_offload_on_meta_counts_one_block():
    t5 = tiny_t5()
    blocks = t5.model.encoder.block
    o = off.BlockOffload(t5, device="meta")
    assert off.find_blocks(t5) is blocks
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad(), o:
        out = t5.model(input_ids=ids).last_hidden_state
    assert out.is_meta and out.shape == (1, 4, 40)
    block = max(off.nbytes(off.tensors_of([b])) for b in blocks)
    rest = off.nbytes(off.tensors_of([t5])) - sum(off.nbytes(off.tensors_of([b])) for b in blocks)
    assert o.ledger.peak <= rest + block and o.ledger.resident == 0
    o.close()


def test_bad_input_gets_clear_errors():
    with torch.device("meta"):
        ghost = Toy()
    with pytest.raises(ValueError, match="model: .* tensors are on the meta device"):
        off.BlockOffload(ghost, device="cpu")
    model = Toy()
    o = off.BlockOffload(model, device="cpu")
    with pytest.raises(ValueError, match="model: already offloaded"):
        off.LeafOffload(model, device="cpu")
    o.close()
    off.LeafOffload(model, device="cpu").close()  # after close() it may be offloaded again
    with pytest.raises(ValueError, match="mode: expected one of"):
        off.offload(model, "layers", device="cpu")
    with pytest.raises(ValueError, match="group_size: expected an integer >= 1"):
        off.BlockOffload(model, device="cpu", group_size=0)
    with pytest.raises(ValueError, match="device: expected a device"):
        off.BlockOffload(model, device="gpu0")
    with pytest.raises(ValueError, match="stream: prefetching on a side stream needs a CUDA device"):
        off.BlockOffload(model, device="cpu", stream=True)
    with pytest.raises(TypeError, match="models\\['x'\\]: expected an nn.Module, got str"):
        off.ModelOffload({"x": "not a model"}, device="cpu")
    with pytest.raises(ValueError, match="model: Linear has no nn.ModuleList"):
        off.BlockOffload(nn.Linear(2, 2), device="cpu")
    with pytest.raises(ValueError, match="name: expected one of \\['a'\\], got 'b'"):
        with off.ModelOffload({"a": Toy()}, device="cpu").use("b"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory: pinned CPU memory needs CUDA"):
            off.BlockOffload(Toy(), device="cpu", pin_memory=True)
