"""How long XLA takes to compile the run's largest programs, and how fast they then run,
under different ``XLA_FLAGS``: one subprocess per flag set, same programs, same shapes.

    python bench/compile_probe.py [--model configs/models/qwen2.5-0.5b.yaml] [--flags "|--xla_a=b|--xla_c=d --xla_e=f"]

``--flags``: flag sets separated by "|" (an empty one: XLA's defaults).

Programs (random weights, bfloat16, the shapes of RESULTS.md's 10-template Qwen run): a
prefill of 64 rows x 128 tokens after a 768-token shared prefix; a 32-step greedy decode
chunk of 64 rows on a 1,536-slot cache; amplification's gradient on 8 rows of 448 tokens
after a shared 768-token context. Prints one JSON line per flag set: compile seconds
(lower + XLA compile, ahead of time) and the median run seconds of each program.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_perf import _median_time  # noqa: E402
DEFAULT_FLAGS = ["", "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0",
                 "--xla_llvm_disable_expensive_passes=true"]


def child(model_path: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import cca_jax
    from cca_jax.cca import amplify as amp
    from cca_jax.cca import components
    from cca_jax.generate import decode_chunk
    from cca_jax.mesh import per_layer
    from cca_jax.model.cache import init_cache
    from cca_jax.model.prefill import prefill
    from cca_jax.sampling import Sampling

    model, _ = cca_jax.load_model(model_path, "bfloat16")
    cfg, params = model.config, model.params()
    layers = per_layer(params)
    rng = np.random.default_rng(0)
    out = {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        out[f"{name}_compile_s"] = round(time.perf_counter() - t, 2)
        return compiled

    B, P, S = 64, 768, 128
    toks = jnp.asarray(rng.integers(100, 5000, (B, S)), jnp.int32)
    mask = jnp.ones((B, S), bool)
    # as after a tiled shared prefix: a cache that is not empty, written from slot P on
    cache = init_cache(cfg, B, P + S, jnp.bfloat16).replace(index=jnp.asarray(P, jnp.int32), empty=False)
    pre = timed("prefill", prefill, cfg, params, toks, mask, cache)
    out["prefill_run_s"] = round(_median_time(lambda: pre(params, toks, mask, cache), warm=1), 4)

    big = init_cache(cfg, B, 1536, jnp.bfloat16).replace(index=jnp.asarray(P + S, jnp.int32), empty=False)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    done = jnp.zeros((B,), bool)
    key = jax.random.key(0)
    eos = jnp.asarray([cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else -1], jnp.int32)
    dec = timed("decode", decode_chunk, cfg, layers, big, logits, done, key, eos, 0, 32, Sampling(), True)
    holder = {"c": big}

    def run_dec():
        c, _, _, _, t = dec(layers, holder["c"], logits, done, key, eos, 0)
        holder["c"] = c
        return t

    out["decode_chunk_run_s"] = round(_median_time(run_dec, warm=1), 4)

    mask_c = {k: rng.random(s) < 0.07 for k, s in components.shapes(cfg).items()}
    opt = amp.make_optimizer(amp.AmplifyConfig(), mask_c, params)
    train, frozen = amp.split_params(params, opt.selection)
    Ba, T = 8, 448
    at = jnp.asarray(rng.integers(100, 5000, (Ba, T)), jnp.int32)
    am = jnp.ones((Ba, T), bool)
    d = jnp.asarray(rng.integers(100, 1000, Ba), jnp.int32)
    u = jnp.asarray(rng.integers(1000, 2000, Ba), jnp.int32)
    w = jnp.ones((Ba,), jnp.float32)
    prefix = jnp.asarray(rng.integers(100, 5000, (1, P)), jnp.int32)
    g = timed("amplify_grad", amp.grad_sum, train, frozen, cfg, at, am, d, u, False, False, w, prefix)
    out["amplify_grad_run_s"] = round(_median_time(lambda: g(train, frozen, at, am, d, u, w, prefix), warm=1), 4)
    out["compile_total_s"] = round(sum(v for k, v in out.items() if k.endswith("_compile_s")), 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "configs/models/qwen2.5-0.5b.yaml"))
    ap.add_argument("--flags", default="|".join(DEFAULT_FLAGS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model)))
        return
    for flags in args.flags.split("|"):
        env = {**os.environ, "XLA_FLAGS": " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)}
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model], env=env,
                              capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"error": proc.stderr[-600:]}
        print(json.dumps({"xla_flags": flags, **res}), flush=True)


if __name__ == "__main__":
    main()
