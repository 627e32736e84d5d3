"""Where an amplification step's seconds go on this host: the device cost of its batches
alone against the whole step as the train loop runs it, with the host's profile.

    python bench/amplify_probe.py MODEL.gguf [--examples 52] [--length 1200] [--shared 750]
        [--steps 8] [--batch 8] [--share both|on|off]

Random localization examples of one length that all start with one context of
``--shared`` tokens (the 8-shot prompt), and a random circuit of ~7% of the components
(the shapes of RESULTS.md's 10-template Qwen run); ``Amplifier.step`` as the loop calls it,
with the context run once per micro-batch (``amplify.share_prefix``, on) and in every row
(off). Prints JSON per variant: the gradient program's seconds per batch (blocked on each),
a step's wall seconds and its compile/device/host split (``cca_jax.timing``), and the host
functions that took the most time inside the steps (cProfile, own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--examples", type=int, default=52)
    ap.add_argument("--length", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="amplify.batch_size (the micro-batch)")
    ap.add_argument("--shared", type=int, default=750, help="tokens every example starts with")
    ap.add_argument("--share", choices=("both", "on", "off"), default="both")
    args = ap.parse_args()
    import numpy as np

    import cca_jax
    from cca_jax.cca import amplify as amp
    from cca_jax.cca import components
    from cca_jax.cca.examples import LocalizationExample

    model, _ = cca_jax.load_model(args.gguf, args.dtype, with_tokenizer=False)
    cfg = model.config
    rng = np.random.default_rng(0)
    context = tuple(int(t) for t in rng.integers(100, cfg.vocab_size - 100, args.shared))
    ex = [LocalizationExample(context + tuple(int(t) for t in rng.integers(100, cfg.vocab_size - 100,
                                                                          args.length - args.shared)),
                              int(rng.integers(100, 1000)), int(rng.integers(1000, 2000)), 0, i)
          for i in range(args.examples)]
    mask = {k: rng.random(s) < 0.07 for k, s in components.shapes(cfg).items()}
    for share in {"both": (True, False), "on": (True,), "off": (False,)}[args.share]:
        trainer = amp.Amplifier(model, ex, mask, amp.AmplifyConfig(batch_size=args.batch, share_prefix=share))
        _probe(args, trainer, cfg, share)
        del trainer


def _probe(args, trainer, cfg, share):
    import jax

    from cca_jax import timing
    from cca_jax.cca import amplify as amp

    master, opt = trainer.init()
    out = {"backend": jax.default_backend(), "share_prefix": share, "batch": args.batch,
           "batches": len(trainer.batches), "examples": args.examples, "length": args.length,
           "shared": args.shared}
    t = time.perf_counter()
    master, opt, _ = trainer.step(master, opt, 0)
    jax.block_until_ready(master)
    out["first_step_s"] = round(time.perf_counter() - t, 2)
    # the gradient program alone, blocked on each batch
    train_now = jax.tree.map(lambda x: x.astype(trainer.dtype), master)
    b = trainer.batches[0]
    args_b = [jax.numpy.asarray(x) for x in (b.tokens, b.mask, b.desired, b.undesired)]
    prefix = None if trainer.prefix is None else jax.numpy.asarray(trainer.prefix)
    for _ in range(2):
        jax.block_until_ready(amp.grad_sum(train_now, trainer.frozen, cfg, *args_b, False, False,
                                           jax.numpy.asarray(b.weights), prefix))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(amp.grad_sum(train_now, trainer.frozen, cfg, *args_b, False, False,
                                           jax.numpy.asarray(b.weights), prefix))
        ts.append(time.perf_counter() - t)
    out["grad_batch_s"] = round(sorted(ts)[2], 4)
    out["grad_all_batches_s"] = round(sorted(ts)[2] * len(trainer.batches), 3)
    del train_now
    prof = cProfile.Profile()
    with timing.account() as acc:
        t = time.perf_counter()
        prof.enable()
        for s in range(args.steps):
            master, opt, _ = trainer.step(master, opt, s + 1)
        jax.block_until_ready(master)
        prof.disable()
        wall = time.perf_counter() - t
    out["step_s"] = round(wall / args.steps, 3)
    out["step_split_s"] = {k: round(v / args.steps, 3) for k, v in acc.split().items()}
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(6)
    print(s.getvalue()[-1800:])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
