"""The Jupyter Book builds offline from the percent notebooks, executed, with figures and maths.

`tools/build_book.py` runs every notebook at fast settings (cached by content) and builds the HTML.
The built pages must show at least one figure per chapter, load MathJax from the book itself, and
reference nothing on a CDN; the export directives and the fast-settings set-up cell are hidden.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.py"))
REMOTE = re.compile(r"""(?:src|href)=["'](?:https?:)?//[^"']*\.(?:js|css|woff2?)\b|https?://(?:cdn|unpkg|cdnjs)[.\w]*/""")


def toc_files():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    return [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_toc_lists_every_notebook_in_order():
    assert [f for f in toc_files() if f.startswith("notebooks/")] == [f"notebooks/{nb.stem}" for nb in NOTEBOOKS]
    pages = [f for f in toc_files() if not f.startswith("notebooks/")]
    assert all((ROOT / "book" / f"{p}.md").is_file() for p in pages), pages  # reference pages live in book/


@pytest.fixture(scope="module")
def book_build(tmp_path_factory, executed_cache):
    """(html folder, the build's log, how many chapters the shared cache held before the build)."""
    out = tmp_path_factory.mktemp("book")
    cached_before = len(list(executed_cache.glob("*.ipynb"))) if executed_cache.is_dir() else 0
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_book.py"), "--out", str(out),
                           "--cache", str(executed_cache)],  # the notebooks' runs of test_notebooks.py, reused
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "_build" / "html", proc.stdout, cached_before


@pytest.fixture(scope="module")
def html(book_build):
    return book_build[0]


def test_book_build_executes_only_what_the_notebook_tests_did_not(book_build):
    """After test_notebooks (conftest puts the book last) the build executes no chapter a second time."""
    _, log, cached_before = book_build
    executed = [line.strip() for line in log.splitlines() if "executed in" in line]
    assert len(executed) == len(NOTEBOOKS) - cached_before, (cached_before, executed)
    if cached_before == len(NOTEBOOKS):
        assert not executed  # the whole suite: every notebook ran once, in test_notebooks.py


def test_book_builds_offline_with_every_chapter(html):
    assert (html / "index.html").is_file()
    assert "tinydit" in (html / "intro.html").read_text()
    for nb in NOTEBOOKS:
        assert (html / "notebooks" / f"{nb.stem}.html").is_file(), f"{nb.stem}.html missing from the built book"
    data_page = (html / "notebooks" / "01a_data.html").read_text()
    assert "ShapesDataset" in data_page and "caption grammar" in data_page


def test_reference_pages_and_the_intro_pictures_are_in_the_book(html):
    assert "Why a transformer, not a U-Net" in (html / "manifest.html").read_text()
    assert "Tensor shapes, stage by stage" in (html / "shapes.html").read_text()
    intro = (html / "intro.html").read_text()
    for picture in ("generate_grid", "demo"):  # the generated grid, the served demo's screenshot
        src = re.search(rf'<img[^>]*src="([^"]*{picture}[^"]*\.png)"', intro)
        assert src is not None and (html / src.group(1)).is_file(), f"intro: picture {picture!r} missing"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_chapter_page_shows_figures_and_hides_plumbing(html, notebook):
    page = (html / "notebooks" / f"{notebook.stem}.html").read_text()
    images = re.findall(r"<img\b[^>]*>", page)
    print(f"{notebook.stem}: {len(images)} images")
    assert len(images) >= 1, f"{notebook.stem}: no figure on the page (were the notebooks executed?)"
    assert "# | export" not in page and "| default_exp" not in page, "export directives are visible"


def test_plumbing_cells_are_tagged_away():
    import jupytext

    sys.path.insert(0, str(ROOT / "tools"))
    from build_book import tag_plumbing

    for nb in NOTEBOOKS:
        notebook = jupytext.read(nb, fmt="py:percent")
        tag_plumbing(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        shown = [c for c in code if "remove-cell" not in c.metadata.get("tags", [])]
        assert len(shown) < len(code), f"{nb.stem}: nothing hidden"
        for cell in shown:
            assert 'os.environ.get("TINYDIT_FAST")' not in cell.source, f"{nb.stem}: set-up cell shown"
            assert not cell.source.lstrip().startswith("# | "), f"{nb.stem}: export directive shown"


def test_no_page_references_a_cdn_and_mathjax_is_local(html):
    offenders = {p.name: REMOTE.findall(p.read_text()) for p in html.rglob("*.html")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"pages that load from the network: {offenders}"
    page = (html / "notebooks" / "03_embeddings.html").read_text()
    src = re.search(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page)
    assert src is not None, "no MathJax script on a page full of formulas"
    assert (html / "notebooks" / src.group(1)).resolve().is_file(), f"MathJax not shipped with the book: {src.group(1)}"
