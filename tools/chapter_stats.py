#!/usr/bin/env python3
"""Print, per chapter: total lines, code lines, exported-code share, largest exported cell (non-blank
lines), markdown cells, and (when a built book is given) the number of figures on the chapter's page.

    python tools/chapter_stats.py [--html book/_build/_build/html] [--root CHECKOUT]

Code lines are non-blank lines of code cells that are not comment-only; exported lines are those of
cells whose first line is a `# | export` directive. `--root` reads another checkout (an older commit's
worktree, to compare). Stdlib only.
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
    total = exported = largest = markdown = 0
    for kind, lines in split_cells(text):
        if kind != "code":
            markdown += 1
            continue
        body = [line for line in lines if line.strip()]
        n = code_lines(lines)
        total += n
        if body and _EXPORT.match(body[0]):
            exported += n
            largest = max(largest, len(body))
    return {"lines": len(text.splitlines()), "code": total, "exported": exported, "markdown": markdown,
            "share": exported / total if total else 0.0, "largest_export_cell": largest}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, help="built book folder (…/_build/html) to count figures in")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    args = ap.parse_args(argv)
    print(f"{'chapter':28s} {'lines':>6s} {'code':>5s} {'export':>6s} {'share':>6s} {'max cell':>8s} {'markdown':>8s} "
          f"{'figures':>7s}")
    for nb in sorted((args.root / "notebooks").glob("[0-9][0-9]*_*.py")):
        s = stats(nb)
        figs = "-"
        if args.html is not None:
            page = args.html / "notebooks" / f"{nb.stem}.html"
            figs = str(len(re.findall(r"<img\b", page.read_text()))) if page.is_file() else "?"
        print(f"{nb.stem:28s} {s['lines']:6d} {s['code']:5d} {s['exported']:6d} {s['share']:6.0%} "
              f"{s['largest_export_cell']:8d} {s['markdown']:8d} {figs:>7s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
