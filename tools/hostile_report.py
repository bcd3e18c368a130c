#!/usr/bin/env python3
"""Run every case of tests/test_hostile.py once and sort the outcomes: clear / raw / silent.

    python tools/hostile_report.py        # the counts and every case that is not clear
    python tools/hostile_report.py -v     # every case

clear: the expected error type with a message naming the argument (or the right behaviour);
raw: an error from deep inside torch / safetensors / PIL, or a message that names nothing;
silent: no error where one is due, or a wrong result.
"""

import collections
import sys
import time
import warnings
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.simplefilter("ignore")
import test_hostile as th  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)
counts, rows = collections.Counter(), []
t0 = time.perf_counter()
for case in th.CASES:
    t = time.perf_counter()
    kind, what = th.classify(case)
    counts[kind] += 1
    rows.append((kind, case[0], what, time.perf_counter() - t))
for kind, cid, what, dt in rows:
    if kind != "clear" or "-v" in sys.argv:
        print(f"{kind:6} {cid:60} {dt:5.2f}s  {what[:220]}")
print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.1f} s: "
      + ", ".join(f"{counts[k]} {k}" for k in ("clear", "raw", "silent")))
sys.exit(1 if counts["raw"] or counts["silent"] else 0)
