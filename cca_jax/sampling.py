"""Sampling and stop rules shared by plain decoding (generate.py) and speculative decoding
(speculative.py): the token choice (greedy, temperature, top-k, top-p) and the host-side
stop rule applied to each row's generated ids."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.errors import CCAError

# A stop rule sees one row's generated ids and returns how many to keep, or None to go on.
StopRule = Callable[[Sequence[int]], "int | None"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise CCAError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CCAError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CCAError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (transformers' order and definitions).

    Removed tokens get -inf. top-k keeps the k largest logits (ties at the k-th kept);
    top-p keeps the smallest set of most likely tokens whose probability reaches p.
    """
    x = logits.astype(jnp.float32)
    if s.temperature > 0:
        x = x / s.temperature
    if s.top_k is not None and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p is not None and s.top_p < 1.0:
        order = jnp.argsort(x, axis=-1)  # ascending, as transformers does
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        remove_sorted = cum <= (1.0 - s.top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)  # keep at least one
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
        x = jnp.where(remove, -jnp.inf, x)
    return x


def next_token(key: jax.Array, logits: jax.Array, s: Sampling) -> jax.Array:
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


def check_stops(stop: StopRule, out: np.ndarray, stopped: np.ndarray, keep: list, n: int, eos: np.ndarray):
    """Apply the stop rule to the first ``n`` rows not yet stopped (in place)."""
    for r in range(n):
        if not stopped[r]:
            k = stop(row_tokens(out[r], eos))
            if k is not None:
                stopped[r], keep[r] = True, k


def row_tokens(tokens: np.ndarray, eos: np.ndarray) -> list[int]:
    """A row's ids up to and including its first EOS."""
    hits = np.nonzero(np.isin(tokens, eos))[0]
    end = int(hits[0]) + 1 if len(hits) else len(tokens)
    return [int(t) for t in tokens[:end]]
