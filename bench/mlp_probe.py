"""The gated MLP's first half alone, ``gelu(x @ gate) * (x @ up)``: ours (one XLA matmul
over [gate | up], then the activation pass) against tokamax's fused gated linear unit,
on the gemma-2-2b shapes of the prefill (32 x 896 rows), a decode step (32 rows) and the
amplification step (8 x 1,024 rows, forward and backward). Prints times and the largest
difference from a float32 reference.

    python bench/mlp_probe.py [--impl ours,mosaic,triton] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_perf import MODELS, _median_time  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="ours,mosaic,triton")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default="prefill,decode,amplify")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from cca_jax import model_yaml
    from cca_jax.model import attention_kernels as ak
    from cca_jax.model.layers import activation

    cfg, _ = model_yaml.read(MODELS["gemma-2-2b"])
    D, F = cfg.hidden_size, cfg.intermediate_size
    act = lambda g: activation(cfg.hidden_act, g)  # noqa: E731
    shapes = {"prefill": (32 * 896, False), "decode": (32, False), "amplify": (8 * 1024, True)}
    res = {"device": jax.devices()[0].device_kind}
    ks = jax.random.split(jax.random.key(0), 3)
    w = (jax.random.normal(ks[0], (D, 2 * F), jnp.float32) / D ** 0.5).astype(jnp.bfloat16)
    for name in args.shapes.split(","):
        M, grad = shapes[name]
        x = jax.random.normal(ks[1], (M, D), jnp.bfloat16)
        cot = jax.random.normal(ks[2], (M, F), jnp.bfloat16)

        def glu(x, w, impl):
            if impl == "ours":
                g, u = jnp.split(x @ w, 2, axis=-1)
                return act(g) * u
            return ak.import_tokamax().gated_linear_unit(x, w.reshape(D, 2, F), activation=act, implementation=impl)

        ref = glu(x.astype(jnp.float32), w.astype(jnp.float32), "ours")
        for impl in args.impl.split(","):
            f = jax.jit(lambda x, w, impl=impl: glu(x, w, impl))
            try:
                out = f(x, w)
            except Exception as e:  # noqa: BLE001 - report and go on to the next
                res[f"{name}_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, impl, res[f"{name}_{impl}_error"], flush=True)
                continue
            res[f"{name}_{impl}_maxdiff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            res[f"{name}_{impl}_fwd_ms"] = 1e3 * _median_time(lambda: f(x, w), warm=2, reps=args.reps)
            if grad:
                g = jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(glu(x, w, impl).astype(jnp.float32) * cot),
                                     argnums=(0, 1)))
                try:
                    res[f"{name}_{impl}_fwdbwd_ms"] = 1e3 * _median_time(lambda: g(x, w), warm=2, reps=args.reps)
                except Exception as e:  # noqa: BLE001
                    res[f"{name}_{impl}_bwd_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(name, impl, {k_: v_ for k_, v_ in res.items() if k_.startswith(f"{name}_{impl}")}, flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
