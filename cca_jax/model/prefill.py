"""Filling a KV cache: left-padded prompt rows, a prefill that returns the last logits,
and the cache of every position but the last (the DCM and patching steps run that one)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.model.cache import KVCache, init_cache
from cca_jax.model.transformer import forward


def left_pad(rows: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, length) int32, mask (N, length) bool): each row right-aligned after ``pad``s."""
    toks = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        if len(r):
            toks[i, length - len(r):] = r
            mask[i, length - len(r):] = True
    return toks, mask


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill(cfg: ModelConfig, params, tokens, mask, cache: KVCache):
    """``tokens`` (B, T) written into ``cache``: (the last position's logits (B, V), the cache)."""
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    out = forward(cfg, params, tokens, mask=mask, cache=cache, at=last)
    return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefix_cache(cfg: ModelConfig, params, tokens, mask) -> KVCache:
    """A fresh cache of T slots holding the keys/values of every position of ``tokens``
    (B, T) but the last (computed once per batch; each DCM/patching step runs the last)."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, params["embed"].dtype)
    out = forward(cfg, params, tokens[:, :-1], mask=mask[:, :-1], cache=cache,
                  at=jnp.zeros((B, 1), jnp.int32))
    return out.cache
