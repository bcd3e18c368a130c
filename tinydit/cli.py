"""Command line: `python -m tinydit <command> ...` (or the `tinydit` script).

Hand-written glue (no notebook owns it): each subcommand parses flags and calls what the chapters
exported. Errors in flags or values print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; we print a single line that points at --help."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_dataset(args: argparse.Namespace) -> int:
    from tinydit import data

    if args.dataset == "shapes":
        ds = data.ShapesDataset(args.n, size=args.size, seed=args.seed, split=args.split)
    else:
        ds = data.EmojiDataset(size=args.size)
    t0 = time.perf_counter()
    grid = data.dataset_grid(ds, n=args.n, cols=args.cols, scale=args.scale)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    grid.save(out)
    shown = min(args.n, len(ds))
    print(f"wrote {out} ({shown} {args.dataset} samples, {grid.width}x{grid.height} px, "
          f"{time.perf_counter() - t0:.2f} s)")
    return 0


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from tinydit import vae

    t0 = time.perf_counter()
    model, history = vae.train_book_vae(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                        out_dir=args.out)
    images = vae.shapes_images(256, seed=0, split="test")
    import torch

    with torch.no_grad():
        rec = model.decode(model.encode(images).mode()).clamp(-1, 1)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s); held-out PSNR "
          f"{float(vae.psnr(rec, images).mean()):.2f} dB on 256 test images")
    return 0


def _cmd_train_text_encoder(args: argparse.Namespace) -> int:
    from tinydit import text

    t0 = time.perf_counter()
    encoders = text.train_book_text_encoder(out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                                            seed=args.seed)
    metrics = text.evaluate_book_encoders(encoders.text_encoder, encoders.image_encoder, n=1000, seed=1)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s); held-out metrics: {metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m tinydit",
        description="tinydit: a DiT text-to-image engine built chapter by chapter. "
        "Each subcommand runs what one chapter of the book built.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_OneLineParser)
    sub.required = True

    p = sub.add_parser(
        "dataset",
        help="draw a captioned grid of the book's training data (chapter 01)",
        description="Render samples of the book's dataset with their captions into one PNG grid. "
        "Shapes are drawn procedurally (deterministic in --seed and --split); emoji need the "
        "fonts-noto-color-emoji system package.",
    )
    p.add_argument("--n", type=_positive_int, default=64, help="number of samples to show (default 64)")
    p.add_argument("--out", default="grid.png", help="output PNG path (default grid.png)")
    p.add_argument("--dataset", choices=("shapes", "emoji"), default="shapes",
                   help="which dataset (default shapes)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="shapes split; 'test' includes the held-out colour/shape pairs (default train)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=_positive_int, default=32, help="image side in pixels, >= 8 (default 32)")
    p.add_argument("--cols", type=_positive_int, default=8, help="grid columns (default 8)")
    p.add_argument("--scale", type=_positive_int, default=4, help="enlargement of each tile (default 4)")
    p.set_defaults(func=_cmd_dataset)

    p = sub.add_parser(
        "train-vae",
        help="retrain the book's tiny VAE (chapter 02) and save it",
        description="Train the book VAE on the shapes dataset (32x32 images -> 4x8x8 latents) with "
        "the chapter 02 recipe, save config.json + model.safetensors to --out, and print the held-out "
        "PSNR. The defaults reproduce the weights shipped in tinydit/assets/book_vae.",
    )
    p.add_argument("--out", default="outputs/book_vae", help="output folder (default outputs/book_vae)")
    p.add_argument("--steps", type=_positive_int, default=4500, help="optimizer steps (default 4500)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.set_defaults(func=_cmd_train_vae)

    p = sub.add_parser(
        "train-text-encoder",
        help="retrain the book's text encoder contrastively (chapter 06) and save it",
        description="Train the book's CLIP-style text encoder against a small image encoder on the "
        "shapes dataset (contrastive loss), save it in the Hugging Face format to --out. The defaults "
        "reproduce the weights shipped in tinydit/assets/book_text_encoder.",
    )
    p.add_argument("--out", default="outputs/book_text_encoder", help="output folder")
    p.add_argument("--steps", type=_positive_int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.set_defaults(func=_cmd_train_text_encoder)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
