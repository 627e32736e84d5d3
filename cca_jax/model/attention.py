"""Attention as this package's einsums (``attention: xla``), and the scores mask every
attention path shares (``attention_kernels`` builds the fused kernel's mask from it).

Shapes: queries grouped by KV head, qg (B, T, KV, G, Dh); keys/values (B, T, KV, Dh) for
this call's tokens, (B, KV, S, Dh) for a cache buffer. Positions, not slot indices, decide
what a query sees: a key at position -1 (empty slot, padding) is never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cca_jax import precision
from cca_jax.config import Tuning
from cca_jax.model.layers import softcap


def scores_mask(q_pos, k_pos, sliding, cfg):
    """(B, T, S) bool: query at q_pos (B, T) may attend to the key at k_pos (B, S)."""
    mask = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if cfg.sliding_window:
        in_window = q_pos[:, :, None] - k_pos[:, None, :] < cfg.sliding_window
        mask = mask & (in_window | ~sliding)
    return mask  # (B, T, S)


def _capped_scores(s, mask, cfg):
    """Scaled, soft-capped scores (B, KV, G, T, S) with masked keys at the float32 minimum."""
    return jnp.where(mask[:, None, None], softcap(s * cfg.scale, cfg.attn_logit_softcap), jnp.finfo(jnp.float32).min)


def _softmax_masked(s, mask, cfg):
    probs = jax.nn.softmax(_capped_scores(s, mask, cfg), axis=-1)
    return jnp.where(mask.any(-1)[:, None, None, :, None], probs, 0.0)  # padding queries


def _softmax_two(s_a, mask_a, s_b, mask_b, cfg):
    """Softmax over the keys of two score blocks, as if concatenated, without the concat:
    on a GPU the concatenated form costs a poorly parallelised copy (and its backward a
    split) per layer per step. s_*: (B, KV, G, T, S_*); mask_*: (B, T, S_*)."""
    s_a, s_b = _capped_scores(s_a, mask_a, cfg), _capped_scores(s_b, mask_b, cfg)
    top = jax.lax.stop_gradient(jnp.maximum(s_a.max(-1, keepdims=True), s_b.max(-1, keepdims=True)))
    e_a, e_b = jnp.exp(s_a - top), jnp.exp(s_b - top)
    z = e_a.sum(-1, keepdims=True) + e_b.sum(-1, keepdims=True)
    valid = (mask_a.any(-1) | mask_b.any(-1))[:, None, None, :, None]  # padding queries: 0
    inv = jnp.where(valid, 1.0 / z, 0.0)
    return e_a * inv, e_b * inv


def attend_cached(cfg, qg, k, v, kc, vc, q_pos, kpos_old, kpos_new, sliding):
    """Attention of a few new queries over the cached slots (read-only) and the new keys.

    Keeping the cache read-only inside the layers (the new keys/values are written once
    after them) means no gradient flows into the cache and a scan would carry no copy of
    it. qg (B,T,KV,G,Dh); k, v (B,T,KV,Dh); kc, vc (B,KV,S,Dh) -> (B,T,KV,G,Dh)."""
    f32 = jnp.float32
    # the dots read keys in qg's dtype and probabilities in vc's; their precision is that
    # of the model's dtype, not of the CPU's upcast operands below
    prec_s, prec_v = precision.of(qg), precision.of(vc)
    if jax.default_backend() == "cpu" and kc.dtype != f32:
        # XLA's CPU runtime has no bf16 x bf16 -> f32 dot for this layout (DotThunk):
        # there the operands are upcast; accelerators read them as stored
        qg, kc, vc = qg.astype(f32), kc.astype(f32), vc.astype(f32)
    s_c = jnp.einsum("btkgd,bksd->bkgts", qg, kc.astype(qg.dtype), preferred_element_type=f32, precision=prec_s)
    # the new tokens' own scores and values as multiply-and-reduce (a few elements): as
    # matmuls XLA merges them with the cached ones by concatenating keys/values to the
    # cache, a copy of the whole layer cache per call (measured: a quarter of a decode step)
    s_n = jnp.sum(qg.astype(f32)[:, :, None, :, :, :].transpose(0, 3, 4, 1, 2, 5)
                  * k.astype(f32).transpose(0, 2, 1, 3)[:, :, None, None, :, :], axis=-1)  # (B, KV, G, T, T)
    p_c, p_n = _softmax_two(s_c, scores_mask(q_pos, kpos_old, sliding, cfg),
                            s_n, scores_mask(q_pos, kpos_new, sliding, cfg), cfg)
    out_c = jnp.einsum("bkgts,bksd->btkgd", p_c.astype(vc.dtype), vc, preferred_element_type=f32, precision=prec_v)
    out_n = jnp.sum(p_n.transpose(0, 3, 1, 2, 4)[..., None]
                    * v.astype(f32).transpose(0, 2, 1, 3)[:, None, :, None, :, :], axis=-2)  # (B, T, KV, G, Dh)
    return (out_c + out_n).astype(v.dtype)  # (B, T, KV, G, Dh)


def causal_blocks(T: int, tuning: Tuning) -> int:
    """How many causal query blocks a call of T tokens without a cache runs in: up to
    ``tuning.causal_blocks``, each at least ``tuning.min_block`` tokens, dividing T."""
    n = min(tuning.causal_blocks, T // tuning.min_block)
    while n > 1 and T % n:
        n -= 1
    return max(n, 1)


def heads_major(qg, k, v):
    """(B,T,KV,G,Dh), (B,T,KV,Dh) -> (B,KV,G,T,Dh), (B,KV,T,Dh): attention's batched
    matmuls (batch dims b, kv-head) then produce scores with the keys innermost, so the
    softmax reduces along contiguous rows (with (t, g) innermost XLA transposed the f32
    scores back and forth: a sixth of an amplification step, measured)."""
    return qg.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def attend_buffer(cfg, qh, kc, vc, q_pos, k_pos, sliding):
    """Attention over a whole cache buffer, one softmax (the decode step's write-first
    form): qh (B,KV,G,T,Dh), kc/vc (B,KV,S,Dh), k_pos (B,S) -> (B,T,KV,G,Dh)."""
    kc = kc.astype(qh.dtype)
    s = jnp.einsum("bkgtd,bksd->bkgts", qh, kc, preferred_element_type=jnp.float32, precision=precision.of(qh, kc))
    probs = _softmax_masked(s, scores_mask(q_pos, k_pos, sliding, cfg), cfg).astype(vc.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, vc, precision=precision.of(probs, vc)).transpose(0, 3, 1, 2, 4)


def attend_blocks(cfg, qh, kh, vh, q_pos, k_pos, sliding, blocks: int):
    """Attention over this call's own tokens (heads-major: qh (B,KV,G,T,Dh), kh/vh
    (B,KV,T,Dh)); returns (B,T,KV,G,Dh). With ``blocks`` > 1 the queries run in blocks
    against the keys up to the block's end: exact when a later token never has an
    earlier position (default positions), since those keys are masked anyway."""
    T = qh.shape[3]
    prec_s, prec_v = precision.of(qh, kh), precision.of(vh)  # probs are cast to vh's dtype
    outs = []
    for b in range(blocks):
        lo, hi = b * T // blocks, (b + 1) * T // blocks
        s = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, lo:hi], kh[:, :, :hi], preferred_element_type=jnp.float32,
                       precision=prec_s)
        probs = _softmax_masked(s, scores_mask(q_pos[:, lo:hi], k_pos[:, :hi], sliding, cfg), cfg)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(vh.dtype), vh[:, :, :hi], precision=prec_v))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4)


def attend_self_xla(cfg, q, k, v, q_pos, k_pos, sliding, index_causal: bool):
    """Attention over a call's own tokens with this package's einsums (``attention: xla``;
    ``attention_kernels.attend_self`` is the fused form, same arguments): q (B,T,H,Dh),
    k/v (B,T,KV,Dh) -> (B,T,H,Dh). ``index_causal``: causal query blocks (``attend_blocks``)
    as many as ``cfg.tuning`` gives."""
    B, T, H, Dh = q.shape
    KV = k.shape[2]
    blocks = causal_blocks(T, cfg.tuning) if index_causal else 1
    qh, kh, vh = heads_major(q.reshape(B, T, KV, H // KV, Dh), k, v)
    return attend_blocks(cfg, qh, kh, vh, q_pos, k_pos, sliding, blocks).reshape(B, T, H, Dh)
