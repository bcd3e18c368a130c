#!/usr/bin/env python3
"""Build the Jupyter Book (HTML) offline from the percent-format notebooks, with their outputs.

The book's sources live in `book/` (config, table of contents, intro) and `notebooks/` (the
chapters, as jupytext percent `.py` files). Jupyter Book wants everything under one folder and
reads `.ipynb`, so we stage a copy: `book/*` plus every `notebooks/NN_*.py` converted to `.ipynb`.

Every chapter page shows its figures, so the notebooks are **executed** before the build, at fast
settings (`TINYDIT_FAST=1`) unless `--full` is given. Executed notebooks are cached in
`book/_build/.executed/`, keyed by a hash of the notebook, the package sources and the settings,
so a rebuild after a prose edit re-runs only that chapter.

While staging, the plumbing a reader need not see is tagged away: the `# | default_exp` cell and
the `TINYDIT_FAST` set-up cell get the `remove-cell` tag, and the `# | export` directive line is
dropped from exported cells. Maths is rendered by a local copy of MathJax
(sphinx-mathjax-offline), so the book reads without a network.

    python tools/build_book.py                # execute (cached) at fast settings, then build
    python tools/build_book.py --full         # execute at book size (slow: trains models)
    python tools/build_book.py --no-execute   # text only, no outputs (seconds)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r"^#\s*\|\s*(default_exp|export)\b")


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]*_*.py"))


def tag_plumbing(notebook) -> None:
    """Hide export directives and the fast-settings set-up cell in the rendered page."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        tags = cell.metadata.setdefault("tags", [])
        if any(_DIRECTIVE.match(line) and "default_exp" in line for line in lines) or "TINYDIT_FAST" in cell.source:
            if "remove-cell" not in tags:
                tags.append("remove-cell")
        elif lines and _DIRECTIVE.match(lines[0]):
            cell.source = "\n".join(lines[1:]).lstrip("\n")


def package_digest(root: Path = ROOT) -> str:
    """A hash of what a notebook's outputs depend on besides itself: the package and its assets."""
    h = hashlib.sha256()
    for path in sorted((root / "tinydit").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def execute(ipynb: Path, cache: Path, key: str, full: bool, timeout: int) -> Path:
    """Run `ipynb` top to bottom (or reuse the cached run with the same key); returns the executed file."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    cached = cache / f"{ipynb.stem}-{key[:16]}.ipynb"
    if cached.is_file():
        print(f"  {ipynb.stem}: cached")
        return cached
    env_before = os.environ.get("TINYDIT_FAST")
    os.environ["TINYDIT_FAST"] = "0" if full else "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    t0 = time.perf_counter()
    try:
        run_dir = cache / "run" / ipynb.stem  # notebooks may write files; keep them out of the repo
        run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):  # a kernel that dies or stops answering gets one fresh start
            nb = nbformat.read(ipynb, as_version=4)
            try:
                NotebookClient(nb, timeout=timeout, kernel_name="python3",
                               resources={"metadata": {"path": str(run_dir)}}).execute()
                break
            except (DeadKernelError, CellTimeoutError) as e:
                if attempt == 2:
                    raise
                print(f"  {ipynb.stem}: {type(e).__name__} ({str(e)[:200]}); restarting the kernel once")
    finally:
        if env_before is None:
            os.environ.pop("TINYDIT_FAST", None)
        else:
            os.environ["TINYDIT_FAST"] = env_before
    for old in cache.glob(f"{ipynb.stem}-*.ipynb"):  # one cached run per chapter
        old.unlink()
    nbformat.write(nb, cached)
    print(f"  {ipynb.stem}: executed in {time.perf_counter() - t0:.0f} s")
    return cached


def execute_chapter(nb: Path, staged: Path, cache: Path, full: bool = False, timeout: int | None = None) -> Path:
    """Stage the percent notebook `nb` as `staged` (.ipynb, plumbing tagged away) and execute it, or reuse
    the cached run with the same key (the notebook, the package, the settings); returns the executed file.
    The test suite calls this once per chapter and the book build finds every chapter in the same cache,
    so each notebook executes once per test run. A failing cell raises nbclient's CellExecutionError."""
    import jupytext

    notebook = jupytext.read(nb, fmt="py:percent")
    notebook.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    tag_plumbing(notebook)
    staged.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, staged)
    cache.mkdir(parents=True, exist_ok=True)
    timeout = (3600 if full else 600) if timeout is None else timeout  # per cell: book-size training takes long
    key = hashlib.sha256((nb.read_text() + package_digest() + str(full)).encode()).hexdigest()
    return execute(staged, cache, key, full, timeout)


def stage(out: Path, run: bool, full: bool, timeout: int | None = None, cache: Path | None = None) -> Path:
    import jupytext

    src = out / "_src"
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    for item in (ROOT / "book").iterdir():
        if item.name.startswith("_build"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, src / item.name)
    cache = out / ".executed" if cache is None else cache
    for nb in notebooks():
        staged = src / "notebooks" / f"{nb.stem}.ipynb"
        if run:
            shutil.copy2(execute_chapter(nb, staged, cache, full, timeout), staged)
        else:
            notebook = jupytext.read(nb, fmt="py:percent")
            tag_plumbing(notebook)
            jupytext.write(notebook, staged)
    return src


def build(out: Path = ROOT / "book" / "_build", run: bool = True, full: bool = False, cache: Path | None = None) -> Path:
    """Stage, execute (cached) and build; returns the folder holding index.html."""
    try:
        import jupyter_book  # noqa: F401
    except ImportError:
        raise SystemExit("jupyter-book is not installed: pip install -e '.[dev]'") from None
    out = Path(out).resolve()
    src = stage(out, run, full, cache=cache)
    # the `jupyter-book` console script, run with this interpreter (no PATH assumptions)
    cli = "from jupyter_book.cli.main import main; main()"
    subprocess.run([sys.executable, "-c", cli, "build", str(src), "--path-output", str(out)], check=True)
    html = out / "_build" / "html"
    strip_remote_scripts(html)
    return html


_REMOTE_SCRIPT = re.compile(r'<script>const THEBE_JS_URL = "https?://[^<]*</script>\n?')


def strip_remote_scripts(html: Path) -> None:
    """Remove sphinx-thebe's launcher, the one script that points at a CDN (live code needs a
    Jupyter server and a network anyway); the book then references nothing outside itself."""
    for page in html.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        cleaned = _REMOTE_SCRIPT.sub("", text)
        if cleaned != text:
            page.write_text(cleaned, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-execute", action="store_true", help="build without outputs (no figures)")
    ap.add_argument("--full", action="store_true", help="execute at book size instead of TINYDIT_FAST=1")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "_build", help="output folder")
    ap.add_argument("--cache", type=Path, default=None, help="executed-notebook cache (default: OUT/.executed)")
    args = ap.parse_args(argv)
    html = build(args.out, run=not args.no_execute, full=args.full, cache=args.cache)
    print(f"book built: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
