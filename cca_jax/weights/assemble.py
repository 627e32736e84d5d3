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


def np_dtype(dtype) -> np.dtype:
    return np.dtype(jax.numpy.dtype(dtype))


def hf_shape(e: mapping.Entry) -> tuple[int, ...]:
    """The exact shape of ``e``'s tensor in a checkpoint (what ``mapping.to_hf`` makes of
    ours; GGUF readers yield the same order): a transposed matrix of the right size is
    refused, not silently reshaped."""
    s = e.shape
    if e.transform == "proj":  # ours (D, N, Dh), HF (N*Dh, D)
        return (int(np.prod(s[1:])), s[0])
    if e.transform == "out_proj":  # ours (H, Dh, D), HF (D, H*Dh)
        return (s[-1], int(np.prod(s[:-1])))
    if e.transform == "transpose":
        return tuple(reversed(s))
    if e.transform == "reshape":
        return (int(np.prod(s)),)
    return tuple(s)


def name_table(cfg: ModelConfig) -> dict[str, mapping.Entry]:
    return {e.hf_name: e for e in mapping.entries(cfg)}


def entry(table, cfg: ModelConfig, raw_name: str, source: str) -> mapping.Entry | None:
    """The table row of a checkpoint tensor; None for tensors the model does not use."""
    name = mapping.canonical_name(raw_name)
    if name in table:
        return table[name]
    if mapping.is_ignored(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return None
    raise CCAError(
        f"{source}: tensor {raw_name!r} is not part of a {cfg.family} model as configured "
        f"(unknown tensor: wrong architecture in the config, or an unsupported variant)"
    )


def _check_new(e: mapping.Entry, raw_name: str, shape, seen: set, source: str) -> None:
    if e.hf_name in seen:
        raise CCAError(f"{source}: tensor {raw_name!r} appears twice")
    seen.add(e.hf_name)
    found, want = tuple(int(n) for n in shape), hf_shape(e)
    if found != want:
        raise CCAError(
            f"{source}: tensor {raw_name!r} has shape {found}, expected {want}: "
            f"the weights do not match the config (a transposed or foreign tensor)"
        )


def _check_complete(table, seen: set, source: str) -> None:
    missing = sorted(set(table) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CCAError(f"{source}: missing tensors {', '.join(missing[:3])}{more}: incomplete or mismatched checkpoint")


def check(cfg: ModelConfig, shapes: Iterable[tuple[str, tuple[int, ...]]], source: str) -> None:
    """Check a checkpoint's (name, shape) list against ``cfg`` before anything is read or
    allocated: every tensor known, none twice, each of its exact shape, none missing. A
    config that claims more than the files hold (1e4 layers) fails here, not in malloc."""
    table, seen = name_table(cfg), set()
    for raw_name, shape in shapes:
        e = entry(table, cfg, raw_name, source)
        if e is not None:
            _check_new(e, raw_name, shape, seen, source)
    _check_complete(table, seen, source)


def assemble(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype,
    source: str,
    put=None,
) -> Params:
    """Build the parameter dict from HF-named tensors.

    put: called on each finished numpy leaf with its path (to place it on devices, maybe
    sharded); default ``jax.device_put``. Unknown, repeated, missing or misshapen tensors
    are errors (call ``check`` first to find them before reading anything).
    """
    put = put or (lambda path, x: jax.device_put(x))
    ndt = np_dtype(dtype)
    table = name_table(cfg)
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], int] = {}
    need: dict[tuple[str, ...], int] = {}
    for e in table.values():
        need[e.path] = need.get(e.path, 0) + 1
    seen: set = set()
    out: Params = {}

    def finish(path):
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = put(path, buffers.pop(path))

    for raw_name, x in tensors:
        e = entry(table, cfg, raw_name, source)
        if e is None:
            continue
        _check_new(e, raw_name, x.shape, seen, source)
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
    _check_complete(table, seen, source)
    return out
