#!/usr/bin/env python3
"""Print which tinydit module imports which (module-level and call-time imports), one line each,
then the count of edges and any edge that runs from a lower floor to a higher one.

    python tools/import_graph.py [--root CHECKOUT]

Stdlib only: reads the package's source with `ast`, imports nothing.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
UPPER = {"train", "train_recipe", "evaluate", "guidance_study", "demo", "cli", "vae_training", "text_training",
         "dit_measure"}  # what stands on the pipeline: training, grading, chapter studies, entry points


def imports(path: Path) -> set[str]:
    """The tinydit modules a source file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tinydit":
                found |= {a.name for a in node.names}
            elif node.module.startswith("tinydit."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tinydit.")}
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    args = ap.parse_args(argv)
    modules = {p.stem: p for p in sorted((args.root / "tinydit").glob("*.py")) if p.stem not in ("__init__", "__main__")}
    edges, upward = 0, []
    for name, path in modules.items():
        deps = sorted(imports(path) & set(modules) - {name})
        edges += len(deps)
        upward += [f"{name} -> {d}" for d in deps if d in UPPER and name not in UPPER]
        print(f"{name:16s} <- {', '.join(deps) if deps else '-'}")
    print(f"{len(modules)} modules, {edges} imports; inference modules importing training / grading / studies: "
          f"{', '.join(upward) if upward else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
