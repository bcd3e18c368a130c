"""book/shapes.md is generated from the code (tools/shapes.py, forward hooks on the real models, every
symbolic shape checked against the concrete one): fail when the committed page is stale."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_shape_reference_is_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "shapes.py"), "--check"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
