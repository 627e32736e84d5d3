"""Parameters from a GGUF file's bytes: quantized tensors expanded on the device.

Each stacked parameter (all layers' q, all layers' down...) is one small XLA program: the
layers' raw blocks go in as they lie in the file (a memory map: the disk is read once,
no Python per weight), are dequantized (``dequant``), fixed up, put in our layout and
stacked, in the target dtype. Layers stored in different formats (Q4_K_M mixes Q4_K,
Q5_0, Q6_K within one parameter) are decoded group by group in the same program.
Float32 tensors (norms, biases) and formats ``dequant`` lacks are assembled on the host.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.transformer import Params
from cca_jax.weights import assemble as assemble_lib
from cca_jax.weights import dequant, mapping
from cca_jax.weights import gguf as gguf_lib


def _ours(x, transform: str, shape: tuple[int, ...]):
    """``mapping.to_ours`` over a leading axis of layers."""
    if transform in ("proj", "out_proj", "transpose"):
        x = jnp.swapaxes(x, -1, -2)
    return x.reshape((x.shape[0],) + shape)


@functools.partial(jax.jit, static_argnames=("groups", "order", "transform", "shape", "dtype", "stacked"))
def _build(raws, *, groups, order, transform, shape, dtype, stacked):
    """One parameter. raws: per group, its tensors' bytes; groups: (format, hf_shape,
    fix-up, heads) each; order: where each stacked row comes from in the groups' concat."""
    parts = []
    for rs, (fmt, hf_shape, fix, heads) in zip(raws, groups):
        x = dequant.dequantize(jnp.stack(rs), fmt, (len(rs),) + hf_shape)
        parts.append(_ours(gguf_lib.undo_fixup(x, fix, heads), transform, shape).astype(dtype))
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    if order != tuple(range(len(order))):
        y = y[np.asarray(order)]
    return y if stacked else y[0]


def _host_tensor(rec: dict, raw: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One tensor on the host (float32, HF order): a float view, or gguf's dequantizer."""
    import gguf

    fmt, shape = rec["format"], tuple(rec["shape"])
    if fmt == "F32":
        x = raw.view(np.float32).reshape(shape)
    elif fmt == "F16":
        x = raw.view(np.float16).reshape(shape).astype(np.float32)
    else:
        qtype = gguf.GGMLQuantizationType[fmt]
        x = gguf.quants.dequantize(raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1), qtype)
        x = np.asarray(x, np.float32).reshape(shape)
    return gguf_lib.undo_fixup(x[None], rec["fixup"], gguf_lib.fixup_heads(cfg, rec["fixup"]))[0]


def _on_device(recs: list[dict]) -> bool:
    """Quantized or half-precision tensors are expanded by the device; float32 ones (norms,
    biases: small) are only copied, on the host."""
    return all(r["format"] in dequant.BLOCKS for r in recs) and any(r["format"] != "F32" for r in recs)


def assemble(cfg: ModelConfig, records: list[dict], path: Path, dtype, source: str, put=None) -> Params:
    """The parameter dict from ``records`` (``gguf.records``) of the file at ``path``.

    put: places a host-assembled leaf (default ``jax.device_put``); with ``put`` given (a
    mesh) every leaf is assembled on the host and placed by it, so no device ever holds
    more than its shards. Call ``assemble.check`` on the records' shapes first."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = data.shape[0]
    table = assemble_lib.name_table(cfg)
    by_path: dict[tuple[str, ...], list[tuple[mapping.Entry, dict]]] = defaultdict(list)
    for rec in records:
        e = assemble_lib.entry(table, cfg, rec["name"], source)
        if e is None:
            continue
        if rec["offset"] < 0 or rec["offset"] + rec["nbytes"] > size:
            raise CCAError(f"{source}: tensor {rec['name']!r} lies past the end of the file: the file is truncated; "
                           f"download or copy it again")
        by_path[e.path].append((e, rec))

    def raw(rec):
        return data[rec["offset"]:rec["offset"] + rec["nbytes"]]

    ndt = assemble_lib.np_dtype(dtype)
    out: Params = {}
    for p, items in by_path.items():
        items.sort(key=lambda er: -1 if er[0].layer is None else er[0].layer)
        e0 = items[0][0]
        recs = [r for _, r in items]
        if put is None and _on_device(recs):
            grouped: dict[tuple, list[int]] = defaultdict(list)
            for i, r in enumerate(recs):
                grouped[(r["format"], tuple(r["shape"]), r["fixup"], gguf_lib.fixup_heads(cfg, r["fixup"]))].append(i)
            groups = tuple(grouped)
            concat = [i for g in groups for i in grouped[g]]
            order = tuple(int(k) for k in np.argsort(concat))
            raws = tuple(tuple(jax.device_put(np.asarray(raw(recs[i]))) for i in grouped[g]) for g in groups)
            leaf = _build(raws, groups=groups, order=order, transform=e0.transform, shape=e0.shape,
                          dtype=jnp.dtype(dtype), stacked=e0.layer is not None)
        else:
            host = [mapping.to_ours(_host_tensor(r, raw(r), cfg), e).astype(ndt, copy=False) for e, r in items]
            x = np.stack(host) if e0.layer is not None else host[0]
            leaf = (put or (lambda _p, a: jax.device_put(a)))(p, x)
        node = out
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = leaf
    return out
