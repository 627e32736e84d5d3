"""The pivot objective every CCA step reads: the logit difference desired - undesired."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_diffs(logits: jax.Array, desired: jax.Array, undesired: jax.Array) -> jax.Array:
    """(B,) per row: logits[b, desired[b]] - logits[b, undesired[b]]; logits (B, V)."""
    d = jnp.take_along_axis(logits, desired[:, None], axis=1)[:, 0]
    u = jnp.take_along_axis(logits, undesired[:, None], axis=1)[:, 0]
    return d - u


def logit_diff(logits: jax.Array, desired: jax.Array, undesired: jax.Array, mode: str = "fixed") -> jax.Array:
    """Mean logit difference over the rows. reference (the original DCM code): its
    ``logits[:, desired]`` (B, B) cross product, i.e. the mean over all pairs (i, j) of
    logit[i, d_j] - logit[i, u_j]."""
    if mode == "reference":
        return jnp.mean(logits[:, desired] - logits[:, undesired])
    return jnp.mean(logit_diffs(logits, desired, undesired))
