"""The pivot objective every CCA step reads: the logit difference desired - undesired."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_diffs(logits: jax.Array, desired: jax.Array, undesired: jax.Array) -> jax.Array:
    """(B,) per row: logits[b, desired[b]] - logits[b, undesired[b]]; logits (B, V)."""
    d = jnp.take_along_axis(logits, desired[:, None], axis=1)[:, 0]
    u = jnp.take_along_axis(logits, undesired[:, None], axis=1)[:, 0]
    return d - u


def logit_diff(logits: jax.Array, desired: jax.Array, undesired: jax.Array, mode: str = "fixed",
               weights: jax.Array | None = None) -> jax.Array:
    """Mean logit difference over the rows. reference (the original DCM code): its
    ``logits[:, desired]`` (B, B) cross product, i.e. the mean over all pairs (i, j) of
    logit[i, d_j] - logit[i, u_j]. ``weights`` (B,): 1 a real row, 0 a padded one (see
    ``examples.Batch``): the mean over real rows (reference: over pairs of real rows)."""
    if mode == "reference":
        pairs = logits[:, desired] - logits[:, undesired]
        if weights is None:
            return jnp.mean(pairs)
        weights = weights.astype(pairs.dtype)
        return jnp.sum(weights[:, None] * weights[None, :] * pairs) / jnp.square(jnp.sum(weights))
    diffs = logit_diffs(logits, desired, undesired)
    if weights is None:
        return jnp.mean(diffs)
    weights = weights.astype(diffs.dtype)
    return jnp.sum(weights * diffs) / jnp.sum(weights)
