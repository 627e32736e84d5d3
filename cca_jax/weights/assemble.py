"""Fill stacked parameter arrays from a stream of (HF name, tensor) pairs.

Shared by every reader (safetensors directories, GGUF): arrays are allocated once in the
target dtype and filled tensor by tensor, so host memory stays near one copy of the model.
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.transformer import Params
from cca_jax.weights import mapping


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jax.numpy.dtype(dtype))


def assemble(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype,
    source: str,
    put=None,
) -> Params:
    """Build the parameter dict from HF-named tensors.

    put: called on each finished numpy leaf with its path (to place it on devices, maybe
    sharded); default ``jax.device_put``. Unknown or missing tensors are errors.
    """
    put = put or (lambda path, x: jax.device_put(x))
    ndt = _np_dtype(dtype)
    table = {e.hf_name: e for e in mapping.entries(cfg)}
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], int] = {}
    need: dict[tuple[str, ...], int] = {}
    for e in table.values():
        need[e.path] = need.get(e.path, 0) + 1
    seen = set()
    out: Params = {}

    def finish(path):
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = put(path, buffers.pop(path))

    for raw_name, x in tensors:
        name = mapping.canonical_name(raw_name)
        if name not in table:
            if mapping.is_ignored(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise CCAError(
                f"{source}: tensor {raw_name!r} is not part of a {cfg.family} model as configured "
                f"(unknown tensor: wrong architecture in the config, or an unsupported variant)"
            )
        e = table[name]
        if name in seen:
            raise CCAError(f"{source}: tensor {raw_name!r} appears twice")
        seen.add(name)
        want = int(np.prod(e.shape))
        if x.size != want:
            raise CCAError(
                f"{source}: tensor {raw_name!r} has shape {tuple(x.shape)}, expected {want} values "
                f"for {'/'.join(e.path)} {e.shape}: the config does not match the weights"
            )
        y = mapping.to_ours(np.asarray(x), e).astype(ndt, copy=False)
        if e.layer is None:
            buffers[e.path] = y
        else:
            if e.path not in buffers:
                buffers[e.path] = np.empty((cfg.num_layers,) + e.shape, ndt)
            buffers[e.path][e.layer] = y
        filled[e.path] = filled.get(e.path, 0) + 1
        if filled[e.path] == need[e.path]:
            finish(e.path)
    missing = sorted(set(table) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CCAError(f"{source}: missing tensors {', '.join(missing[:3])}{more}: incomplete or mismatched checkpoint")
    return out
