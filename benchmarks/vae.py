"""Encode + decode one 256x256 image with an SD-sized AutoencoderKL: tinydit vs diffusers.

Both models hold the same random weights (SD 1.x architecture, 83.7M parameters), run in fp32 in
eval mode under torch.no_grad(), in one process, alternating runs. Prints the median time of each and the ratio.

    python benchmarks/vae.py [--size 256] [--repeats 5] [--device cpu]
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from tinydit import vae


def timed(fn, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per implementation")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = vae.VAEConfig.preset("sd1")
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    ours = vae.AutoencoderKL(cfg)
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.eval().to(args.device), ours.eval().to(args.device)
    x = (torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(args.device)

    def run_ref():
        return ref.decode(ref.encode(x).latent_dist.mean).sample

    def run_ours():
        return ours.decode(ours.encode(x).mean)

    with torch.no_grad():
        err = (run_ours() - run_ref()).abs().max().item()  # also the warm-up run
        t_ref, t_ours = [], []
        for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
            t_ref += timed(run_ref, 1, args.device)
            t_ours += timed(run_ours, 1, args.device)
    m_ref, m_ours = statistics.median(t_ref), statistics.median(t_ours)
    print(f"SD-sized AutoencoderKL ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params), "
          f"encode+decode of 1x3x{args.size}x{args.size}, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"diffusers: {m_ref * 1000:8.1f} ms")
    print(f"tinydit:   {m_ours * 1000:8.1f} ms")
    print(f"ratio tinydit / diffusers: {m_ours / m_ref:.3f}   (max abs difference of outputs {err:.1e})")


if __name__ == "__main__":
    main()
