"""A decode step's weight matmuls alone (batch 32, one token), as XLA compiles them, against
split-K forms: the contraction split into ``s`` slices that run as a batched matmul with
float32 partial sums, added afterwards. A (32 x K) @ (K x N) product with a small N has
few output tiles, so few thread blocks stream the weight; splitting K gives each slice its
own blocks. Each shape runs over 26 separate weight buffers (one per layer, as decoding
reads them); times are device time per matmul from a profiler trace (a call's own wall
time is mostly dispatch at these sizes), the split forms' additions included, with the
bandwidth that implies.

    python bench/decode_matmul_probe.py [--splits 1,2,4,8] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_top import load_kernels  # noqa: E402

# gemma-2-2b: (K, N) of each per-layer matmul of a decode step
SHAPES = {"qkv": (2304, 4096), "o": (2048, 2304), "gate_up": (2304, 18432), "down": (9216, 2304)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    L, M = 26, args.rows
    res = {"device": jax.devices()[0].device_kind}
    for name, (K, N) in SHAPES.items():
        ks = jax.random.split(jax.random.key(0), L + 1)
        ws = [jax.random.normal(k, (K, N), jnp.bfloat16) for k in ks[:L]]
        x = jax.random.normal(ks[-1], (M, K), jnp.bfloat16)
        ref = [(x.astype(jnp.float32) @ w.astype(jnp.float32)) for w in ws[:2]]
        for s in map(int, args.splits.split(",")):
            if K % s:
                continue

            def one(x, w, s=s):
                if s == 1:
                    return x @ w
                xs = x.reshape(M, s, K // s).transpose(1, 0, 2)
                part = jnp.einsum("sbk,skn->sbn", xs, w.reshape(s, K // s, N), preferred_element_type=jnp.float32)
                return part.sum(0).astype(x.dtype)

            f = jax.jit(lambda x, ws, one=one: [one(x, w) for w in ws])
            out = f(x, ws)
            err = max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - r) / (1 + jnp.abs(r)))) for o, r in zip(out, ref))
            t = _device_time(f, (x, ws), args.reps) / L
            res[f"{name}_split{s}_us"] = 1e6 * t
            res[f"{name}_split{s}_TBps"] = K * N * 2 / t / 1e12
            res[f"{name}_split{s}_relerr"] = err
            print(name, s, f"{1e6 * t:.1f} us, {K * N * 2 / t / 1e12:.2f} TB/s, rel err {err:.1e}", flush=True)
        del ws
    print(json.dumps(res))


def _device_time(f, args, reps: int) -> float:
    """Median over ``reps`` calls of the device time of one call's kernels, in seconds."""
    import tempfile

    import jax

    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(f(*args))
        _, ks = load_kernels(Path(d))
    if not ks:  # no device kernels in the trace (CPU): fall back to wall time
        from gpu_perf import _median_time

        return _median_time(lambda: f(*args), warm=1, reps=reps)
    ks = [e for e in ks if not e["name"].startswith("Memcpy")]
    names = sorted({e["name"][:40] for e in ks})
    print(f"  kernels per call: {len(ks) / reps:.0f} ({', '.join(names[:4])})", flush=True)
    return sum(e.get("dur", 0) for e in ks) / reps / 1e6


if __name__ == "__main__":
    main()
