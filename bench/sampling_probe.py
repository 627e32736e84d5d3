"""Where a sampled decode step's time goes at pivot sampling's width (320 rows, Qwen2.5's
151,936-token vocabulary): the top-k filter and the categorical draw against a greedy
argmax, alone and inside a 32-step decode chunk.

    python bench/sampling_probe.py [--rows 320] [--model configs/models/qwen2.5-0.5b.yaml]

Prints one JSON line: milliseconds per call (median of 20, after 3 warm-ups).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_perf import _median_time  # noqa: E402


def _ms(fn, reps=20):
    return round(_median_time(fn, warm=3, reps=reps) * 1e3, 3)


def _window_draw(key, x, k, window):
    import jax
    import jax.numpy as jnp

    vals, idx = jax.lax.top_k(x, window)
    w = jnp.where(vals >= vals[:, k - 1:k], vals, -jnp.inf)
    c = jax.random.categorical(key, w, -1)
    return jnp.take_along_axis(idx, c[:, None], 1)[:, 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=320)
    ap.add_argument("--model", default=str(ROOT / "configs/models/qwen2.5-0.5b.yaml"))
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import cca_jax
    from cca_jax.generate import decode_chunk
    from cca_jax.mesh import per_layer
    from cca_jax.model.cache import init_cache
    from cca_jax.sampling import Sampling, filter_logits, next_token

    model, _ = cca_jax.load_model(args.model, "bfloat16")
    cfg, params = model.config, model.params()
    B, V = args.rows, cfg.vocab_size
    x = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * 3
    key = jax.random.key(1)
    s = Sampling(1.0, 50)
    out = {"rows": B, "vocab": V}
    progs = {"argmax": jax.jit(lambda k, x: jnp.argmax(x, -1)),
             "top_k_50": jax.jit(lambda k, x: jax.lax.top_k(x, 50)),
             "filter_top_k": jax.jit(lambda k, x: filter_logits(x, s)),
             "categorical_full": jax.jit(lambda k, x: jax.random.categorical(k, x, -1)),
             "next_token_sampled": jax.jit(lambda k, x: next_token(k, x, s)),
             # a candidate: the draw over the 64 largest only (the top-50 filter kept inside)
             "top_k_window_draw": jax.jit(lambda k, x: _window_draw(k, x, 50, 64))}
    for name, f in progs.items():
        out[f"{name}_ms"] = _ms(lambda f=f: f(key, x))
    layers = per_layer(params)
    P = 1408
    cache = init_cache(cfg, B, P, jnp.bfloat16).replace(index=jnp.asarray(896, jnp.int32), empty=False)
    done = jnp.zeros((B,), bool)
    eos = jnp.asarray([-1], jnp.int32)
    for name, samp in (("greedy", Sampling()), ("sampled", s)):
        # decode_chunk donates its cache: each call decodes on from the last one's (13 calls
        # of 32 steps from slot 896 stay inside the 1,408 slots)
        holder = {"c": jax.tree.map(jnp.copy, cache)}

        def chunk(samp=samp, holder=holder):
            c, *_, toks = decode_chunk(cfg, layers, holder["c"], x, done, key, eos, 0, 32, samp, True)
            holder["c"] = c
            return toks

        out[f"decode_chunk32_{name}_ms"] = _ms(chunk, reps=10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
