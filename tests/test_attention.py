"""tinydit.attention: backends agree, masks work, and the module matches torch's MultiheadAttention."""

import pytest
import torch
from torch import nn

from tinydit.attention import Attention, RMSNorm, attention, attention_weights, flash_available


@pytest.mark.parametrize("tq, tk", [(16, 16), (7, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_math_and_sdpa_agree(tq, tk, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, tq, 8, generator=g)
    k, v = torch.randn(2, 3, 4, tk, 8, generator=g).unbind(0)
    mask = None
    if masked:
        mask = torch.ones(3, tk, dtype=torch.bool)
        mask[1, tk // 2:] = False
        mask[2, 1:] = False
    a = attention(q, k, v, mask, backend="math")
    b = attention(q, k, v, mask, backend="sdpa")
    c = attention(q, k, v, mask, backend="auto")
    assert a.shape == (3, 4, tq, 8)
    assert (a - b).abs().max() < 1e-5 and (c - b).abs().max() < 1e-5


def test_key_padding_mask_ignores_padded_values():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 5, 8, generator=g).unbind(0)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = attention(q, k, v, mask, backend="sdpa")
    # changing what sits under the padding changes nothing
    v2, k2 = v.clone(), k.clone()
    v2[:, :, 3:] = 100.0
    k2[:, :, 3:] = -7.0
    assert torch.allclose(attention(q, k2, v2, mask, backend="sdpa"), out, atol=1e-6)
    # and equals attention over the real tokens only
    assert torch.allclose(attention(q, k[:, :, :3], v[:, :, :3], backend="math"), out, atol=1e-6)
    w = attention_weights(q, k, mask)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 5)) and (w[..., 3:] == 0).all()


def test_full_boolean_mask_broadcasts():
    q, k, v = torch.randn(3, 2, 2, 6, 4).unbind(0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(attention(q, k, v, causal[None], backend="math"), ref, atol=1e-6)  # 2-D means key padding
    assert torch.allclose(attention(q, k, v, causal[None, None], backend="sdpa"), ref, atol=1e-6)


@pytest.mark.parametrize("heads", [2, 3])  # heads == B: plain broadcasting would not even fail
def test_3d_mask_is_per_sample_and_shared_by_heads(heads):
    """A (B, T_q, T_k) mask holds one mask per sample, read as (B, 1, T_q, T_k); right-aligned
    broadcasting would read it as (heads, T_q, T_k) and give sample 0's mask to head 0."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, heads, 5, 8, generator=g).unbind(0)  # B = 2
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[0] = torch.eye(5, dtype=torch.bool)  # sample 0: every query sees only its own key
    for backend in ("math", "sdpa", "auto"):
        out = attention(q, k, v, mask, backend=backend)
        torch.testing.assert_close(out[0], v[0])  # every head of sample 0 copies its own value
        torch.testing.assert_close(out[1], attention(q[1:], k[1:], v[1:], backend="math")[0])
        torch.testing.assert_close(out, attention(q, k, v, mask[:, None], backend=backend))
        torch.testing.assert_close(attention(q, k, v, mask.int(), backend=backend), out)  # 0/1 integers
    assert torch.equal(attention_weights(q, k, mask)[0] > 0, mask[0].expand(heads, 5, 5))
    with pytest.raises(ValueError, match="boolean"):
        attention(q, k, v, mask.float())  # float masks stay refused
    with pytest.raises(ValueError, match=r"\(B, T_q, T_k\) = \(2, 5, 5\)"):
        attention(q, k, v, torch.ones(3, 5, 5, dtype=torch.bool))  # another batch size


def test_module_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = Attention(32, num_heads=4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 10, 32)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, 6:] = False
    with torch.no_grad():
        expect = ref(x, x, x, key_padding_mask=~pad, need_weights=False)[0]
        got = ours(x, mask=pad)
    assert (expect - got).abs().max() < 1e-5


def test_rmsnorm_formula_and_qk_norm():
    x = torch.randn(4, 16)
    n = RMSNorm(16)
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0)
    expect = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * n.weight
    assert torch.allclose(n(x), expect, atol=1e-6)
    attn = Attention(16, 2, qk_norm=True)
    q, k, _ = attn.qkv_heads(torch.randn(1, 5, 16))
    rms = q.pow(2).mean(-1).sqrt()  # the per-head RMS of normalised queries is 1 (unit weight)
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert attn(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_flash_is_optional_and_refused_on_cpu():
    q = torch.randn(1, 1, 4, 8)
    assert not flash_available(q)  # CPU tensors never take the flash path
    with pytest.raises(ValueError, match="flash"):
        attention(q, q, q, backend="flash")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: attention(q, q, q, backend="fast"), "backend"),
        (lambda q: attention(q[0], q[0], q[0]), "q: expected"),
        (lambda q: attention(q, q[:, :, :3], q), "shapes do not fit"),
        (lambda q: attention(q, q, q, mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
        (lambda q: attention(q, q, q, mask=torch.zeros(2, 4, dtype=torch.bool)), "padding only"),
        (lambda q: attention(q, q, q, mask=torch.ones(5, 5, 5, dtype=torch.bool)), "mask"),
        (lambda q: attention(q, q, q, mask=torch.ones(4, dtype=torch.bool)), "mask: expected"),
        (lambda q: attention(q, q, q, mask=torch.ones(1, 2, 2, 4, 4, dtype=torch.bool)), "mask: expected"),
        (lambda q: attention(q[:, :, :1], q, q, mask=torch.ones(2, 4, 4, dtype=torch.bool)), "mask: expected"),
        (lambda q: attention(q, q, q, mask=torch.zeros(2, 1, 4, 4, dtype=torch.bool)), "at least one key"),
        (lambda q: attention(q, q, q, mask=torch.zeros(2, 1, 1, 4).float()), "boolean"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 2, 4, 8))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, num_heads=4)
