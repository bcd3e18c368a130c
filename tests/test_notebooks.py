"""Every notebook runs top to bottom at fast settings (TINYDIT_FAST=1), once per test run.

Each percent-format notebook is staged as .ipynb (jupytext) and executed by nbclient, the engine
under both nbval and Jupyter Book (nbval itself cannot keep a run's outputs for the book), through `tools/build_book.py`'s `execute_chapter`: a failing cell
(an assertion that checks the chapter's claims) fails this test with the cell's traceback, as
`--nbval-lax` would. The executed notebooks go to a cache shared with `tests/test_book.py`, whose
build then finds every chapter already run (conftest orders the book after the notebooks), so the
suite executes each notebook once, not twice.
"""

import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.py"))
sys.path.insert(0, str(ROOT / "tools"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, executed_cache, tmp_path, monkeypatch):
    from build_book import execute_chapter
    from nbclient.exceptions import CellExecutionError

    # the inline backend, as the book's build uses: the cached runs carry the figures its pages show
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        executed = execute_chapter(notebook, tmp_path / f"{notebook.stem}.ipynb", executed_cache)
    except CellExecutionError as e:
        pytest.fail(f"{notebook.name}: a cell failed at fast settings:\n{str(e)[-8000:]}", pytrace=False)
    assert executed.is_file()
