"""Tokens/s of cca_jax.generate vs transformers generate, same prompts, same process.

    python bench/generate_cpu.py [--batch 32] [--new 64] [--shots 8] [--model smollm2-135m]

Greedy, batch of prompts that share the 8-shot context, a fixed number of new tokens for
both (EOS ignored) so the work is identical. Prints wall times and the ratio. CPU or GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    import cca_jax
    from cca_jax import models
    from cca_jax.data.prompt import build_prompt
    from cca_jax.generate import generate

    path = models.resolve(args.model) if args.model in models.names() else args.model
    model, tok = cca_jax.load_model(path)
    rng = np.random.default_rng(0)
    questions = [f"{n} has {a} apples and buys {b} more bags with {c} apples each. How many apples does {n} have now?"
                 for n, a, b, c in zip(rng.choice(["Ann", "Bob", "Cleo", "Dan"], args.batch),
                                       rng.integers(2, 90, args.batch), rng.integers(2, 9, args.batch),
                                       rng.integers(2, 12, args.batch))]
    prompts = [tok(build_prompt(q, args.shots))["input_ids"] for q in questions]
    lens = [len(p) for p in prompts]
    print(f"device={jax.devices()[0].platform} cores={os.cpu_count()} batch={args.batch} "
          f"prompt tokens {min(lens)}-{max(lens)} new={args.new}")
    n_tokens = args.batch * args.new

    def run_ours(share):
        t = time.perf_counter()
        out = generate(model, prompts, args.new, eos_token_id=[], batch_size=args.batch, share_prefix=share, chunk=args.new)
        assert all(len(o) == args.new for o in out)
        return time.perf_counter() - t, out

    cold, _ = run_ours(True)
    warm, ours = run_ours(True)
    warm_noshare, _ = run_ours(False)
    warm_noshare, _ = run_ours(False)
    print(f"cca_jax  shared prefix: first call {cold:.1f}s (with compile), warm {warm:.1f}s "
          f"= {n_tokens / warm:.1f} tok/s")
    print(f"cca_jax  no prefix share: warm {warm_noshare:.1f}s = {n_tokens / warm_noshare:.1f} tok/s")
    if args.skip_torch:
        return
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # EOS is an ordinary token here, as in our run
    T = max(lens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((args.batch, T), pad, dtype=torch.long)
    att = torch.zeros((args.batch, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new,
                           do_sample=False, pad_token_id=pad)
    hf_time = time.perf_counter() - t
    same = sum(out[i, T:].tolist() == ours[i] for i in range(args.batch))
    print(f"transformers generate: {hf_time:.1f}s = {n_tokens / hf_time:.1f} tok/s (torch threads {torch.get_num_threads()})")
    print(f"ratio (cca_jax warm / transformers): {hf_time / warm:.2f}x; identical rows {same}/{args.batch}")


if __name__ == "__main__":
    main()
