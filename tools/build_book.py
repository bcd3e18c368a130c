#!/usr/bin/env python3
"""Build the Jupyter Book (HTML) offline from the percent-format notebooks.

The book's sources live in `book/` (config, table of contents, intro) and `notebooks/` (the
chapters, as jupytext percent `.py` files). Jupyter Book wants everything under one folder and
reads `.ipynb`, so we stage a copy: `book/*` plus every `notebooks/NN_*.py` converted to `.ipynb`
by jupytext. The staged folder and the HTML go under `book/_build/` (git-ignored).

    python tools/build_book.py              # build without executing the notebooks
    python tools/build_book.py --execute    # run every notebook while building (slow)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(out: Path, execute: bool) -> Path:
    import jupytext
    import yaml

    src = out / "_src"
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    for item in (ROOT / "book").iterdir():
        if item.name.startswith("_build"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, src / item.name)
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        notebook = jupytext.read(nb, fmt="py:percent")
        jupytext.write(notebook, src / "notebooks" / f"{nb.stem}.ipynb")
    if execute:
        config = yaml.safe_load((src / "_config.yml").read_text())
        config["execute"]["execute_notebooks"] = "force"
        (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return src


def build(out: Path = ROOT / "book" / "_build", execute: bool = False) -> Path:
    """Stage and build; returns the folder holding index.html."""
    out = Path(out).resolve()
    src = stage(out, execute)
    try:
        import jupyter_book  # noqa: F401
    except ImportError:
        raise SystemExit("jupyter-book is not installed: pip install -e '.[dev]'") from None
    # the `jupyter-book` console script, run with this interpreter (no PATH assumptions)
    cli = "from jupyter_book.cli.main import main; main()"
    subprocess.run([sys.executable, "-c", cli, "build", str(src), "--path-output", str(out)], check=True)
    return out / "_build" / "html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="run the notebooks while building")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "_build", help="output folder")
    args = ap.parse_args(argv)
    html = build(args.out, args.execute)
    print(f"book built: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
