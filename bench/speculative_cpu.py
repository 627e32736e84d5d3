"""Plain vs speculative greedy generation on the demo's GSM prompts (configs/demo.yaml).

    python bench/speculative_cpu.py [--model qwen2.5-coder-0.5b] [--items 64] [--k 2,4,6] [--ngram 3]
                                    [--iters 8] [--fixed] [--json OUT]

The demo's items, prompts (its shots), budget (eval.max_new_tokens), batch size and dtype;
generation exactly as the pipeline's evaluation runs it (EOS, the answer stop rule), or
with ``--fixed`` a fixed number of new tokens per row (EOS and the stop rule off: the
raw decode rate). Each variant runs twice in this process and the second, warm call is
timed. Prints tokens per second (of the tokens kept), the acceptance rate (draft tokens
kept / drafted), tokens per verify step, and how many rows equal plain greedy's. CPU or GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent


def _prompts(config, tok, items: int):
    from cca_jax import pipeline
    from cca_jax.data.prompt import encode

    splits, _ = pipeline._data(config)
    its = [it for s in ("train", "val", "test") for it in splits[s]][:items]
    return [encode(tok, it.question, config.eval.shots, config.eval.chat_template) for it in its]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--model", help="default: the config's")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--k", default="2,4,6", help="draft lengths to try (comma-separated)")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8, help="verify steps per compiled call")
    ap.add_argument("--max-new-tokens", type=int, help="default: the config's eval.max_new_tokens")
    ap.add_argument("--batch-size", type=int, help="default: the config's eval.batch_size")
    ap.add_argument("--fixed", action="store_true", help="EOS and stop rule off: every row gets the whole budget")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import cca_jax
    from cca_jax import models, runconfig, speculative
    from cca_jax.data import answers
    from cca_jax.generate import generate, stop_ids

    config = runconfig.load(args.config, [f"model={args.model}"] if args.model else [])
    src = str(models.resolve(config.model)) if config.model in models.names() else config.model
    model, tok = cca_jax.load_model(src, dtype=config.dtype)
    prompts = _prompts(config, tok, args.items)
    max_new = args.max_new_tokens or config.eval.max_new_tokens
    batch = args.batch_size or config.eval.batch_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if args.fixed:
        kw = {"eos_token_id": []}
    else:
        kw = {"stop": answers.stop_rule(tok), "eos_token_id": stop_ids(model, tok)}
    lens = [len(p) for p in prompts]
    print(f"device={jax.devices()[0].platform} cores={os.cpu_count()} model={config.model} dtype={config.dtype} "
          f"items={len(prompts)} batch={batch} prompt tokens {min(lens)}-{max(lens)} max_new={max_new} "
          f"{'fixed budget' if args.fixed else 'EOS + stop rule'}", flush=True)

    def timed(**opts):
        generate(model, prompts, max_new, batch_size=batch, pad_token_id=pad, **kw, **opts)  # compile
        t = time.perf_counter()
        out = generate(model, prompts, max_new, batch_size=batch, pad_token_id=pad, **kw, **opts)
        return time.perf_counter() - t, out

    rows = []
    t_plain, plain = timed()
    n_tok = sum(len(o) for o in plain)
    rows.append({"variant": "plain", "seconds": t_plain, "tokens": n_tok, "tokens_per_s": n_tok / t_plain})
    print(f"plain: {t_plain:.2f} s, {n_tok} tokens, {n_tok / t_plain:.1f} tok/s", flush=True)
    for k in [int(x) for x in args.k.split(",") if x.strip()]:
        t, out = timed(speculative="ngram", spec_k=k, spec_ngram=args.ngram, spec_iters=args.iters)
        st = speculative.last_stats()
        same = sum(a == b for a, b in zip(out, plain))
        n = sum(len(o) for o in out)
        rows.append({"variant": f"ngram k={k} n={args.ngram}", "seconds": t, "tokens": n, "tokens_per_s": n / t,
                     "speedup": t_plain / t, "acceptance": st.acceptance, "tokens_per_step": st.tokens_per_step,
                     "identical_rows": same, "rows": len(out)})
        print(f"ngram k={k}: {t:.2f} s, {n / t:.1f} tok/s, {t_plain / t:.2f}x plain, acceptance {st.acceptance:.2f}, "
              f"{st.tokens_per_step:.2f} tokens/step, identical rows {same}/{len(out)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
