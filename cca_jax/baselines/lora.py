"""LoRA on the stacked per-component weight layout (SPEC 5 baseline).

Every target weight keeps its layer axis first; its remaining axes split into input axes
(contracted with the activation) and output axes::

    q (L, D, H, Dh)   k, v (L, D, KV, Dh)   o (L, H, Dh, D)
    gate, up (L, D, F)   down (L, F, D)

An adapter is ``a`` (L, in..., r) and ``b`` (L, r, out...): ``b`` starts at zero (the
model is unchanged at init), ``a`` is PEFT's default (kaiming-uniform, bound
1/sqrt(fan_in)). The effective weight is W + (alpha/r) * a @ b reshaped to the leaf's
axes, computed in float32 and rounded once to the weight's dtype (``apply``), so the
forward pass needs no LoRA branch and ``merge`` gives the weights to evaluate and export.

Dropout (training only) acts on the adapter's input path. Because the adapter is merged
into the weight for each forward, the dropout mask is drawn per input feature (a row of
``a``) and shared by the tokens of one micro-batch, instead of per token as PEFT does:
``(x * m) @ a == x @ (m[:, None] * a)`` for one mask ``m``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from cca_jax.errors import CCAError

# target -> (group, leaf, number of input axes after the layer axis)
TARGETS = {
    "q": ("attn", "q", 1), "k": ("attn", "k", 1), "v": ("attn", "v", 1), "o": ("attn", "o", 2),
    "gate": ("mlp", "gate", 1), "up": ("mlp", "up", 1), "down": ("mlp", "down", 1),
}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise CCAError(f"lora_targets {list(targets)}: choose one or more of {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise CCAError(f"lora_targets {list(targets)}: repeated target")
    return tuple(targets)


def _leaf(params, target):
    group, name, _ = TARGETS[target]
    return params["layers"][group][name]


def _split_shape(shape, n_in):
    """(L, in..., out...) -> (L, in-axes, out-axes)."""
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def init(params, targets: Sequence[str], r: int, key: jax.Array) -> dict:
    """{target: {"a": (L, in..., r), "b": (L, r, out...)}} in float32; b = 0."""
    targets = check_targets(targets)
    if r < 1:
        raise CCAError(f"lora_r must be >= 1, got {r}")
    out = {}
    for t, k in zip(targets, jax.random.split(key, len(targets))):
        w = _leaf(params, t)
        L, ins, outs = _split_shape(w.shape, TARGETS[t][2])
        bound = 1.0 / math.sqrt(math.prod(ins))
        out[t] = {"a": jax.random.uniform(k, (L, *ins, r), jnp.float32, -bound, bound),
                  "b": jnp.zeros((L, r, *outs), jnp.float32)}
    return out


def delta(adapter: dict, scale: float) -> jax.Array:
    """scale * a @ b with the leaf's axes (L, in..., out...), float32."""
    a, b = adapter["a"], adapter["b"]
    L, r = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    d = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                   b.reshape(L, r, -1).astype(jnp.float32))
    return (scale * d).reshape(L, *ins, *outs)


def apply(params, adapters: dict, scale: float, *, dropout: float = 0.0, key: jax.Array | None = None):
    """``params`` with every adapted leaf replaced by W + delta (in W's dtype); with
    ``dropout`` > 0 and a ``key``, rows of each ``a`` (input features) are dropped and the
    rest scaled by 1/(1 - dropout). Differentiable in ``adapters``."""
    layers = dict(params["layers"])
    groups = {g: dict(layers[g]) for g in ("attn", "mlp")}
    use_dropout = dropout > 0.0 and key is not None
    keys = jax.random.split(key, len(adapters)) if use_dropout else [None] * len(adapters)
    for (t, ad), k in zip(sorted(adapters.items()), keys):
        group, name, _ = TARGETS[t]
        if use_dropout:
            keep = jax.random.bernoulli(k, 1.0 - dropout, ad["a"].shape[:-1])
            ad = {"a": ad["a"] * (keep[..., None] / (1.0 - dropout)), "b": ad["b"]}
        w = groups[group][name]
        groups[group][name] = (w.astype(jnp.float32) + delta(ad, scale)).astype(w.dtype)
    layers.update(groups)
    return {**params, "layers": layers}


def merge(params, adapters: dict, scale: float):
    """The merged weights (for evaluation and export)."""
    return apply(params, adapters, scale)


def num_params(adapters: dict) -> int:
    return int(sum(x.size for x in jax.tree.leaves(adapters)))


def target_parameters(params, targets: Sequence[str]) -> int:
    """How many model parameters the adapters can change (the targeted leaves' size)."""
    return int(sum(_leaf(params, t).size for t in check_targets(targets)))
