"""Samplers: denoiser calls needed for a given accuracy, and loop overhead against diffusers' schedulers.

1. Accuracy. Data x0 ~ N(0.3, 0.5^2) has an exact denoiser, so each sampler runs on it with the exact
   denoiser (65536 scalar samples, Karras sigmas from 80 to 0.002; the rectified-flow sampler: flow
   times with shift 3) and we search the fewest steps whose samples' distribution is within W2 <= --target
   of the data's (W2 between Gaussians: sqrt(dmean^2 + dstd^2)) at that step count and the next two on
   the grid. Prints the denoiser calls (NFE) needed.
2. Overhead. Each sampler and its diffusers scheduler run the same loop on the same tensors with a
   trivial network (eps = 0.1 x_in), schedule set-up included: what remains is the cost of the sampler
   itself. Prints milliseconds per network call and the ratio tinydit / diffusers (median of --repeats
   runs, alternating).

    python benchmarks/samplers.py [--target 0.02] [--size 64] [--steps 20] [--repeats 7] [--device cpu]
                                  [--threads 1]
"""

import argparse
import statistics
import time

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from tinydit import schedules
from tinydit.denoisers import DiscreteDenoiser, FlowDenoiser, GaussianDenoiser
from tinydit.samplers import SAMPLERS


MEAN, STD = 0.3, 0.5
STEP_GRID = [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 320,
             384, 512]


def flow_gaussian(x, t):
    """Exact denoiser of N(MEAN, STD^2) data under x = (1 - t) x0 + t noise."""
    t = t[:, None]
    return MEAN + (1 - t) * STD**2 / ((1 - t) ** 2 * STD**2 + t**2) * (x - (1 - t) * MEAN)


def w2_after(name: str, n: int, noise: torch.Tensor) -> tuple[int, float]:
    """(NFE, W2 distance to the data) of sampler `name` with n steps."""
    calls = []
    if name == "euler_ancestral_rf":
        sigmas, x, denoiser = FlowDenoiser(None).get_sigmas(n, 3.0).double(), noise, flow_gaussian
    else:
        sigmas, denoiser = schedules.karras_sigmas(n, 0.002, 80.0).double(), GaussianDenoiser(MEAN, STD)
        x = noise * sigmas[0]
    counted = lambda x, s: calls.append(1) or denoiser(x, s)
    out = SAMPLERS[name](counted, x, sigmas, generator=torch.Generator().manual_seed(1), disable=True)
    return len(calls), ((out.mean() - MEAN) ** 2 + (out.std() - STD) ** 2).sqrt().item()


def accuracy_table(target: float) -> None:
    noise = torch.randn(65536, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print(f"1. denoiser calls (NFE) to reach W2 <= {target} on N({MEAN}, {STD}^2) data, exact denoiser")
    print(f"   {'sampler':20s} {'steps':>6s} {'NFE':>6s} {'W2':>9s}")
    for name in SAMPLERS:
        results = []  # the fewest steps from which on the target holds (3 grid points in a row: no lucky cancellation)
        for n in STEP_GRID:
            results.append((n, *w2_after(name, n, noise)))
            if len(results) >= 3 and all(w2 <= target for *_, w2 in results[-3:]):
                n, nfe, w2 = results[-3]
                print(f"   {name:20s} {n:6d} {nfe:6d} {w2:9.2e}")
                break
        else:
            print(f"   {name:20s} not reached in {STEP_GRID[-3]} steps (W2 {results[-3][2]:.2e})")


def overhead_pairs():
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    dpm = dict(cfg, final_sigmas_type="zero")
    return {  # tinydit sampler: (diffusers scheduler, VP start?, step() options, our options)
        "euler": (EulerDiscreteScheduler(**cfg), False, {}, {}),
        "euler_ancestral": (EulerAncestralDiscreteScheduler(**cfg), False, {"generator": True}, {}),
        "heun": (HeunDiscreteScheduler(**cfg), False, {}, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler(**dpm), True, {}, {}),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler(**dpm, algorithm_type="sde-dpmsolver++"), True,
                         {"generator": True}, {}),
        "dpmpp_3m_sde": (DPMSolverMultistepScheduler(**dpm, solver_order=3, solver_type="heun"), True, {},
                         {"eta": 0.0, "kdiffusion_compat": True}),
        "ddim": (DDIMScheduler(**cfg, clip_sample=False), True, {}, {}),
        "unipc": (UniPCMultistepScheduler(**dpm), True, {}, {}),
        "euler (flow)": (FlowMatchEulerDiscreteScheduler(shift=3.0), False, {}, {}),
    }


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def overhead_table(size: int, steps: int, repeats: int, device: str) -> None:
    ac = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))
    net = lambda x, t: 0.1 * x  # a trivial "network": the loop's own cost is what is measured
    noise = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"\n2. loop overhead per network call, (2, 4, {size}, {size}) latents, {steps} steps, {device}, trivial network")
    print(f"   {'tinydit sampler':18s} {'diffusers scheduler':34s} {'calls':>5s} {'tinydit ms':>10s} "
          f"{'diffusers ms':>12s} {'ratio':>6s}")
    for name, (sched, vp, step_options, options) in overhead_pairs().items():
        flow = name.endswith("(flow)")
        denoiser = FlowDenoiser(net) if flow else DiscreteDenoiser(net, ac, quantize=True)
        calls = []
        counted = lambda x, s, denoiser=denoiser, calls=calls: calls.append(1) or denoiser(x, s)

        def ours(name=name, flow=flow, denoiser=denoiser, options=options, counted=counted):
            sigmas = denoiser.get_sigmas(steps, 3.0) if flow else denoiser.get_sigmas(steps, "trailing")
            x = noise if flow else noise * float(sigmas[0])
            SAMPLERS[name.split(" ")[0]](counted, x, sigmas, generator=torch.Generator().manual_seed(1), disable=True,
                                         **options)

        def theirs(sched=sched, vp=vp, step_options=step_options, flow=flow):
            sched.set_timesteps(steps, device=device)
            kw = {k: (torch.Generator().manual_seed(1) if k == "generator" else v) for k, v in step_options.items()}
            x = noise if (vp or flow) else noise * sched.init_noise_sigma
            for t in sched.timesteps:
                x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                x = sched.step(net(x_in, t), t, x, **kw).prev_sample

        ours(), theirs()  # warm-up, and the number of network calls of one run
        n_calls = len(calls)
        t_ours, t_theirs = [], []
        for _ in range(repeats):
            t_ours.append(timed(ours, device))
            t_theirs.append(timed(theirs, device))
        m_ours, m_theirs = statistics.median(t_ours) / n_calls * 1e3, statistics.median(t_theirs) / n_calls * 1e3
        print(f"   {name:18s} {type(sched).__name__:34s} {n_calls:5d} {m_ours:10.3f} {m_theirs:12.3f} "
              f"{m_ours / m_theirs:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.02, help="W2 distance to reach in part 1")
    ap.add_argument("--size", type=int, default=64, help="latent side in part 2")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps in part 2")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per implementation in part 2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the "
                    "tensors are small, and on a busy 2-core machine two threads contend")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    accuracy_table(args.target)
    with torch.no_grad():
        overhead_table(args.size, args.steps, args.repeats, args.device)


if __name__ == "__main__":
    main()
