"""The circuit as an optax transformation, for amplification and for users' own loops.

    opt = circuit_optimizer(optax.adamw(1e-4, weight_decay=0.01), mask, params)
    state = opt.init(params)
    loss, grads = circuit_value_and_grad(loss_fn, params, opt.selection)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)

``circuit_optimizer`` wraps any optax optimizer: ``optax.masked`` hands it only the leaves
that hold circuit rows (its state exists for those alone), then every update is
restricted to the circuit's rows within those leaves. Every other row and leaf gets an
update of exactly -0.0, the one float whose addition leaves every value bit-identical
(+0.0 would turn a weight of -0.0 into +0.0), whatever the inner optimizer does (weight
decay, clipping, schedules).

``circuit_value_and_grad`` differentiates only the selected leaves (the rest of the
gradient is never computed) and returns a gradient tree shaped like the parameters with
None at frozen leaves; the optimizer passes those Nones through and ``apply_updates``
leaves those parameters as they are (the very same arrays).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cca_jax.cca import components


def _is_none(x) -> bool:
    return x is None


def split_params(params, selection):
    """(trainable, frozen): the selected leaves and the rest, None in the other tree."""
    train = jax.tree.map(lambda p, s: p if s else None, params, selection)
    frozen = jax.tree.map(lambda p, s: None if s else p, params, selection)
    return train, frozen


def merge_params(train, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, train, frozen, is_leaf=_is_none)


def restrict_rows(row_masks) -> optax.GradientTransformation:
    """Keep each update on its leaf's circuit rows (``row_masks``: arrays broadcastable to
    the leaf, nonzero on circuit rows; None: a frozen leaf) and make every other entry
    -0.0. A None update (a leaf that was never differentiated) stays None."""

    def restrict(u, m):
        if u is None:
            return None
        if m is None:
            return jnp.full_like(u, -0.0)
        return jnp.where(m != 0, u, jnp.asarray(-0.0, u.dtype))

    def update(updates, state, params=None):
        return jax.tree.map(restrict, updates, row_masks, is_leaf=_is_none), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class CircuitOptimizer(NamedTuple):
    """An ``optax.GradientTransformation`` (init, update) that also carries the leaf
    selection and per-row masks it was built from."""

    init: Callable
    update: Callable
    selection: Any  # bool per leaf: does it hold circuit rows?
    row_masks: Any  # per selected leaf: broadcastable 0/1 rows; None elsewhere


def circuit_masks(circuit_mask: dict | None, params, targets=components.DEFAULT_TARGETS, biases: bool = True):
    """(selection, row_masks) of a circuit over ``params``: which leaves hold circuit rows
    and, for those, which rows. ``circuit_mask=None`` selects every row of the targets;
    ``targets="all"`` selects every row of every parameter (the update-everything ablation)."""
    if targets == "all":
        rows = jax.tree.map(lambda p: jnp.ones((1,) * jnp.ndim(p), jnp.float32), params)
    else:
        rows = components.update_masks(circuit_mask, params, targets, biases=biases)
    selection = components.leaf_selection(rows)
    return selection, rows


def circuit_optimizer(inner: optax.GradientTransformation, circuit_mask: dict | None, params,
                      targets=components.DEFAULT_TARGETS, biases: bool = True) -> CircuitOptimizer:
    """``inner`` restricted to a circuit (``{"q": (L, H), "k": (L, KV), "v": (L, KV),
    "mlp": (L, F)}`` booleans, e.g. ``components.load(run_dir / "stages/circuit/mask.npz")``).

    targets: which weights of a kept component move (SPEC: q, k, v, up; also gate, down,
    o), or "all" for every parameter. biases: also the targets' biases (Qwen2's q/k/v).
    ``params`` only fixes the tree's structure and shapes. Works on the whole parameter
    tree, or on a tree with None at frozen leaves (what ``circuit_value_and_grad`` gives).
    """
    selection, rows = circuit_masks(circuit_mask, params, targets, biases)
    tx = optax.chain(optax.masked(inner, selection), restrict_rows(rows))
    return CircuitOptimizer(tx.init, tx.update, selection, rows)


def circuit_value_and_grad(loss_fn: Callable, params, selection, *args, has_aux: bool = False, **kwargs):
    """``jax.value_and_grad(loss_fn)(params, *args, **kwargs)`` computed for the selected
    leaves only: the gradient tree has ``params``' structure with None at every frozen
    leaf (``optax`` and ``apply_updates`` pass those through). Jit the caller, as usual."""
    train, frozen = split_params(params, selection)

    def on_train(t, *a, **kw):
        return loss_fn(merge_params(t, frozen), *a, **kw)

    return jax.value_and_grad(on_train, has_aux=has_aux)(train, *args, **kwargs)


def apply_updates(params, updates):
    """``optax.apply_updates`` where a None update leaves the parameter as it is."""
    return jax.tree.map(lambda p, u: p if u is None else (p + u).astype(p.dtype), params, updates,
                        is_leaf=_is_none)
