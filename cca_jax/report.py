"""Run reports: PNG plots of a run (matplotlib, from the [viz] extra) and ``report.md``.

``plots(summary, run_dir)`` writes into ``run_dir/plots``: the val accuracy by
amplification step, the selected components per layer, and the circuit views of
``cca_jax.views`` (per-layer head and neuron counts, the head-level heatmap, the neuron
density per layer; for patching/attribution runs also the heatmap of per-head effects).
It also writes ``run_dir/report.md``: the before/after table and links to the plots.
"""

from __future__ import annotations

from pathlib import Path

from cca_jax import atomic


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def accuracy_cell(a: dict) -> str:
    """``0.425 [0.350, 0.500]`` from a summary's accuracy record."""
    return f"{a['overall']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"


def table_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the before/after table: held-out test accuracy with 95%
    intervals, the circuit size and the parameters changed."""
    b, a = summary["test_accuracy_before"], summary["test_accuracy_after"]
    sel = summary.get("test_accuracy_selected_templates") or {}
    rows = [
        (f"test accuracy before ({b['n_items']} held-out items, 95% CI)", accuracy_cell(b)),
        ("test accuracy after (amplified, best val step)", accuracy_cell(a)),
        ("difference", f"{a['overall'] - b['overall']:+.3f}"),
    ]
    if sel.get("before") is not None and sel.get("after") is not None:
        rows.append((f"selected templates only ({len(summary.get('selected_templates', []))})",
                     f"{sel['before']:.3f} -> {sel['after']:.3f}"))
    loc = summary.get("localization", {})
    rows += [
        ("pivotal tokens (localization examples)", f"{loc.get('examples', 'n/a')} from {loc.get('items', 'n/a')} train items"),
        ("circuit (components kept)", f"{summary['components_selected']:,} of {summary['components_total']:,} "
                                      f"({_pct(summary['fraction_components'])})"),
        ("parameters changed", _pct(summary["fraction_parameters_changed"])),
        ("best amplification step (val)", str(summary["best_step"])),
    ]
    f = summary.get("faithfulness")
    if f and f.get("fraction") is not None:
        rows.append(("faithfulness (circuit's share of the pivots' logit difference, rest mean-ablated)",
                     f"{f['fraction']:.2f} (LD {f['ld_circuit']:.2f} of {f['ld_full']:.2f}; "
                     f"{f['ld_all_ablated']:.2f} with nothing kept)"))
    return rows


def format_table(summary: dict) -> str:
    rows = table_rows(summary)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def plots(summary: dict, run_dir: str | Path) -> list[Path]:
    """The run's PNGs and report.md. Figures are drawn without pyplot (``views.figure``):
    calling this in a notebook leaves its plotting backend alone."""
    from cca_jax.views import figure

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = []

    steps = sorted(summary["val_accuracy_by_step"].items(), key=lambda kv: int(kv[0]))
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([int(s) for s, _ in steps], [a for _, a in steps], marker="o")
    ax.axvline(summary["best_step"], color="grey", ls="--", label=f"best step {summary['best_step']}")
    ax.set_xlabel("amplification step")
    ax.set_ylabel("val accuracy")
    ax.set_title("Validation accuracy during amplification")
    ax.legend()
    fig.tight_layout()
    files.append(atomic.save_figure(fig, out / "val_accuracy.png"))

    per_layer = summary["components_per_layer"]
    n_layers = len(next(iter(per_layer.values())))
    fig = figure(figsize=(7, 3.5))
    ax = fig.subplots()
    bottom = [0] * n_layers
    for kind, counts in per_layer.items():
        ax.bar(range(n_layers), counts, bottom=bottom, label=kind)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel("selected components")
    ax.set_title(f"Circuit: {summary['components_selected']} of {summary['components_total']} components")
    ax.legend()
    fig.tight_layout()
    files.append(atomic.save_figure(fig, out / "components_per_layer.png"))

    files += circuit_plots(run_dir, out)
    markdown(summary, run_dir, files)
    return files


def circuit_plots(run_dir: str | Path, out: str | Path) -> list[Path]:
    """The circuit views of a run directory's mask (and effects, if it saved any)."""
    from cca_jax import views

    circ_dir = Path(run_dir) / "stages" / "circuit"
    files = []
    if (circ_dir / "mask.npz").exists():
        files += views.write_pngs(views.load(circ_dir / "mask.npz"), out, prefix="circuit")
    if (circ_dir / "effects.npz").exists():
        files += views.write_pngs(views.load(circ_dir / "effects.npz"), out, prefix="effects")
    return files


def _split(v) -> dict:
    """A stage's timing: a split (``timing.Account``) or, in older summaries, seconds."""
    return v if isinstance(v, dict) else {"total": float(v)}


def _total(v) -> float:
    v = _split(v)
    return float(v.get("total", 0.0)) + float(v.get("earlier_runs", 0.0))


def seconds_per_stage(summary: dict) -> str:
    return ", ".join(f"{k} {_total(v):.0f}" for k, v in summary.get("timings_seconds", {}).items())


def _phases(v: dict) -> str:
    """ "; trace 1.2, lower 0.4, xla 9.8": a stage's compile seconds by phase (when recorded)."""
    ph = v.get("compile_phases") or {}
    return ("; " + ", ".join(f"{k} {ph[k]:.1f}" for k in ("trace", "lower", "xla") if k in ph)) if ph else ""


def _loop_part(loop: dict, name: str, label: str) -> str:
    """A train loop part's seconds, with its compile / device / host split when recorded."""
    sp = loop.get(f"{name}_split")
    how = f" (compile {sp['compile']:.1f}, device {sp['device']:.1f}, host {sp['host']:.1f})" if sp else ""
    return f"{label} {loop[name]:.1f} s{how}"


def markdown(summary: dict, run_dir: str | Path, files: list[Path] | None = None) -> Path:
    """``run_dir/report.md``: the before/after table, timings and the plots."""
    run_dir = Path(run_dir)
    lines = [f"# CCA run: {summary['model']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table_rows(summary)]
    per_t_b = summary["test_accuracy_before"].get("per_template", {})
    per_t_a = summary["test_accuracy_after"].get("per_template", {})
    if per_t_b:
        lines += ["", "Per template (test, before -> after): " + ", ".join(
            f"{t} {per_t_b[t]:.2f}->{per_t_a.get(t, float('nan')):.2f}" for t in per_t_b)]
    val = summary.get("val_accuracy_by_step", {})
    if val:
        lines += ["", "Val accuracy by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in val.items())]
    t = summary.get("timings_seconds", {})
    if t:
        lines += ["", "Where the time went (seconds; compile: tracing, lowering and XLA compiles; device: the host "
                  "waiting for device results; host: the rest, dispatch waiting for a busy device included):", "",
                  "| stage | total | compile (XLA compiles) | device | host |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_total(v):.1f} | " + (f"{v['compile']:.1f} ({v['compiles']}) | {v['device']:.1f} | "
                                                   f"{v['host']:.1f} |" if "compile" in v else "| | |")
                  for k, v in ((k, _split(v)) for k, v in t.items())]
        slow = [(k, v) for k, v in t.items() if isinstance(v, dict) and v.get("programs") and v.get("compiles", 0) > 0]
        if slow:  # which programs a stage's compile time went to
            lines += ["", "Slowest programs to compile (compiles / seconds):"]
            lines += [f"- {k}: " + ", ".join(f"{n} {c}/{sec:.1f}" for n, (c, sec) in list(v["programs"].items())[:4])
                      + _phases(v) for k, v in slow]
        w = summary.get("wall_seconds") or {}
        if w.get("run") is not None:
            start = w.get("import_to_run")
            lines += ["", f"Whole run: {w['run']:.1f} s in `run` up to summary.json"
                      + (f", after {start:.1f} s from `import cca_jax` (start-up)" if start else "")
                      + "; the stages above, the rest is the run's own bookkeeping."]
        for k, v in t.items():  # the training loop's own split (this process's part of it)
            loop = v.get("loop") if isinstance(v, dict) else None
            if loop:
                lines += ["", f"{k}: {_loop_part(loop, 'steps', 'steps')}, "
                              f"{_loop_part(loop, 'val_eval', 'val evaluations')}, checkpoints {loop['checkpoints']:.1f} s"]
    for f in files or []:
        rel = Path(f).relative_to(run_dir) if Path(f).is_relative_to(run_dir) else Path(f)
        lines += ["", f"![{rel.stem}]({rel.as_posix()})"]
    return atomic.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
