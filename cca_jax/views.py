"""Circuit views: masks and per-component effects with named axes.

A circuit is a dict of arrays, one per component type (``cca_jax.cca.components``)::

    {"q": (layer, head), "k": (layer, kv_head), "v": (layer, kv_head), "mlp": (layer, neuron)}

The same layout holds a binary DCM/patching selection (``stages/circuit/mask.npz``), the
DCM's learned mask values (``m.npz``) and patching/attribution effects (``effects.npz``).

- In notebooks: ``named(c)`` turns each array into a penzai ``NamedArray`` with named axes
  (layer, head, kv_head, neuron); ``show(c)`` / ``to_html(c)`` render them with treescope
  (interactive heatmaps you can hover for layer/head indices).
- In reports: ``write_pngs(c, out_dir)`` writes matplotlib PNGs: per-layer counts of
  selected heads and neurons, a head-level heatmap (layer x q/k/v heads), and the
  neuron density per layer.

penzai, treescope and matplotlib are optional (``pip install 'cca-jax[viz]'``): the
functions that need them import them on use and say how to install them if missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from cca_jax import atomic
from cca_jax.errors import CCAError

TYPES = ("q", "k", "v", "mlp")
AXES = {"q": ("layer", "head"), "k": ("layer", "kv_head"), "v": ("layer", "kv_head"), "mlp": ("layer", "neuron")}
VIZ_HINT = "pip install 'cca-jax[viz]'"


class MissingVizError(CCAError, ImportError):
    """An optional visualization package is not installed."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingVizError(f"circuit views need {module.split('.')[0]}: {VIZ_HINT}") from None


# -- loading --------------------------------------------------------------------------------


def load(source) -> dict[str, np.ndarray]:
    """A circuit as numpy arrays from a run directory (its binary mask), an ``.npz`` file
    (mask, DCM values or effects; read without pickle) or a mapping of arrays."""
    if isinstance(source, Mapping):
        circ = {k: np.asarray(v) for k, v in source.items()}
    else:
        p = Path(source)
        if p.is_dir():
            p = p / "stages" / "circuit" / "mask.npz"
        if not p.exists():
            raise CCAError(f"no circuit at {source}: give a finished run directory or an .npz of "
                           f"q/k/v/mlp arrays")
        with np.load(p, allow_pickle=False) as f:
            circ = {k: f[k] for k in f.files}
    check(circ)
    return circ


def check(circuit: Mapping) -> None:
    """Keys q/k/v/mlp, each 2-D with one shared layer count; k and v the same shape."""
    if set(circuit) != set(TYPES):
        raise CCAError(f"a circuit has keys {list(TYPES)}, got {sorted(circuit)}")
    shapes = {k: np.shape(circuit[k]) for k in TYPES}
    if any(len(s) != 2 for s in shapes.values()):
        raise CCAError(f"circuit arrays must be (layer, component), got {shapes}")
    if len({s[0] for s in shapes.values()}) != 1 or shapes["k"] != shapes["v"]:
        raise CCAError(f"circuit arrays disagree on layers or kv heads: {shapes}")


def is_binary(circuit: Mapping) -> bool:
    return all(np.asarray(v).dtype == bool or np.isin(np.asarray(v), (0, 1)).all() for v in circuit.values())


# -- counts ---------------------------------------------------------------------------------


def counts(mask: Mapping) -> dict:
    """Selected components per layer and in total, per type, and their fractions."""
    check(mask)
    m = {k: np.asarray(mask[k]).astype(bool) for k in TYPES}
    per_layer = {k: m[k].sum(axis=1).astype(int).tolist() for k in TYPES}
    sizes = {k: int(m[k].shape[1]) for k in TYPES}
    selected = {k: int(m[k].sum()) for k in TYPES}
    total = sum(m[k].size for k in TYPES)
    return {
        "layers": int(m["q"].shape[0]),
        "per_type_size": sizes,
        "per_layer": per_layer,
        "selected": selected,
        "selected_total": int(sum(selected.values())),
        "components_total": int(total),
        "fraction": float(sum(selected.values()) / total),
        "neuron_fraction_per_layer": (m["mlp"].mean(axis=1)).round(6).tolist(),
    }


def head_matrix(circuit: Mapping) -> tuple[np.ndarray, list[str]]:
    """(layer, H + 2*KV) matrix of the attention components: query heads, then key and
    value heads; with column labels (q0.., k0.., v0..)."""
    check(circuit)
    cols = [np.asarray(circuit[t], float) for t in ("q", "k", "v")]
    labels = [f"{t}{i}" for t in ("q", "k", "v") for i in range(np.shape(circuit[t])[1])]
    return np.concatenate(cols, axis=1), labels


def neuron_density(mask: Mapping, bins: int = 64) -> np.ndarray:
    """(layer, bins): fraction of selected MLP neurons in each block of neuron indices."""
    m = np.asarray(mask["mlp"]).astype(float)
    L, F = m.shape
    bins = max(1, min(bins, F))
    edges = np.linspace(0, F, bins + 1).astype(int)
    return np.stack([m[:, a:b].mean(axis=1) if b > a else np.zeros(L) for a, b in zip(edges[:-1], edges[1:])],
                    axis=1)


# -- penzai / treescope -------------------------------------------------------------------


def named(circuit: Mapping) -> dict:
    """Each array as a penzai NamedArray with axes (layer, head|kv_head|neuron)."""
    circ = load(circuit)
    pz = _need("penzai.pz")
    return {k: pz.nx.wrap(circ[k]).tag(*AXES[k]) for k in TYPES}


def figures(circuit: Mapping) -> dict:
    """treescope array figures (one per type) with named axes; layers as rows."""
    treescope = _need("treescope")
    out = {}
    for k, arr in named(circuit).items():
        out[k] = treescope.render_array(arr, rows=["layer"], columns=[AXES[k][1]])
    return out


def to_html(circuit: Mapping, compressed: bool = True) -> str:
    """Standalone HTML of the circuit's named arrays, arrays shown as heatmaps."""
    treescope = _need("treescope")
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        return treescope.render_to_html(named(circuit), compressed=compressed)


def show(circuit: Mapping) -> None:
    """Display the circuit in a notebook (treescope): one heatmap per component type."""
    treescope = _need("treescope")
    figs = figures(circuit)
    treescope.show(*[x for k in TYPES for x in (f"{k} {AXES[k]}:", figs[k])])


# -- matplotlib PNGs ----------------------------------------------------------------------


def figure(**kw):
    """A matplotlib Figure that is not pyplot's: it renders to files without choosing a
    backend, so nothing here switches the backend of a live notebook kernel (its inline
    plots keep showing)."""
    _need("matplotlib")
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_layer_counts(mask: Mapping, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two panels: selected heads per layer (q, k, v stacked) and selected neurons per layer."""
    c = counts(mask)
    L = c["layers"]
    x = np.arange(L)
    fig = figure(figsize=(11, 3.4))
    a1, a2 = fig.subplots(1, 2)
    bottom = np.zeros(L)
    for t in ("q", "k", "v"):
        v = np.asarray(c["per_layer"][t])
        a1.bar(x, v, bottom=bottom, label=f"{t} ({c['selected'][t]}/{L * c['per_type_size'][t]})")
        bottom += v
    a1.set_xlabel("layer")
    a1.set_ylabel("selected heads")
    a1.set_title("attention heads per layer")
    a1.legend(fontsize=8)
    a2.bar(x, c["per_layer"]["mlp"], color="tab:red")
    a2.set_xlabel("layer")
    a2.set_ylabel(f"selected neurons (of {c['per_type_size']['mlp']})")
    a2.set_title(f"MLP neurons per layer ({c['selected']['mlp']} in all)")
    fig.suptitle(title or f"circuit: {c['selected_total']} of {c['components_total']} components "
                          f"({100 * c['fraction']:.2f}%)", fontsize=10)
    fig.tight_layout()
    return atomic.save_figure(fig, path)


def plot_head_heatmap(circuit: Mapping, path: str | os.PathLike, title: str | None = None) -> Path:
    """Layer x (query heads | key heads | value heads). Binary masks in two colours,
    effects on a diverging scale around zero."""
    grid, labels = head_matrix(circuit)
    binary = is_binary(circuit)
    L, n = grid.shape
    fig = figure(figsize=(max(4.0, 0.32 * n + 2), max(3.0, 0.22 * L + 1.2)))
    ax = fig.subplots()
    if binary:
        im = ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    else:
        vmax = float(np.nanmax(np.abs(grid))) or 1.0
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.04)
    nq = np.shape(circuit["q"])[1]
    nkv = np.shape(circuit["k"])[1]
    for b in (nq - 0.5, nq + nkv - 0.5):
        ax.axvline(b, color="tab:orange", lw=1.2)
    step = max(1, n // 24)
    ax.set_xticks(range(0, n, step), labels[::step], rotation=90, fontsize=7)
    ax.set_yticks(range(0, L, max(1, L // 16)))
    ax.set_xlabel("head (query | key | value)")
    ax.set_ylabel("layer")
    if title is None:
        title = (f"attention heads in the circuit (black): {int(grid.sum())} of {grid.size}" if binary
                 else "per-head effect")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return atomic.save_figure(fig, path)


def plot_neuron_density(mask: Mapping, path: str | os.PathLike, bins: int = 64, title: str | None = None) -> Path:
    """Left: fraction of each layer's MLP neurons in the circuit. Right: the same per block
    of neuron indices (layer x block heatmap)."""
    m = {k: np.asarray(mask[k]).astype(bool) for k in TYPES}
    frac = m["mlp"].mean(axis=1)
    dens = neuron_density(m, bins)
    L, F = m["mlp"].shape
    fig = figure(figsize=(11, 3.6))
    a1, a2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    a1.barh(np.arange(L), 100 * frac, color="tab:red")
    a1.invert_yaxis()
    a1.set_xlabel("% of the layer's neurons selected")
    a1.set_ylabel("layer")
    a1.set_title("neuron density per layer")
    im = a2.imshow(dens, aspect="auto", cmap="magma", vmin=0, vmax=max(float(dens.max()), 1e-9),
                   interpolation="nearest", extent=(0, F, L - 0.5, -0.5))
    a2.set_xlabel(f"neuron index ({dens.shape[1]} blocks of ~{F // dens.shape[1]})")
    a2.set_ylabel("layer")
    a2.set_title("selected fraction per block of neurons")
    fig.colorbar(im, ax=a2, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic.save_figure(fig, path)


def write_pngs(circuit: Mapping, out_dir: str | os.PathLike, prefix: str = "circuit") -> list[Path]:
    """The report's circuit PNGs. A binary mask gets per-layer counts, the head heatmap and
    the neuron density; effects (floats) get the head heatmap of effects."""
    circ = load(circuit)
    out = Path(out_dir)
    if is_binary(circ):
        return [plot_layer_counts(circ, out / f"{prefix}_layer_counts.png"),
                plot_head_heatmap(circ, out / f"{prefix}_heads.png"),
                plot_neuron_density(circ, out / f"{prefix}_neuron_density.png")]
    return [plot_head_heatmap(circ, out / f"{prefix}_heads.png")]
