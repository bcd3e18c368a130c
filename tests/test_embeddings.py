"""Parity of tinydit.embeddings with diffusers (the reference the real DiT / PixArt / Flux code uses),
the RoPE relative-position property, and clear errors on bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import (
    CombinedTimestepLabelEmbeddings,
    TimestepEmbedding,
    Timesteps,
    apply_rotary_emb,
    get_1d_rotary_pos_embed,
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from tinydit import embeddings as E


TOL = 1e-6
T_VALUES = torch.tensor([0.0, 1.0, 2.5, 17.0, 250.0, 999.0])


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dim", [7, 8, 128, 256, 320])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("max_period", [10000, 1000])
def test_timestep_embedding_matches_diffusers(dim, flip, shift, max_period):
    ours = E.timestep_embedding(T_VALUES, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, max_period=max_period)
    ref = get_timestep_embedding(T_VALUES, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                 max_period=max_period)
    assert ours.shape == ref.shape == (len(T_VALUES), dim)
    assert _max_err(ours, ref) <= TOL


def test_timestep_embedding_scale_and_scalar_time():
    ref = get_timestep_embedding(T_VALUES, 64, scale=1000.0)
    assert _max_err(E.timestep_embedding(T_VALUES, 64, scale=1000.0), ref) <= TOL
    assert E.timestep_embedding(torch.tensor(5), 16).shape == (1, 16)


def test_dit_layout_is_cos_first_with_frequencies_over_half():
    """The original DiT layout: cos then sin, frequencies exp(-ln(P) * i / half) (shift 0)."""
    dim, half = 256, 128
    ours = E.timestep_embedding(T_VALUES, dim, flip_sin_to_cos=True, downscale_freq_shift=0).double()
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = T_VALUES.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    assert (ours - expected).abs().max().item() < 1e-4  # float32 arguments up to 999 rad
    assert _max_err(ours, get_timestep_embedding(T_VALUES, dim, True, 0)) <= TOL


def _copy_mlp(ours, ref: TimestepEmbedding):
    with torch.no_grad():
        ours.mlp[0].weight.copy_(ref.linear_1.weight)
        ours.mlp[0].bias.copy_(ref.linear_1.bias)
        ours.mlp[2].weight.copy_(ref.linear_2.weight)
        ours.mlp[2].bias.copy_(ref.linear_2.bias)


def test_timestep_embedder_matches_pixart_path():
    torch.manual_seed(0)
    ref_proj, ref_mlp = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0), TimestepEmbedding(256, 96)
    ours = E.TimestepEmbedder(96)
    _copy_mlp(ours, ref_mlp)
    t = torch.tensor([0, 10, 500, 999])
    assert _max_err(ours(t), ref_mlp(ref_proj(t))) <= TOL


def test_timestep_embedder_with_shift_one_matches_diffusers_dit_port():
    torch.manual_seed(0)
    ref = CombinedTimestepLabelEmbeddings(num_classes=10, embedding_dim=64, class_dropout_prob=0.0).eval()
    ours = E.TimestepEmbedder(64, downscale_freq_shift=1)
    _copy_mlp(ours, ref.timestep_embedder)
    t, y = torch.tensor([0, 3, 400, 999]), torch.tensor([1, 2, 3, 4])
    ref_t = ref(t, y) - ref.class_embedder(y, force_drop_ids=None)
    assert _max_err(ours(t), ref_t) <= 1e-5  # the sum and difference with the label embedding round in float32


def test_timestep_embedder_loads_original_dit_state_dict_names():
    ours = E.TimestepEmbedder(32, frequency_embedding_size=64)
    sd = {"mlp.0.weight": torch.randn(32, 64), "mlp.0.bias": torch.randn(32),
          "mlp.2.weight": torch.randn(32, 32), "mlp.2.bias": torch.randn(32)}
    ours.load_state_dict(sd)  # strict: raises on any name or shape mismatch
    assert torch.equal(ours.mlp[2].bias, sd["mlp.2.bias"])


@pytest.mark.parametrize("grid, base_size, scale", [
    (16, 16, 1.0),  # DiT: base size = grid side, raw indices
    (8, 8, 1.0),
    (32, 16, 1.0),  # diffusers default base size 16
    (64, 64, 2.0),  # PixArt 1024 px
    (16, 16, 0.5),  # PixArt 256 px
    ((8, 12), 16, 1.0),  # non-square
])
def test_2d_sincos_matches_diffusers(grid, base_size, scale):
    ours = E.sincos_pos_embed_2d(64, grid, base_size=base_size, interpolation_scale=scale)
    ref = get_2d_sincos_pos_embed(64, grid, base_size=base_size, interpolation_scale=scale)
    assert ours.shape == ref.shape
    assert _max_err(ours, ref) <= TOL


def test_2d_sincos_without_base_size_is_the_dit_table():
    ref = get_2d_sincos_pos_embed(96, 16, base_size=16)
    assert _max_err(E.sincos_pos_embed_2d(96, 16), ref) <= TOL


@pytest.mark.parametrize("dim, theta", [(16, 10000.0), (64, 10000.0), (32, 256.0)])
def test_rope_frequencies_and_apply_match_diffusers(dim, theta):
    pos = torch.arange(0, 40, dtype=torch.float64) * 1.5
    cos, sin = E.rope_frequencies(pos, dim, theta)
    rc, rs = get_1d_rotary_pos_embed(dim, pos, theta=theta, use_real=True, repeat_interleave_real=True,
                                     freqs_dtype=torch.float64)
    assert _max_err(cos, rc) <= TOL and _max_err(sin, rs) <= TOL
    x = torch.randn(2, 3, 40, dim, generator=torch.Generator().manual_seed(0))
    assert _max_err(E.apply_rope(x, cos, sin), apply_rotary_emb(x, (rc, rs), use_real=True)) <= TOL


def test_apply_rope_matches_complex_form():
    """Lumina's complex-number form: pairs as complex numbers, times exp(i m theta_k)."""
    dim, n = 32, 24
    x = torch.randn(1, n, 2, dim, generator=torch.Generator().manual_seed(1))  # Lumina: (B, S, heads, D)
    freqs_cis = get_1d_rotary_pos_embed(dim, n, use_real=False)  # (n, dim/2) complex
    ref = apply_rotary_emb(x, freqs_cis[None], use_real=False)  # (1, n, dim/2) for Lumina
    ours = E.apply_rope(x.transpose(1, 2), *E.rope_frequencies(torch.arange(n), dim)).transpose(1, 2)
    assert _max_err(ours, ref) <= TOL


def test_rope_axial_matches_flux_pos_embed():
    axes_dim = (8, 12, 12)
    ids = torch.stack([torch.zeros(30), torch.arange(30) // 6, torch.arange(30) % 6], dim=1)  # (30, 3)
    cos, sin = E.rope_axial(ids, axes_dim)
    rc, rs = FluxPosEmbed(theta=10000, axes_dim=list(axes_dim))(ids)
    assert _max_err(cos, rc) <= TOL and _max_err(sin, rs) <= TOL


def test_rope_2d_is_axial_rows_then_columns():
    cos, sin = E.rope_2d(3, 5, 16)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    rc, rs = FluxPosEmbed(theta=10000, axes_dim=[8, 8])(torch.stack([rows.flatten(), cols.flatten()], 1))
    assert _max_err(cos, rc) <= TOL and _max_err(sin, rs) <= TOL


def test_rope_score_depends_only_on_relative_offset_1d():
    g = torch.Generator().manual_seed(0)
    dim, n = 64, 50
    q, k = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    cos, sin = E.rope_frequencies(torch.arange(n), dim)
    scores = E.apply_rope(q.expand(n, dim), cos.double(), sin.double()) @ \
        E.apply_rope(k.expand(n, dim), cos.double(), sin.double()).T  # (n, n)
    for offset in (-20, -3, 0, 1, 7, 30):
        diag = scores.diagonal(-offset)  # m - n = offset
        assert diag.max() - diag.min() < 1e-4, offset
    assert not torch.allclose(scores.diagonal(0)[0], scores.diagonal(-5)[0])  # and it does depend on the offset


def test_rope_score_depends_only_on_relative_offset_2d():
    g = torch.Generator().manual_seed(1)
    h, w, dim = 6, 7, 32
    q, k = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    cos, sin = E.rope_2d(h, w, dim)
    s = (E.apply_rope(q.expand(h * w, dim), cos, sin) @ E.apply_rope(k.expand(h * w, dim), cos, sin).T)
    s = s.reshape(h, w, h, w)
    for (dr, dc) in ((0, 0), (1, 2), (-2, 3), (4, -5)):
        vals = torch.stack([s[r, c, r - dr, c - dc] for r in range(h) for c in range(w)
                            if 0 <= r - dr < h and 0 <= c - dc < w])
        assert vals.max() - vals.min() < 1e-4, (dr, dc)


@pytest.mark.parametrize("call, argument", [
    (lambda: E.timestep_embedding(torch.zeros(2, 3), 8), "t"),
    (lambda: E.timestep_embedding(T_VALUES, 1), "dim"),
    (lambda: E.timestep_embedding(T_VALUES, 2, downscale_freq_shift=1), "downscale_freq_shift"),
    (lambda: E.TimestepEmbedder(0), "hidden_size"),
    (lambda: E.sincos_pos_embed_2d(30, 4), "embed_dim"),
    (lambda: E.sincos_pos_embed_2d(32, (0, 4)), "grid_size"),
    (lambda: E.sincos_pos_embed_2d(32, 4, interpolation_scale=0), "interpolation_scale"),
    (lambda: E.rope_frequencies(torch.arange(4), 7), "dim"),
    (lambda: E.rope_2d(4, 4, 30), "dim"),
    (lambda: E.rope_axial(torch.zeros(4, 2), (8, 8, 8)), "ids"),
    (lambda: E.apply_rope(torch.zeros(1, 4, 8), torch.zeros(5, 8), torch.zeros(5, 8)), "x"),
])
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b.*expected.*got"):
        call()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, pattern", [
    (lambda: E.timestep_embedding(torch.tensor([0.0, NAN]), 8), r"^t: expected finite values, got 1 NaN"),
    (lambda: E.timestep_embedding(torch.tensor([INF, 1.0]), 8), r"^t: expected finite values, got 0 NaN and 1 inf"),
    (lambda: E.timestep_embedding(-INF, 8), r"^t: expected finite values"),
    (lambda: E.TimestepEmbedder(8, 16)(torch.tensor([NAN])), r"^t: expected finite values, got 1 NaN"),
    (lambda: E.timestep_embedding(T_VALUES, 8, max_period=NAN), r"^max_period: expected a finite number, got nan"),
    (lambda: E.timestep_embedding(T_VALUES, 8, downscale_freq_shift=INF),
     r"^downscale_freq_shift: expected a finite number, got inf"),
    (lambda: E.timestep_embedding(T_VALUES, 8, scale=NAN), r"^scale: expected a finite number, got nan"),
    (lambda: E.sincos_embed_1d(8, torch.tensor([1.0, NAN])), r"^pos: expected finite values, got 1 NaN"),
    (lambda: E.sincos_pos_embed_2d(32, 4, base_size=16, interpolation_scale=NAN),
     r"^interpolation_scale: expected a finite number, got nan"),
    (lambda: E.rope_frequencies(torch.tensor([0.0, INF]), 8), r"^pos: expected finite values, got 0 NaN and 1 inf"),
    (lambda: E.rope_frequencies(torch.arange(4), 8, theta=NAN), r"^theta: expected a finite number, got nan"),
])
def test_non_finite_input_is_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_numpy_integers_count_as_integers_and_bools_do_not():
    assert E.timestep_embedding(T_VALUES, np.int64(8)).shape == (len(T_VALUES), 8)
    assert E.TimestepEmbedder(np.int32(16), np.int64(32))(torch.tensor([3])).shape == (1, 16)
    assert E.sincos_pos_embed_2d(np.int64(32), (np.int64(2), 3)).shape == (6, 32)
    assert E.rope_2d(np.int64(2), 3, np.int16(8))[0].shape == (6, 8)
    with pytest.raises(TypeError, match=r"^dim: expected an integer, got True"):
        E.timestep_embedding(T_VALUES, True)
    with pytest.raises(TypeError, match=r"^hidden_size: expected an integer, got False"):
        E.TimestepEmbedder(False)
    with pytest.raises(TypeError, match=r"^grid_size: expected an integer, got True"):
        E.sincos_pos_embed_2d(32, (True, 4))
    with pytest.raises(TypeError, match=r"^h: expected an integer, got 2.0"):
        E.rope_2d(2.0, 3, 8)
