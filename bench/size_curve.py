"""Test accuracy against circuit size from finished runs (issue 22's size curve): reads
each run's summary.json and plots accuracy after amplification (with its 95% interval over
items) against the circuit's share of components, with the accuracy before as a line.

    python bench/size_curve.py RUN_DIR [RUN_DIR ...] --out size_curve.png [--json size_curve.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def points(run_dirs):
    out = []
    for d in run_dirs:
        f = Path(d) / "summary.json"
        if not f.is_file():
            sys.exit(f"size_curve: {f} is missing: give finished run directories")
        s = json.loads(f.read_text())
        a = s["test_accuracy_after"]
        out.append({"run": str(d), "fraction_components": s.get("fraction_components", 1.0),
                    "localize": "random" if "random" in str(d) else "dcm", "after": a["overall"],
                    "low": a["low"], "high": a["high"], "before": s["test_accuracy_before"]["overall"],
                    "faithfulness": s.get("faithfulness", {}).get("fraction")})
    return sorted(out, key=lambda p: p["fraction_components"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True, help="the PNG")
    ap.add_argument("--json", help="also the points as JSON")
    args = ap.parse_args(argv)
    pts = points(args.runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, color in (("dcm", "tab:blue"), ("random", "tab:green")):
        ps = [p for p in pts if p["localize"] == kind]
        if not ps:
            continue
        x = [100 * p["fraction_components"] for p in ps]
        y = [p["after"] for p in ps]
        err = [[p["after"] - p["low"] for p in ps], [p["high"] - p["after"] for p in ps]]
        ax.errorbar(x, y, yerr=err, fmt="o-" if kind == "dcm" else "s", capsize=3, color=color,
                    label=f"{kind} circuit, after amplification")
    ax.axhline(pts[0]["before"], color="k", lw=0.8, ls="--", label="before")
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 100)
             if 0.5 * min(100 * p["fraction_components"] for p in pts) <= t <= 2 * max(100 * p["fraction_components"] for p in pts)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("circuit size (% of components, log scale)")
    ax.set_ylabel("test accuracy (95% CI over items)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    if args.json:
        Path(args.json).write_text(json.dumps(pts, indent=1))
    for p in pts:
        print(f"{100 * p['fraction_components']:6.2f}%  {p['localize']:6s}  {p['before']:.3f} -> {p['after']:.3f} "
              f"[{p['low']:.3f}, {p['high']:.3f}]  {p['run']}")


if __name__ == "__main__":
    main()
