"""Run reports: PNG plots of a run's summary (matplotlib, from the [viz] extra)."""

from __future__ import annotations

from pathlib import Path


def plots(summary: dict, run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = []

    steps = sorted(summary["val_accuracy_by_step"].items(), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(s) for s, _ in steps], [a for _, a in steps], marker="o")
    ax.axvline(summary["best_step"], color="grey", ls="--", label=f"best step {summary['best_step']}")
    ax.set_xlabel("amplification step")
    ax.set_ylabel("val accuracy")
    ax.set_title("Validation accuracy during amplification")
    ax.legend()
    fig.tight_layout()
    files.append(out / "val_accuracy.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    per_layer = summary["components_per_layer"]
    n_layers = len(next(iter(per_layer.values())))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * n_layers
    for kind, counts in per_layer.items():
        ax.bar(range(n_layers), counts, bottom=bottom, label=kind)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel("selected components")
    ax.set_title(f"Circuit: {summary['components_selected']} of {summary['components_total']} components")
    ax.legend()
    fig.tight_layout()
    files.append(out / "components_per_layer.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files
