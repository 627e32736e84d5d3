"""Parameter layouts: their shapes, random initialisation, and the two forms of the layers.

Stacked (``param_shapes``), so the blocks run under ``lax.scan``::

    embed (V, D)                        final_norm (D,)       lm_head (D, V) unless tied
    layers/attn_norm, post_attn_norm, mlp_norm, post_mlp_norm (L, D)   (as the family has them)
    layers/attn/q (L, D, H, Dh)   k, v (L, D, KV, Dh)   o (L, H, Dh, D)
    layers/attn/q_bias (L, H, Dh) k_bias, v_bias (L, KV, Dh)  o_bias (L, D)
    layers/attn/q_norm, k_norm   (L, Dh) for "head" q/k norm, (L, H, Dh) / (L, KV, Dh) for "full"
    layers/mlp/gate, up (L, D, F)  down (L, F, D)   gate_bias, up_bias (L, F)  down_bias (L, D)

Per layer (``layer_list``: a tuple of the same dicts sliced per layer; ``unstack_layers``:
the same with q/k/v merged into ``qkv`` (D, H + 2 KV, Dh) and gate/up into ``gate_up``
(D, 2F)). ``qkv_projections`` and ``gate_up_projections`` are what reads either form.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cca_jax import precision
from cca_jax.config import ModelConfig

Params = dict[str, Any]

MERGED_QKV, MERGED_GATE_UP = "qkv", "gate_up"  # the merged per-layer leaves (unstack_layers)


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as nested dicts (the stacked layout above)."""
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


def is_per_layer(layers) -> bool:
    """Whether ``layers`` is a tuple of per-layer dicts (else stacked (L, ...) arrays)."""
    return isinstance(layers, (list, tuple))


def layer_list(layers: Params) -> tuple[Params, ...]:
    """Stacked ``layers`` (L, ...) as a tuple of per-layer slices (inside jit: the layers
    then run unrolled, and gradients flow back into the stacked arrays)."""
    if is_per_layer(layers):
        return tuple(layers)
    n = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def unstack_layers(params: Params) -> Params:
    """The same parameters with ``layers`` as a tuple of per-layer dicts (a copy of the
    layer weights). ``forward`` accepts either form; memory-bound calls (decoding, the
    DCM and patching steps) run faster on this one because each matmul then reads its
    weight buffer in place instead of a slice copied out of the stacked array."""
    if is_per_layer(params["layers"]):
        return params
    return {**params, "layers": _split_layers(params["layers"])}


@jax.jit
def _split_layers(layers):
    out = []
    for lp in layer_list(layers):
        # gate and up side by side: XLA otherwise merges the two matmuls by concatenating
        # the weights anew on every call (a quarter of a decode step, measured)
        mlp = {k: v for k, v in lp["mlp"].items() if k not in ("gate", "up")}
        mlp[MERGED_GATE_UP] = jnp.concatenate([lp["mlp"]["gate"], lp["mlp"]["up"]], axis=-1)
        # likewise q, k and v (XLA concatenated their weights on every decode step)
        attn = {k: v for k, v in lp["attn"].items() if k not in ("q", "k", "v")}
        attn[MERGED_QKV] = jnp.concatenate([lp["attn"]["q"], lp["attn"]["k"], lp["attn"]["v"]], axis=1)
        out.append({**lp, "attn": attn, "mlp": mlp})
    return tuple(out)


def qkv_projections(cfg: ModelConfig, p: Params, x: jax.Array):
    """A layer's q (B,T,H,Dh), k, v (B,T,KV,Dh) from x (B,T,D), either weight form."""
    if MERGED_QKV in p:  # one matmul over [q | k | v] heads
        H, KV = cfg.num_heads, cfg.num_kv_heads
        w = p[MERGED_QKV]
        return jnp.split(jnp.einsum("btd,dhk->bthk", x, w, precision=precision.of(x, w)), [H, H + KV], axis=2)
    return tuple(jnp.einsum("btd,dhk->bthk", x, p[n], precision=precision.of(x, p[n])) for n in ("q", "k", "v"))


def gate_up_projections(p: Params, x: jax.Array):
    """A layer's MLP gate and up outputs (B,T,F) from x (B,T,D), either weight form."""
    if MERGED_GATE_UP in p:  # one matmul over [gate | up]
        return jnp.split(matmul(x, p[MERGED_GATE_UP]), 2, axis=-1)
    return matmul(x, p["gate"]), matmul(x, p["up"])


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w at the operands' precision (float32: full float32, ``precision.of``)."""
    return jnp.matmul(x, w, precision=precision.of(x, w))
