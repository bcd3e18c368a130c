"""DiT forward speed: tinydit vs diffusers on the same DiT-S/2 weights, in one run.

DiT-S/2 shape (12 layers, width 384, 6 heads), 32x32x4 latents, batch 4, fp32, no_grad. Prints
both times, their ratio, and tinydit's achieved FLOP/s as a fraction of this machine's fp32 matmul
throughput, measured in the same run. With a CUDA device, also runs bf16 with the sdpa and (if
installed) flash attention backends, then DiT-XL/2 at 256^2, batch 32, bf16 / fp16, eager and compiled.

    python benchmarks/dit.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def best_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(device: str, dtype: torch.dtype, n: int = 1536, repeats: int = 10, sync=lambda: None) -> float:
    """FLOP/s of one large square matmul: the practical peak the model's GEMMs can hope for."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats, sync)


def main() -> None:
    import diffusers

    from tinydit.dit import DiT, DiTConfig
    from tinydit.dit_measure import dit_macs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                          out_channels=8, num_layers=12, sample_size=32, patch_size=2,
                                          num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
        for block in ref.transformer_blocks:
            block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = DiT.from_pretrained(tmp).eval()
    x, t, y = torch.randn(4, 4, 32, 32), torch.tensor([1, 250, 500, 999]), torch.tensor([0, 1, 2, 1000])

    def report(label, device, dtype, backends, sync=lambda: None):
        m_ref = ref.to(device, dtype)
        xd, td, yd = x.to(device, dtype), t.to(device), y.to(device)
        with torch.no_grad():
            t_ref = best_time(lambda: m_ref(xd, timestep=td, class_labels=yd), args.repeats, sync)
            peak = matmul_peak(device, dtype, sync=sync)
            flops = 2 * dit_macs(ours.config) * x.shape[0]
            print(f"[{label}] diffusers: {t_ref * 1e3:8.2f} ms   matmul peak {peak / 1e9:8.1f} GFLOP/s")
            for backend in backends:
                m = DiT(DiTConfig(**{**ours.config.to_dict(), "attn_backend": backend}))
                m.load_state_dict(ours.state_dict())
                m = m.eval().to(device, dtype)
                err = (m(xd, td, yd).float() - m_ref(xd, timestep=td, class_labels=yd).sample.float()).abs().max()
                t_ours = best_time(lambda m=m: m(xd, td, yd), args.repeats, sync)
                print(f"[{label}] tinydit ({backend:5s}): {t_ours * 1e3:8.2f} ms   ratio tinydit/diffusers "
                      f"{t_ours / t_ref:5.2f}   achieved {flops / t_ours / 1e9:7.1f} GFLOP/s = "
                      f"{flops / t_ours / peak:5.1%} of matmul peak   max|diff| {err:.1e}")

    print(f"DiT-S/2, batch {x.shape[0]}, 32x32x4 latents, {2 * dit_macs(ours.config) * x.shape[0] / 1e9:.1f} GFLOP "
          f"per forward; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    report("cpu fp32", "cpu", torch.float32, ["sdpa", "math"])
    if torch.cuda.is_available():
        import importlib.util

        backends = ["sdpa"] + (["flash"] if importlib.util.find_spec("flash_attn") else [])
        report(f"{torch.cuda.get_device_name()} bf16", "cuda", torch.bfloat16, backends, torch.cuda.synchronize)
        dit_xl_cuda(args.repeats)


def dit_xl_cuda(repeats: int) -> None:
    """DiT-XL/2 at 256^2 (32x32x4 latents), batch 32: bf16 / fp16, eager and torch.compile, tinydit vs
    diffusers on the same random weights, and tinydit's share of the matmul peak (issue 14's GPU targets:
    compiled >= diffusers compiled and >= 55 % of the bf16 matmul peak)."""
    import diffusers

    from tinydit.dit import DiT
    from tinydit.dit_measure import dit_macs

    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                          out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                          num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = DiT.from_pretrained(tmp).eval()
    x, t, y = torch.randn(32, 4, 32, 32), torch.randint(0, 1000, (32,)), torch.randint(0, 1000, (32,))
    flops = 2 * dit_macs(ours.config) * 32
    sync = torch.cuda.synchronize
    print(f"\nDiT-XL/2 256^2, batch 32, {flops / 1e12:.2f} TFLOP per forward, {torch.cuda.get_device_name()}")
    for dtype in [torch.bfloat16, torch.float16]:
        peak = matmul_peak("cuda", dtype, n=8192, sync=sync)
        m_ref, m_ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
        xd, td, yd = x.to("cuda", dtype), t.to("cuda"), y.to("cuda")
        for compiled in [False, True]:
            f_ref = torch.compile(m_ref) if compiled else m_ref
            f_ours = torch.compile(m_ours) if compiled else m_ours
            with torch.no_grad():
                t_ref = best_time(lambda f=f_ref, a=(xd, td, yd): f(a[0], timestep=a[1], class_labels=a[2]), repeats, sync)
                t_ours = best_time(lambda f=f_ours, a=(xd, td, yd): f(*a), repeats, sync)
            print(f"  {str(dtype)[6:]:9} {'compiled' if compiled else 'eager':8}  diffusers {t_ref * 1e3:7.2f} ms  "
                  f"tinydit {t_ours * 1e3:7.2f} ms  tinydit/diffusers {t_ours / t_ref:5.2f}  tinydit "
                  f"{flops / t_ours / 1e12:6.1f} TFLOP/s = {flops / t_ours / peak:5.1%} of matmul peak "
                  f"({peak / 1e12:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
