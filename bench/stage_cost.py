"""Each stage of a run against what its device programs cost, one at a time.

    # a normal run, then the same config again with every program timed alone
    cca-jax run CONFIG --out RUN
    CCA_JAX_STEP_PROBE=1 cca-jax run CONFIG --out PROBE
    python bench/stage_cost.py RUN PROBE

The probe run (same config, same persistent compilation cache, so it compiles nothing)
records per stage each program kind's calls and median seconds a call, waited for alone
(``timing.step``): prefills, decode chunks, DCM mask steps, gradient micro-batches. This
prints, per stage: the normal run's seconds outside compilation, the sum of calls x median
from the probe, and their ratio (the issue's target: at most 2x). A stage's other work
(host code, programs that are not counted: cache copies, evaluation of answers) is what
the ratio shows above 1. Both runs must have made the same calls (same config and data);
a stage whose counts differ is flagged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _timings(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["timings_seconds"]


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[0] + "\nusage: python bench/stage_cost.py RUN PROBE", file=sys.stderr)
        return 2
    run, probe = (_timings(Path(a)) for a in args)
    rows = []
    print(f"{'stage':<14}{'total':>8}{'compile':>9}{'outside':>9}{'steps':>9}{'ratio':>7}  programs (calls x median ms)")
    for stage, t in run.items():
        if not isinstance(t, dict) or stage not in probe:
            continue
        p = probe[stage].get("step_probe") or {}
        outside = t.get("total", 0.0) - t.get("compile", 0.0)
        steps = sum(v[2] for v in p.values())
        same = {k: v[0] for k, v in p.items()} == dict(t.get("work", {})) if p else True
        ratio = outside / steps if steps else None
        progs = ", ".join(f"{k}: {v[0]} x {v[1] * 1e3:.1f}" for k, v in sorted(p.items(), key=lambda kv: -kv[1][2]))
        print(f"{stage:<14}{t.get('total', 0):>8.1f}{t.get('compile', 0):>9.1f}{outside:>9.1f}{steps:>9.1f}"
              f"{(f'{ratio:.2f}' if ratio else '-'):>7}  {progs or '-'}{'' if same else '  (CALLS DIFFER)'}")
        rows.append({"stage": stage, "outside_compile": round(outside, 3), "steps": round(steps, 3),
                     "ratio": None if ratio is None else round(ratio, 3), "same_calls": same, "programs": p})
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
