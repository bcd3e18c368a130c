"""tinydit.dit: adaLN-Zero identity, presets, loaders (original + diffusers layouts), parity."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tinydit.dit import DiT, DiTConfig, infer_config_from_original
from tinydit.dit_measure import dit_macs
from tinydit.embeddings import sincos_pos_embed_2d


diffusers = pytest.importorskip("diffusers")  # a dev dependency: installed by the test command

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def randomize(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_fresh_model_blocks_are_identity_and_output_is_zero():
    model = DiT(DiTConfig(**TINY)).eval()
    x = torch.randn(3, 4, 8, 8)
    tokens = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    assert torch.equal(model(x, torch.tensor([1, 50, 999]), torch.tensor([0, 5, 10])), torch.zeros(3, 8, 8, 8))


def test_output_channels_and_learn_sigma():
    assert randomize(DiT(DiTConfig(**TINY)))(torch.randn(2, 4, 8, 8), 5).shape == (2, 8, 8, 8)
    assert DiT(DiTConfig(**TINY, learn_sigma=False))(torch.randn(2, 4, 8, 8), 5).shape == (2, 4, 8, 8)


def make_diffusers_dit(tmp_path, seed=0, diverge=False):
    torch.manual_seed(seed)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6).eval()
    randomize(ref, seed=seed)
    with torch.no_grad():  # a converted checkpoint holds identical copies of the shared embedders
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
        if diverge:
            ref.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(0.01)
    ref.save_pretrained(tmp_path)
    return ref


def test_parity_with_diffusers_dit(tmp_path):
    ref = make_diffusers_dit(tmp_path)
    ours = DiT.from_pretrained(tmp_path).eval()
    assert ours.config.depth == 3 and ours.config.num_classes == 10 and ours.config.learn_sigma
    for block in ref.transformer_blocks:  # the original DiT's frequencies (see chapter 05)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 999])
    for y in (torch.tensor([0, 3, 9, 10, 10]), torch.tensor([10, 10, 10, 10, 10]), torch.arange(5)):
        with torch.no_grad():
            expect = ref(x, timestep=t, class_labels=y).sample
            got = ours(x, t, y)
        assert got.shape == expect.shape == (5, 8, 8, 8)
        assert (got - expect).abs().max() < 1e-5
    with torch.no_grad():  # y=None means the null class
        assert torch.allclose(ours(x, t), ours(x, t, torch.full((5,), 10)))


def test_diffusers_shift_differs_and_is_configurable(tmp_path):
    ref = make_diffusers_dit(tmp_path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 2])
    with torch.no_grad():
        shipped = ref(x, timestep=t, class_labels=y).sample
        original = DiT.from_pretrained(tmp_path).eval()(x, t, y)
        as_diffusers = DiT.from_pretrained(tmp_path, freq_shift=1.0).eval()(x, t, y)
    assert (shipped - original).abs().max() > 1e-3
    assert (shipped - as_diffusers).abs().max() < 1e-5


def test_diverged_embedder_copies_are_reported(tmp_path):
    make_diffusers_dit(tmp_path, diverge=True)
    with pytest.raises(ValueError, match="block 2's copy of the shared embedder 'timestep_embedder.linear_1.weight'"):
        DiT.from_pretrained(tmp_path)


ORIGINAL_KEYS_ONE_BLOCK = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}


def test_parameter_names_follow_the_original_layout():
    model = DiT(DiTConfig(**{**TINY, "depth": 1}))
    assert set(model.state_dict()) == ORIGINAL_KEYS_ONE_BLOCK
    assert model.y_embedder.embedding_table.weight.shape == (11, 32)  # 10 classes + the null class


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_from_original_infers_config_and_matches(tmp_path, suffix):
    cfg = DiTConfig(**{**TINY, "depth": 3, "hidden_size": 48, "num_heads": 3, "patch_size": 4, "input_size": 16})
    model = randomize(DiT(cfg)).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"DiT-tiny{suffix}"
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    loaded = DiT.from_original(path, num_heads=3).eval()
    assert loaded.config == cfg
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([7, 700]), torch.tensor([2, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_head_rule_for_the_paper_presets():
    for name in ("DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"):
        cfg = DiTConfig.preset(name)
        with torch.device("meta"):
            sd = DiT(cfg).state_dict()
        assert infer_config_from_original(sd) == cfg, name
    with torch.device("meta"):
        sd = DiT(DiTConfig(**{**TINY, "hidden_size": 128, "num_heads": 2})).state_dict()
        book = DiT(DiTConfig.preset("book")).state_dict()
    assert infer_config_from_original(sd, num_heads=2).num_heads == 2
    for state in (sd, book):  # the file does not say: no guess, the error asks for the argument
        with pytest.raises(ValueError, match="num_heads: the checkpoint does not store"):
            infer_config_from_original(state)
    with pytest.raises(ValueError, match="num_heads: must divide the checkpoint's width 128, got 3"):
        infer_config_from_original(sd, num_heads=3)


def test_loaded_models_are_in_eval_mode(tmp_path):
    model = randomize(DiT(DiTConfig(**TINY)))
    save_file(model.state_dict(), tmp_path / "dit.safetensors")
    model.save_pretrained(tmp_path / "folder")
    for loaded in (DiT.from_original(tmp_path / "dit.safetensors", num_heads=4), DiT.from_pretrained(tmp_path / "folder")):
        assert not loaded.training and not any(m.training for m in loaded.modules())


def test_wrapped_training_checkpoint_loads(tmp_path):
    model = randomize(DiT(DiTConfig(**TINY)))
    torch.save({"ema": model.state_dict(), "opt": {"lr": torch.tensor(1e-4)}}, tmp_path / "ckpt.pt")
    loaded = DiT.from_original(tmp_path / "ckpt.pt", num_heads=4)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


def test_another_architecture_is_refused(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="not a DiT checkpoint"):
        DiT.from_original(tmp_path / "vae.safetensors")


def test_shape_mismatch_names_the_keys(tmp_path):
    sd = DiT(DiTConfig(**TINY)).state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        DiT.from_original(tmp_path / "bad.safetensors", num_heads=4)


def test_pickle_with_objects_is_refused(tmp_path):
    import argparse  # any non-tensor object: weights_only=True refuses to unpickle it

    torch.save({"x_embedder.proj.weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        DiT.from_original(tmp_path / "evil.pt")


def test_save_and_load_tinydit_layout(tmp_path):
    model = randomize(DiT(DiTConfig(**TINY, qk_norm=True)))
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3, torch.tensor([1])), model(x, 3, torch.tensor([1])))


def test_offline_hub_id_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local folder"):
        DiT.from_pretrained("facebook/DiT-XL-2-256", subfolder="transformer")


def test_smaller_inputs_use_the_top_left_of_the_position_table():
    model = DiT(DiTConfig(**TINY))
    assert torch.allclose(model.pos_embed_for(2, 3)[0], sincos_pos_embed_2d(32, (2, 3)), atol=1e-6)
    assert randomize(model)(torch.randn(1, 4, 4, 6), 1).shape == (1, 8, 4, 6)


def test_label_dropout_only_in_training():
    model = DiT(DiTConfig(**TINY, class_dropout_prob=0.5))
    y = torch.zeros(2000, dtype=torch.long)
    table = model.y_embedder.embedding_table.weight
    model.train()
    out = model.y_embedder(y, generator=torch.Generator().manual_seed(0))
    dropped = (out == table[10]).all(dim=1).float().mean()
    assert 0.45 < dropped < 0.55
    model.eval()
    assert torch.equal(model.y_embedder(y), table[0].expand(2000, -1))


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda: (torch.randn(2, 3, 8, 8), 1, None), "x: expected latents of shape"),
        (lambda: (torch.randn(2, 4, 7, 8), 1, None), "divisible by patch_size"),
        (lambda: (torch.randn(2, 4, 16, 16), 1, None), "larger than the position table"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.ones(3), None), "t: expected"),
        (lambda: (torch.randn(2, 4, 8, 8), 1, torch.tensor([0, 11])), r"y: labels must be in \[0, 10\]"),
        (lambda: (torch.randn(2, 4, 8, 8), 1, torch.tensor([0.5, 1.0])), "y: expected integer labels"),
    ],
)
def test_bad_input(args, match):
    model = DiT(DiTConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model(*args())


def test_bad_configs():
    with pytest.raises(ValueError, match="name: unknown DiT preset"):
        DiTConfig.preset("DiT-M/2")
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="input_size"):
        DiTConfig(input_size=9, patch_size=2)


def test_presets_match_the_paper():
    paper = {"DiT-S/2": (33, 6.06), "DiT-B/4": (130, 5.56), "DiT-L/8": (458, 5.01), "DiT-XL/2": (675, 118.64)}
    for name, (mparams, gflops) in paper.items():
        cfg = DiTConfig.preset(name)
        with torch.device("meta"):
            n = DiT(cfg).num_params
        assert abs(n / 1e6 - mparams) / mparams < 0.02, name
        assert abs(dit_macs(cfg) / 1e9 - gflops) / gflops < 0.02, name


def test_mac_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = DiT(DiTConfig(**{**TINY, "attn_backend": "math", "mlp_ratio": 2.0}))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1]))
    assert counter.get_total_flops() / 2 == pytest.approx(dit_macs(model.config), rel=1e-3)


class _Zeros(nn.Module):
    """Stands in for a removed part: returns zeros shaped like the input (attention) or (B, D)."""

    def __init__(self, width: int | None = None):
        super().__init__()
        self.width = width

    def forward(self, x, *args):
        return x.new_zeros(x.shape[0], self.width) if self.width else torch.zeros_like(x)


def _verification_loop(ablation: str | None):
    """Chapter 05's verification loop with an optional wiring bug: overfit, then the wiring report."""
    from tinydit import schedules, vae
    from tinydit.data import ShapesDataset
    from tinydit.dit_measure import overfit_single_batch, wiring_report

    ds = ShapesDataset(8, seed=0)
    with torch.no_grad():
        latents = vae.load_book_vae().to_latent(torch.stack([ds[i][0] for i in range(8)]))  # (8, 4, 8, 8)
    ab = schedules.alphas_cumprod(schedules.make_betas("linear"))
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("book", hidden_size=96, depth=2, num_heads=4, class_dropout_prob=0.0))
    if ablation == "no attention":
        for block in model.blocks:
            block.attn = _Zeros()
    elif ablation == "timestep ignored":
        model.t_embedder = _Zeros(width=96)
    losses = overfit_single_batch(model, latents, torch.arange(8), ab, steps=800, lr=2e-3, seed=0, disable=True)
    return losses, wiring_report(model, latents, torch.arange(8), ab)


def verification_passes(losses, report) -> bool:
    """The chapter's criteria: loss below 0.1 and both wiring numbers above their minimum."""
    from tinydit.dit_measure import WIRING_MIN

    return (sum(losses[-100:]) / 100 < 0.1 and report["loss"] < 0.1
            and all(report[k] > v for k, v in WIRING_MIN.items()))


def test_verification_loop_passes_the_real_model():
    """A tiny DiT memorises 8 book-VAE latents (epsilon loss 1 -> < 0.1) and reads t and other tokens."""
    losses, report = _verification_loop(None)
    print(f"real model: last-100 loss {sum(losses[-100:]) / 100:.4f}, report {report}")
    assert losses[0] > 0.5  # the zero-initialised model predicts 0: loss = E[eps^2] = 1
    assert verification_passes(losses, report)


@pytest.mark.parametrize("ablation", ["no attention", "timestep ignored"])
def test_verification_loop_catches_wiring_bugs(ablation):
    losses, report = _verification_loop(ablation)
    print(f"{ablation}: last-100 loss {sum(losses[-100:]) / 100:.4f}, report {report}")
    assert not verification_passes(losses, report), f"the verification loop passed a model with {ablation}"


def test_legacy_transformer2dmodel_dit_config_loads(tmp_path):
    import json

    ref = make_diffusers_dit(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel",
                                                      "norm_type": "ada_norm_zero"}))
    ours = DiT.from_pretrained(tmp_path).eval()
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert (ours(x, t, y) - ref(x, timestep=t, class_labels=y).sample).abs().max() < 1e-5


def test_unknown_diffusers_dit_keys_are_refused(tmp_path):
    from safetensors.torch import load_file

    make_diffusers_dit(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    sd["transformer_blocks.0.attn2.to_q.weight"] = torch.zeros(32, 32)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="attn2.to_q.weight"):
        DiT.from_pretrained(tmp_path)


def test_class_conditioned_dit_refuses_context():
    with pytest.raises(TypeError, match="context"):
        DiT(DiTConfig(**TINY))(torch.randn(1, 4, 8, 8), 1, context=torch.randn(1, 3, 32))


def test_dit_refuses_a_pixart_folder_and_says_what_to_use(tmp_path):
    from tinydit.textdit import TextDiT, TextDiTConfig

    TextDiT(TextDiTConfig.preset("book-text", depth=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="TextDiT.from_pretrained"):
        DiT.from_pretrained(tmp_path)
