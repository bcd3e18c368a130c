"""tinydit.stepcache: the first-block cache on the shipped book model (exactness of computed calls, skipping,
reset, warmup, keys, close), parity with diffusers' `apply_first_block_cache` on a tiny random PixArt, and
bad input. CPU only."""

import diffusers
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from tinydit import train
from tinydit.stepcache import CachedBlocks, StepCache, relative_change
from tinydit.textdit import TextDiT


HEADS, HEAD_DIM, CAPTION = 4, 12, 24  # the tiny PixArt of tests/test_textdit.py


def book_model() -> TextDiT:
    return train.load_book_model()[0].eval()


def book_inputs(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 6, 96, generator=g)  # latents, text tokens
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 6][:B])
    return x, dict(context=ctx, context_mask=mask)


def calls(model, x, kw, timesteps):
    with torch.no_grad():
        return [model(x, torch.full((x.shape[0],), float(t)), **kw) for t in timesteps]


def test_threshold_zero_never_skips_and_is_exact():
    model = book_model()
    x, kw = book_inputs()
    timesteps = (500, 500, 499, 100)  # a repeated call too: relative change 0 is not below 0
    plain = calls(model, x, kw, timesteps)
    with StepCache(model, threshold=0) as cache:
        cached = calls(model, x, kw, timesteps)
    assert (cache.calls, cache.skipped, cache.saved()) == (4, 0, 0.0)
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)


def test_large_threshold_skips_a_nearby_step_and_reset_recomputes():
    model = book_model()
    original = model.blocks
    keys = list(model.state_dict())
    x, kw = book_inputs()
    plain = calls(model, x, kw, (500, 499, 100, 100))
    cache = StepCache(model, threshold=0.5)
    assert isinstance(model.blocks, CachedBlocks) and cache.depth == 6 and cache.saved() == 0.0
    assert list(model.state_dict()) == keys  # the same modules under the same keys while on
    assert all(model.blocks[i] is original[i] for i in range(6))  # the same block modules
    first, near = calls(model, x, kw, (500, 499))
    assert (cache.calls, cache.skipped) == (2, 1)  # t=499 is next to t=500: the deep blocks were reused
    assert torch.equal(first, plain[0])  # a fully computed call is bit-exact
    error = ((near - plain[1]).norm() / plain[1].norm()).item()
    print(f"book model, reused step t=499 (after t=500): relative L2 error {error:.2e}")
    assert 0 < error < 0.02  # measured 3.2e-3 (6x margin); a reused step is an approximation, close for a nearby t
    cache.reset()  # a new image: the next call computes, whatever the threshold
    (after_reset,) = calls(model, x, kw, (100,))
    assert (cache.calls, cache.skipped) == (3, 1) and torch.equal(after_reset, plain[2])
    calls(model, x, kw, (100,))  # the same input again: relative change 0 < 0.5, skipped
    assert (cache.calls, cache.skipped) == (4, 2)
    assert cache.saved() == pytest.approx(2 * 5 / (4 * 6))  # skipped calls ran 1 of 6 blocks
    assert list(model.state_dict()) == keys
    cache.close()
    assert model.blocks is original and type(model.blocks) is nn.ModuleList
    assert torch.equal(calls(model, x, kw, (499,))[0], plain[1])  # closed: plain again


def test_warmup_and_shape_changes_always_compute():
    model = book_model()
    x, kw = book_inputs(B=2)
    x3, kw3 = book_inputs(B=3)
    with StepCache(model, threshold=1e9, warmup=3) as cache:
        calls(model, x, kw, (500, 500, 500))
        assert cache.skipped == 0  # the first 3 calls after a reset always compute
        calls(model, x, kw, (500,))
        assert cache.skipped == 1
        plain3 = calls(model, x3, kw3, (500,))  # another batch size: nothing to compare with, computed
        assert (cache.calls, cache.skipped) == (5, 1)
    with torch.no_grad():
        assert torch.equal(plain3[0], model(x3, torch.full((3,), 500.0), **kw3))


def make_pixart(folder, seed: int = 0, layers: int = 3) -> diffusers.PixArtTransformer2DModel:
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


def pixart_pair(folder, threshold: float):
    """diffusers' PixArt with its first-block cache, ours (the same weights) with StepCache, a call counter on
    each model's last block (its forward does not run when the deep blocks are skipped), and the inputs."""
    ref = make_pixart(folder)
    ours = TextDiT.from_pretrained(folder).eval()
    apply_first_block_cache(ref, FirstBlockCacheConfig(threshold=threshold))
    cache = StepCache(ours, threshold=threshold)
    ran = {"ref": 0, "ours": 0}
    ref.transformer_blocks[-1].ff.net[2].register_forward_hook(lambda *_: ran.update(ref=ran["ref"] + 1))
    ours.blocks[-1].mlp.fc2.register_forward_hook(lambda *_: ran.update(ours=ran["ours"] + 1))
    g = torch.Generator().manual_seed(3)
    ctx, mask = torch.randn(2, 5, CAPTION, generator=g), torch.tensor([[1] * 5, [1] * 3 + [0] * 2])

    def step(x, t):
        """One call of each; returns (diffusers' output, ours, diffusers computed the deep blocks, ours did)."""
        before = dict(ran)
        with torch.no_grad(), CacheMixin.cache_context(ref, "cond"):  # PixArt is not a CacheMixin: call it unbound
            r = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask).sample
        with torch.no_grad():
            o = ours(x, t, context=ctx, context_mask=mask)
        return r, o, ran["ref"] > before["ref"], ran["ours"] > before["ours"]

    return ours, cache, step


def test_parity_with_diffusers_first_block_cache(tmp_path):
    """Both compare the first block's residual with the one of the last *fully computed* call (relative L1:
    mean |r - r_prev| / mean |r_prev|) and, on a skip, add the deep blocks' stored residual (last block's output
    minus the first block's output) to the new first-block output. The rules differ only at equality: diffusers
    computes when change > threshold (skips at change == threshold), tinydit skips when change < threshold; and
    diffusers has no warmup (equivalent to tinydit's warmup=1) and no batch-shape check. The inputs here keep
    every change more than 0.005 from the threshold (measured: 0.0079), so the decisions are comparable."""
    threshold = 0.03
    ours, cache, step = pixart_pair(tmp_path, threshold)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = (900.0, 899.5, 899.0, 600.0, 599.5, 300.0)  # slowly, then a jump, slowly, a jump
    r1 = []  # ours' first-block residual at each call, to show the margin around the threshold
    probe = ours.blocks[0].register_forward_hook(lambda m, a, out: r1.append(out - a[0]))
    decisions_ref, decisions_ours, changes, last_computed = [], [], [], None
    for i, t in enumerate(timesteps):
        r, o, computed_ref, computed_ours = step(x, torch.full((2,), t))
        decisions_ref.append(computed_ref)
        decisions_ours.append(computed_ours)
        if last_computed is not None:
            change = relative_change(r1[-1], r1[last_computed])
            changes.append(round(change, 4))
            assert abs(change - threshold) > 0.005, (i, change)  # measured: closest 0.0221 (call 2 vs call 0)
        if computed_ours:
            last_computed = i
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)  # measured 0 (bit-exact), skipped calls included
        x = x + 0.002 * torch.randn(x.shape, generator=g)
    probe.remove()
    print(f"changes vs the last computed call: {changes}, threshold {threshold}")
    print(f"computed (diffusers): {decisions_ref}\ncomputed (tinydit):   {decisions_ours}")
    assert decisions_ours == decisions_ref == [True, False, False, True, False, True]
    assert (cache.calls, cache.skipped) == (6, 3) and cache.saved() == pytest.approx(3 * 2 / (6 * 3))


def test_threshold_zero_differs_from_diffusers_on_a_repeated_call(tmp_path):
    """The one documented difference: at threshold 0 tinydit never skips (change < 0 is impossible), while
    diffusers skips an exactly repeated call (change 0 is not > 0). Its output then stays within rounding."""
    ours, cache, step = pixart_pair(tmp_path, 0.0)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((2,), 500.0)
    first = step(x, t)
    second = step(x, t)
    assert first[2:] == (True, True) and second[2:] == (False, True)  # diffusers skipped, tinydit computed
    assert torch.equal(second[1], first[1]) and cache.skipped == 0
    torch.testing.assert_close(second[0], first[0], rtol=0, atol=1e-5)


def test_bad_inputs_fail_with_sentences():
    model = book_model()
    with pytest.raises(ValueError, match=r"threshold: expected a number >= 0, got -0.1"):
        StepCache(model, threshold=-0.1)
    with pytest.raises(ValueError, match=r"warmup: expected .*>= 1.*got 0"):
        StepCache(model, warmup=0)
    with pytest.raises(ValueError, match="blocks: not a child list of model"):
        StepCache(model, blocks=nn.ModuleList([nn.Linear(2, 2)]))
    assert type(model.blocks) is nn.ModuleList  # refused before touching the model
    cache = StepCache(model)
    with pytest.raises(ValueError, match="model: a step cache is already on; call close"):
        StepCache(model)
    cache.close()
    StepCache(model).close()  # closed: it may be applied again
