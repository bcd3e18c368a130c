#!/usr/bin/env python3
"""Print, per chapter: total lines, code lines, exported-code share, largest exported cell, and
(when a built book is given) the number of figures on the chapter's page.

    python tools/chapter_stats.py [--html book/_build/_build/html]

Code lines are non-blank lines of code cells that are not comment-only; exported lines are those of
cells whose first line is a `# | export` directive. Stdlib only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import ROOT, split_cells  # noqa: E402


_EXPORT = re.compile(r"^#\s*\|\s*export\b")


def code_lines(lines: list[str]) -> int:
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def stats(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    total = exported = largest = 0
    for kind, lines in split_cells(text):
        if kind != "code":
            continue
        body = [line for line in lines if line.strip()]
        n = code_lines(lines)
        total += n
        if body and _EXPORT.match(body[0]):
            exported += n
            largest = max(largest, n)
    return {"lines": len(text.splitlines()), "code": total, "exported": exported,
            "share": exported / total if total else 0.0, "largest_export_cell": largest}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, help="built book folder (…/_build/html) to count figures in")
    args = ap.parse_args(argv)
    print(f"{'chapter':28s} {'lines':>6s} {'code':>5s} {'export':>6s} {'share':>6s} {'max cell':>8s} {'figures':>7s}")
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.py")):
        s = stats(nb)
        figs = "-"
        if args.html is not None:
            page = args.html / "notebooks" / f"{nb.stem}.html"
            figs = str(len(re.findall(r"<img\b", page.read_text()))) if page.is_file() else "?"
        print(f"{nb.stem:28s} {s['lines']:6d} {s['code']:5d} {s['exported']:6d} {s['share']:6.0%} "
              f"{s['largest_export_cell']:8d} {figs:>7s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
