"""Precision and compilation (chapter 12): tinydit vs diffusers on the same weights, in one run.

For each setting: milliseconds per forward for both libraries and the ratio tinydit / diffusers,
with bf16 / fp16 weights, fp8 storage with layerwise casting (tinydit's `LayerwiseCasting`,
diffusers' `apply_layerwise_casting`), eager and `torch.compile`, and the SDPA kernel that runs.

- CPU (always): a PixArt-shaped model of book width (depth 6, width 192, 32x32 latents, batch 8).
- CUDA (when present): DiT-XL/2 256^2 batch 32 and PixArt-XL/2 512^2 batch 8 (120 caption tokens,
  with and without a padding mask), plus an SDXL-shaped VAE decode at 512^2 in fp32 / bf16 / fp16.
  GPU targets (issue 14): DiT-XL/2 bf16 compiled >= diffusers compiled and >= 55 % of matmul peak;
  PixArt-XL/2 eager >= diffusers.

    python benchmarks/precision.py [--repeats 10] [--no-compile] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def best_ms(fn, repeats: int, cuda: bool) -> float:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        fn()
        fn()  # warm-up (and compilation)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def pixart_pair(layers: int, heads: int, head_dim: int, sample: int, caption: int):
    """A random diffusers PixArtTransformer2DModel and the same weights in tinydit's TextDiT."""
    import diffusers

    from tinydit.textdit import TextDiT

    ref = randomise(diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, caption_channels=caption, sample_size=sample, patch_size=2,
        norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=max(1, sample // 64)))
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = TextDiT.from_pretrained(tmp).eval()
    return ref, ours


def compare(label, ref_fn, our_fn, repeats, cuda):
    t_ref, t_ours = best_ms(ref_fn, repeats, cuda), best_ms(our_fn, repeats, cuda)
    print(f"  {label:44} diffusers {t_ref:8.2f} ms   tinydit {t_ours:8.2f} ms   tinydit/diffusers {t_ours / t_ref:5.2f}")
    return t_ref, t_ours


def pixart_settings(ref, ours, device, dtype, batch, sample, tokens, caption, masked, repeats, cuda, compile_):
    from diffusers.hooks import apply_layerwise_casting

    from tinydit.precision import LayerwiseCasting

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, sample, sample, generator=g).to(device, dtype)
    t = torch.linspace(10, 990, batch).to(device)
    ctx = torch.randn(batch, tokens, caption, generator=g).to(device, dtype)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if masked:
        mask[:, tokens // 2:] = False  # half the caption is padding
    mask = mask.to(device)
    ref.to(device, dtype)
    ours.to(device, dtype)
    ref_fn = lambda: ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask if masked else None,  # noqa: E731
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    our_fn = lambda: ours(x, t, context=ctx, context_mask=mask if masked else None)  # noqa: E731
    name = f"{str(dtype)[6:]}{', mask' if masked else ''}"
    compare(f"{name}, eager", ref_fn, our_fn, repeats, cuda)
    if compile_:
        ref_c, our_c = torch.compile(ref), torch.compile(ours)
        compare(f"{name}, torch.compile", lambda: ref_c(x, encoder_hidden_states=ctx, timestep=t,
                                                        encoder_attention_mask=mask if masked else None,
                                                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
                lambda: our_c(x, t, context=ctx, context_mask=mask if masked else None), repeats, cuda)
    return x, t, ctx, mask, ref_fn, our_fn, apply_layerwise_casting, LayerwiseCasting


def fp8_setting(ref, ours, ref_fn, our_fn, repeats, cuda, apply_layerwise_casting, LayerwiseCasting):
    """fp8 storage of the blocks' linear layers in both libraries (the same weights), bf16 compute."""
    from tinydit.precision import weight_bytes

    before = weight_bytes(ours)
    apply_layerwise_casting(ref, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                            skip_modules_pattern=("pos_embed", "norm", "adaln_single", "caption_projection", "proj_out"))
    LayerwiseCasting(ours, "fp8_e4m3", "bf16")
    compare("fp8 storage (layerwise casting), bf16 compute", ref_fn, our_fn, repeats, cuda)
    print(f"  {'':44} weights: bf16 {before / 2**20:.1f} MiB -> fp8 {weight_bytes(ours) / 2**20:.1f} MiB "
          f"({weight_bytes(ours) / before:.2f}x)")


def sdpa_table(device):
    from tinydit.precision import sdpa_backends

    print(f"\n[{device}] SDPA kernels accepted / auto choice (B=2, 8 heads, 256 queries, 120 keys)")
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        for masked in [False, True]:
            for head in [64, 72, 128]:
                q = torch.randn(2, 8, 256, head, device=device, dtype=dtype)
                k = torch.randn(2, 8, 120, head, device=device, dtype=dtype)
                mask = torch.ones(2, 1, 1, 120, dtype=torch.bool, device=device) if masked else None
                b = sdpa_backends(q, k, k, mask)
                ok = ",".join(n for n in ("flash", "efficient", "cudnn", "math") if b[n])
                print(f"  {str(dtype)[6:]:9} mask={str(masked):5} head {head:3}: auto = {b['auto']:9} accepts {ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA device'}")
    print("\n[cpu] PixArt-shaped, book width (depth 6, width 192, 32x32 latents), batch 8, 16 tokens")
    ref, ours = pixart_pair(6, 6, 32, 32, 96)
    for dtype in [torch.float32, torch.bfloat16]:
        *_, ref_fn, our_fn, alc, LC = pixart_settings(ref, ours, "cpu", dtype, 8, 32, 16, 96, True, args.repeats,
                                                      False, not args.no_compile and dtype == torch.float32)
    fp8_setting(ref, ours, ref_fn, our_fn, args.repeats, False, alc, LC)
    sdpa_table("cpu")
    if not cuda:
        print("\nno CUDA device: the DiT-XL/2, PixArt-XL/2 and VAE figures need a GPU")
        return
    print("\n[cuda] PixArt-XL/2 shape, 512^2 (64x64 latents), batch 8, 120 caption tokens of width 4096")
    ref, ours = pixart_pair(28, 16, 72, 64, 4096)
    for masked in [False, True]:
        *_, ref_fn, our_fn, alc, LC = pixart_settings(ref, ours, "cuda", torch.bfloat16, 8, 64, 120, 4096, masked,
                                                      args.repeats, True, not args.no_compile and not masked)
    fp8_setting(ref, ours, ref_fn, our_fn, args.repeats, True, alc, LC)
    sdpa_table("cuda")
    print("\n[cuda] DiT-XL/2 256^2 batch 32 and the SDXL VAE decode: python benchmarks/dit.py and "
          "python benchmarks/vae.py print those (same weights in both libraries)")


if __name__ == "__main__":
    main()
