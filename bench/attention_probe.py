"""Attention alone, ours (XLA, causal query blocks) against tokamax's kernels, on the
gemma-2-2b attention shapes: the amplification step's (8 x 1,024, forward and backward)
and the prefill's (32 x 896, forward). Prints times and the largest difference from a
float32 reference. ``--shapes decode``: one decode step's attention over a 1,024-slot
cache (batch 32), ours (two batched matmuls over the (B, KV, S, Dh) buffers) against
tokamax's kernel given the cache as (B, S, KV, Dh).

    python bench/attention_probe.py [--impl mosaic,xla] [--reps 10]
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
    ap.add_argument("--impl", default="ours,mosaic,mosaic-nomask")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default="amplify,prefill")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from cca_jax import model_yaml
    from cca_jax.model import attention_kernels as ak
    from cca_jax.model import attention as attn

    cfg, _ = model_yaml.read(MODELS["gemma-2-2b"])
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"amplify": (8, 1024, True), "prefill": (32, 896, False)}
    res = {"device": jax.devices()[0].device_kind}
    for name in args.shapes.split(","):
        if name == "decode":
            _decode_shape(cfg, args, res)
            continue
        B, T, grad = shapes[name]
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, H, Dh), jnp.bfloat16) * 2
        k = jax.random.normal(ks[1], (B, T, KV, Dh), jnp.bfloat16) * 2
        v = jax.random.normal(ks[2], (B, T, KV, Dh), jnp.bfloat16)
        pad = jnp.arange(B) % 3 * 17  # some left padding
        pos = jnp.arange(T)[None] - pad[:, None]
        pos = jnp.where(pos >= 0, pos, -1)
        cot = jax.random.normal(ks[3], (B, T, H, Dh), jnp.bfloat16)
        sliding = jnp.asarray(False)

        def attend(q, k, v, impl):
            if impl == "ours":
                return attn.attend_self_xla(cfg, q, k, v, pos, pos, sliding, True)
            name_, _, opt = impl.partition("-")  # "mosaic-nomask": causal only, no padding mask
            return ak.attend_self(cfg, q, k, v, pos, pos, sliding, True, implementation=name_, dense_mask=opt != "nomask")

        ref = attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), "ours")
        valid = (pos >= 0)[:, :, None, None]
        for impl in args.impl.split(","):
            f = jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, impl))
            try:
                out = f(q, k, v)
            except Exception as e:  # noqa: BLE001 - report and go on to the next
                res[f"{name}_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, impl, res[f"{name}_{impl}_error"], flush=True)
                continue
            res[f"{name}_{impl}_maxdiff"] = float(jnp.max(jnp.abs(jnp.where(valid, out.astype(jnp.float32) - ref, 0))))
            res[f"{name}_{impl}_fwd_ms"] = 1e3 * _median_time(lambda: f(q, k, v), warm=2, reps=args.reps)
            if grad:
                g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(attend(q, k, v, impl).astype(jnp.float32) * cot),
                                     argnums=(0, 1, 2)))
                res[f"{name}_{impl}_fwdbwd_ms"] = 1e3 * _median_time(lambda: g(q, k, v), warm=2, reps=args.reps)
                if impl != "ours":
                    g0 = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, "ours") * cot.astype(jnp.float32)),
                                  argnums=(0, 1, 2))(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
                    res[f"{name}_{impl}_grad_maxdiff"] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                                                          for a, b in zip(g(q, k, v), g0)]
            print(name, impl, {k_: v_ for k_, v_ in res.items() if k_.startswith(f"{name}_{impl}")}, flush=True)
    print(json.dumps(res, indent=1))


def _decode_shape(cfg, args, res):
    import jax
    import jax.numpy as jnp

    from cca_jax.model import attention_kernels as ak
    from cca_jax.model import attention as attn

    H, KV, Dh, B, S = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 32, 1024
    G = H // KV
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, 1, H, Dh), jnp.bfloat16) * 2
    kc = jax.random.normal(ks[1], (B, KV, S, Dh), jnp.bfloat16) * 2
    vc = jax.random.normal(ks[2], (B, KV, S, Dh), jnp.bfloat16)
    n_valid = 960  # the mean cache length of a 896 + 128 generation
    kpos = jnp.where(jnp.arange(S) < n_valid, jnp.arange(S), -1)[None].repeat(B, 0)
    qpos = jnp.full((B, 1), n_valid - 1)
    sliding = jnp.asarray(False)

    def ours(q, kc, vc):  # as a decode step runs it
        qh = q.reshape(B, 1, KV, G, Dh).transpose(0, 2, 3, 1, 4)
        return attn.attend_buffer(cfg, qh, kc, vc, qpos, kpos, sliding).reshape(B, 1, H, Dh)

    def kernel(q, kc, vc):
        mask = attn.scores_mask(qpos, kpos, sliding, cfg)[:, None]
        return ak.import_tokamax().dot_product_attention(
            q, kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3), mask=mask, scale=cfg.scale,
            logits_soft_cap=cfg.attn_logit_softcap, implementation=None)

    ref = ours(q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32))
    for impl, fn in (("ours", ours), ("tokamax", kernel)):
        f = jax.jit(fn)
        try:
            out = f(q, kc, vc)
            res[f"decode_{impl}_maxdiff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
        except Exception as e:  # noqa: BLE001 - report and go on
            res[f"decode_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        res[f"decode_{impl}_ms"] = 1e3 * _median_time(lambda: f(q, kc, vc), warm=3, reps=max(args.reps, 20))
        print("decode", impl, res[f"decode_{impl}_ms"], flush=True)
    res["decode_kv_bytes_per_layer"] = 2 * B * KV * S * Dh * 2


if __name__ == "__main__":
    main()
