#!/usr/bin/env python3
"""The tensor-shape reference (`book/shapes.md`), generated from the code.

Runs the real pipeline of the shipped book model with forward hooks, and a DiT-XL/2- and a
PixArt-XL/2-shaped model (weights left uninitialised: only shapes matter) on one small batch, and
writes for each stage the tensor's concrete shape and dtype next to its symbolic shape. Every
symbolic shape is checked against the concrete one, so the page cannot drift from the code: a change
of shapes fails the tool (and `--check`, which CI runs, fails when the committed page differs).

    python tools/shapes.py           # (re)write book/shapes.md
    python tools/shapes.py --check   # exit 1 when book/shapes.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "book" / "shapes.md"


def symbolic(shape: tuple, template: str, sizes: dict) -> str:
    """`template` ("B, N, D") checked against `shape` with `sizes` {"B": 2, ...}; products like "2B" allowed."""
    names = [s.strip() for s in template.split(",")]
    if len(names) != len(shape):
        raise AssertionError(f"{template!r} has {len(names)} dims, the tensor {tuple(shape)}")
    for name, n in zip(names, shape):
        value = eval(name.replace("·", "*"), {}, dict(sizes))  # "2*B", "H/p" ... (our own templates only)
        if int(value) != n:
            raise AssertionError(f"{name} = {value}, but the tensor has {n} there ({template} vs {tuple(shape)})")
    return f"({template})"


class Recorder:
    def __init__(self, sizes: dict):
        self.rows, self.sizes = [], sizes

    def add(self, stage: str, what: str, t: torch.Tensor, template: str) -> None:
        self.rows.append((stage, what, symbolic(tuple(t.shape), template, self.sizes), tuple(t.shape), str(t.dtype)[6:]))

    def hook(self, stage: str, module, inputs: list[tuple[int, str, str]], output: tuple[str, str] | None):
        def fn(m, args, kwargs, out):
            for i, what, template in inputs:
                self.add(stage, what, args[i], template)
            if output is not None:
                self.add(stage, output[0], out if isinstance(out, torch.Tensor) else out[0], output[1])
        return module.register_forward_hook(fn, with_kwargs=True)


def book_rows() -> tuple[list, dict]:
    from tinydit.pipeline import TextToImagePipeline

    torch.manual_seed(0)
    pipe = TextToImagePipeline.from_pretrained()
    cfg = pipe.transformer.config
    prompts = ["a red circle above a blue square", "a green triangle"]
    T = pipe.encode(prompts).tokens.shape[1]
    sizes = dict(B=2, T=T, C=4, H=8, W=8, p=cfg.patch_size, D=cfg.hidden_size, N=16, heads=cfg.num_heads,
                 d=cfg.hidden_size // cfg.num_heads, Dt=cfg.context_dim)
    rec = Recorder(sizes)
    ids = pipe.text_encoder.tokenizer(prompts, padding="longest", return_tensors="pt")["input_ids"]
    rec.add("tokenizer", "token ids", ids, "B, T")
    emb = pipe.encode(prompts)
    rec.add("text encoder", "token embeddings", emb.tokens, "B, T, Dt")
    rec.add("text encoder", "attention mask", emb.mask, "B, T")
    m = pipe.transformer
    hooks = [rec.hook("patchify", m.x_embedder, [(0, "latents in", "2*B, C, H, W")], ("patch tokens", "2*B, N, D")),
             rec.hook("caption projection", m.y_embedder, [(0, "text tokens", "2*B, T, Dt")], ("context", "2*B, T, D")),
             rec.hook("DiT block 0", m.blocks[0], [(0, "tokens in", "2*B, N, D"), (1, "adaLN-single modulation", "2*B, 6*D")],
                      ("tokens out", "2*B, N, D")),
             rec.hook("final layer", m.final_layer, [(0, "tokens", "2*B, N, D")], ("patches", "2*B, N, p*p*C")),
             rec.hook("unpatchify", m, [], ("network output (v)", "2*B, C, H, W"))]
    once = {"done": False}

    def sampler_step(info):
        if not once["done"]:
            rec.add("sampler step", "x (noisy latents)", info["x"], "B, C, H, W")
            rec.add("sampler step", "denoised (x0 prediction)", info["denoised"], "B, C, H, W")
            once["done"] = True

    out = pipe(prompts, seed=0, num_inference_steps=2, disable=True, callback=sampler_step)
    for h in hooks:
        h.remove()
    rec.add("VAE decode", "latents", out.latents, "B, C, H, W")
    rec.add("VAE decode", "images", pipe.decode(out.latents), "B, 3, 4*H, 4*W")
    seen, rows = set(), []
    for r in rec.rows:  # the first call of each stage (every step repeats them)
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            rows.append(r)
    return rows, sizes


def big_rows(kind: str) -> tuple[list, dict]:
    from tinydit.checkpoint import empty_model
    from tinydit.dit import DiT, DiTConfig
    from tinydit.textdit import TextDiT, TextDiTConfig

    if kind == "DiT-XL/2":
        cfg = DiTConfig.preset("DiT-XL/2")
        model = empty_model(lambda: DiT(cfg), torch.float32)
    else:
        cfg = TextDiTConfig.preset("PixArt-XL/2-512")
        model = empty_model(lambda: TextDiT(cfg), torch.float32)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.normal_(0, 0.02)
    L = cfg.input_size
    sizes = dict(B=1, C=cfg.in_channels, H=L, W=L, p=cfg.patch_size, D=cfg.hidden_size, N=(L // cfg.patch_size) ** 2,
                 T=8, Dt=getattr(cfg, "context_dim", 0))
    rec = Recorder(sizes)
    out_ch = "2*C" if cfg.learn_sigma else "C"
    hooks = [rec.hook("patchify", model.x_embedder, [(0, "latents in", "B, C, H, W")], ("patch tokens", "B, N, D")),
             rec.hook("DiT block 0", model.blocks[0], [(0, "tokens in", "B, N, D")], ("tokens out", "B, N, D"))]
    x, t = torch.randn(1, cfg.in_channels, L, L), torch.tensor([500])
    with torch.no_grad():
        if kind == "DiT-XL/2":
            out = model(x, t, torch.tensor([1]))
        else:
            out = model(x, t, context=torch.randn(1, 8, cfg.context_dim), context_mask=torch.ones(1, 8, dtype=torch.bool))
    for h in hooks:
        h.remove()
    rec.add("output", "network output", out, f"B, {out_ch}, H, W")
    return rec.rows, sizes


def render() -> str:
    lines = ["# Tensor shapes, stage by stage", "",
             "Generated by `python tools/shapes.py` from forward hooks on the real code (CI regenerates it and",
             "fails when this page differs). Symbols: B batch (2B when classifier-free guidance batches the",
             "conditional and unconditional halves), T text tokens, Dt text width, D model width, C latent",
             "channels, H × W latent grid, p patch size, N = (H/p)(W/p) image tokens.", ""]
    for title, (rows, sizes) in [("The book model (text to image, 2 prompts)", book_rows()),
                                 ("DiT-XL/2 at 256 × 256 (one image)", big_rows("DiT-XL/2")),
                                 ("PixArt-XL/2 at 512 × 512 (one image, 8 caption tokens)", big_rows("PixArt-XL/2"))]:
        lines += [f"## {title}", "", "Sizes: " + ", ".join(f"{k} = {v}" for k, v in sizes.items()), "",
                  "| stage | tensor | symbolic | shape | dtype |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {w} | {sym} | {tuple(shape)} | {dt} |" for s, w, sym, shape, dt in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when book/shapes.md is stale")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python tools/shapes.py")
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
