"""A static-shape KV cache: fixed slots, each slot remembering the position it holds.

Masks are computed from the stored positions (-1 = empty or padding), so left-padded
batches, sliding windows and decoding after a shared prefix need no special cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cca_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # (L, B, S, KV, Dh)
    v: jax.Array  # (L, B, S, KV, Dh)
    pos: jax.Array  # (B, S) int32 position held by each slot, -1 if none
    index: jax.Array  # () int32: next slot to write

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def next_positions(self) -> jax.Array:
        """(B,) the position the next token of each row takes."""
        return jnp.max(self.pos, axis=1) + 1


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch, size), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
