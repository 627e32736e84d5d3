"""The side-by-side table: each stage's wall clock for the original release and for cca_jax.

    python3 bench/original/compare.py RUN_DIR [--out DIR]

RUN_DIR is one run of side_by_side.sh. Reads its walls.jsonl (each process's wall clock,
measured from outside), timeline.jsonl (the original's stages, from the timers that
run_original.py wraps around its functions) and cca*/summary.json (cca_jax's
timings_seconds). Prints a Markdown table and writes comparison.md / comparison.json into
RUN_DIR; with --out also copies them, the raw timings, the summaries and a tarball of the
logs there (at most 8 files: what the device tool brings back). Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

STAGES = ("load_model", "base_eval", "localize", "circuit", "faithfulness", "amplify", "test_eval")
NAMES = {"load_model": "load model (every process)", "base_eval": "base evaluation + template selection",
         "localize": "pivots (localization data)", "circuit": "circuit (DCM)",
         "faithfulness": "faithfulness (cca_jax only)", "amplify": "amplification (+ val evaluations)",
         "test_eval": "test evaluation", "other": "other (startup, imports, data, writes)",
         "whole": "**whole run (wall clock)**"}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a killed process
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def original(r: Path, walls: list[dict]) -> dict:
    ev = _jsonl(r / "timeline.jsonl")

    def total(name, label=None):
        return sum(e["seconds"] for e in ev if e["event"] == name and (label is None or e.get("label") == label))

    def count(name):
        return sum(1 for e in ev if e["event"] == name)

    st = {"load_model": total("load_model"), "base_eval": total("base_eval"), "localize": total("pivots"),
          "circuit": total("dcm"), "faithfulness": None, "amplify": total("amplify"),
          "test_eval": total("eval_model", "fixing_pipeline") + total("load_best")}
    whole = sum(w["seconds"] for w in walls if w["step"].startswith("orig_"))
    st["other"] = whole - sum(v for v in st.values() if v) if whole else None
    st["whole"] = whole or None
    log = (r / "orig_fix.log").read_text(errors="replace") if (r / "orig_fix.log").is_file() else ""
    loc = [p for p in glob.glob(str(r / "orig" / "artifacts" / "*_prefix_*side_by_side.json"))
           if not p.endswith(("_greedy.json", "_non_greedy.json"))]
    res = _json(next(iter(sorted(Path(r / "orig" / "artifacts" / "experiments").glob("*/accuracy_results.json"))),
                     Path("/nonexistent")))
    res = res[-1] if isinstance(res, list) and res else None
    detail = {
        "pivots: greedy traces": total("pivots.greedy"), "pivots: sampled traces": total("pivots.sampling"),
        "amplification: val evaluations": total("amplify.val_eval"),
        "amplification: val evaluation count": count("amplify.val_eval"),
        "amplification: gradients": total("amplify.gradients"), "amplification: updates": total("amplify.update"),
        "amplification: checkpoint saves": total("amplify.save"), "test: reloading best_model.pth": total("load_best"),
        "DCM steps (batches)": len(re.findall(r"Epoch \d+/\d+, Batch \d+/\d+, Loss", log)),
        "localization examples": len(_json(Path(loc[0])) or []) if loc else None,
        "selected templates": (_json(r / "orig" / "selected.json") or {}).get("selected"),
        "base accuracy (train/val/test)": (_json(r / "orig" / "selected.json") or {}).get("base_accuracy"),
        "val accuracy, best step": res.get("best_accuracy_step") if res else None,
        "test accuracy after": res.get("overall_test_accuracy") if res else None,
        "circuit size (q/k/v heads, mlp neurons)": [res.get(k) for k in ("n_q_heads", "n_k_heads", "n_v_heads",
                                                                          "n_mlp_neurons")] if res else None,
        "process exits": {w["step"]: w["exit"] for w in walls if w["step"].startswith("orig_")},
    }
    return {"stages": st, "detail": detail, "results": res}


def cca(r: Path, walls: list[dict]) -> list[dict]:
    out = []
    for w in walls:
        if not re.fullmatch(r"cca\d+", w["step"]):
            continue
        s = _json(r / w["step"] / "summary.json") or {}
        t = s.get("timings_seconds", {})
        st = {k: (t[k]["total"] if isinstance(t.get(k), dict) else None) for k in STAGES}
        st["other"] = w["seconds"] - sum(v for v in st.values() if v) if s else None
        st["whole"] = w["seconds"]
        hist = (_json(r / w["step"] / "stages" / "circuit" / "history.json") or {}).get("history")
        compile_s = sum(t[k].get("compile", 0.0) for k in t if isinstance(t.get(k), dict))
        out.append({"run": w["step"], "exit": w["exit"], "stages": st, "detail": {
            "compile seconds (all stages)": round(compile_s, 1),
            "DCM steps (batches)": len(hist) if isinstance(hist, list) else None,
            "localization": s.get("localization"), "selected templates": s.get("selected_templates"),
            "best step": s.get("best_step"),
            "test accuracy before": (s.get("test_accuracy_before") or {}).get("overall"),
            "test accuracy after": (s.get("test_accuracy_after") or {}).get("overall"),
            "components selected": s.get("components_selected")}})
    return out


def _f(v) -> str:
    return "" if v is None else f"{v:,.1f}"


def _ratio(a, b) -> str:
    return f"{a / b:.1f}x" if a and b and b > 0 else ""


def table(o: dict, cs: list[dict], settings: dict) -> str:
    head = ["stage", "original (s)"]
    for c in cs:
        head += [f"cca_jax {c['run']} (s)", "speed-up"]
    lines = [f"Templates [{settings.get('templates')}], max_new_tokens {settings.get('max_new_tokens')}, "
             f"batch {settings.get('batch')}; {' / '.join(c['run'] for c in cs) or 'no cca_jax run'} "
             f"(cca1 starts with an empty compile cache, later runs reuse it).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in (*STAGES, "other", "whole"):
        ov = o["stages"].get(k) if o else None
        row = [NAMES[k], _f(ov)]
        for c in cs:
            cv = c["stages"].get(k)
            row += [_f(cv), _ratio(ov, cv) if k not in ("faithfulness", "other") else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Original, inside its stages:", ""]
    lines += [f"- {k}: {v if not isinstance(v, float) else round(v, 1)}" for k, v in (o or {}).get("detail", {}).items()]
    for c in cs:
        lines += ["", f"cca_jax {c['run']} (exit {c['exit']}):", ""]
        lines += [f"- {k}: {v}" for k, v in c["detail"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, help="also copy the results here (the device tool's $OUT)")
    a = ap.parse_args(argv)
    r = a.run_dir.resolve()
    if not r.is_dir():
        print(f"compare: error: no such run directory: {a.run_dir}", file=sys.stderr)
        return 2
    walls = _jsonl(r / "walls.jsonl")
    settings = _json(r / "settings.json") or {}
    o = original(r, walls) if any(w["step"].startswith("orig_") for w in walls) else None
    cs = cca(r, walls)
    md = table(o, cs, settings)
    print(md)
    (r / "comparison.md").write_text(md)
    (r / "comparison.json").write_text(json.dumps({"settings": settings, "original": o, "cca_jax": cs,
                                                   "walls": walls}, indent=1) + "\n")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for name in ("comparison.md", "comparison.json", "timeline.jsonl"):
            if (r / name).is_file():
                shutil.copy(r / name, a.out / name)
        for c in cs[:1] + cs[-1:] if len(cs) > 1 else cs:
            if (r / c["run"] / "summary.json").is_file():
                shutil.copy(r / c["run"] / "summary.json", a.out / f"{c['run']}_summary.json")
        if o and o["results"]:
            (a.out / "orig_accuracy_results.json").write_text(json.dumps(o["results"], indent=1) + "\n")
        with tarfile.open(a.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(r.glob("*.log")) + sorted(r.glob("*.json")) + sorted((r / "orig").glob("*.json")) \
                    + sorted((r / "orig").glob("*.yaml")):
                if p.stat().st_size < 8 << 20:
                    tar.add(p, arcname=str(p.relative_to(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
