"""tinydit.textdit, the text-conditioned model: parity with diffusers' PixArtTransformer2DModel (PixArt-α
with micro-conditions, PixArt-Σ without), the original PixArt checkpoint layout, the book model,
and bad input."""

import diffusers
import pytest
import torch

from tinydit import dit, dual_encoder, loading, text, textdit
from tinydit.dit import DiT
from tinydit.textdit import TextDiT, TextDiTConfig, load_transformer


HEADS, HEAD_DIM, CAPTION = 4, 12, 24  # width 48: divisible by 3 for the micro-condition embedders


def make_pixart(tmp_path, micro: bool, seed: int = 0, sample: int = 8, layers: int = 2):
    torch.manual_seed(seed)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=HEADS * HEAD_DIM, caption_channels=CAPTION, sample_size=sample, patch_size=2,
        norm_eps=1e-6, use_additional_conditions=micro, interpolation_scale=sample / 64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(tmp_path)
    return ref


def captions(B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, T, CAPTION, generator=g)  # (B, T, caption_channels)
    lengths = [T, 4, 1][:B]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])  # padded captions
    return ctx, mask


def max_error(ref, ours, micro, shape, t, ctx, mask):
    B = shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    res, ar = torch.tensor([[shape[2] * 8.0, shape[3] * 8.0]] * B), torch.tensor([[shape[3] / shape[2]]] * B)
    with torch.no_grad():
        r = ref(x, encoder_hidden_states=ctx, timestep=t.expand(B) if t.ndim == 0 else t, encoder_attention_mask=mask,
                added_cond_kwargs=dict(resolution=res, aspect_ratio=ar) if micro else None).sample
        o = ours(x, t, context=ctx, context_mask=mask, **(dict(resolution=res, aspect_ratio=ar) if micro else {}))  # scalar t ok
    assert o.shape == r.shape
    return (o - r).abs().max().item(), r.abs().max().item()


@pytest.mark.parametrize("micro", [True, False], ids=["alpha-micro-conditions", "sigma-no-micro-conditions"])
def test_parity_with_diffusers_pixart(tmp_path, micro):
    ref = make_pixart(tmp_path, micro)
    ours = TextDiT.from_pretrained(tmp_path)
    assert isinstance(ours, TextDiT) and not isinstance(ours, DiT) and not ours.training
    assert ours.config.micro_conditions == micro and ours.config.context_dim == CAPTION
    assert ours.config.learn_sigma and ours.config.caption_tokens == 0
    ctx, mask = captions()
    for shape in ((3, 4, 8, 8), (3, 4, 12, 16)):  # the training grid, and a larger non-square one
        for t in (torch.tensor([0.0, 10.0, 999.0]), torch.tensor([500.0, 250.5, 1.0]), torch.tensor(37.0)):
            err, scale = max_error(ref, ours, micro, shape, t, ctx, mask)
            assert err <= 1e-5 and scale > 0.1, (shape, t, err)


def test_padding_is_masked_exactly(tmp_path):
    make_pixart(tmp_path, micro=False)
    model = TextDiT.from_pretrained(tmp_path)
    ctx, _ = captions(B=1, T=7)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        short = model(x, 10, context=ctx[:, :3])
        padded = model(x, 10, context=torch.cat([ctx[:, :3], torch.randn(1, 9, CAPTION)], 1),
                       context_mask=torch.tensor([[1] * 3 + [0] * 9]))
        unmasked = model(x, 10, context=torch.cat([ctx[:, :3], torch.randn(1, 9, CAPTION)], 1))
    assert (short - padded).abs().max() < 1e-6 < (short - unmasked).abs().max()


def test_original_layout_loads_and_matches_diffusers(tmp_path):
    ref = make_pixart(tmp_path / "diffusers", micro=True)
    converted = TextDiT.from_pretrained(tmp_path / "diffusers")
    sd = dict(converted.state_dict())
    sd["y_embedder.y_embedding"] = torch.randn(12, CAPTION)  # the null caption, present in original checkpoints
    torch.save({"state_dict": sd}, tmp_path / "PixArt-tiny.pth")  # PixArt's release wrapper
    ours = TextDiT.from_original(tmp_path / "PixArt-tiny.pth", num_heads=HEADS)
    assert isinstance(ours, TextDiT)
    c = ours.config
    assert (c.depth, c.hidden_size, c.context_dim, c.caption_tokens, c.micro_conditions) == (2, 48, CAPTION, 12, True)
    assert c.interpolation_scale == 8 / 64 and c.pos_base_size == 4
    ctx, mask = captions()
    for t in (torch.tensor([0.0, 10.0, 999.0]), torch.tensor([3.0, 600.0, 42.0])):
        err, _ = max_error(ref, ours, True, (3, 4, 8, 8), t, ctx, mask)
        assert err <= 1e-5
    # no context: the learned null caption
    x = torch.randn(2, 4, 8, 8)
    kw = dict(resolution=[[64.0, 64.0]], aspect_ratio=[1.0])
    with torch.no_grad():
        assert torch.equal(ours(x, 5, **kw), ours(x, 5, context=sd["y_embedder.y_embedding"][None].expand(2, -1, -1), **kw))
    # a stored position table from another interpolation scale is caught
    sd["pos_embed"] = dit.sincos_pos_embed_2d(48, 4, base_size=4, interpolation_scale=1.0)[None]
    torch.save(sd, tmp_path / "wrong-scale.pth")
    with pytest.raises(ValueError, match="interpolation_scale"):
        TextDiT.from_original(tmp_path / "wrong-scale.pth", num_heads=HEADS)


def test_load_transformer_dispatches_to_class_conditional_dits(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    ref.save_pretrained(tmp_path / "dit")
    model = load_transformer(tmp_path / "dit")
    assert type(model) is DiT and model.config.num_classes == 10
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    again = load_transformer(tmp_path / "DiT-tiny.pt", num_heads=2)
    assert type(again) is DiT and torch.equal(again.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_tinydit_text_dit_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TextDiT(TextDiTConfig.preset("book-text", depth=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path)
    again = load_transformer(tmp_path)
    assert isinstance(again, TextDiT) and again.config == model.config
    with pytest.raises(ValueError, match="TextDiT.from_pretrained"):
        DiT.from_pretrained(tmp_path)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 96), torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x, 3, context=ctx, pooled=pooled), again(x, 3, context=ctx, pooled=pooled))


def test_book_model_starts_at_zero_and_accepts_text_embeddings():
    model = TextDiT(TextDiTConfig.preset("book-text")).eval()
    assert not isinstance(model, DiT) and 1e6 < model.num_params < 10e6
    emb = text.TextEmbeddings(torch.randn(2, 6, 96), torch.tensor([[1] * 6, [1] * 3 + [0] * 3]), torch.randn(2, 64))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(x, torch.tensor([1, 900]), context=emb), torch.zeros(2, 4, 8, 8))
    tokens = torch.randn(2, 16, 192)
    for block in model.blocks:  # adaLN-Zero + zero cross-attention output: identity at initialisation
        assert torch.equal(block(tokens, torch.randn(2, 192), torch.randn(2, 6, 192), emb.mask), tokens)
    # the pooled vector conditions the model once it is trained
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        a = model(x, 5, context=emb)
        b = model(x, 5, context=emb.tokens, context_mask=emb.mask, pooled=emb.pooled + 1)
    assert (a - b).abs().max() > 1e-3


def test_presets_match_the_papers():
    with torch.device("meta"):
        alpha = TextDiT(TextDiTConfig.preset("PixArt-alpha-XL/2-1024"))
        sigma = TextDiT(TextDiTConfig.preset("PixArt-Sigma-XL/2-1024"))
    assert 600e6 < alpha.num_params < 620e6  # "0.6B"
    assert alpha.config.caption_tokens == 120 and sigma.config.caption_tokens == 300
    assert alpha.config.micro_conditions and not sigma.config.micro_conditions
    assert alpha.config.interpolation_scale == 2.0 and TextDiTConfig.preset("PixArt-XL/2-256").interpolation_scale == 0.5
    with pytest.raises(ValueError, match="name"):
        TextDiTConfig.preset("PixArt-XXL")


def test_bad_inputs_fail_with_sentences(tmp_path):
    make_pixart(tmp_path, micro=True)
    pix = TextDiT.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 8, 8)
    ctx, mask = torch.randn(2, 5, CAPTION), torch.ones(2, 5, dtype=torch.bool)
    kw = dict(resolution=[[64.0, 64.0]], aspect_ratio=[1.0])
    cases = [
        (lambda: pix(x, 1, context=torch.randn(2, 5, 77), **kw), "context: expected text tokens of width 24"),
        (lambda: pix(x, 1, context=torch.randn(5, CAPTION), **kw), r"context: expected text tokens of shape \(2, T, 24\)"),
        (lambda: pix(x, 1, context=ctx, context_mask=mask[:, :3], **kw), r"context_mask: expected shape \(B, T\) = \(2, 5\)"),
        (lambda: pix(x, 1, context=ctx, context_mask=torch.zeros(2, 5, dtype=torch.bool), **kw), "at least one real"),
        (lambda: pix(x, 1, context=ctx, context_mask=torch.full((2, 5), 2), **kw), "only 0 and 1"),
        (lambda: pix(x, 1, context=ctx), "resolution, aspect_ratio"),
        (lambda: pix(x, 1, context=ctx, pooled=torch.randn(2, 8), **kw), "pooled"),
        (lambda: pix(x, 1, **kw), "null caption"),  # diffusers folders carry no y_embedding
        (lambda: pix(x, torch.ones(3), context=ctx, **kw), "t: expected"),
        (lambda: pix(x, 1, context=ctx, resolution=[[64.0, 64.0]] * 3, aspect_ratio=[1.0]), "resolution: expected"),
        (lambda: pix(x, 1, context_mask=mask, **kw), "context_mask: given without context"),
        (lambda: pix(torch.randn(2, 3, 8, 8), 1, context=ctx, **kw), "x: expected latents"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    additive = torch.tensor([[0.0, 0.0, 0.0, float("-inf"), float("-inf")]] * 2)  # 0 = attend, -inf = ignore
    with pytest.raises(TypeError, match="context_mask: expected a boolean .* convert it with `mask == 0`"):
        pix(x, 1, context=ctx, context_mask=additive, **kw)
    with pytest.raises(TypeError, match="y"):
        pix(x, 1, y=torch.tensor([1, 2]), context=ctx, **kw)
    book = TextDiT(TextDiTConfig.preset("book-text"))
    with pytest.raises(ValueError, match=r"pooled: .* expected shape \(2, 64\), got None"):
        book(x, 1, context=torch.randn(2, 5, 96))
    with pytest.raises(ValueError, match="larger than the position table"):
        book(torch.randn(2, 4, 16, 16), 1, context=torch.randn(2, 5, 96), pooled=torch.randn(2, 64))
    with pytest.raises(ValueError, match="modulation"):
        TextDiTConfig(modulation="film")
    with pytest.raises(ValueError, match="divisible by 3"):
        TextDiTConfig(hidden_size=32, num_heads=4, micro_conditions=True)
    with pytest.raises(TypeError, match="config: expected a TextDiTConfig"):
        TextDiT(dit.DiTConfig())


def test_diffusers_state_dict_with_unknown_keys_is_refused(tmp_path):
    ref = make_pixart(tmp_path, micro=False, layers=1)
    sd = {**ref.state_dict(), "transformer_blocks.0.attn1.norm_q.weight": torch.ones(HEAD_DIM)}
    with pytest.raises(ValueError, match="does not know how to map"):
        loading.convert_diffusers_pixart(sd)
    with pytest.raises(ValueError, match="not a diffusers PixArtTransformer2DModel"):
        loading.convert_diffusers_pixart({"pos_embed.proj.weight": torch.zeros(1)})


def test_missing_interpolation_scale_follows_the_original_rule():
    base = dict(_class_name="PixArtTransformer2DModel", num_attention_heads=16, attention_head_dim=72,
                caption_channels=4096, cross_attention_dim=1152, out_channels=8)
    scales = {s: textdit.config_from_diffusers_pixart({**base, "sample_size": s, "interpolation_scale": None}).interpolation_scale
              for s in (32, 64, 128)}
    assert scales == {32: 0.5, 64: 1.0, 128: 2.0}  # 256, 512, 1024 px (diffusers' default would give 1 at 256)
    assert textdit.config_from_diffusers_pixart({**base, "sample_size": 32, "interpolation_scale": 1}).interpolation_scale == 1
    with pytest.raises(ValueError, match="PixArt options"):
        textdit.config_from_diffusers_pixart({**base, "sample_size": 32, "norm_elementwise_affine": True})


def test_legacy_transformer2dmodel_configs_load(tmp_path):
    """Hub repos converted before diffusers split its classes say "Transformer2DModel"; the class is
    then chosen by norm_type, as diffusers does."""
    import json

    ref = make_pixart(tmp_path, micro=False)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"}))
    ours = load_transformer(tmp_path)
    assert isinstance(ours, TextDiT)
    ctx, mask = captions()
    err, _ = max_error(ref, ours, False, (3, 4, 8, 8), torch.tensor([1.0, 500.0, 999.0]), ctx, mask)
    assert err <= 1e-5


def test_dual_encoder_follows_to():
    enc = dual_encoder.DualTextEncoder(text.load_book_text_encoder(), None)
    enc.to("meta")
    assert enc.device == torch.device("meta") and enc.primary.device == torch.device("meta")
