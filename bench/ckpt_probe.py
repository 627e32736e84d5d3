"""Checkpoint commits, synchronous against asynchronous (issue 21): the time the training
loop is blocked by N commits of a Qwen2.5-0.5B-sized float32 master (the q/k/v/up
matrices of its 24 layers, ~520 MB, what amplification checkpoints), each after a fake
0.8 s step.

The step is a jitted in-place update of the master (its buffers donated, as amplification
does) followed by a sleep standing for the device's work, so the background write has the
host to itself as it would on a GPU host. Every commit is a new best, so every one is
saved (the asynchronous mode's worst case: nothing is skipped). The commits go through
``train_loop.Checkpoints``, the code the loop runs. Prints the blocked seconds of each mode
and their ratio as JSON.

    python bench/ckpt_probe.py [--commits 6] [--step 0.8] [--adam] [--dir /fast/disk]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cca_jax

# Qwen2.5-0.5B: layers, hidden, query heads x head dim, key/value heads x head dim, MLP width
LAYERS, D, Q, KV, F = 24, 896, 14 * 64, 2 * 64, 4864


def master_like_qwen(seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = {"q": (LAYERS, D, Q), "k": (LAYERS, D, KV), "v": (LAYERS, D, KV), "up": (LAYERS, D, F)}
    return {"layers": {n: jax.random.normal(k, s, jnp.float32) * 0.02 for k, (n, s) in zip(ks, shapes.items())}}


def run(mode: str, commits: int, step_s: float, adam: bool, root: Path) -> dict:
    import functools

    import jax
    import optax

    from cca_jax import train_loop

    master = master_like_qwen()
    opt = optax.adam(1e-3) if adam else optax.sgd(1e-3)
    opt_state = opt.init(master)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(m, s):
        upd, s = opt.update(jax.tree.map(lambda x: x * 1e-3, m), s, m)
        return optax.apply_updates(m, upd), s

    master, opt_state = update(master, opt_state)  # compiled before timing
    jax.block_until_ready(master)
    ckpt = train_loop.Checkpoints(root / mode, "probe", asynchronous=mode == "async")
    blocked, t0 = [], time.perf_counter()
    for i in range(1, commits + 1):
        master, opt_state = update(master, opt_state)
        jax.block_until_ready(master)
        time.sleep(step_s)  # the rest of the step's device work
        t = time.perf_counter()
        ckpt.commit(i, master, opt_state, {"history": [], "best_step": i, "best_val": float(i), "best": "this",
                                           "seconds": 0.0}, final=i == commits)
        blocked.append(time.perf_counter() - t)
    t = time.perf_counter()
    ckpt.flush()
    blocked.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    prog = json.loads((root / mode / train_loop.PROGRESS).read_text())
    assert prog["step"] == commits, prog
    return {"blocked_s": round(sum(blocked), 2), "per_commit_s": [round(b, 2) for b in blocked[:-1]],
            "final_flush_s": round(blocked[-1], 2), "wall_s": round(wall, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=6)
    ap.add_argument("--step", type=float, default=0.8, help="seconds of fake device work per step")
    ap.add_argument("--adam", action="store_true", help="checkpoint Adam's state too (3x the bytes)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    import jax

    with tempfile.TemporaryDirectory(prefix="ckpt_probe_", dir=args.dir) as tmp:
        nbytes = sum(x.nbytes for x in jax.tree.leaves(master_like_qwen()))
        out = {"device": jax.devices()[0].device_kind, "master_MB": round(nbytes / 1e6),
               "commits": args.commits, "step_s": args.step, "adam": args.adam}
        for mode in ("sync", "async"):
            out[mode] = run(mode, args.commits, args.step, args.adam, Path(tmp))
        out["blocked_ratio_async_over_sync"] = round(out["async"]["blocked_s"] / out["sync"]["blocked_s"], 3)
        out["wall_saved_s"] = round(out["sync"]["wall_s"] - out["async"]["wall_s"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
