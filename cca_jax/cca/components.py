"""Component masks: one array per component type, shaped like the circuit's axes.

    {"q": (L, H), "k": (L, KV), "v": (L, KV), "mlp": (L, F)}

The same shape holds DCM masks, patching effects and binary selections. ``update_masks``
turns a selection into per-parameter multipliers (broadcastable to each weight) that
restrict an optimizer's updates to the selected heads' and neurons' rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError

TYPES = ("q", "k", "v", "mlp")
# parameter -> (component type, how its component axis sits: reshape of the (L, N) mask)
_PARAM_AXES = {
    ("attn", "q"): ("q", lambda m: m[:, None, :, None]),       # (L, D, H, Dh)
    ("attn", "q_bias"): ("q", lambda m: m[:, :, None]),        # (L, H, Dh)
    ("attn", "k"): ("k", lambda m: m[:, None, :, None]),
    ("attn", "k_bias"): ("k", lambda m: m[:, :, None]),
    ("attn", "v"): ("v", lambda m: m[:, None, :, None]),
    ("attn", "v_bias"): ("v", lambda m: m[:, :, None]),
    ("attn", "o"): ("q", lambda m: m[:, :, None, None]),       # (L, H, Dh, D): a query head's rows
    ("mlp", "up"): ("mlp", lambda m: m[:, None, :]),           # (L, D, F)
    ("mlp", "up_bias"): ("mlp", lambda m: m),                  # (L, F)
    ("mlp", "gate"): ("mlp", lambda m: m[:, None, :]),
    ("mlp", "gate_bias"): ("mlp", lambda m: m),
    ("mlp", "down"): ("mlp", lambda m: m[:, :, None]),         # (L, F, D)
}
# SPEC 4: q rows of kept query heads, k/v rows of kept KV heads, up rows of kept neurons.
DEFAULT_TARGETS = ("q", "k", "v", "up")
OPTIONAL_TARGETS = ("gate", "down", "o")


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    L = cfg.num_layers
    return {"q": (L, cfg.num_heads), "k": (L, cfg.num_kv_heads), "v": (L, cfg.num_kv_heads),
            "mlp": (L, cfg.intermediate_size)}


def full(cfg: ModelConfig, value: float = 1.0, dtype=jnp.float32) -> dict:
    return {k: jnp.full(s, value, dtype) for k, s in shapes(cfg).items()}


def count(mask: dict) -> int:
    return int(sum(int(np.asarray(v).astype(bool).sum()) for v in mask.values()))


def total(cfg: ModelConfig) -> int:
    return cfg.num_components


def per_layer(mask: dict) -> dict[str, list[int]]:
    return {k: np.asarray(v).astype(bool).sum(axis=1).tolist() for k, v in mask.items()}


def binarize(m: dict) -> dict:
    """round(clamp(m)) with 0.5 -> 0 (SPEC 3)."""
    # numpy, not jnp: on the host already, and no small device programs to compile
    return {k: np.clip(np.asarray(v), 0.0, 1.0) > 0.5 for k, v in m.items()}


def check(mask: dict, cfg: ModelConfig, what: str = "mask") -> None:
    want = shapes(cfg)
    if set(mask) != set(want):
        raise CCAError(f"{what}: keys {sorted(mask)} should be {sorted(want)}")
    for k, s in want.items():
        if tuple(np.shape(mask[k])) != s:
            raise CCAError(f"{what}: {k} has shape {tuple(np.shape(mask[k]))}, the model needs {s}")


def targets_of(names) -> tuple[str, ...]:
    bad = [n for n in names if n not in DEFAULT_TARGETS + OPTIONAL_TARGETS]
    if bad:
        raise CCAError(f"unknown update target(s) {bad}: choose from {DEFAULT_TARGETS + OPTIONAL_TARGETS}")
    return tuple(names)


def update_masks(mask: dict | None, params: dict, targets=DEFAULT_TARGETS, biases: bool = True) -> dict:
    """Per-parameter float multipliers for ``params["layers"]``-style trees.

    Returns a tree like ``params`` whose leaves are arrays broadcastable to the weight
    (selected rows 1, others 0) for the target weights (and their biases), and None for
    every other leaf. ``mask=None`` selects every component of the targets (all rows)."""
    targets = targets_of(targets)

    def leaf(path, x):
        keys = tuple(getattr(p, "key", p) for p in path)
        if keys[0] != "layers" or len(keys) != 3:
            return None
        group, name = keys[1], keys[2]
        base = name[:-5] if name.endswith("_bias") else name
        if base not in targets or (name.endswith("_bias") and not biases) or (group, name) not in _PARAM_AXES:
            return None
        ctype, shape_fn = _PARAM_AXES[(group, name)]
        if mask is None:
            return jnp.ones((1,) * x.ndim, jnp.float32)
        return shape_fn(jnp.asarray(mask[ctype], jnp.float32))

    return jax.tree_util.tree_map_with_path(leaf, params)


def leaf_selection(update: dict) -> dict:
    """Booleans for ``optax.masked``: which leaves are updated at all."""
    return jax.tree.map(lambda u: u is not None, update, is_leaf=lambda u: u is None)


def fraction_parameters_changed(mask: dict | None, params: dict, targets=DEFAULT_TARGETS) -> float:
    upd = update_masks(mask, params, targets)
    changed = 0
    for u, p in zip(jax.tree.leaves(upd, is_leaf=lambda u: u is None),
                    jax.tree.leaves(params)):
        if u is not None:
            changed += int(np.broadcast_to(np.asarray(u), p.shape).astype(bool).sum())
    total_params = sum(int(p.size) for p in jax.tree.leaves(params))
    return changed / total_params


def random_like(reference: dict, seed: int) -> dict:
    """A circuit drawn uniformly at random with exactly as many components of each type in
    each layer as ``reference`` (a control: does *this* circuit matter, or its size?)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in TYPES:
        ref = np.asarray(reference[t]).astype(bool)
        m = np.zeros(ref.shape, bool)
        for layer, n in enumerate(ref.sum(axis=1)):
            m[layer, rng.choice(ref.shape[1], size=int(n), replace=False)] = True
        out[t] = m
    return out


def random_fraction(cfg: ModelConfig, fraction: float, seed: int) -> dict:
    """A random circuit with round(fraction * N) components of each type in every layer."""
    counts = {t: np.zeros(s, bool) for t, s in shapes(cfg).items()}
    for t, m in counts.items():
        m[:, : int(round(fraction * m.shape[1]))] = True
    return random_like(counts, seed)


def circuit_file(run_or_mask: str | os.PathLike) -> Path:
    """A run directory's circuit (stages/circuit/mask.npz), or a mask.npz given directly."""
    p = Path(run_or_mask)
    f = p / "stages" / "circuit" / "mask.npz" if p.is_dir() else p
    if not f.is_file():
        raise CCAError(f"{run_or_mask} holds no circuit (stages/circuit/mask.npz): finish that run first")
    return f


def save(mask: dict, path: str | os.PathLike) -> Path:
    """npz (no pickle), written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in mask.items()})
    os.replace(tmp, p)
    return p


def load(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise CCAError(f"no such mask file: {p}")
    with np.load(p, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
