"""Offloading (chapter 12): peak device memory and seconds per new prompt for a T5 encoder with no
offload, model offload (pageable and pinned) and block offload (pinned, side-stream prefetch).

On CUDA the encoder defaults to T5-XXL's shape (4.76 B parameters, 9.5 GB in bf16, random weights
made on the device side of nothing: built on `meta`, materialised on the CPU). GPU targets (issue 14):
block offload <= 1.5 GiB peak; model offload <= 1.5 s per new prompt (pinned, >= 10 GB/s).
On a CPU-only machine it runs a smaller T5 with device="cpu" (the hooks' overhead: the copies are
free there) and device="meta" (the exact peak bytes each mode would hold on a GPU).

    python benchmarks/offload.py [--size xxl|large|base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


SIZES = {  # d_model, d_ff, layers, heads (T5 v1.1 / T5-XXL encoder shapes)
    "xxl": (4096, 10240, 24, 64),
    "large": (1024, 2816, 24, 16),
    "base": (768, 2048, 12, 12),
}


def build_t5(size: str, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    d, ff, layers, heads = SIZES[size]
    cfg = T5Config(vocab_size=32128, d_model=d, d_ff=ff, num_layers=layers, num_heads=heads, d_kv=64,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        model = T5EncoderModel(cfg).to(dtype)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, device: torch.device, mode: str | None, repeats: int, **options) -> dict:
    from tinydit import offload

    ids = torch.randint(0, 32128, (1, 120))  # one prompt, 120 tokens (PixArt's window)
    off = None
    if mode is None:
        model.to(device)
    else:
        off = offload.offload({"t5": model} if mode == "model" else model, mode, device=device, **options)
    times = []
    with torch.no_grad():
        model(input_ids=ids.to(device))  # warm-up: first-call costs are not offloading's
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            if off is not None:
                off.release()  # a new prompt after the DiT and VAE ran: the encoder starts off the device
            sync(device)
            start = time.perf_counter()
            hidden = model(input_ids=ids.to(device)).last_hidden_state  # noqa: F841  (1, 120, d_model)
            sync(device)
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else (off.ledger.peak if off else None)
    result = {"seconds": min(times), "peak": peak, "moved": off.ledger.moved / repeats if off else 0}
    if off is not None:
        off.close()
    else:
        model.to("cpu")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    size = args.size or ("xxl" if cuda else "base")
    dtype = torch.bfloat16
    model = build_t5(size, dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"T5 {size} encoder: {n / 1e9:.2f} B parameters, {n * 2 / 2**30:.2f} GiB in bf16; torch {torch.__version__}")
    setups = [("none", None, {}), ("model, pageable", "model", {"pin_memory": False}), ("model, pinned", "model", {}),
              ("block, pinned + stream", "block", {}), ("block x4, pinned + stream", "block", {"group_size": 4}),
              ("leaf", "leaf", {})]
    device = torch.device("cuda" if cuda else "cpu")
    label = torch.cuda.get_device_name() if cuda else "cpu (copies free: hook overhead only)"
    print(f"\n[{label}] seconds per new prompt (best of {args.repeats}); peak = extra device memory")
    base = None
    for name, mode, options in setups:
        if not cuda:
            options = {k: v for k, v in options.items() if k != "pin_memory"}
        r = run(model, device, mode, args.repeats, **options)
        base = base or r["seconds"]
        rate = f"{r['moved'] / r['seconds'] / 1e9:6.1f} GB/s moved" if r["moved"] and cuda else ""
        peak = f"{r['peak'] / 2**30:6.2f} GiB peak" if r["peak"] is not None else ""
        print(f"  {name:26} {r['seconds']:7.3f} s  ({r['seconds'] / base:5.2f}x none)  {peak}  {rate}")
    if not cuda:
        print("\n[meta] exact bytes each mode holds on the device (no storage, no copies)")
        for name, mode, options in setups[1:]:
            options = {k: v for k, v in options.items() if k != "pin_memory"}
            r = run(model, torch.device("meta"), mode, 1, **options)
            print(f"  {name:26} peak {r['peak'] / 2**20:8.1f} MiB of {n * 2 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
