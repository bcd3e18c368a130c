"""Every notebook runs top to bottom under nbval at fast settings (TINYDIT_FAST=1).

Each percent-format notebook is converted to .ipynb with jupytext in a temporary folder (never
committed) and executed by `pytest --nbval-lax` in a subprocess, so that a failing cell (an
assertion that checks the chapter's claims) fails this test and shows the cell's error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    ipynb = tmp_path / (notebook.stem + ".ipynb")
    subprocess.run(
        [sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--output", str(ipynb), str(notebook)],
        check=True,
    )
    env = {**os.environ, "TINYDIT_FAST": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp_path), str(ipynb)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, f"{notebook.name} failed under nbval:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
