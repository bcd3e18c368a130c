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
