"""Partition specs over a 2-axis (fsdp, tp) mesh.

Heads and neurons (the circuit's axes) are split over ``tp``; the model dimension over
``fsdp``. A dimension that does not divide by its mesh axis stays whole (replicated), so
any mesh works for any model, at worst with less splitting.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# parameter name -> axis names of its dimensions (layer axis included for stacked leaves)
_SPECS = {
    "embed": ("tp", "fsdp"),
    "lm_head": ("fsdp", "tp"),
    "final_norm": (None,),
    "q": (None, "fsdp", "tp", None),
    "k": (None, "fsdp", "tp", None),
    "v": (None, "fsdp", "tp", None),
    "o": (None, "tp", None, "fsdp"),
    "q_bias": (None, "tp", None),
    "k_bias": (None, "tp", None),
    "v_bias": (None, "tp", None),
    "o_bias": (None, None),
    "gate": (None, "fsdp", "tp"),
    "up": (None, "fsdp", "tp"),
    "down": (None, "tp", "fsdp"),
    "gate_bias": (None, "tp"),
    "up_bias": (None, "tp"),
    "down_bias": (None, None),
}


def make_mesh(fsdp: int = 1, tp: int | None = None, devices=None) -> Mesh:
    """A (fsdp, tp) mesh; tp defaults to the devices left after fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    tp = tp if tp is not None else len(devices) // fsdp
    if fsdp * tp != len(devices):
        from cca_jax.errors import CCAError

        raise CCAError(f"mesh fsdp={fsdp} x tp={tp} needs {fsdp * tp} devices, {len(devices)} available")
    return Mesh(np.array(devices).reshape(fsdp, tp), ("fsdp", "tp"))


def spec_for(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    names = _SPECS.get(path[-1])
    if names is None or len(names) != len(shape):  # norms and anything unlisted: replicated
        return P()
    axes = [n if n is not None and shape[i] % mesh.shape[n] == 0 else None for i, n in enumerate(names)]
    return P(*axes)


def param_shardings(params, mesh: Mesh):
    """A pytree of NamedSharding matching ``params`` (arrays or ShapeDtypeStructs)."""
    def one(path, x):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return NamedSharding(mesh, spec_for(keys, tuple(x.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh):
    return jax.device_put(params, param_shardings(params, mesh))
