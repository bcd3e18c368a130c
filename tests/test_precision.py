"""tinydit.precision: fp8 weight storage with a per-layer upcast (layerwise casting) on a DiT-XL/2-shaped
meta model and on the shipped book model, parity with diffusers' `apply_layerwise_casting` on a tiny
random PixArt, the SDPA kernel helpers, and bad input. CPU only."""

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.hooks import apply_layerwise_casting
from torch import nn

from tinydit import train
from tinydit.dit import DiT, DiTConfig
from tinydit.precision import (
    CASTABLE,
    LayerwiseCasting,
    fp8_dtype,
    pin_sdpa,
    sdpa_backends,
    weight_bytes,
)
from tinydit.textdit import TextDiT


HEADS, HEAD_DIM, CAPTION = 4, 12, 24  # the tiny PixArt of tests/test_textdit.py
FP8 = torch.float8_e4m3fn


def make_pixart(folder, seed: int = 0, layers: int = 2) -> diffusers.PixArtTransformer2DModel:
    """A tiny random diffusers PixArt (as in tests/test_textdit.py), every parameter non-zero, saved to `folder`."""
    torch.manual_seed(seed)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=HEADS * HEAD_DIM, caption_channels=CAPTION, sample_size=8, patch_size=2,
        norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=8 / 64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(folder)
    return ref


def book_inputs(B: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 6, 96, generator=g)  # latents, text tokens
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] + [0] * 5])[:B]  # padded captions
    return x, torch.tensor([10, 300, 600, 950])[:B], dict(context=ctx, context_mask=mask)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def fp8_layers(model: nn.Module) -> set[str]:
    """Names of the modules whose own weight is stored in fp8."""
    return {n for n, m in model.named_modules() if getattr(m, "weight", None) is not None and m.weight.dtype == FP8}


def test_dit_xl_on_meta_stores_about_one_byte_a_weight():
    with torch.device("meta"):  # the 675 M-parameter shape, no memory
        model = DiT(DiTConfig.preset("DiT-XL/2")).to(torch.bfloat16)
    bf16 = weight_bytes(model)
    casting = LayerwiseCasting(model, "fp8_e4m3", "bf16")
    ratio = weight_bytes(model) / bf16
    print(f"DiT-XL/2: bf16 {bf16 / 1e9:.3f} GB -> fp8 storage {weight_bytes(model) / 1e9:.3f} GB, ratio {ratio:.4f}")
    assert ratio <= 0.52  # measured 0.5043: the embedders, final layer and modulation tables stay bf16
    assert all(p.is_meta for p in model.parameters())
    assert model.blocks[27].mlp.fc2.weight.dtype == FP8 and model.x_embedder.proj.weight.dtype == torch.bfloat16
    casting.close()
    assert weight_bytes(model) == bf16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_book_model_fp8_output_close_to_fp32_and_skip_patterns_respected():
    reference_model = train.load_book_model()[0].eval()
    model = train.load_book_model()[0].eval()
    x, t, kw = book_inputs()
    with torch.no_grad():
        reference = reference_model(x, t, **kw)
    casting = LayerwiseCasting(model, "fp8_e4m3", "bf16")
    # idle: every Linear inside the blocks in fp8; the embedders, final layer, norms and tables in bf16
    block_linears = {n for n, m in model.named_modules() if isinstance(m, CASTABLE) and n.startswith("blocks.")}
    assert fp8_layers(model) == block_linears and len(block_linears) == 6 * 7
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        assert p.dtype == (FP8 if owner in block_linears else torch.bfloat16), name
    assert model.blocks[0].scale_shift_table.dtype == torch.bfloat16  # a block parameter outside any Linear
    seen = []  # registered after the casting hook: sees the layer as its forward does
    probe = model.blocks[3].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    with torch.no_grad():
        out = model(x, t, **kw)
    probe.remove()
    assert seen == [torch.bfloat16] and model.blocks[3].mlp.fc1.weight.dtype == FP8  # upcast for the call only
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    error = rel(out, reference)
    print(f"book model, fp8 e4m3 storage + bf16 compute vs fp32: relative L2 error {error:.4f}")
    assert error < 0.03  # measured 0.0153 (bf16 alone: 0.0065); 2x margin for platform noise
    assert fp8_layers(model) == block_linears  # the stored fp8 weights are not re-rounded by the call
    # close(): bf16 everywhere, hooks gone, the same (fp8-rounded) numbers as before
    casting.close()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model._tinydit_casting is None
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, t, **kw), out)
    LayerwiseCasting(model, "fp8_e5m2", "bf16").close()  # closed: it may be applied again


def test_fp8_e5m2_storage_is_coarser_but_works():
    reference_model, model = train.load_book_model()[0].eval(), train.load_book_model()[0].eval()
    x, t, kw = book_inputs()
    LayerwiseCasting(model, "fp8_e5m2", "fp32")
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float8_e5m2
    with torch.no_grad():
        error = rel(model(x, t, **kw), reference_model(x, t, **kw))
    print(f"book model, fp8 e5m2 storage + fp32 compute vs fp32: relative L2 error {error:.4f}")
    assert 1e-3 < error < 0.05  # measured 0.0240 (e5m2 has 2 mantissa bits); 2x margin


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32-compute", "bf16-compute"])
def test_parity_with_diffusers_layerwise_casting(tmp_path, compute):
    """The same weights in fp8 in both: the Linears inside the transformer blocks (diffusers' attn1/attn2/ff,
    tinydit's fused attn.qkv, cross_attn.kv_linear, ...). fp8 rounding is elementwise, so fusing q/k/v does
    not change the stored values; both round fp32 -> compute dtype -> fp8."""
    ref = make_pixart(tmp_path)
    ours = TextDiT.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, CAPTION, generator=g), torch.tensor([10.0, 700.0])
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])

    def run():
        with torch.no_grad():
            r = ref(x.to(compute), encoder_hidden_states=ctx.to(compute), timestep=t, encoder_attention_mask=mask).sample
            return r.float(), ours(x, t, context=ctx, context_mask=mask).float()

    ref.to(compute)
    ours.to(compute)
    plain_ref, plain_ours = run()
    apply_layerwise_casting(ref, storage_dtype=FP8, compute_dtype=compute,
                            skip_modules_pattern=("pos_embed", "norm", "adaln_single", "caption_projection", "^proj_out$"))
    LayerwiseCasting(ours, "fp8_e4m3", compute, skip=(r"^(?!blocks\.)",))  # everything outside the blocks
    assert {n.replace("transformer_blocks.", "blocks.") for n in fp8_layers(ref)} == {
        f"blocks.{i}.{a}.{b}" for i in range(2) for a, b in [("attn1", "to_q"), ("attn1", "to_k"), ("attn1", "to_v"),
                                                            ("attn1", "to_out.0"), ("attn2", "to_q"), ("attn2", "to_k"),
                                                            ("attn2", "to_v"), ("attn2", "to_out.0"), ("ff", "net.0.proj"),
                                                            ("ff", "net.2")]}
    assert fp8_layers(ours) == {f"blocks.{i}.{n}" for i in range(2) for n in (
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2")}
    for i in range(2):  # bit for bit the same stored fp8 values
        a, b = ref.transformer_blocks[i], ours.blocks[i]
        pairs = [(torch.cat([getattr(a.attn1, f"to_{c}").weight for c in "qkv"]), b.attn.qkv.weight),
                 (torch.cat([a.attn2.to_k.weight, a.attn2.to_v.weight]), b.cross_attn.kv_linear.weight),
                 (a.attn1.to_out[0].weight, b.attn.proj.weight), (a.ff.net[2].bias, b.mlp.fc2.bias)]
        for theirs, mine in pairs:
            assert mine.dtype == FP8 and torch.equal(theirs.view(torch.uint8), mine.view(torch.uint8))
    fp8_ref, fp8_ours = run()
    parity, plain_parity, effect = rel(fp8_ours, fp8_ref), rel(plain_ours, plain_ref), rel(fp8_ref, plain_ref)
    print(f"{compute}: fp8 parity {parity:.2e} (without casting {plain_parity:.2e}), fp8 effect {effect:.2e}")
    assert effect > 2e-3  # measured 3.5e-3 (fp32) / 5.8e-3 (bf16): the casting did change the output
    if compute == torch.float32:
        assert parity < 1e-6  # measured 0 (bit-exact); 1e-6 for platform noise
    else:
        assert parity < 1e-3  # measured 3.8e-4 (without casting: 2.5e-4, bf16 rounding of fused vs split matmuls)


def test_sdpa_backends_and_pinning():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))  # (B, heads, T, head_dim)
    mask = torch.rand(16, 16, generator=g) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    for m in (None, mask):
        found = sdpa_backends(q, k, v, m)
        assert set(found) == {"flash", "efficient", "cudnn", "math", "auto"}
        assert found["math"] is True and found["auto"] in ("flash", "efficient", "cudnn", "math")
        assert found[found["auto"]]  # the kernel torch picks accepts the inputs
        print(f"mask={m is not None}: {found}")
        default = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        with pin_sdpa("math"):
            pinned = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(pinned, default, rtol=0, atol=1e-5)
        for name in ("flash", "efficient", "cudnn"):
            if not found[name]:  # pinned to a kernel that refuses: an error, never a silent fallback
                with pytest.raises(RuntimeError), pin_sdpa(name):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def test_bad_inputs_fail_with_sentences(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of .*'math'.*got 'fast'"), pin_sdpa("fast"):
        pass
    with pytest.raises(ValueError, match=r"storage_dtype: expected one of \['fp8_e4m3', 'fp8_e5m2'\], got 'fp4'"):
        fp8_dtype("fp4")
    layer = nn.Linear(4, 4)
    for bad in ("fp8_e4m3", "int8"):
        with pytest.raises(ValueError, match=f"compute_dtype: expected .*got '{bad}'"):
            LayerwiseCasting(layer, compute_dtype=bad)
    with pytest.raises(ValueError, match=r"compute_dtype: expected fp32, fp16 or bf16, got torch.float8_e4m3fn"):
        LayerwiseCasting(layer, compute_dtype=FP8)
    assert layer.weight.dtype == torch.float32  # refused before touching the model
    model = nn.Sequential(nn.Linear(4, 4))
    LayerwiseCasting(model)
    with pytest.raises(ValueError, match="model: layerwise casting is already on; call close"):
        LayerwiseCasting(model)
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch older than 2.1
    with pytest.raises(RuntimeError, match=r"storage_dtype: this torch \((.+)\) has no float8_e4m3fn.*torch >= 2\.1") as err:
        fp8_dtype("fp8_e4m3")
    assert torch.__version__ in str(err.value)


def test_layerwise_casting_survives_a_forward_that_raises():
    """A forward that fails inside a cast layer must not leave it in the compute dtype for good."""
    from tinydit.precision import LayerwiseCasting

    m = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    LayerwiseCasting(m, "fp8_e4m3", "bf16", skip=())
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 63, dtype=torch.bfloat16))  # wrong width: F.linear raises inside the layer
    m(torch.randn(2, 64, dtype=torch.bfloat16))
    assert m[0].weight.dtype == torch.float8_e4m3fn
