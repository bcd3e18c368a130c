"""`dtype=` on every loader: weights converted while reading (tensor by tensor), models built empty on
the meta device, no float32 copy in memory; the fp16 VAE overflow guard. All on CPU."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinydit import loading, text, vae
from tinydit.checkpoint import (
    WeightsMismatchError,
    empty_model,
    load_model,
    load_state_dict,
    resolve_dtype,
)
from tinydit.dit import DiT, DiTConfig
from tinydit.textdit import TextDiT, load_transformer


diffusers = pytest.importorskip("diffusers")  # a dev dependency: the reference, never a run-time one

LOW = [torch.bfloat16, torch.float16]
BAD_DTYPE = r"^dtype: expected one of fp32, fp16, bf16 \(or a torch dtype\), got "


def randomize(model, std, seed=0):
    """Random weights everywhere, including the zero-initialised ones (so every path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random diffusers models saved in diffusers' own format: DiT, PixArt, AutoencoderKL."""
    root = tmp_path_factory.mktemp("dtype")
    torch.manual_seed(0)
    dit = randomize(diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6), std=0.05)
    with torch.no_grad():  # a converted checkpoint holds identical copies of the shared embedders
        dit.transformer_blocks[1].norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    dit.save_pretrained(root / "dit")
    pixart = randomize(diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=24, sample_size=8, patch_size=2, norm_eps=1e-6,
        use_additional_conditions=True, interpolation_scale=8 / 64), std=0.1, seed=1)
    pixart.save_pretrained(root / "pixart")
    torch.manual_seed(0)
    ae = diffusers.AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4)
    ae.save_pretrained(root / "vae")
    return root


def run_dit(m):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([1.0, 300.0, 999.0]), torch.tensor([0, 5, 10])).float()


def run_pixart(m):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 7, 24, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()
    kw = dict(resolution=torch.tensor([[64.0, 64.0]] * 3), aspect_ratio=torch.tensor([[1.0]] * 3))
    with torch.no_grad():
        return m(x, torch.tensor([0.0, 10.0, 999.0]), context=ctx, context_mask=mask, **kw).float()


def run_vae(m):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m.decode(z).float()


LOADERS = {"DiT": (lambda f, **kw: DiT.from_pretrained(f / "dit", **kw), run_dit),
           "TextDiT": (lambda f, **kw: TextDiT.from_pretrained(f / "pixart", **kw), run_pixart),
           "AutoencoderKL": (lambda f, **kw: vae.AutoencoderKL.from_pretrained(f / "vae", **kw), run_vae)}
# Max |low-precision output - float32 output| / max |float32 output|, measured (torch 2.13, 2-core x86
# CPU): DiT bf16 9.0e-3, fp16 1.3e-3; TextDiT bf16 8.9e-3, fp16 9.2e-4; AutoencoderKL bf16 1.7e-2,
# fp16 2.2e-3 (bf16 keeps 8 mantissa bits, fp16 11). Bounds: about 3x the measured value, for CPU
# kernel differences (bf16 / fp16 accumulation varies with the instruction set).
TOLERANCE = {("DiT", torch.bfloat16): 0.03, ("DiT", torch.float16): 0.004,
             ("TextDiT", torch.bfloat16): 0.03, ("TextDiT", torch.float16): 0.003,
             ("AutoencoderKL", torch.bfloat16): 0.05, ("AutoencoderKL", torch.float16): 0.007}


def tensors_everywhere(model: nn.Module):
    """Every tensor a module holds: parameters, buffers and plain tensor attributes."""
    for m in model.modules():
        yield from (v for v in vars(m).values() if isinstance(v, torch.Tensor))
    yield from model.parameters()
    yield from model.buffers()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", LOADERS)
def test_loaders_convert_and_stay_close_to_float32(folders, kind, dtype):
    load, run = LOADERS[kind]
    ref, low = load(folders), load(folders, dtype=dtype)
    assert {p.dtype for p in low.parameters()} == {dtype} and not low.training
    assert not any(t.is_meta for t in tensors_everywhere(low))
    # converting while reading gives exactly the float32 model cast afterwards
    for (k, a), b in zip(ref.state_dict().items(), low.state_dict().values(), strict=True):
        assert torch.equal(a.to(dtype), b), k
    out, out_low = run(ref), run(low)
    rel = ((out_low - out).abs().max() / out.abs().max()).item()
    print(f"{kind} {dtype}: max rel. error vs float32 = {rel:.2e}")
    assert torch.isfinite(out_low).all() and rel < TOLERANCE[kind, dtype]


@pytest.mark.parametrize("kind", LOADERS)
def test_float32_through_the_empty_model_path_is_exact(folders, kind):
    load, run = LOADERS[kind]
    assert torch.equal(run(load(folders)), run(load(folders, dtype="fp32")))


def test_dtype_names_and_torch_dtypes():
    for names, want in ((("fp32", "float32"), torch.float32), (("fp16", "float16", "FP16"), torch.float16),
                        (("bf16", "bfloat16", " BF16 "), torch.bfloat16)):
        assert all(resolve_dtype(n) is want for n in names) and resolve_dtype(want) is want
    assert resolve_dtype(None) is None and resolve_dtype(torch.float64) is torch.float64


@pytest.mark.parametrize("bad", ["int8", "half", "fp8", "", torch.int8, torch.bool, 16, object()])
def test_unsupported_dtype_is_refused_with_the_message(bad):
    with pytest.raises(ValueError, match=BAD_DTYPE):
        resolve_dtype(bad)


@pytest.mark.parametrize("call", [
    lambda f: load_state_dict(f / "dit" / "diffusion_pytorch_model.safetensors", dtype="int8"),
    lambda f: DiT.from_pretrained(f / "dit", dtype="fp64"),
    lambda f: DiT.from_original(f / "missing.pt", dtype="float"),
    lambda f: TextDiT.from_pretrained(f / "pixart", dtype=torch.int32),
    lambda f: TextDiT.from_original(f / "missing.pth", dtype="8bit"),
    lambda f: load_transformer(f / "dit", dtype="bf32"),
    lambda f: vae.AutoencoderKL.from_pretrained(f / "vae", dtype="auto"),
    lambda f: vae.AutoencoderKL.from_single_file(f / "missing.ckpt", dtype="int4"),
    lambda f: vae.load_book_vae(dtype="fp8"),
    lambda f: text.load_book_text_encoder(dtype="int8"),
    lambda f: text.load_book_image_encoder(dtype="uint8"),
], ids=["load_state_dict", "DiT.from_pretrained", "DiT.from_original", "TextDiT.from_pretrained",
        "TextDiT.from_original", "load_transformer", "AutoencoderKL.from_pretrained",
        "AutoencoderKL.from_single_file", "load_book_vae", "load_book_text_encoder", "load_book_image_encoder"])
def test_every_loader_refuses_an_unsupported_dtype(folders, call):
    with pytest.raises(ValueError, match=BAD_DTYPE):
        call(folders)


def test_original_layouts_and_load_transformer_with_dtype(folders, tmp_path):
    """The pickle path (torch.load with mmap) and the original layouts give the same bf16 models."""
    dit = DiT.from_pretrained(folders / "dit", dtype="bf16")
    pixart = TextDiT.from_pretrained(folders / "pixart", dtype="bf16")
    torch.save(DiT.from_pretrained(folders / "dit").state_dict(), tmp_path / "DiT-tiny.pt")
    torch.save({"state_dict": TextDiT.from_pretrained(folders / "pixart").state_dict()}, tmp_path / "PixArt-tiny.pth")
    # an old (non-zip) pickle cannot be memory-mapped: read whole, then converted
    torch.save(DiT.from_pretrained(folders / "dit").state_dict(), tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    for other in (DiT.from_original(tmp_path / "DiT-tiny.pt", num_heads=4, dtype=torch.bfloat16),
                  load_transformer(tmp_path / "DiT-tiny.pt", num_heads=4, dtype="bf16"),
                  load_transformer(tmp_path / "legacy.pt", num_heads=4, dtype="bf16"),
                  load_transformer(folders / "dit", dtype="bf16")):
        assert isinstance(other, DiT) and torch.equal(run_dit(other), run_dit(dit))
    for other in (TextDiT.from_original(tmp_path / "PixArt-tiny.pth", num_heads=4, dtype="bf16"),
                  load_transformer(tmp_path / "PixArt-tiny.pth", num_heads=4, dtype="bf16"),
                  load_transformer(folders / "pixart", dtype="bf16")):
        assert isinstance(other, TextDiT) and torch.equal(run_pixart(other), run_pixart(pixart))


def test_pixart_stored_position_table_check_allows_low_precision_rounding(folders, tmp_path):
    model = TextDiT.from_pretrained(folders / "pixart")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pth")
    assert TextDiT.from_original(tmp_path / "ok.pth", num_heads=4, dtype="bf16").pos_embed.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^interpolation_scale: the checkpoint's stored position table"):
        TextDiT.from_original(tmp_path / "ok.pth", num_heads=4, dtype="bf16", interpolation_scale=1.0)


def test_single_file_vae_with_dtype(folders, tmp_path):
    ref = vae.AutoencoderKL.from_pretrained(folders / "vae")
    ldm = {"first_stage_model." + k: v.contiguous() for k, v in loading.diffusers_to_ldm(ref.state_dict(), 3).items()}
    save_file({**ldm, "model.diffusion_model.step": torch.tensor([7])}, tmp_path / "sd.safetensors")
    low = vae.AutoencoderKL.from_single_file(tmp_path / "sd.safetensors", config=ref.config, dtype="fp16")
    assert low.dtype == torch.float16
    assert torch.equal(run_vae(low), run_vae(vae.AutoencoderKL.from_pretrained(folders / "vae", dtype="fp16")))
    with pytest.raises(WeightsMismatchError, match=r"is preset='sd3' the right family"):
        vae.AutoencoderKL.from_single_file(tmp_path / "sd.safetensors", preset="sd3", dtype="bf16")


def test_load_state_dict_converts_floats_only_and_copies_out_of_the_file(tmp_path):
    save_file({"w": torch.randn(4, 4), "h": torch.randn(3).half(), "step": torch.tensor([3]),
               "ids": torch.arange(5, dtype=torch.int32)}, tmp_path / "m.safetensors")
    torch.save({"state_dict": {"w": torch.randn(4, 4), "step": torch.tensor([3])}}, tmp_path / "m.ckpt")
    sd = load_state_dict(tmp_path / "m.safetensors", dtype="bf16")
    assert {k: v.dtype for k, v in sd.items()} == {"w": torch.bfloat16, "h": torch.bfloat16, "step": torch.int64,
                                                   "ids": torch.int32}
    assert torch.equal(sd["w"], load_file(tmp_path / "m.safetensors")["w"].bfloat16())
    sd = load_state_dict(tmp_path / "m.ckpt", dtype=torch.float16)
    assert sd["w"].dtype == torch.float16 and sd["step"].dtype == torch.int64
    assert load_state_dict(tmp_path / "m.ckpt")["w"].dtype == torch.float32  # dtype=None: unchanged


def test_fp16_out_of_range_weights_are_named(tmp_path):
    save_file({"ok": torch.ones(2), "big": torch.tensor([1.0, 1e5])}, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match=r"^dtype: big holds values beyond float16's range.*dtype='bf16'"):
        load_state_dict(tmp_path / "big.safetensors", dtype="fp16")
    assert load_state_dict(tmp_path / "big.safetensors", dtype="bf16")["big"][1] == 99840  # bf16 rounding of 1e5


def test_existing_file_errors_are_unchanged_with_dtype(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "callback": Exception("not a tensor")}, tmp_path / "code.ckpt")
    for name, pattern in (("cut.safetensors", r"cut\.safetensors \(9 bytes\) is corrupt"),
                          ("empty.ckpt", r"empty\.ckpt \(0 bytes\) is damaged"),
                          ("code.ckpt", r"weights_only=True\) refused code\.ckpt"),
                          ("weights.txt", r"expected a \.safetensors file")):
        (tmp_path / "weights.txt").write_text("x")
        with pytest.raises(ValueError, match=pattern):
            load_state_dict(tmp_path / name, dtype="bf16")
    with pytest.raises(FileNotFoundError, match=r"^path: no checkpoint file"):
        load_state_dict(tmp_path / "nothing.safetensors", dtype="bf16")


def test_missing_key_still_raises_with_dtype(folders, tmp_path):
    DiT.from_pretrained(folders / "dit").save_pretrained(tmp_path / "dit")
    sd = load_file(tmp_path / "dit" / "model.safetensors")
    del sd["blocks.1.mlp.fc2.weight"]
    save_file(sd, tmp_path / "dit" / "model.safetensors")
    for dtype in (None, "bf16", "fp16"):
        with pytest.raises(WeightsMismatchError, match=r"(?s)missing keys \(1\):\s+blocks\.1\.mlp\.fc2\.weight"):
            DiT.from_pretrained(tmp_path / "dit", dtype=dtype)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((folders / "vae" / "config.json").read_text())
    sd = load_file(folders / "vae" / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"},
              tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"decoder\.conv_out\.bias"):
        vae.AutoencoderKL.from_pretrained(tmp_path / "vae", dtype="bf16")


class PlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = torch.ones(2)  # a plain attribute, not a buffer: under meta it stays on meta


class NonPersistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("freqs", torch.arange(2.0), persistent=False)  # in no state dict


def test_empty_model_refuses_tensors_no_state_dict_fills():
    with torch.device("meta"):
        assert PlainTensor().scale.is_meta  # what would be left behind
    with pytest.raises(RuntimeError, match=r"build: PlainTensor holds tensors that no state dict fills.*'scale'"):
        empty_model(PlainTensor, "bf16")
    with pytest.raises(RuntimeError, match=r"NonPersistent holds tensors.*'freqs'"):
        empty_model(NonPersistent, torch.float16)
    model = empty_model(lambda: nn.Sequential(nn.Linear(2, 2)), "bf16")
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert empty_model(lambda: nn.Linear(2, 2), None).weight.dtype == torch.float32  # None: build's dtypes


def test_shipped_models_and_book_loaders(folders):
    """The package's own models hold no tensor outside their state dicts (found by empty_model)."""
    for build in (lambda: DiT(DiTConfig.preset("book")), lambda: TextDiT(), lambda: vae.AutoencoderKL(),
                  lambda: text.ImageEncoder()):
        model = empty_model(build, "bf16")
        assert not any(t.is_meta for t in tensors_everywhere(model))
    ref, low = vae.load_book_vae(), vae.load_book_vae(dtype="bf16")
    assert low.dtype == torch.bfloat16
    x = vae.shapes_images(16, split="test")  # (16, 3, 32, 32)
    with torch.no_grad():
        p32, p16 = vae.psnr(ref(x)[0], x).mean().item(), vae.psnr(low(x)[0].float(), x).mean().item()
    print(f"book VAE PSNR: float32 {p32:.2f} dB, bf16 weights {p16:.2f} dB")
    assert p16 > p32 - 0.5  # measured 40.89 -> 40.79 dB on these 16 images; 0.5 dB allows platform noise
    enc, enc16 = text.load_book_text_encoder(), text.load_book_text_encoder(dtype="bf16")
    assert enc16.model.dtype == torch.bfloat16
    prompts = ["a small red circle", "a big blue square on a gray background"]
    with torch.no_grad():
        a, b = enc.encode(prompts).pooled, enc16.encode(prompts).pooled.float()
    cos = torch.nn.functional.cosine_similarity(a, b).min().item()
    print(f"book text encoder, bf16 vs float32 pooled: 1 - cosine = {1 - cos:.1e}")
    assert 1 - cos < 1e-4  # measured 8.2e-6
    img, img16 = text.load_book_image_encoder(), text.load_book_image_encoder(dtype="fp16")
    assert {p.dtype for p in img16.parameters()} == {torch.float16} and not img16.training
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(img(x), img16(x.half()).float()).min().item()
    print(f"book image encoder, fp16 vs float32: 1 - cosine = {1 - cos:.1e}")
    assert 1 - cos < 1e-5  # measured 1.8e-7 (float32 rounding of the cosine itself is ~1e-7)


def overflowing_vae(tmp_path):
    """A small VAE whose decoder input convolution is scaled so that fp16 activations overflow
    (float32 is fine: the GroupNorms after it bring the scale back)."""
    torch.manual_seed(0)
    m = vae.AutoencoderKL(vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                        sample_size=16, force_upcast=False)).eval()
    with torch.no_grad():
        m.decoder.conv_in.weight.mul_(1e5)  # activations up to ~1.4e5 > 65504
        m.decoder.conv_in.bias.mul_(1e5)
    return m.save_pretrained(tmp_path / "hot_vae")


def test_fp16_vae_overflow_upcasts_the_decoder_once(tmp_path):
    folder = overflowing_vae(tmp_path)
    ref, half = vae.AutoencoderKL.from_pretrained(folder), vae.AutoencoderKL.from_pretrained(folder, dtype="fp16")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = half._decode(z)  # what fp16 computes without the guard
        assert raw.dtype == torch.float16 and not torch.isfinite(raw).all()
        expected = ref.decode(z)
        with pytest.warns(UserWarning, match=r"float16 decoder overflowed.*dtype='bf16'") as caught:
            out = half.decode(z)
        assert len([w for w in caught if "overflowed" in str(w.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second decode: no warning, already float32
            again = half.decode(z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.equal(out, again)
    assert half.dtype == torch.float16 and half.decoder.conv_in.weight.dtype == torch.float32
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    print(f"upcast decode vs float32: max rel. error {err:.2e} (fp16-rounded weights)")
    assert err < 0.002  # measured 4.7e-4: the fp16 rounding of the weights, nothing else
    bf16 = vae.AutoencoderKL.from_pretrained(folder, dtype="bf16")  # float32's range: no overflow, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.isfinite(bf16.decode(z)).all()


MEMORY_SCRIPT = r"""
import json, sys, threading, time
import torch
from tinydit.checkpoint import empty_model
from tinydit.dit import DiT, DiTConfig

def rss_anon():  # resident anonymous memory: heap and torch tensors, not pages of mapped files
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

torch.set_num_threads(1)
dtype = None if sys.argv[2] == "none" else sys.argv[2]
start = rss_anon()
# One-off, size-independent cost: the first meta-device build imports ~800 modules (torch.empty_like
# from meta pulls in sympy, ...), about 70 MB of Python objects. Paid here, before the baseline.
empty_model(lambda: DiT(DiTConfig(input_size=4, hidden_size=8, depth=1, num_heads=2, num_classes=2)), "bf16")
base = peak = rss_anon()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, rss_anon())
        time.sleep(0.0005)

thread = threading.Thread(target=sample)
thread.start()
t0 = time.perf_counter()
model = DiT.from_pretrained(sys.argv[1], dtype=dtype)
seconds = time.perf_counter() - t0
done = True
thread.join()
peak = max(peak, rss_anon())
print(json.dumps({"growth": peak - base, "seconds": seconds, "warm_up": base - start,
                  "weights": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""


def test_bf16_load_never_holds_a_float32_copy(tmp_path):
    """Peak memory of loading a ~200 MB float32 DiT with dtype=bf16, in a fresh interpreter.

    How it is measured: RssAnon (resident *anonymous* memory: malloc'd heap, torch tensors) from
    /proc/self/status, sampled every 0.5 ms by a thread while the loader runs, minus its value just
    before. Not VmHWM / ru_maxrss: those count the safetensors file's pages too, which are mapped
    (file-backed, reclaimable by the kernel) and touched while converting, so they would show the
    file's size whatever the loader keeps. A sampling thread can miss a spike shorter than its
    period, but a whole-model float32 copy takes far longer than 0.5 ms to fill."""
    cfg = DiTConfig.preset("DiT-S/2", depth=19)  # 51M parameters: ~204 MB in float32
    DiT(cfg).save_pretrained(tmp_path / "big")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for dtype in ("none", "bf16"):
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big"), dtype], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
        r = runs[dtype]
        print(f"dtype={dtype}: file {size / 2**20:.0f} MiB, weights {r['weights'] / 2**20:.0f} MiB, peak anonymous "
              f"growth {r['growth'] / 2**20:.0f} MiB ({r['growth'] / size:.2f} x file), {r['seconds']:.1f} s; "
              f"one-off meta warm-up {r['warm_up'] / 2**20:.0f} MiB")
    assert runs["bf16"]["weights"] < 0.51 * size
    # measured: bf16 0.53 x the float32 file (105 MiB; its weights alone are 0.50 x), dtype=None 1.03 x
    # (the float32 model); a float32 copy held at any moment would add 1.0 x, so 0.7 x separates them
    assert runs["bf16"]["growth"] < 0.7 * size


def test_load_model_strict_in_both_paths():
    full = nn.Linear(3, 2).state_dict()
    for dtype in (None, "bf16"):
        with pytest.raises(WeightsMismatchError, match=r"(?s)missing keys \(1\):\s+bias"):
            load_model(lambda: nn.Linear(3, 2), {"weight": full["weight"]}, dtype=dtype)
        with pytest.raises(WeightsMismatchError, match=r"(?s)unexpected keys \(1\):\s+extra"):
            load_model(lambda: nn.Linear(3, 2), {**full, "extra": torch.ones(1)}, dtype=dtype)
    model = load_model(lambda: nn.Linear(3, 2), full, dtype="bf16")
    assert not model.training and torch.equal(model.weight, full["weight"].bfloat16())
