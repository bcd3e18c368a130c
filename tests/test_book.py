"""The Jupyter Book builds offline from the percent notebooks (without executing them)."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def toc_files():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    return [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_toc_lists_every_notebook_in_order():
    assert toc_files() == [f"notebooks/{nb.stem}" for nb in NOTEBOOKS]


def test_book_builds_offline(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_book.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "index.html").is_file()
    assert "tinydit" in (html / "intro.html").read_text()
    for nb in NOTEBOOKS:
        page = html / "notebooks" / f"{nb.stem}.html"
        assert page.is_file(), f"{page.name} missing from the built book"
    data_page = (html / "notebooks" / "01_data.html").read_text()
    assert "ShapesDataset" in data_page and "caption grammar" in data_page
