"""Float32 on one GPU against a 1 x 2 tensor-parallel mesh, with JAX's default matmul
precision (TF32 on Ampere and later) and with the precision a float32 run now uses
(``cca_jax.precision.for_dtype``): the largest logit difference, and whether greedy and
sampled generations give the same tokens. Random weights of a model YAML, loaded once
and sharded onto the mesh (the same values on both).

    python bench/precision_probe.py [--model configs/models/tiny-llama.yaml] [--out DIR]

CPU smoke test: XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python bench/precision_probe.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="configs/models/tiny-llama.yaml")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from cca_jax import forward, load_model, make_mesh, precision, shard_params
    from cca_jax.generate import generate

    model, _ = load_model(ROOT / args.model, dtype="float32", with_tokenizer=False)
    cfg = model.config
    sharded = model.with_params(shard_params(model.params(), make_mesh(1, 2, jax.devices()[:2])))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, 96).tolist() for _ in range(args.rows)]
    toks = jnp.asarray(np.asarray(prompts, np.int32))
    res = {"model": args.model, "backend": jax.default_backend(), "devices": str(jax.devices()[:2])}
    for name, ctx in (("jax default", contextlib.nullcontext), ("float32 run (highest)",
                                                                 lambda: precision.for_dtype("float32"))):
        with ctx():
            fwd = jax.jit(lambda p, t: forward(cfg, p, t).logits)
            a, b = np.asarray(fwd(model.params(), toks)), np.asarray(fwd(sharded.params(), toks))
            same = {}
            for how, kw in (("greedy", {}), ("sampled T=1", {"temperature": 1.0, "key": jax.random.key(1)})):
                g1 = generate(model, prompts, args.new, eos_token_id=[], **kw)
                g2 = generate(sharded, prompts, args.new, eos_token_id=[], **kw)
                same[how] = sum(x == y for x, y in zip(g1, g2))
        res[name] = {"max_abs_logit_diff": float(np.max(np.abs(a - b))), "logit_scale": float(np.max(np.abs(a))),
                     "rows_identical": same}
        print(f"{name}: max |logit 1 GPU - logit tp=2| {res[name]['max_abs_logit_diff']:.3e} (logits up to "
              f"{res[name]['logit_scale']:.2f}); identical rows of {args.rows} x {args.new} tokens: {same}",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
