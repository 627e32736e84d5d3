"""Compare circuits of several runs: Jaccard overlap overall, per type and per layer, and
against the top components by patching effect (for runs that saved effects)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from cca_jax import atomic
from cca_jax.cca import components
from cca_jax.errors import CCAError


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def overlap(m1: dict, m2: dict) -> dict:
    """Overall, per component type, and per (type, layer) Jaccard overlap."""
    flat1 = np.concatenate([np.asarray(m1[t]).ravel() for t in components.TYPES])
    flat2 = np.concatenate([np.asarray(m2[t]).ravel() for t in components.TYPES])
    return {
        "overall": jaccard(flat1, flat2),
        "per_type": {t: jaccard(m1[t], m2[t]) for t in components.TYPES},
        "per_layer": {t: [jaccard(m1[t][l], m2[t][l]) for l in range(np.shape(m1[t])[0])] for t in components.TYPES},
    }


def _read_npz(path: Path, what: str) -> dict:
    """The arrays of a per-component npz (mask or effects): q, k, v, mlp, each (layers, n)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CCAError(f"{path}: not a readable {what} (.npz): {why}") from None
    missing = [t for t in components.TYPES if t not in arrays]
    if missing:
        raise CCAError(f"{path}: not a cca-jax {what}: no {', '.join(missing)} array(s)")
    bad = [t for t in components.TYPES if arrays[t].ndim != 2]
    if bad:
        raise CCAError(f"{path}: not a cca-jax {what}: {bad[0]} is not (layers, components)")
    return arrays


def load_run(run_dir: str | Path) -> tuple[dict, dict | None]:
    d = Path(run_dir) / "stages" / "circuit"
    if not (d / "mask.npz").is_file():
        raise CCAError(f"{run_dir}: no circuit mask (stages/circuit/mask.npz): not a finished cca-jax run")
    mask = _read_npz(d / "mask.npz", "circuit mask")
    effects = _read_npz(d / "effects.npz", "effects file") if (d / "effects.npz").exists() else None
    if effects is not None and any(effects[t].shape != mask[t].shape for t in components.TYPES):
        raise CCAError(f"{d / 'effects.npz'}: its shapes differ from the run's mask.npz")
    return mask, effects


def compare(run_dirs: list[str]) -> dict:
    if len(run_dirs) < 2:
        raise CCAError("circuit compare needs at least two run directories")
    runs = {str(r): load_run(r) for r in run_dirs}
    shapes = {k: {t: np.shape(m[t]) for t in components.TYPES} for k, (m, _) in runs.items()}
    if len({json.dumps(s, sort_keys=True) for s in shapes.values()}) != 1:
        raise CCAError("the runs' circuits have different shapes: compare runs of the same model")
    from cca_jax.cca.patching import select

    names = list(runs)
    out = {"runs": {n: {"components_selected": components.count(runs[n][0])} for n in names}, "pairs": []}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out["pairs"].append({"a": names[i], "b": names[j], **overlap(runs[names[i]][0], runs[names[j]][0])})
    for n, (m, eff) in runs.items():
        for e_name, (_, e) in runs.items():
            if e is not None:
                top = select(e, top_k=components.count(m))
                out["runs"][n][f"vs_top_effects_of:{e_name}"] = overlap(m, top)["overall"]
    return out


def plot(result: dict, path: str | Path) -> Path:
    from cca_jax.views import figure  # not pyplot: a notebook's backend stays as it is

    pairs = result["pairs"]
    fig = figure(figsize=(8, 2.2 * len(pairs)))
    axes = fig.subplots(len(pairs), 1, squeeze=False)
    for ax, p in zip(axes[:, 0], pairs):
        grid = np.array([p["per_layer"][t] for t in components.TYPES])
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(components.TYPES)), components.TYPES)
        ax.set_xlabel("layer")
        ax.set_title(f"Jaccard {p['overall']:.2f}: {Path(p['a']).name} vs {Path(p['b']).name}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return atomic.save_figure(fig, path, dpi=110)
