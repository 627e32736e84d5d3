"""The decoder forward pass as a pure function, and the NNX module that holds parameters.

Parameters (stacked over layers so the blocks run under ``lax.scan``)::

    embed (V, D)                        final_norm (D,)       lm_head (D, V) unless tied
    layers/attn_norm, post_attn_norm, mlp_norm, post_mlp_norm (L, D)   (as the family has them)
    layers/attn/q (L, D, H, Dh)   k, v (L, D, KV, Dh)   o (L, H, Dh, D)
    layers/attn/q_bias (L, H, Dh) k_bias, v_bias (L, KV, Dh)  o_bias (L, D)
    layers/attn/q_norm, k_norm   (L, Dh) for "head" q/k norm, (L, H, Dh) / (L, KV, Dh) for "full"
    layers/mlp/gate, up (L, D, F)  down (L, F, D)   gate_bias, up_bias (L, F)  down_bias (L, D)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from cca_jax.config import ModelConfig
from cca_jax.model import intervention as iv_lib
from cca_jax.model.cache import KVCache
from cca_jax.model.intervention import Intervention
from cca_jax.model.layers import activation, apply_rope, rms_norm, rope_tables, softcap

Params = dict[str, Any]


@struct.dataclass
class ForwardOutput:
    logits: jax.Array  # (B, P, V) float32 at the requested positions (all positions if none)
    cache: KVCache | None = None
    # {"q","k","v": (L,B,P,N,Dh), "mlp": (L,B,P,F), "resid": (L+1,B,P,D)} when asked for
    activations: dict | None = None


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as nested dicts (the layout above)."""
    L, D, H, KV, Dh, F, V = (
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
        cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
    )
    attn = {"q": (L, D, H, Dh), "k": (L, D, KV, Dh), "v": (L, D, KV, Dh), "o": (L, H, Dh, D)}
    if cfg.qkv_bias:
        attn.update(q_bias=(L, H, Dh), k_bias=(L, KV, Dh), v_bias=(L, KV, Dh))
    if cfg.o_bias:
        attn["o_bias"] = (L, D)
    if cfg.qk_norm == "head":
        attn.update(q_norm=(L, Dh), k_norm=(L, Dh))
    elif cfg.qk_norm == "full":
        attn.update(q_norm=(L, H, Dh), k_norm=(L, KV, Dh))
    mlp = {"gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)}
    if cfg.mlp_bias:
        mlp.update(gate_bias=(L, F), up_bias=(L, F), down_bias=(L, D))
    layers: Params = {"attn": attn, "mlp": mlp}
    for name, on in (
        ("attn_norm", cfg.pre_attn_norm), ("post_attn_norm", cfg.post_attn_norm),
        ("mlp_norm", cfg.pre_mlp_norm), ("post_mlp_norm", cfg.post_mlp_norm),
    ):
        if on:
            layers[name] = (L, D)
    shapes: Params = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(std) weights, norms at identity, small random biases)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            # gemma norms scale by (1 + w): identity is w = 0; others identity at w = 1.
            base = 0.0 if cfg.norm_plus_one else 1.0
            leaves.append((base + 0.1 * jax.random.normal(k, shape)).astype(dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_name = checkpoint_name

# What a rematerialised block keeps from its forward pass (the rest is recomputed):
# full keeps only the block's input; dots keeps every weight matmul's output (attention
# itself is recomputed); qkv_mlp keeps rotated q/k, v and the MLP's gate/up outputs;
# qkv_mlp_out also keeps the attention and MLP outputs (only attention is recomputed).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_in"),
    "qkv_mlp_out": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_in", "block_out"),
}


def remat_policy(remat: bool | str):
    """The jax.checkpoint policy for ``remat`` (True = "full")."""
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        from cca_jax.errors import CCAError

        raise CCAError(f"remat must be true, false or one of {', '.join(REMAT_POLICIES)}; got {remat!r}")
    return REMAT_POLICIES[name]


def _gather(x: jax.Array, at: jax.Array | None) -> jax.Array:
    """x (B, T, ...) -> (B, P, ...) at indices ``at`` (B, P)."""
    if at is None:
        return x
    idx = at.reshape(at.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


# Calls with at most this many new tokens on top of a cache (decoding, the DCM and
# patching steps) read each layer's cached keys/values in place: see _attend_cached.
SMALL_T = 8


def _scores_mask(q_pos, kpos, sliding, cfg):
    mask = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= q_pos[:, :, None])
    if cfg.sliding_window:
        in_window = q_pos[:, :, None] - kpos[:, None, :] < cfg.sliding_window
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


def _attend_cached(cfg, qg, k, v, kc, vc, q_pos, kpos_old, kpos_new, sliding):
    """Attention of a few new queries over the cached slots (read-only) and the new keys.

    Keeping the cache read-only inside the layer scan (the new keys/values are written
    once after it) means no gradient flows into the cache and the scan carries no copy of
    it. qg (B,T,KV,G,Dh); k, v (B,T,KV,Dh); kc, vc (B,KV,S,Dh)."""
    f32 = jnp.float32
    if jax.default_backend() == "cpu" and kc.dtype != f32:
        # XLA's CPU runtime has no bf16 x bf16 -> f32 dot for this layout (DotThunk):
        # there the operands are upcast; accelerators read them as stored
        qg, kc, vc = qg.astype(f32), kc.astype(f32), vc.astype(f32)
    s_c = jnp.einsum("btkgd,bksd->bkgts", qg, kc.astype(qg.dtype), preferred_element_type=f32)
    # the new tokens' own scores and values as multiply-and-reduce (a few elements): as
    # matmuls XLA merges them with the cached ones by concatenating keys/values to the
    # cache, a copy of the whole layer cache per call (measured: a quarter of a decode step)
    s_n = jnp.sum(qg.astype(f32)[:, :, None, :, :, :].transpose(0, 3, 4, 1, 2, 5)
                  * k.astype(f32).transpose(0, 2, 1, 3)[:, :, None, None, :, :], axis=-1)  # (B, KV, G, T, T)
    p_c, p_n = _softmax_two(s_c, _scores_mask(q_pos, kpos_old, sliding, cfg),
                            s_n, _scores_mask(q_pos, kpos_new, sliding, cfg), cfg)
    out_c = jnp.einsum("bkgts,bksd->btkgd", p_c.astype(vc.dtype), vc, preferred_element_type=f32)
    out_n = jnp.sum(p_n.transpose(0, 3, 1, 2, 4)[..., None]
                    * v.astype(f32).transpose(0, 2, 1, 3)[:, None, :, None, :, :], axis=-2)  # (B, T, KV, G, Dh)
    return (out_c + out_n).astype(v.dtype)  # (B, T, KV, G, Dh)


# A long call without a cache runs causal attention in this many query blocks, each
# against the keys up to its end only: the blocks above the diagonal (3/8 of the scores
# and of their elementwise passes at 4 blocks) are never computed.
CAUSAL_BLOCKS = 4
MIN_BLOCK = 256


def _causal_blocks(T: int) -> int:
    n = min(CAUSAL_BLOCKS, T // MIN_BLOCK)
    while n > 1 and T % n:
        n -= 1
    return max(n, 1)


def _heads_major(qg, k, v):
    """(B,T,KV,G,Dh), (B,T,KV,Dh) -> (B,KV,G,T,Dh), (B,KV,T,Dh): attention's batched
    matmuls (batch dims b, kv-head) then produce scores with the keys innermost, so the
    softmax reduces along contiguous rows (with (t, g) innermost XLA transposed the f32
    scores back and forth: a sixth of an amplification step, measured)."""
    return qg.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _attend_buffer(cfg, qh, kc, vc, q_pos, k_pos, sliding):
    """Attention over a whole cache buffer, one softmax (the decode step's write-first
    form): qh (B,KV,G,T,Dh), kc/vc (B,KV,S,Dh), k_pos (B,S) -> (B,T,KV,G,Dh)."""
    s = jnp.einsum("bkgtd,bksd->bkgts", qh, kc.astype(qh.dtype), preferred_element_type=jnp.float32)
    probs = _softmax_masked(s, _scores_mask(q_pos, k_pos, sliding, cfg), cfg)
    return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(vc.dtype), vc).transpose(0, 3, 1, 2, 4)


def _attend_self(cfg, qh, kh, vh, q_pos, k_pos, sliding, blocks: int):
    """Attention over this call's own tokens (heads-major: qh (B,KV,G,T,Dh), kh/vh
    (B,KV,T,Dh)); returns (B,T,KV,G,Dh). With ``blocks`` > 1 the queries run in blocks
    against the keys up to the block's end: exact when a later token never has an
    earlier position (default positions), since those keys are masked anyway."""
    T = qh.shape[3]
    outs = []
    for b in range(blocks):
        lo, hi = b * T // blocks, (b + 1) * T // blocks
        s = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, lo:hi], kh[:, :, :hi], preferred_element_type=jnp.float32)
        probs = _softmax_masked(s, _scores_mask(q_pos[:, lo:hi], k_pos[:, :hi], sliding, cfg), cfg)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(vh.dtype), vh[:, :, :hi]))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4)


def attend_self_xla(cfg, q, k, v, q_pos, k_pos, sliding, index_causal: bool):
    """Attention over a call's own tokens with this package's einsums (``attention: xla``;
    ``attention_kernels.attend_self`` is the fused form, same arguments): q (B,T,H,Dh),
    k/v (B,T,KV,Dh) -> (B,T,H,Dh). ``index_causal``: causal query blocks (see _attend_self)."""
    B, T, H, Dh = q.shape
    KV = k.shape[2]
    blocks = _causal_blocks(T) if index_causal else 1
    qh, kh, vh = _heads_major(q.reshape(B, T, KV, H // KV, Dh), k, v)
    return _attend_self(cfg, qh, kh, vh, q_pos, k_pos, sliding, blocks).reshape(B, T, H, Dh)


def _attention(cfg, p, x, q_pos, kv_cache, k_pos, sliding, cos, sin, layer_iv, where, collect, at, index_causal=False):
    """One attention sublayer. Returns (output, this layer's cache after the call, activations).

    kv_cache: None (attend over this call's tokens; ``index_causal``: a later token never
    has an earlier position, so causality can go by index: causal query blocks, or the
    fused kernel skipping the blocks above the diagonal);
    ("fresh",): an empty cache: attend as with None and return this call's keys/values
    for the caller to write; ("write", kc, vc, index): this layer's (B, KV, S, Dh) buffers, this call's
    keys/values written at ``index`` and attention over the whole buffer; ("read", kc,
    vc): the buffers read-only, attention over them plus this call's keys (the caller
    writes the new keys/values afterwards, so no gradient flows into the cache)."""
    B, T, _ = x.shape
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if "qkv" in p:  # per-layer form (unstack_layers): one matmul over [q | k | v] heads
        q, k, v = jnp.split(jnp.einsum("btd,dhk->bthk", x, p["qkv"]), [H, H + KV], axis=2)
    else:
        q = jnp.einsum("btd,dhk->bthk", x, p["q"])
        k = jnp.einsum("btd,dhk->bthk", x, p["k"])
        v = jnp.einsum("btd,dhk->bthk", x, p["v"])
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q = iv_lib.apply(q, "q", layer_iv, where)
    k = iv_lib.apply(k, "k", layer_iv, where)
    v = iv_lib.apply(v, "v", layer_iv, where)
    acts = {"q": _gather(q, at), "k": _gather(k, at), "v": _gather(v, at)} if collect else {}
    eps = cfg.rms_norm_eps
    if cfg.qk_norm == "head":
        q = rms_norm(q, p["q_norm"], eps, cfg.norm_plus_one)
        k = rms_norm(k, p["k_norm"], eps, cfg.norm_plus_one)
    elif cfg.qk_norm == "full":  # olmo2: one norm over the whole projection
        q = rms_norm(q.reshape(B, T, H * Dh), p["q_norm"].reshape(-1), eps, False).reshape(B, T, H, Dh)
        k = rms_norm(k.reshape(B, T, KV * Dh), p["k_norm"].reshape(-1), eps, False).reshape(B, T, KV, Dh)
    q = _name(apply_rope(q, cos, sin), "qkv")
    k = _name(apply_rope(k, cos, sin), "qkv")
    v = _name(v, "qkv")
    G = H // KV
    qg = q.reshape(B, T, KV, G, Dh)
    if kv_cache is None or kv_cache[0] == "fresh":
        if cfg.attention == "xla":
            out = attend_self_xla(cfg, q, k, v, q_pos, k_pos, sliding, index_causal)
        else:
            from cca_jax.model import attention_kernels

            impl = cfg.attention.partition(":")[2] or "auto"
            out = attention_kernels.attend_self(cfg, q, k, v, q_pos, k_pos, sliding, index_causal, impl)
        new_kv = None if kv_cache is None else (k, v)  # (B, T, KV, Dh): the caller writes them
    elif kv_cache[0] == "read":
        _, kc, vc = kv_cache
        k, v = k.astype(kc.dtype), v.astype(vc.dtype)
        kpos_old, kpos_new = k_pos
        out = _attend_cached(cfg, qg, k, v, kc, vc, q_pos, kpos_old, kpos_new, sliding).reshape(B, T, H, Dh)
        new_kv = (k, v)  # (B, T, KV, Dh): the caller writes them into the buffers
    else:
        _, kc, vc, index = kv_cache
        qh, kh, vh = _heads_major(qg, k.astype(kc.dtype), v.astype(vc.dtype))
        k_all = jax.lax.dynamic_update_slice(kc, kh, (0, 0, index, 0))
        v_all = jax.lax.dynamic_update_slice(vc, vh, (0, 0, index, 0))
        new_kv = (k_all, v_all)
        out = _attend_buffer(cfg, qh, k_all, v_all, q_pos, k_pos, sliding).reshape(B, T, H, Dh)
    out = jnp.einsum("bthd,hdm->btm", out.astype(x.dtype), p["o"])
    if cfg.o_bias:
        out = out + p["o_bias"]
    return _name(out, "block_out"), new_kv, acts


def _mlp(cfg, p, x, layer_iv, where, collect, at):
    if "gate_up" in p:  # per-layer form (unstack_layers): one matmul over [gate | up]
        g, u = jnp.split(x @ p["gate_up"], 2, axis=-1)
    else:
        g = x @ p["gate"]
        u = x @ p["up"]
    if cfg.mlp_bias:
        g, u = g + p["gate_bias"], u + p["up_bias"]
    g, u = _name(g, "mlp_in"), _name(u, "mlp_in")
    h = activation(cfg.hidden_act, g) * u
    h = iv_lib.apply(h, "mlp", layer_iv, where)
    out = h @ p["down"]
    if cfg.mlp_bias:
        out = out + p["down_bias"]
    return _name(out, "block_out"), ({"mlp": _gather(h, at)} if collect else {})


def layer_list(layers: Params) -> tuple[Params, ...]:
    """Stacked ``layers`` (L, ...) as a tuple of per-layer slices (inside jit: the layers
    then run unrolled, and gradients flow back into the stacked arrays)."""
    if isinstance(layers, (list, tuple)):
        return tuple(layers)
    n = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def unstack_layers(params: Params) -> Params:
    """The same parameters with ``layers`` as a tuple of per-layer dicts (a copy of the
    layer weights). ``forward`` accepts either form; memory-bound calls (decoding, the
    DCM and patching steps) run faster on this one because each matmul then reads its
    weight buffer in place instead of a slice copied out of the stacked array."""
    if isinstance(params["layers"], (list, tuple)):
        return params
    return {**params, "layers": _split_layers(params["layers"])}


@jax.jit
def _split_layers(layers):
    out = []
    for lp in layer_list(layers):
        # gate and up side by side: XLA otherwise merges the two matmuls by concatenating
        # the weights anew on every call (a quarter of a decode step, measured)
        mlp = {k: v for k, v in lp["mlp"].items() if k not in ("gate", "up")}
        mlp["gate_up"] = jnp.concatenate([lp["mlp"]["gate"], lp["mlp"]["up"]], axis=-1)
        # likewise q, k and v (XLA concatenated their weights on every decode step)
        attn = {k: v for k, v in lp["attn"].items() if k not in ("q", "k", "v")}
        attn["qkv"] = jnp.concatenate([lp["attn"]["q"], lp["attn"]["k"], lp["attn"]["v"]], axis=1)
        out.append({**lp, "attn": attn, "mlp": mlp})
    return tuple(out)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    at: jax.Array | None = None,
    intervention: Intervention | None = None,
    collect: bool = False,
    remat: bool = False,
    final_softcap: bool = True,
    vocab: jax.Array | None = None,
    write_first: bool = False,
) -> ForwardOutput:
    """Run the decoder on ``tokens`` (B, T).

    mask: (B, T) bool, False for padding tokens (never attended to); default all True.
    positions: (B, T) rope positions; default counts the valid tokens of each row,
        continuing after what ``cache`` already holds (so left padding just works).
    cache: when given, this call's keys/values are written at ``cache.index`` and attention
        covers everything the cache holds; the updated cache is returned.
    at: (B, P) indices into this call's tokens: logits (and activations) only there.
    vocab: (K,) token ids: logits only for these (B, P, K); a loss that reads a few
        logits then skips the rest of the output matmul and its gradient.
    intervention: scale/replace components (see ``Intervention``); None = plain forward.
    collect: also return per-component activations (and the residual stream) at ``at``.
    remat: recompute each block in the backward pass (less memory for gradient steps):
        True (= "full") or a name in ``REMAT_POLICIES`` saying what to keep.
    final_softcap: False returns the lm-head output before Gemma-2's final soft-cap (what
        the original DCM code reads; see SPEC 3).
    write_first: with a cache and a few tokens (decoding), write their keys/values into
        the buffers first and attend over the buffers with one softmax: fewer kernels per
        layer. Only for calls that are not differentiated: a gradient would flow into the
        whole buffer (the default reads the cache as a constant and writes after).
    """
    B, T = tokens.shape
    if mask is None:
        mask = jnp.ones((B, T), bool)
    small = cache is not None and T <= SMALL_T and not write_first  # read the cache in place, write after the layers
    fresh = cache is not None and cache.empty and not small  # attend over this call only, then write
    # default positions never decrease along a row: later keys are always masked for a query
    index_causal = positions is None and (cache is None or fresh)
    if positions is None:
        start = cache.next_positions()[:, None] if cache is not None else 0
        positions = start + jnp.cumsum(mask, axis=1) - 1
    positions = positions.astype(jnp.int32)
    kpos_new = jnp.where(mask, positions, -1)
    if cache is not None:
        kpos_all = jax.lax.dynamic_update_slice_in_dim(cache.pos, kpos_new, cache.index, axis=1)
    else:
        kpos_all = kpos_new

    dtype = params["embed"].dtype
    x = params["embed"][tokens]
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype)
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
    if cfg.rope_local is not None:
        cos_l, sin_l = rope_tables(cfg.rope_local, cfg.head_dim, positions)
    else:
        cos_l, sin_l = cos, sin
    where = intervention.where if intervention is not None else None
    layer_ivs = intervention.layer_slices() if intervention is not None else None
    sliding = jnp.asarray(np.array(cfg.sliding_layers, bool))
    eps, plus = cfg.rms_norm_eps, cfg.norm_plus_one

    def block(x, xs):
        lp, is_sliding, layer_iv, kv_arg, kpos_arg = xs
        c = jnp.where(is_sliding, cos_l, cos) if cfg.rope_local is not None else cos
        s_ = jnp.where(is_sliding, sin_l, sin) if cfg.rope_local is not None else sin
        h = rms_norm(x, lp["attn_norm"], eps, plus) if cfg.pre_attn_norm else x
        a, kv_layer, acts = _attention(cfg, lp["attn"], h, positions, kv_arg, kpos_arg, is_sliding, c, s_,
                                       layer_iv, where, collect, at, index_causal)
        if cfg.post_attn_norm:
            a = rms_norm(a, lp["post_attn_norm"], eps, plus)
        x = x + a
        h = rms_norm(x, lp["mlp_norm"], eps, plus) if cfg.pre_mlp_norm else x
        m, macts = _mlp(cfg, lp["mlp"], h, layer_iv, where, collect, at)
        if cfg.post_mlp_norm:
            m = rms_norm(m, lp["post_mlp_norm"], eps, plus)
        x = x + m
        if collect:
            acts = {**acts, **macts, "resid": _gather(x, at)}
        return x, (acts, kv_layer)

    if remat:
        block = jax.checkpoint(block, policy=remat_policy(remat))
    x_in = x
    layers = params["layers"]
    per_layer = isinstance(layers, (list, tuple))

    kvs = None  # with a cache: per layer, its (k, v) buffers, or this call's (k, v) when small or fresh
    if (cache is None or fresh) and not per_layer:
        # no cache (or an empty one): one compiled block scanned over the stacked layers
        kv_arg = None if cache is None else ("fresh",)
        x, (acts, kv) = jax.lax.scan(lambda x, xs: block(x, (*xs, kv_arg, kpos_new)), x, (layers, sliding, layer_ivs))
        if fresh:
            kvs = [(kv[0][i], kv[1][i]) for i in range(cfg.num_layers)]
    elif not small and not per_layer:
        # many tokens into a cache (scoring after a prefix): compute-bound, so a scan (one
        # compiled block) over the buffers stacked for the call; the copies cost little next to the work
        def body(x, xs):
            lp, is_sliding, liv, kc, vc = xs
            return block(x, (lp, is_sliding, liv, ("write", kc, vc, cache.index), kpos_all))

        x, (acts, (ks, vs)) = jax.lax.scan(body, x, (layers, sliding, layer_ivs, jnp.stack(cache.k), jnp.stack(cache.v)))
        kvs = list(zip(ks, vs))
    else:
        # With a cache (or per-layer weights, see unstack_layers) the layers run unrolled,
        # each reading its own buffers: inside a scan XLA copies every layer's weights and
        # cache out of the stacked arrays before each matmul.
        ys = []
        for i, lp in enumerate(layer_list(layers)):
            liv = None if layer_ivs is None else jax.tree.map(lambda a, i=i: a[i], layer_ivs)
            if cache is None:
                kv_arg, kpos_arg = None, kpos_new
            elif small:
                kv_arg, kpos_arg = ("read", cache.k[i], cache.v[i]), (cache.pos, kpos_new)
            elif fresh:
                kv_arg, kpos_arg = ("fresh",), kpos_new
            else:
                kv_arg, kpos_arg = ("write", cache.k[i], cache.v[i], cache.index), kpos_all
            x, y = block(x, (lp, sliding[i], liv, kv_arg, kpos_arg))
            ys.append(y)
        acts = jax.tree.map(lambda *a: jnp.stack(a), *[y[0] for y in ys])
        if cache is not None:
            kvs = [y[1] for y in ys]
    new_cache = None
    if cache is not None:
        if small or fresh:  # this call's keys/values (B, T, KV, Dh) into their slots, in place
            kvs = [tuple(jax.lax.dynamic_update_slice(full, new.transpose(0, 2, 1, 3).astype(full.dtype),
                                                      (0, 0, cache.index, 0))
                         for full, new in zip((cache.k[i], cache.v[i]), kv)) for i, kv in enumerate(kvs)]
        new_cache = KVCache(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs), pos=kpos_all,
                            index=cache.index + T)

    h = _gather(x, at)
    h = rms_norm(h, params["final_norm"], eps, plus)
    if vocab is None:
        head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    else:
        head = params["embed"][vocab].T if cfg.tie_word_embeddings else params["lm_head"][:, vocab]
    logits = jnp.einsum("bpd,dv->bpv", h, head.astype(dtype), preferred_element_type=jnp.float32)
    if final_softcap:
        logits = softcap(logits, cfg.final_logit_softcap)

    if collect:
        acts["resid"] = jnp.concatenate([_gather(x_in, at)[None], acts["resid"]], axis=0)
    return ForwardOutput(logits=logits, cache=new_cache, activations=acts if collect else None)


class _Group(nnx.Module):
    """A named group of parameters (attn, mlp, layers) in the NNX module tree."""

    def __init__(self, tree: Params):
        for name, value in tree.items():
            setattr(self, name, _Group(value) if isinstance(value, dict) else nnx.Param(value))


class Transformer(nnx.Module):
    """A decoder-only transformer of any supported family, as an NNX module.

    ``model.params()`` is the pure parameter dict that ``forward`` takes; ``model(tokens,
    ...)`` runs ``forward`` with it. Use ``nnx.split`` / ``nnx.merge`` or ``params()`` /
    ``with_params()`` to move between the module and plain pytrees.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, params: Params | None = None):
        self.config = config
        tree = params if params is not None else init_params(config, rngs.params(), dtype)
        for name, value in tree.items():
            setattr(self, name, _Group(value) if isinstance(value, dict) else nnx.Param(value))

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def with_params(self, params: Params) -> "Transformer":
        """A new module with the same config holding ``params`` (no copy of the arrays)."""
        return Transformer(self.config, rngs=nnx.Rngs(0), params=params)

    def with_attention(self, attention: str) -> "Transformer":
        """The same weights computing attention with ``attention`` ("xla" | "tokamax" | ...:
        see ``config.ATTENTION``)."""
        return Transformer(self.config.replace(attention=attention), rngs=nnx.Rngs(0), params=self.params())

    @classmethod
    def abstract(cls, config: ModelConfig, dtype=jnp.float32) -> "Transformer":
        """A module of ShapeDtypeStructs: the shapes without allocating anything."""
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))

    def __call__(self, tokens: jax.Array, **kw) -> ForwardOutput:
        return forward(self.config, self.params(), tokens, **kw)

    @property
    def dtype(self):
        return self.embed[...].dtype
