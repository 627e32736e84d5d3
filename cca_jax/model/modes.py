"""How a forward call uses its KV cache, as types.

``CacheUse`` is the whole call's choice (``cache_use``); each attention layer then gets one
of three modes, pytrees of that layer's arrays, each attending its own way:

- ``OwnKeys``: attend over this call's tokens only (no cache, or an empty one whose
  keys/values are handed back to be written after the layers);
- ``ReadCache``: the layer's buffers read-only plus this call's keys (a few tokens: the
  new keys/values are written after the layers, so no gradient flows into the cache);
- ``WriteCache``: this call's keys/values written into the buffers first, then one
  softmax over the whole buffer.
"""

from __future__ import annotations

import enum

import jax
from flax import struct

from cca_jax.config import Tuning
from cca_jax.model import attention_kernels
from cca_jax.model.attention import attend_buffer, attend_cached, attend_self_xla, heads_major
from cca_jax.model.cache import KVCache, per_row, write_rows


class CacheUse(enum.Enum):
    NONE = "none"  # no cache: attend over this call's tokens
    FRESH = "fresh"  # an empty cache: as NONE, then write this call's keys/values into it
    READ = "read"  # a few tokens: read the buffers in place, write the new keys/values after
    WRITE = "write"  # write into the buffers first, attend over all of them


def cache_use(cache: KVCache | None, T: int, write_first: bool, tuning: Tuning) -> CacheUse:
    """The cache use of a call of T tokens (see ``forward``'s ``write_first``)."""
    if cache is None:
        return CacheUse.NONE
    if T <= tuning.read_cache_tokens and not write_first:
        return CacheUse.READ
    return CacheUse.FRESH if cache.empty else CacheUse.WRITE


def _grouped(q, num_kv_heads: int):
    B, T, H, Dh = q.shape
    return q.reshape(B, T, num_kv_heads, H // num_kv_heads, Dh)


@struct.dataclass
class OwnKeys:
    k_pos: jax.Array  # (B, T) this call's key positions, -1 for padding
    keep: bool = struct.field(pytree_node=False, default=False)  # hand (k, v) back (FRESH)

    def attend(self, cfg, q, k, v, q_pos, sliding, index_causal: bool):
        """(out (B,T,H,Dh), this call's (k, v) when kept, else None)."""
        if cfg.attention == "xla":
            out = attend_self_xla(cfg, q, k, v, q_pos, self.k_pos, sliding, index_causal)
        else:
            impl = cfg.attention.partition(":")[2] or "auto"
            out = attention_kernels.attend_self(cfg, q, k, v, q_pos, self.k_pos, sliding, index_causal, impl)
        return out, ((k, v) if self.keep else None)  # (B, T, KV, Dh): the caller writes them


@struct.dataclass
class ReadCache:
    k: jax.Array  # this layer's (B, KV, S, Dh) buffers
    v: jax.Array
    k_pos_cached: jax.Array  # (B, S) the position each slot holds, -1 if none
    k_pos_new: jax.Array  # (B, T) this call's key positions

    def attend(self, cfg, q, k, v, q_pos, sliding, index_causal: bool):
        """(out (B,T,H,Dh), this call's (k, v) for the caller to write)."""
        qg = _grouped(q, cfg.num_kv_heads)
        k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
        out = attend_cached(cfg, qg, k, v, self.k, self.v, q_pos, self.k_pos_cached, self.k_pos_new, sliding)
        return out.reshape(q.shape), (k, v)


@struct.dataclass
class WriteCache:
    k: jax.Array  # this layer's (B, KV, S, Dh) buffers
    v: jax.Array
    index: jax.Array  # () the slot this call's first token goes to, or (B,) one per row
    k_pos: jax.Array  # (B, S) the slots' positions after this call's are written

    def attend(self, cfg, q, k, v, q_pos, sliding, index_causal: bool):
        """(out (B,T,H,Dh), the layer's buffers with this call's keys/values written)."""
        qh, kh, vh = heads_major(_grouped(q, cfg.num_kv_heads), k.astype(self.k.dtype), v.astype(self.v.dtype))
        if per_row(self.index):  # speculative decoding: each row writes at its own slot
            k_all, v_all = write_rows(self.k, kh, self.index, 2), write_rows(self.v, vh, self.index, 2)
        else:
            k_all = jax.lax.dynamic_update_slice(self.k, kh, (0, 0, self.index, 0))
            v_all = jax.lax.dynamic_update_slice(self.v, vh, (0, 0, self.index, 0))
        return attend_buffer(cfg, qh, k_all, v_all, q_pos, self.k_pos, sliding).reshape(q.shape), (k_all, v_all)


AttentionMode = OwnKeys | ReadCache | WriteCache


def layer_mode(use: CacheUse, cache: KVCache | None, i: int, k_pos_new, k_pos_all) -> AttentionMode:
    """Layer ``i``'s mode for a call whose cache use is ``use``."""
    if use in (CacheUse.NONE, CacheUse.FRESH):
        return OwnKeys(k_pos_new, keep=use is CacheUse.FRESH)
    if use is CacheUse.READ:
        return ReadCache(cache.k[i], cache.v[i], cache.pos, k_pos_new)
    return WriteCache(cache.k[i], cache.v[i], cache.index, k_pos_all)
