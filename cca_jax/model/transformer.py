"""The decoder forward pass as a pure function, and the NNX module that holds parameters.

``forward`` runs in named steps: the call's positions, the embedding, the layers (one
block scanned over stacked weights, or unrolled over per-layer weights and cache
buffers: the caller picks by the weights it passes), the cache write, the logits.
Parameter layouts are in ``model.params``; how a call uses its cache, and each attention
layer's mode, in ``model.modes``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from cca_jax import precision
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model import intervention as iv_lib
from cca_jax.model.cache import KVCache, per_row, write_rows
from cca_jax.model.intervention import Intervention
from cca_jax.model.layers import activation, apply_rope, rms_norm, rope_tables, softcap
from cca_jax.model.modes import AttentionMode, CacheUse, OwnKeys, ReadCache, WriteCache, cache_use, layer_mode
from cca_jax.model.params import (Params, gate_up_projections, init_params, is_per_layer, layer_list, matmul,
                                  param_shapes, qkv_projections, unstack_layers)

# the parameter-layout names are re-exported: weights.mapping, amplify and tests read them here
__all__ = ["ForwardOutput", "Params", "REMAT_POLICIES", "Transformer", "forward", "init_params", "layer_list",
           "param_shapes", "remat_policy", "unstack_layers"]


@struct.dataclass
class ForwardOutput:
    logits: jax.Array  # (B, P, V) float32 at the requested positions (all positions if none)
    cache: KVCache | None = None
    # {"q","k","v": (L,B,P,N,Dh), "mlp": (L,B,P,F), "resid": (L+1,B,P,D)} when asked for
    activations: dict | None = None


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
        raise CCAError(f"remat must be true, false or one of {', '.join(REMAT_POLICIES)}; got {remat!r}")
    return REMAT_POLICIES[name]


def _gather(x: jax.Array, at: jax.Array | None) -> jax.Array:
    """x (B, T, ...) -> (B, P, ...) at indices ``at`` (B, P)."""
    if at is None:
        return x
    idx = at.reshape(at.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@dataclasses.dataclass(frozen=True)
class Positions:
    """A call's positions: rope positions of its queries and the keys' positions (-1 for
    padding) of its own tokens and, with a cache, of every slot after the call's write."""

    q: jax.Array  # (B, T) int32
    k_new: jax.Array  # (B, T)
    k_all: jax.Array  # (B, S) with a cache, else k_new


def _positions(tokens, mask, positions, cache: KVCache | None) -> Positions:
    B, T = tokens.shape
    if mask is None:
        mask = jnp.ones((B, T), bool)
    if positions is None:  # count the valid tokens of each row, after what the cache holds
        start = cache.next_positions()[:, None] if cache is not None else 0
        positions = start + jnp.cumsum(mask, axis=1) - 1
    positions = positions.astype(jnp.int32)
    k_new = jnp.where(mask, positions, -1)
    if cache is None:
        k_all = k_new
    elif per_row(cache.index):  # speculative decoding: each row writes at its own slot
        k_all = write_rows(cache.pos, k_new, cache.index, 1)
    else:
        k_all = jax.lax.dynamic_update_slice_in_dim(cache.pos, k_new, cache.index, axis=1)
    return Positions(positions, k_new, k_all)


@dataclasses.dataclass(frozen=True)
class CallConsts:
    """What every layer of one call reads, closed over by the block (never scanned)."""

    positions: jax.Array  # (B, T) query (rope) positions
    cos: jax.Array  # (B, T, Dh) rope tables
    sin: jax.Array
    cos_local: jax.Array | None  # sliding layers' rope (gemma3), else None
    sin_local: jax.Array | None
    at: jax.Array | None  # (B, P) positions to read logits/activations at
    where: jax.Array | None  # (B, T) positions an intervention acts on
    collect: bool
    # a later token never has an earlier position (default positions, no cache or an
    # empty one), so causality can also go by index (see attention.attend_blocks)
    index_causal: bool

    def rope(self, sliding):
        """(cos, sin) of a layer; ``sliding`` is its (traced) sliding-window flag."""
        if self.cos_local is None:
            return self.cos, self.sin
        return jnp.where(sliding, self.cos_local, self.cos), jnp.where(sliding, self.sin_local, self.sin)


def _call_consts(cfg, positions, at, intervention, collect: bool, index_causal: bool) -> CallConsts:
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
    local = rope_tables(cfg.rope_local, cfg.head_dim, positions) if cfg.rope_local is not None else (None, None)
    where = intervention.where if intervention is not None else None
    return CallConsts(positions, cos, sin, *local, at, where, collect, index_causal)


def _qkv(cfg, p, x, call: CallConsts, cos, sin, layer_iv):
    """q (B,T,H,Dh), k, v (B,T,KV,Dh) projected, intervened on (the raw projections, as
    DCM defines components), normed and rotated; and the raw ones collected at ``at``."""
    B, T, _ = x.shape
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = qkv_projections(cfg, p, x)
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q = iv_lib.apply(q, "q", layer_iv, call.where)
    k = iv_lib.apply(k, "k", layer_iv, call.where)
    v = iv_lib.apply(v, "v", layer_iv, call.where)
    acts = {"q": _gather(q, call.at), "k": _gather(k, call.at), "v": _gather(v, call.at)} if call.collect else {}
    eps = cfg.rms_norm_eps
    if cfg.qk_norm == "head":
        q = rms_norm(q, p["q_norm"], eps, cfg.norm_plus_one)
        k = rms_norm(k, p["k_norm"], eps, cfg.norm_plus_one)
    elif cfg.qk_norm == "full":  # olmo2: one norm over the whole projection
        q = rms_norm(q.reshape(B, T, H * Dh), p["q_norm"].reshape(-1), eps, False).reshape(B, T, H, Dh)
        k = rms_norm(k.reshape(B, T, KV * Dh), p["k_norm"].reshape(-1), eps, False).reshape(B, T, KV, Dh)
    q = _name(apply_rope(q, cos, sin), "qkv")
    k = _name(apply_rope(k, cos, sin), "qkv")
    return q, k, _name(v, "qkv"), acts


def _attention(cfg, p, x, call: CallConsts, mode: AttentionMode, sliding, cos, sin, layer_iv):
    """One attention sublayer: (output, what ``mode`` hands back for the cache, activations)."""
    q, k, v, acts = _qkv(cfg, p, x, call, cos, sin, layer_iv)
    out, new_kv = mode.attend(cfg, q, k, v, call.positions, sliding, call.index_causal)
    out = out.astype(x.dtype)
    out = jnp.einsum("bthd,hdm->btm", out, p["o"], precision=precision.of(out, p["o"]))
    if cfg.o_bias:
        out = out + p["o_bias"]
    return _name(out, "block_out"), new_kv, acts


def _mlp(cfg, p, x, call: CallConsts, layer_iv):
    g, u = gate_up_projections(p, x)
    if cfg.mlp_bias:
        g, u = g + p["gate_bias"], u + p["up_bias"]
    g, u = _name(g, "mlp_in"), _name(u, "mlp_in")
    h = activation(cfg.hidden_act, g) * u
    h = iv_lib.apply(h, "mlp", layer_iv, call.where)
    out = matmul(h, p["down"])
    if cfg.mlp_bias:
        out = out + p["down_bias"]
    return _name(out, "block_out"), ({"mlp": _gather(h, call.at)} if call.collect else {})


def _block(cfg, call: CallConsts, x, xs):
    """One decoder layer. xs = (layer params, sliding flag, layer intervention, mode);
    returns (x, (activations, what the mode hands back for the cache))."""
    lp, is_sliding, layer_iv, mode = xs
    cos, sin = call.rope(is_sliding)
    eps, plus = cfg.rms_norm_eps, cfg.norm_plus_one
    h = rms_norm(x, lp["attn_norm"], eps, plus) if cfg.pre_attn_norm else x
    a, kv_layer, acts = _attention(cfg, lp["attn"], h, call, mode, is_sliding, cos, sin, layer_iv)
    if cfg.post_attn_norm:
        a = rms_norm(a, lp["post_attn_norm"], eps, plus)
    x = x + a
    h = rms_norm(x, lp["mlp_norm"], eps, plus) if cfg.pre_mlp_norm else x
    m, macts = _mlp(cfg, lp["mlp"], h, call, layer_iv)
    if cfg.post_mlp_norm:
        m = rms_norm(m, lp["post_mlp_norm"], eps, plus)
    x = x + m
    if call.collect:
        acts = {**acts, **macts, "resid": _gather(x, call.at)}
    return x, (acts, kv_layer)


def _scan_own(block, layers, x, sliding, layer_ivs, mode: OwnKeys):
    """No cache (or an empty one): one compiled block scanned over the stacked layers."""
    x, (acts, kv) = jax.lax.scan(lambda x, xs: block(x, (*xs, mode)), x, (layers, sliding, layer_ivs))
    kvs = None if kv is None else [(kv[0][i], kv[1][i]) for i in range(len(sliding))]
    return x, acts, kvs


def _scan_write(block, layers, x, sliding, layer_ivs, cache: KVCache, k_pos_all):
    """Many tokens into a cache (scoring after a prefix): compute-bound, so a scan over
    the buffers stacked for the call; the copies cost little next to the work."""

    def body(x, xs):
        lp, is_sliding, liv, kc, vc = xs
        return block(x, (lp, is_sliding, liv, WriteCache(kc, vc, cache.index, k_pos_all)))

    x, (acts, (ks, vs)) = jax.lax.scan(body, x, (layers, sliding, layer_ivs, jnp.stack(cache.k), jnp.stack(cache.v)))
    return x, acts, list(zip(ks, vs))


def _scan_read(block, layers, x, sliding, layer_ivs, cache: KVCache, k_pos_new):
    """A few tokens on stacked weights (DCM's steps): one compiled block scanned over the
    layers, each reading its slice of the weights and of the cache (stacked once by the
    caller, ``KVCache.stacked``, or here). A step moves those copies too, but compiles
    one layer instead of all of them: for a few hundred steps, far less time in all."""

    def body(x, xs):
        lp, is_sliding, liv, kc, vc = xs
        return block(x, (lp, is_sliding, liv, ReadCache(kc, vc, cache.pos, k_pos_new)))

    stacked = cache.stacked()
    x, (acts, kv) = jax.lax.scan(body, x, (layers, sliding, layer_ivs, stacked.k, stacked.v))
    return x, acts, [(kv[0][i], kv[1][i]) for i in range(len(sliding))]


def _unrolled(block, layers, x, sliding, layer_ivs, use: CacheUse, cache: KVCache | None, pos: Positions):
    """The layers unrolled, each reading its own buffers: inside a scan XLA copies every
    layer's weights and cache out of the stacked arrays before each matmul (what a
    memory-bound call of a few tokens, or one on per-layer weights, must avoid)."""
    ys = []
    for i, lp in enumerate(layer_list(layers)):
        liv = None if layer_ivs is None else jax.tree.map(lambda a, i=i: a[i], layer_ivs)
        x, y = block(x, (lp, sliding[i], liv, layer_mode(use, cache, i, pos.k_new, pos.k_all)))
        ys.append(y)
    acts = jax.tree.map(lambda *a: jnp.stack(a), *[y[0] for y in ys])
    return x, acts, (None if cache is None else [y[1] for y in ys])


def _layers(cfg, layers, x, call: CallConsts, use: CacheUse, cache, pos: Positions, layer_ivs, remat):
    """Every layer: (x, stacked activations, per layer what its mode hands back: this
    call's (k, v) for READ and FRESH, the whole written buffers for WRITE)."""
    block = functools.partial(_block, cfg, call)
    if remat:
        block = jax.checkpoint(block, policy=remat_policy(remat))
    sliding = jnp.asarray(np.array(cfg.sliding_layers, bool))
    if is_per_layer(layers):
        return _unrolled(block, layers, x, sliding, layer_ivs, use, cache, pos)
    if use is CacheUse.READ:  # per-layer weights (unstack_layers) unroll instead: faster steps
        return _scan_read(block, layers, x, sliding, layer_ivs, cache, pos.k_new)
    if use is CacheUse.WRITE:
        return _scan_write(block, layers, x, sliding, layer_ivs, cache, pos.k_all)
    return _scan_own(block, layers, x, sliding, layer_ivs, layer_mode(use, None, 0, pos.k_new, pos.k_all))


def _cache_after(cache: KVCache, use: CacheUse, kvs, pos: Positions, T: int) -> KVCache:
    """The cache after the call: READ and FRESH write this call's keys/values (B, T, KV,
    Dh) into their slots, in place; WRITE's layers returned their written buffers."""
    if use in (CacheUse.READ, CacheUse.FRESH) and per_row(cache.index):
        kvs = [tuple(write_rows(full, new.transpose(0, 2, 1, 3).astype(full.dtype), cache.index, 2)
                     for full, new in zip((cache.k[i], cache.v[i]), kv)) for i, kv in enumerate(kvs)]
    elif use in (CacheUse.READ, CacheUse.FRESH):
        kvs = [tuple(jax.lax.dynamic_update_slice(full, new.transpose(0, 2, 1, 3).astype(full.dtype),
                                                  (0, 0, cache.index, 0))
                     for full, new in zip((cache.k[i], cache.v[i]), kv)) for i, kv in enumerate(kvs)]
    return KVCache(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs), pos=pos.k_all, index=cache.index + T)


def _embed(cfg, params, tokens):
    x = params["embed"][tokens]
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, params["embed"].dtype)
    return x


def _logits(cfg, params, x, at, vocab, final_softcap: bool):
    """Final norm and output matmul at ``at`` (only the ``vocab`` columns when given)."""
    h = rms_norm(_gather(x, at), params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    if vocab is None:
        head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    else:
        head = params["embed"][vocab].T if cfg.tie_word_embeddings else params["lm_head"][:, vocab]
    head = head.astype(params["embed"].dtype)
    logits = jnp.einsum("bpd,dv->bpv", h, head, preferred_element_type=jnp.float32, precision=precision.of(h, head))
    return softcap(logits, cfg.final_logit_softcap) if final_softcap else logits


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
    cache: when given, this call's keys/values are written at ``cache.index`` (one slot
        for all rows, or a (B,) slot per row) and attention covers everything the cache
        holds; the updated cache is returned.
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
    ``cfg.tuning`` holds the performance switches (see ``config.Tuning``).
    """
    T = tokens.shape[1]
    use = cache_use(cache, T, write_first, cfg.tuning)
    pos = _positions(tokens, mask, positions, cache)
    x = _embed(cfg, params, tokens)
    index_causal = positions is None and use in (CacheUse.NONE, CacheUse.FRESH)
    call = _call_consts(cfg, pos.q, at, intervention, collect, index_causal)
    layer_ivs = intervention.layer_slices() if intervention is not None else None
    y, acts, kvs = _layers(cfg, params["layers"], x, call, use, cache, pos, layer_ivs, remat)
    new_cache = None if cache is None else _cache_after(cache, use, kvs, pos, T)
    logits = _logits(cfg, params, y, at, vocab, final_softcap)
    if collect:
        acts["resid"] = jnp.concatenate([_gather(x, at)[None], acts["resid"]], axis=0)
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

    def with_tuning(self, **changes) -> "Transformer":
        """The same weights with ``config.tuning`` fields changed (see ``config.Tuning``)."""
        tuning = dataclasses.replace(self.config.tuning, **changes)
        return Transformer(self.config.replace(tuning=tuning), rngs=nnx.Rngs(0), params=self.params())

    @classmethod
    def abstract(cls, config: ModelConfig, dtype=jnp.float32) -> "Transformer":
        """A module of ShapeDtypeStructs: the shapes without allocating anything."""
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))

    def __call__(self, tokens: jax.Array, **kw) -> ForwardOutput:
        return forward(self.config, self.params(), tokens, **kw)

    @property
    def dtype(self):
        return self.embed[...].dtype
