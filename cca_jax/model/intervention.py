"""Intervention: per-component scale or replace of q/k/v head outputs and MLP neurons.

Components are the circuit's units: each query head, each key/value head and each MLP
neuron (the input of down_proj). Head activations are the raw projection outputs, before
any q/k norm and before rope. Arrays carry a leading layer axis and an optional batch axis:

    scale    {"q": (L,[B,]H), "k": (L,[B,]KV), "v": (L,[B,]KV), "mlp": (L,[B,]F)}
    replace  {"q": (L,[B,]H,Dh), "k"/"v": (L,[B,]KV,Dh), "mlp": (L,[B,]F)}  values
    replace_mask  shaped like ``scale`` (bool): which components take the replacement
    where    (B, T) bool: token positions (of this call's tokens) the intervention acts on

    add      shaped like ``replace``: added last (a zero ``add`` gives activation gradients)

Any key may be missing (that component type is left alone). At a selected position a
component's activation becomes ``where(replace_mask, replace, act) * scale + add``.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import struct

COMPONENTS = ("q", "k", "v", "mlp")


@struct.dataclass
class Intervention:
    where: jax.Array
    scale: Mapping[str, jax.Array] | None = None
    replace: Mapping[str, jax.Array] | None = None
    replace_mask: Mapping[str, jax.Array] | None = None
    add: Mapping[str, jax.Array] | None = None  # shaped like ``replace``; added after scale

    @classmethod
    def at_last(cls, lengths: jax.Array, seq_len: int, **kw) -> "Intervention":
        """Act at position ``lengths - 1`` of each row (right-padded rows of ``seq_len``)."""
        where = jnp.arange(seq_len)[None, :] == (jnp.asarray(lengths)[:, None] - 1)
        return cls(where=where, **kw)

    def layer_slices(self) -> dict:
        """The per-layer arrays, to be scanned over with the layer parameters."""
        out = {}
        for name in ("scale", "replace", "replace_mask", "add"):
            d = getattr(self, name)
            if d:
                out[name] = {k: v for k, v in d.items()}
        return out


def _per_example(x: jax.Array, batch: int, unit_shape: tuple[int, ...]) -> jax.Array:
    """A layer's slice ([B,] units...) -> (B, units...)."""
    return jnp.broadcast_to(x, (batch,) + unit_shape)


def apply(act: jax.Array, name: str, layer_iv: dict | None, where: jax.Array | None) -> jax.Array:
    """Apply one layer's intervention to ``act``: (B,T,N,Dh) for heads, (B,T,F) for mlp."""
    if layer_iv is None or where is None:
        return act
    b = act.shape[0]
    head = act.ndim == 4
    units = act.shape[2:3]
    sel = where[:, :, None, None] if head else where[:, :, None]
    rep = layer_iv.get("replace", {}).get(name)
    if rep is not None:
        rmask = layer_iv.get("replace_mask", {}).get(name)
        rmask = jnp.ones(units, bool) if rmask is None else rmask
        rmask = _per_example(rmask, b, units)[:, None]
        rep = _per_example(rep, b, act.shape[2:])[:, None].astype(act.dtype)
        if head:
            rmask = rmask[..., None]
        act = jnp.where(sel & rmask, rep, act)
    scale = layer_iv.get("scale", {}).get(name)
    if scale is not None:
        s = _per_example(scale, b, units)[:, None]
        if head:
            s = s[..., None]
        act = jnp.where(sel, act * s.astype(act.dtype), act)
    add = layer_iv.get("add", {}).get(name)
    if add is not None:  # a zero ``add`` makes d(output)/d(activation) a gradient w.r.t. ``add``
        act = jnp.where(sel, act + _per_example(add, b, act.shape[2:])[:, None].astype(act.dtype), act)
    return act
