"""The device dequantizers (weights/dequant.py) against the gguf package's numpy ones."""

import gguf
import jax
import numpy as np
import pytest

from cca_jax.weights import dequant

# byte ranges of each format's float16 block scales (random bytes there could be NaN/inf)
_SCALES = {"Q4_0": [(0, 2)], "Q4_1": [(0, 2), (2, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 2), (2, 4)],
           "Q8_0": [(0, 2)], "Q4_K": [(0, 2), (2, 4)], "Q5_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}


def _blocks(fmt, rows, per_row, rng):
    per_block, size = dequant.BLOCKS[fmt]
    raw = rng.integers(0, 256, (rows, per_row // per_block * size), dtype=np.uint8)
    view = raw.reshape(-1, size)
    for a, b in _SCALES.get(fmt, []):
        view[:, a:b] = rng.normal(0, 0.05, (view.shape[0], 1)).astype(np.float16).view(np.uint8)
    if fmt in ("F32", "F16", "BF16"):  # finite values: NaN payloads are not the point
        dt = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[fmt]
        vals = rng.normal(0, 1, raw.size // np.dtype(dt).itemsize * (2 if fmt == "BF16" else 1))
        if fmt == "BF16":
            raw = (vals.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            raw = vals.astype(dt).view(np.uint8)
        raw = raw.reshape(rows, -1)
    return raw


@pytest.mark.parametrize("fmt", sorted(dequant.BLOCKS))
def test_device_dequantize_equals_gguf(fmt):
    rng = np.random.default_rng(sorted(dequant.BLOCKS).index(fmt))
    rows, cols = 3, 512
    raw = _blocks(fmt, rows, cols, rng)
    qtype = gguf.GGMLQuantizationType[fmt]
    host = raw.view({"F32": np.float32, "F16": np.float16}.get(fmt, np.uint8))
    want = gguf.quants.dequantize(host, qtype).astype(np.float32)
    got = jax.jit(dequant.dequantize, static_argnums=(1, 2))(raw, fmt, (rows, cols))
    assert want.shape == (rows, cols) and np.isfinite(want).all()
    np.testing.assert_array_equal(np.asarray(got), want)
