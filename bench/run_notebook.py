"""Time a Colab notebook's code cells where no Jupyter kernel is installed (the lent GPU
machine): every code cell runs in order in one namespace, as a kernel would run them;
prints each cell's seconds and the total, and writes them as JSON.

    CCA_NOTEBOOK_MODEL=/path/model.gguf python bench/run_notebook.py colab/quickstart.ipynb --out DIR

Without IPython, ``IPython.display`` is replaced by a stand-in that prints what it would
show (the image cells then only check that the files exist)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path


def _display_stub() -> None:
    try:
        import IPython.display  # noqa: F401
    except ImportError:
        class Image:
            def __init__(self, filename: str):
                if not Path(filename).is_file():
                    raise FileNotFoundError(filename)
                self.filename = filename

            def __repr__(self):
                return f"<image {self.filename}>"

        mod = types.ModuleType("IPython.display")
        mod.Image, mod.display = Image, print
        pkg = types.ModuleType("IPython")
        pkg.display = mod
        sys.modules.update({"IPython": pkg, "IPython.display": mod})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook")
    ap.add_argument("--out", default=".")
    ap.add_argument("--keep-going", action="store_true",
                    help="record a failing cell and go on (e.g. treescope's show needs a kernel)")
    args = ap.parse_args()
    nb = json.loads(Path(args.notebook).read_text())
    ns: dict = {"__name__": "__main__"}
    cells, t0 = [], time.perf_counter()
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        src = "".join(cell["source"])
        if "IPython.display" in src:  # only now: other libraries probe IPython at import
            _display_stub()
        t = time.perf_counter()
        error = None
        try:
            exec(compile(src, f"{args.notebook}: code cell {i}", "exec"), ns)
        except Exception as err:
            if not args.keep_going:
                raise
            error = f"{type(err).__name__}: {err}"[:300]
            print(f"[cell {i} failed] {error}", flush=True)
        cells.append({"cell": i, "first_line": src.splitlines()[0][:80] if src else "",
                      "seconds": round(time.perf_counter() - t, 2), **({"error": error} if error else {})})
        print(f"[cell {i}: {cells[-1]['seconds']:.1f} s] {cells[-1]['first_line']}", flush=True)
    total = round(time.perf_counter() - t0, 1)
    print(f"notebook {args.notebook}: {total} s over {len(cells)} code cells", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "notebook_times.json").write_text(json.dumps({"notebook": args.notebook, "total_s": total,
                                                         "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
