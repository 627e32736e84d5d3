"""``cca-jax compare RUN_DIRS...``: CCA against the fine-tuning baselines, as the paper
judges it (SPEC 5): test accuracy before/after with intervals, how much of the model
changed, and each side-effect benchmark's change. Reads only the runs' summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from cca_jax import atomic
from cca_jax.errors import CCAError


def load_summary(run_dir: str | Path) -> dict:
    f = Path(run_dir) / "summary.json"
    if not f.is_file():
        raise CCAError(f"{run_dir}: no summary.json (run `cca-jax run` there to the end first)")
    try:
        s = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CCAError(f"{f}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise CCAError(f"{f}: not valid JSON (not UTF-8 text)") from None
    except OSError as err:
        raise CCAError(f"{f}: cannot read it ({err.strerror or err})") from None
    problem = _summary_problem(s)
    if problem:
        raise CCAError(f"{f}: not a cca-jax run summary ({problem}); rerun `cca-jax run` on {run_dir}")
    return s


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _summary_problem(s) -> str | None:
    """What in a parsed summary.json the table and chart cannot use, or None."""
    if not isinstance(s, dict):
        return f"a JSON {type(s).__name__}, not an object"
    for key in ("test_accuracy_before", "test_accuracy_after"):
        acc = s.get(key)
        if not isinstance(acc, dict):
            return f"no {key} object"
        for k in ("overall", "low", "high"):
            if not _number(acc.get(k)):
                return f"{key}.{k} is not a number"
    for key in ("fraction_components", "fraction_parameters_changed"):
        if s.get(key) is not None and not _number(s[key]):
            return f"{key} is not a number"
    se = s.get("side_effects", {})
    if not isinstance(se, dict):
        return "side_effects is not an object"
    for task, v in se.items():
        if not isinstance(v, dict) or not all(_number(v.get(k)) for k in ("before", "after", "delta", "n")):
            return f"side_effects.{task} lacks numeric before, after, delta and n"
        if ("better" in v) != ("worse" in v):
            return f"side_effects.{task} has only one of better and worse"
        ci = v.get("delta_ci")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci))):
            return f"side_effects.{task}.delta_ci is not two numbers"
    return None


def table(run_dirs: list[str]) -> dict:
    """One row per run, with the side-effect tasks any run measured as columns."""
    if not run_dirs:
        raise CCAError("compare needs at least one run directory")
    rows = []
    tasks: list[str] = []
    for d in run_dirs:
        s = load_summary(d)
        before, after = s["test_accuracy_before"], s["test_accuracy_after"]
        se = s.get("side_effects", {})
        tasks += [t for t in se if t not in tasks]
        rows.append({
            "run": str(d), "method": s.get("method", "cca"), "model": s.get("model"),
            "test_before": before["overall"], "test_before_ci": [before["low"], before["high"]],
            "test_after": after["overall"], "test_after_ci": [after["low"], after["high"]],
            "test_n": after.get("n_items"),
            "fraction_components": s.get("fraction_components"),
            "fraction_parameters_changed": s.get("fraction_parameters_changed"),
            "best_step": s.get("best_step"),
            "side_effects": {t: se[t] for t in se},
        })
    return {"rows": rows, "tasks": tasks}


def _ci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _delta_cell(v: dict) -> str:
    ci = v.get("delta_ci")  # runs before paired intervals were recorded have none
    ci_s = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    moved = f", {v['better']} better / {v['worse']} worse" if "better" in v else ""
    return f"{v['delta']:+.3f}{ci_s} ({v['before']:.3f}→{v['after']:.3f}, n={v['n']}{moved})"


def markdown(t: dict) -> str:
    head = ["run", "method", "test before", "test after", "components", "parameters changed", "best step"]
    head += [f"{task} Δ" for task in t["tasks"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        cells = [Path(r["run"]).name, r["method"], f"{r['test_before']:.3f}{_ci(r['test_before_ci'])}",
                 f"{r['test_after']:.3f}{_ci(r['test_after_ci'])}", _pct(r["fraction_components"]),
                 _pct(r["fraction_parameters_changed"]), str(r["best_step"])]
        for task in t["tasks"]:
            v = r["side_effects"].get(task)
            cells.append("-" if v is None else _delta_cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(t: dict, path: Path) -> Path:
    """Test accuracy before/after (with intervals) and side-effect deltas, per run."""
    import numpy as np

    from cca_jax.views import figure  # not pyplot: a notebook's backend stays as it is

    rows = t["rows"]
    names = [f"{Path(r['run']).name}\n({r['method']})" for r in rows]
    fig = figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    x = np.arange(len(rows))
    for off, key, label in ((-0.18, "test_before", "before"), (0.18, "test_after", "after")):
        vals = [r[key] for r in rows]
        cis = [r[f"{key}_ci"] or (v, v) for r, v in zip(rows, vals)]
        err = np.array([[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]])
        axes[0].bar(x + off, vals, 0.36, yerr=err, capsize=3, label=label)
    axes[0].set_xticks(x, names, fontsize=8)
    axes[0].set_ylabel("GSM-Symbolic test accuracy")
    axes[0].legend()
    tasks = t["tasks"]
    if tasks:
        w = 0.8 / len(rows)
        for i, r in enumerate(rows):
            se = [r["side_effects"].get(task, {}) for task in tasks]
            d = np.array([v.get("delta", np.nan) for v in se])
            ci = np.array([v.get("delta_ci") or (dv, dv) for v, dv in zip(se, d)], float).reshape(-1, 2)
            err = np.abs(np.stack([d - ci[:, 0], ci[:, 1] - d]))
            axes[1].bar(np.arange(len(tasks)) + (i - (len(rows) - 1) / 2) * w, d, w, yerr=err, capsize=2,
                        label=names[i].replace("\n", " "))
        axes[1].axhline(0, color="k", lw=0.8)
        axes[1].set_xticks(np.arange(len(tasks)), tasks, fontsize=8)
        axes[1].set_ylabel("change after - before (95% paired interval)")
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "no side-effect benchmarks in these runs\n(set side_effects.tasks)", ha="center",
                     va="center")
        axes[1].set_axis_off()
    fig.tight_layout()
    return atomic.save_figure(fig, path, dpi=120)


def _test_records(run_dir: str | Path) -> list[dict] | None:
    f = Path(run_dir) / "stages" / "test" / "test.jsonl"
    if not f.is_file():
        return None
    try:
        return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, OSError):
        raise CCAError(f"{f}: unreadable test records: rerun `cca-jax run` on {run_dir}") from None


def paired_tests(run_dirs: list[str]) -> list[dict]:
    """For every two runs scored on the same test items: B's test accuracy minus A's, with a
    paired-bootstrap interval and p-value and the exact McNemar test."""
    from cca_jax.evaluate import paired

    recs = {d: _test_records(d) for d in run_dirs}
    out = []
    for i, a in enumerate(run_dirs):
        for b in run_dirs[i + 1:]:
            if recs[a] is None or recs[b] is None:
                continue
            try:
                res = paired.compare(recs[a], recs[b])
            except CCAError:  # no common items: not comparable item by item
                continue
            out.append({"a": str(a), "b": str(b), **res})
    return out


def paired_markdown(pairs: list[dict]) -> str:
    if not pairs:
        return ""
    lines = ["", "Paired on the same test items (B - A; 95% paired bootstrap; exact McNemar on the items only one "
             "got right):", "", "| A | B | items | B - A | 95% CI | p (bootstrap) | only A / only B | p (McNemar) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        m = p["mcnemar"]
        lines.append(f"| {Path(p['a']).name} | {Path(p['b']).name} | {p['n_items']} | {p['delta']:+.3f} | "
                     f"[{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] | {p['p_value']:.3g} | {m['a_only']} / {m['b_only']} | "
                     f"{m['p_value']:.3g} |")
    return "\n".join(lines)


def write(run_dirs: list[str], out_dir: str | Path) -> tuple[dict, str]:
    t = table(run_dirs)
    t["paired"] = paired_tests(run_dirs)
    out = Path(out_dir)
    md = markdown(t) + paired_markdown(t["paired"])
    atomic.write_json(out / "compare.json", t)
    atomic.write_text(out / "compare.md", md + "\n")
    try:
        plot(t, out / "compare.png")
    except ImportError:  # matplotlib is in the [viz] extra
        pass
    return t, md
