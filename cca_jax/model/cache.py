"""A static-shape KV cache: fixed slots, each slot remembering the position it holds.

Masks are computed from the stored positions (-1 = empty or padding), so left-padded
batches, sliding windows and decoding after a shared prefix need no special cases.

Keys and values are one buffer per layer (a tuple), not one stacked array: a matmul
reads a whole buffer in place, while a slice of a stacked array is first copied out
(measured on an H100: that copy tripled the bytes a decode step moves). Each buffer is
(B, KV, S, Dh), heads before slots, so that attention's batched matmuls (batch dims
b, kv-head) read it as it lies; a (B, S, KV, Dh) buffer is transposed first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from cca_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    # per layer (B, KV, S, Dh); or one (L, B, KV, S, Dh) array (``stacked``: read-only, for
    # calls of a few tokens scanned over stacked weights)
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    pos: jax.Array  # (B, S) int32 position held by each slot, -1 if none
    # () int32: the next slot to write, shared by every row; or (B,) per row (speculative
    # decoding: rows advance by different amounts), see ``write_rows``
    index: jax.Array
    # static: True for a cache straight from init_cache. A long call into an empty cache
    # attends over its own tokens only (causal query blocks, no empty slots) and then
    # writes them; the cache it returns is not empty.
    empty: bool = struct.field(pytree_node=False, default=False)

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def stacked(self) -> "KVCache":
        """The buffers as one (L, B, KV, S, Dh) array each: what a call scanned over stacked
        weights reads (DCM's steps), stacked once here instead of by every call."""
        if not isinstance(self.k, (tuple, list)):
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def next_positions(self) -> jax.Array:
        """(B,) the position the next token of each row takes."""
        return jnp.max(self.pos, axis=1) + 1


# jitted: one dispatch for all 2L + 1 buffers. Op by op, the zeros cost milliseconds of
# host time before every generation batch, while the device waits.
# sharding: a ``mesh.CacheSharding`` on a device mesh (the buffers are made in place, never
# whole on one device), None on one device.
@functools.partial(jax.jit, static_argnames=("cfg", "batch", "size", "dtype", "sharding"))
def init_cache(cfg: ModelConfig, batch: int, size: int, dtype=jnp.float32, sharding=None) -> KVCache:
    from cca_jax.mesh import constrain_cache

    shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
    return constrain_cache(KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        pos=jnp.full((batch, size), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
        empty=True,
    ), sharding)


def per_row(index: jax.Array) -> bool:
    """Whether a cache's ``index`` is one start per row (else one shared start)."""
    return jnp.ndim(index) == 1


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``new`` written into ``buf`` along ``axis`` (the slots axis; axis 0 is the batch)
    from each row's own start ``index`` (B,). Slots past the end of the buffer are
    dropped: a speculative verify call near the end of the budget computes tokens no row
    needs, and their keys have nowhere to go."""
    T = new.shape[axis]

    def row(b, n, i):
        at = (slice(None),) * (axis - 1) + (i + jnp.arange(T),)
        return b.at[at].set(n, mode="drop")

    return jax.vmap(row)(buf, new, index)


def _slots(cache: KVCache, size: int | None) -> KVCache:
    """``cache`` with ``size`` slots: empty ones (position -1) added after its own."""
    if size is None or size == cache.size:
        return cache
    if size < cache.size:
        raise ValueError(f"a cache of {cache.size} slots cannot shrink to {size}")
    extra = size - cache.size

    def grow(b):
        return jnp.pad(b, ((0, 0), (0, 0), (0, extra), (0, 0)))

    return cache.replace(k=tuple(grow(k) for k in cache.k), v=tuple(grow(v) for v in cache.v),
                         pos=jnp.pad(cache.pos, ((0, 0), (0, extra)), constant_values=-1))


@functools.partial(jax.jit, static_argnames=("batch", "sharding", "size"))
def tile_cache(cache: KVCache, batch: int, sharding=None, size: int | None = None) -> KVCache:
    """Each row of ``cache`` repeated ``batch`` times (a one-row shared prefix for a batch),
    with ``size`` slots (default: as many as ``cache``; more are empty)."""
    from cca_jax.mesh import constrain_cache

    cache = _slots(cache, size)
    return constrain_cache(KVCache(
        k=tuple(jnp.repeat(k, batch, axis=0) for k in cache.k), v=tuple(jnp.repeat(v, batch, axis=0) for v in cache.v),
        pos=jnp.repeat(cache.pos, batch, axis=0), index=cache.index,
    ), sharding)


@functools.partial(jax.jit, static_argnames=("size", "sharding"))
def grow_cache(cache: KVCache, size: int, sharding=None) -> KVCache:
    """``cache`` with ``size`` slots, the new ones empty: a prompt prefilled into a cache
    sized for it alone gets room to decode (so prefill programs do not depend on the
    generation budget). A larger buffer cannot reuse the smaller one's memory, so nothing
    is donated: the old cache is freed when the caller drops it."""
    from cca_jax.mesh import constrain_cache

    return constrain_cache(_slots(cache, size), sharding)
