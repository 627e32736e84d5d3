"""Where the time goes: the pieces of generation, the DCM step and the amplification step
timed alone on gemma-2-2b (bf16), with their compiled HLO written to $OUT for reading.

    python bench/gpu_probe.py [--out DIR] [--parts prefill,decode,dcm,amplify,generate]

``generate`` times the whole ``generate`` call as gpu_perf does (prefill, decode chunks and
the host work between them): chunks sent ahead (the default) or one at a time, chunks of
32 or 128 steps, interleaved in one process; and the host time of the calls it makes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_perf import (BATCH, GEN_BATCH, GEN_NEW, GEN_PROMPT, ROTATE, SEQ, _generate_options,  # noqa: E402
                      _median_time, _model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="gemma-2-2b")
    ap.add_argument("--parts", default="prefill,decode,dcm,amplify")
    ap.add_argument("--policy", default="dots", help="amplify remat policy")
    ap.add_argument("--unroll", action="store_true", help="amplify with the layers unrolled")
    ap.add_argument("--trace", action="store_true", help="also write a jax.profiler trace of each part")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cca_jax.generate import Sampling, decode_chunk
    from cca_jax.model.cache import init_cache
    from cca_jax.model.prefill import prefill

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(args.model)
    from cca_jax.model.params import unstack_layers

    # as generate runs them: prefill on the stacked weights, decode on per-layer ones
    cfg, stacked = model.config, model.params()
    params = unstack_layers(stacked)
    parts = args.parts.split(",")
    gen_model = model if "generate" in parts else None  # generate takes the model itself
    del model
    res = {}
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(3, cfg.vocab_size, (GEN_BATCH, GEN_PROMPT)), jnp.int32)
    mask = jnp.ones_like(toks, bool)
    size = 1024
    wf = {k: v for k, v in _generate_options().items() if k == "write_first"}  # BENCH_DECODE_WRITE_FIRST

    def fresh():
        return init_cache(cfg, GEN_BATCH, size, params['embed'].dtype)

    if "prefill" in parts or "decode" in parts:
        res["prefill_s"] = _median_time(lambda: prefill(cfg, stacked, toks, mask, fresh()), warm=1, reps=5)
        res["prefill_unrolled_s"] = _median_time(lambda: prefill(cfg, params, toks, mask, fresh()), warm=1, reps=5)
        (out / "prefill.hlo.txt").write_text(prefill.lower(cfg, stacked, toks, mask, fresh()).compile().as_text())
    if "decode" in parts:
        logits, cache = prefill(cfg, stacked, toks, mask, fresh())
        pos0 = cache.pos + 0  # the cache is donated to each decode call
        eos = jnp.asarray([-1], jnp.int32)
        done = jnp.zeros((GEN_BATCH,), bool)
        key = jax.random.key(0)
        holder = {"cache": cache}

        def dec():
            c, lg, d, k, t = decode_chunk(cfg, params, holder["cache"], logits, done, key, eos, 0, 32, Sampling(),
                                         **wf)
            holder["cache"] = _reset(c)
            return t

        def _reset(c):  # keep the cache index inside the buffer across repeats
            return c.replace(index=jnp.asarray(GEN_PROMPT, jnp.int32), pos=pos0 + 0)

        res["decode_32_steps_s"] = _median_time(dec, warm=1, reps=5)
        res["decode_step_ms"] = res["decode_32_steps_s"] / 32 * 1e3
        (out / "decode.hlo.txt").write_text(
            decode_chunk.lower(cfg, params, holder["cache"], logits, done, key, eos, 0, 32, Sampling(), **wf)
            .compile().as_text())
    if "dcm" in parts:
        from cca_jax.cca import components, dcm

        t8 = toks[:BATCH, :]
        t8 = jnp.concatenate([t8, t8[:, : SEQ - GEN_PROMPT]], axis=1)
        m8 = jnp.ones_like(t8, bool)
        c = dcm.prefix_cache(cfg, params, t8, m8)
        config = dcm.DCMConfig()
        opt = dcm.make_optimizer(config, 26)
        m = components.full(cfg, 1.0)
        st = opt.init(m)
        d = t8[:, 0]
        args_ = (cfg, opt, config.reg, config.mode, params, m, st, c, t8[:, -1], d, d + 1)
        # as train_mask runs it: each step on another batch's cache
        caches = [c] + [dcm.prefix_cache(cfg, params, jnp.roll(t8, i, axis=0), m8) for i in range(1, ROTATE)]
        dh = {"m": m, "st": st, "i": 0}  # mask_step donates m and st: each step's outputs feed the next

        def dcm_step(rotate=True):
            dh["i"] += 1
            o = dcm.mask_step(*args_[:5], dh["m"], dh["st"], caches[dh["i"] % ROTATE] if rotate else c, *args_[8:])
            dh["m"], dh["st"] = o[0], o[1]
            return o[2]

        res["dcm_chained_step_s"] = _median_time(lambda: dcm_step(rotate=False), warm=3, reps=20)
        res["dcm_rotating_step_s"] = _median_time(dcm_step, warm=3, reps=20)
        (out / "dcm.hlo.txt").write_text(dcm.mask_step.lower(*args_).compile().as_text())
    if "amplify" in parts:
        from gpu_perf import part_amplify  # noqa: E402

        res["amplify"] = part_amplify(args.model, args.policy if args.policy != "none" else False,
                                      trace_dir=str(out / "trace_amplify") if args.trace else None,
                                      unroll=args.unroll)
    if "generate" in parts:
        from cca_jax.generate import generate

        prompts = np.asarray(toks).tolist()

        def gen(chunk=32, ahead=True):
            out = generate(gen_model, prompts, GEN_NEW, eos_token_id=[], batch_size=GEN_BATCH, chunk=chunk,
                           **{**_generate_options(), "ahead": ahead})
            assert all(len(o) == GEN_NEW for o in out)
            return jnp.zeros(())

        # same-process A/B, interleaved: chunks sent ahead or one at a time, 32 or 128 steps
        variants = {"generate_s": (32, True), "generate_one_at_a_time_s": (32, False), "generate_chunk128_s": (128, True)}
        times = {k: [] for k in variants}
        for rep in range(6):
            for name, (chunk, ahead) in variants.items():
                t = time.perf_counter()
                jax.block_until_ready(gen(chunk, ahead))
                if rep:  # the first round compiles
                    times[name].append(time.perf_counter() - t)
        res.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
        # host time to dispatch the calls generate makes (the device waits when it is long)
        c = init_cache(cfg, GEN_BATCH, size, params['embed'].dtype)
        jax.block_until_ready(c)
        t = time.perf_counter()
        c = init_cache(cfg, GEN_BATCH, size, params['embed'].dtype)
        res["init_cache_dispatch_ms"] = 1e3 * (time.perf_counter() - t)
        lg, c = prefill(cfg, stacked, toks, mask, c)
        jax.block_until_ready(c)
        t = time.perf_counter()
        o = decode_chunk(cfg, params, c, lg, jnp.zeros((GEN_BATCH,), bool), jax.random.key(0),
                         jnp.asarray([-1], jnp.int32), 0, 32, Sampling(), **wf)
        res["decode_dispatch_ms"] = 1e3 * (time.perf_counter() - t)
        jax.block_until_ready(o)
        t = time.perf_counter()
        np.asarray(o[-1]), np.asarray(o[2])
        res["tokens_to_host_ms"] = 1e3 * (time.perf_counter() - t)
        del o, c
    if args.trace:
        traced = {}
        if "generate" in parts:
            traced["generate"] = gen
            traced["generate128"] = lambda: gen(128)
        if "prefill" in parts:
            traced["prefill"] = lambda: prefill(cfg, stacked, toks, mask, fresh())[0]
        if "decode" in parts:
            traced["decode"] = dec
        if "dcm" in parts:
            traced["dcm"] = dcm_step
        for name, fn in traced.items():
            jax.block_until_ready(fn())
            with jax.profiler.trace(str(out / f"trace_{name}"), create_perfetto_trace=True):
                for _ in range(3):
                    jax.block_until_ready(fn())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
