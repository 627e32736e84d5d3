"""GGML block formats decoded by XLA, on the device that will hold the weights.

A GGUF tensor's bytes go to the device as they are on disk (4-8 bits a weight) and are
expanded there, so a load moves the file's bytes once and does no per-weight work in
Python or numpy. The layouts are GGML's (``ggml-common.h``); results equal the ``gguf``
package's numpy ``dequantize`` (tests/test_dequant.py compares every format here on
random blocks). Formats not listed in ``BLOCKS`` are dequantized on the host as before.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# format -> (weights per block, bytes per block); GGML's sizes.
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


def _f16(b):
    """(..., 2) little-endian bytes -> float32 (GGML's block scales)."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def _u32(b):
    return lax.bitcast_convert_type(b, jnp.uint32)


def _nibbles(qs, group: int):
    """Bytes (n, k*group) -> (n, 2k, group) 4-bit values: each run of ``group`` bytes gives
    its low nibbles, then its high ones (GGML's order)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> jnp.array([0, 4], jnp.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1, group)


def _bits(qh, count: int):
    """A little-endian uint32 per block -> its low ``count`` bits, bit i for weight i."""
    return ((_u32(qh)[:, None] >> jnp.arange(count, dtype=jnp.uint32)) & 1).astype(jnp.uint8)


def _k_scales(scales):
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per block."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _q4_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).astype(jnp.int8) - 8
    return d[:, None] * q.astype(jnp.float32)


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).astype(jnp.float32)
    return d[:, None] * q + m[:, None]


def _q5(b, off: int):
    ql = _nibbles(b[:, off + 4:], 16).reshape(b.shape[0], 32)
    return ql | (_bits(b[:, off:off + 4], 32) << 4)


def _q5_0(b):
    q = _q5(b, 2).astype(jnp.int8) - 16
    return _f16(b[:, :2])[:, None] * q.astype(jnp.float32)


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d[:, None] * _q5(b, 4).astype(jnp.float32) + m[:, None]


def _q8_0(b):
    x = lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return x * _f16(b[:, :2])[:, None]


def _qk_scaled(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2])[:, None] * sc).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4])[:, None] * mn).reshape(n, 8, 1)
    return d, dm


def _q4_k(b):
    d, dm = _qk_scaled(b)
    q = _nibbles(b[:, 16:], 32).astype(jnp.float32)
    return (d * q - dm).reshape(b.shape[0], 256)


def _q5_k(b):
    n = b.shape[0]
    d, dm = _qk_scaled(b)
    ql = _nibbles(b[:, 48:], 32)
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)
    qh = (qh & 1).reshape(n, 8, 32)
    return (d * (ql | (qh << 4)).astype(jnp.float32) - dm).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    scales = lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[:, 208:210])[:, None] * scales).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(jnp.int8) - 32
    return (d * q.reshape(n, 16, 16).astype(jnp.float32)).reshape(n, 256)


_DECODE = {
    "F32": lambda b: lax.bitcast_convert_type(b, jnp.float32),
    "F16": _f16,
    "BF16": lambda b: lax.bitcast_convert_type(
        lax.bitcast_convert_type(b, jnp.uint16).astype(jnp.uint32) << 16, jnp.float32),
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw, fmt: str, shape: tuple[int, ...]):
    """A tensor's raw bytes (uint8, any shape; its blocks in file order) -> float32 of
    ``shape`` (numpy order: GGUF's dimensions reversed). Traceable: call it under ``jit``."""
    size = BLOCKS[fmt][1]
    blocks = raw.reshape(-1, size)  # plain floats: one "block" of ``size`` bytes a weight
    return _DECODE[fmt](blocks).reshape(shape)
