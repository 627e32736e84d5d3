"""Attribution vs activation patching on real weights and real pivots; components/s.

    python bench/patching_cpu.py [--model smollm2-135m] [--items 24] [--components 1536]

Builds localization examples (prefix pivots, 2-shot prompts, builtin templates), then
patches a deterministic sample of components (mean patching) with the vmapped path and
scores every component by attribution; prints the correlation on the sample and the
patching throughput.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--components", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()

    import cca_jax
    from cca_jax import models
    from cca_jax.cca import components, dcm, patching, pivots
    from cca_jax.cca.examples import make_batch
    from cca_jax.data import answers, gsm_symbolic
    from cca_jax.data.prompt import encode
    from cca_jax.generate import generate, stop_ids

    model, tok = cca_jax.load_model(models.source(args.model))
    cfg, params = model.config, model.params()
    items = gsm_symbolic.load_items("builtin", per_template=2, seed=0)[: args.items]
    kw = dict(stop=answers.stop_rule(tok), eos_token_id=stop_ids(model, tok), pad_token_id=tok.pad_token_id or 0)
    prompts = [encode(tok, it.question, n_shots=2) for it in items]
    t = time.perf_counter()
    outs = generate(model, prompts, 96, **kw)

    def judge_for(i):
        return lambda ids: answers.is_correct(answers.extract(tok.decode(list(ids), skip_special_tokens=True)),
                                              items[i].answer)

    greedy = [pivots.Trace(tuple(p), tuple(o), judge_for(i)(o)) for i, (p, o) in enumerate(zip(prompts, outs))]
    exs, stats = pivots.localize(model, greedy, [(it.template, it.instance) for it in items], judge_for,
                                 pivots.PivotConfig(n_samples=6, max_new_tokens=96), kw, progress=False)
    print(f"greedy accuracy {np.mean([g.correct for g in greedy]):.2f}; localization {stats} "
          f"({time.perf_counter() - t:.0f}s)")
    exs = exs[:8]
    b = make_batch(exs)
    cache = dcm.prefix_cache(cfg, params, jnp.asarray(b.tokens), jnp.asarray(b.mask))
    last, d, u = jnp.asarray(b.tokens[:, -1]), jnp.asarray(b.desired), jnp.asarray(b.undesired)
    clean = patching.last_activations(cfg, params, cache, last)
    values = patching.patch_values(clean, "mean")
    n = components.total(cfg)
    rng = np.random.default_rng(0)
    heads = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads)
    # every head, plus a uniform sample of neurons
    sample = np.concatenate([np.arange(heads), np.sort(rng.choice(np.arange(heads, n), args.components - heads,
                                                                  replace=False))])
    patching.patching_effects(cfg, params, cache, last, d, u, values, chunk=args.chunk, indices=sample[:args.chunk])
    t = time.perf_counter()
    eff = patching.patching_effects(cfg, params, cache, last, d, u, values, chunk=args.chunk, indices=sample)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    att = patching.attribution_effects(cfg, params, cache, last, d, u, values, clean)
    jax.block_until_ready(att["q"])
    t_att = time.perf_counter() - t
    e = np.concatenate([eff[k].ravel() for k in patching.TYPES])
    a = np.concatenate([att[k].ravel() for k in patching.TYPES])
    keep = ~np.isnan(e)
    r = np.corrcoef(a[keep], e[keep])[0, 1]
    rh = np.corrcoef(a[:heads], e[:heads])[0, 1]
    ranks = lambda x: np.argsort(np.argsort(x))
    rho = np.corrcoef(ranks(a[keep]), ranks(e[keep]))[0, 1]
    print(f"device={jax.devices()[0].platform} model={args.model} examples={len(exs)} prefix_len={b.tokens.shape[1]} "
          f"components patched={keep.sum()} of {n}")
    print(f"patching: {dt:.1f}s = {keep.sum() / dt:.0f} components/s (vmapped, chunk {args.chunk}, batch {len(exs)})")
    print(f"attribution (all {n} components, one forward+backward): {t_att:.2f}s")
    print(f"correlation attribution vs patching: pearson {r:.3f} (heads only {rh:.3f}), spearman {rho:.3f}")


if __name__ == "__main__":
    main()
