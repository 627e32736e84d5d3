"""cca_jax vs the PyTorch baseline on one GPU, in one call: the CCA hot loops on a
randomly initialised gemma-2-2b (bfloat16), with the hardware's limits measured alongside.

    python bench/gpu_perf.py [--baseline ../shared/bench/torch_baseline.py] [--out DIR]

Each measurement runs in its own subprocess (peak device memory is per process, and JAX
and PyTorch never share the card), then one table is printed:

- DCM mask step, batch 8 x 1,024-token prefixes: cca_jax runs the last position on top
  of the cached prefix (SPEC 3: exact, the mask acts only there); the cache is built once
  per batch and reused every epoch, so its cost is shown amortised over one epoch (the
  worst case: each cache used once) and over the config's 50 epochs.
- amplification gradient step, batch 8 x 1,024, and its peak device memory;
- greedy generation, batch 32, 896-token prompts, 128 new tokens (EOS ignored), plain and
  with a shared 850-token few-shot context;
- the limits: bytes per decode step over the measured copy bandwidth, training FLOPs over
  the measured bf16 matrix-product rate, both measured in this call;
- gemma-2-9b: the DCM and amplification steps at batch 8 x 1,024 on the same GPU.
- greedy generation with exact speculative decoding (``generate_spec``) on real GSM
  8-shot prompts with real weights (n-gram drafts are only accepted where the model
  copies text): the GGUF at ``BENCH_GGUF`` (e.g. Qwen2.5-Coder-0.5B-Instruct), else the
  offline SmolLM2-135M; bf16, batch 32, 128 new tokens (EOS ignored), plain and with
  ``speculative: ngram`` at each k of ``BENCH_SPEC_K`` (default 2,3,4,6): tokens/s, the
  acceptance rate, tokens per verify step, rows identical to plain greedy, and the ratio
  to that model's plain-decode floor (bytes per step over the copy bandwidth).

- ``spec_cost``: on gemma-2-2b (random weights) the time of a plain decode step, of a
  verify step at each k, and of the prefill; with ``generate_spec``'s verify steps per
  batch (the real model's acceptance on GSM prompts) the report projects gemma-2-2b's
  speculative tokens/s and its ratio to gemma-2-2b's plain-decode floor.

Parts can be run alone: ``--part limits|dcm|amplify|generate|generate_shared|generate_spec|spec_cost|baseline``.
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
MODELS = {"gemma-2-2b": ROOT / "configs/models/gemma-2-2b.yaml", "gemma-2-9b": ROOT / "configs/models/gemma-2-9b.yaml",
          "tiny": ROOT / "configs/models/tiny-llama.yaml"}  # tiny: a CPU smoke test of the script
BATCH, SEQ, GEN_BATCH, GEN_PROMPT, GEN_NEW, SHARED = 8, 1024, 32, 896, 128, 850
# a CPU smoke test of the generation parts: BENCH_GEN_BATCH=2 BENCH_GEN_NEW=16 (and --model tiny)
GEN_BATCH = int(os.environ.get("BENCH_GEN_BATCH", GEN_BATCH))
GEN_NEW = int(os.environ.get("BENCH_GEN_NEW", GEN_NEW))
DCM_EPOCHS, DCM_BATCHES, ROTATE = 50, 26, 4


# ---------------------------------------------------------------------------- helpers

def _median_time(fn, warm: int = 2, reps: int = 5) -> float:
    import jax

    for _ in range(warm):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _model(name: str):
    from cca_jax import load_model

    # BENCH_ATTENTION (set by --attention): "xla" or "tokamax" for calls without a cache
    model, _ = load_model(MODELS[name], dtype="bfloat16", with_tokenizer=False,
                          attention=os.environ.get("BENCH_ATTENTION", "xla"))
    return _tuning(model)


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _tuning(model):
    """BENCH_CAUSAL_BLOCKS / BENCH_MIN_BLOCK: try other causal query-block settings (the
    model config's ``tuning``: every program compiled for this model uses them)."""
    changes = {field: int(os.environ[env]) for env, field in (("BENCH_CAUSAL_BLOCKS", "causal_blocks"),
                                                              ("BENCH_MIN_BLOCK", "min_block")) if os.environ.get(env)}
    return model.with_tuning(**changes) if changes else model


def _generate_options() -> dict:
    """BENCH_DECODE_WRITE_FIRST=0/1: decode steps read the cache as a constant / write first;
    BENCH_DECODE_AHEAD=0/1: generate reads each decode chunk before / after sending the next."""
    return {opt: bool(int(os.environ[env])) for env, opt in (("BENCH_DECODE_WRITE_FIRST", "write_first"),
                                                             ("BENCH_DECODE_AHEAD", "ahead")) if os.environ.get(env)}


def _random_tokens(key, shape, vocab):
    import jax

    return jax.random.randint(key, shape, 3, vocab)


# --------------------------------------------------------------------------------- parts

def part_limits(_name: str) -> dict:
    """Copy bandwidth (bytes read + written) and the bf16 matrix-product rate."""
    import jax
    import jax.numpy as jnp

    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB each way
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    c = jnp.asarray(1.0, jnp.bfloat16)
    copy = jax.jit(lambda x, c: x + c)  # elementwise: one read, one write, cannot be elided
    t = _median_time(lambda: copy(x, c), warm=2, reps=10)
    bw = 2 * n * 2 / t
    del x
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    tm = _median_time(lambda: mm(a, b), warm=3, reps=20)
    return {"copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": 2 * m ** 3 / tm / 1e12,
            "device": str(jax.devices()[0].device_kind)}


def _flops_train_step(cfg, B: int, T: int, targets=("q", "k", "v", "up")) -> float:
    """Matrix-product FLOPs of one amplification step (forward, input gradients everywhere,
    weight gradients of the target leaves only; remat recomputation not counted)."""
    D, H, KV, Dh, F, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_layers
    per_w = {"q": D * H * Dh, "k": D * KV * Dh, "v": D * KV * Dh, "o": H * Dh * D, "gate": D * F, "up": D * F,
             "down": F * D}
    tokens = B * T
    proj = 2 * tokens * L * sum(per_w.values())
    attn = 2 * 2 * B * L * H * Dh * T * (T + 1) / 2  # scores and values, causal
    head = 2 * B * cfg.hidden_size * cfg.vocab_size  # last position only
    fwd = proj + attn + head
    bwd_x = proj + 2 * attn + head
    bwd_w = 2 * tokens * L * sum(per_w[t] for t in targets)
    return fwd + bwd_x + bwd_w


def part_dcm(name: str, unroll: bool = True) -> dict:
    """A DCM step as dcm.train_mask runs it: ``unroll`` over per-layer weights (the step's
    speed), or scanned over the stacked weights and caches (the default since the tenth
    session: one layer to compile); ``first_step_s`` is the first call, compile included."""
    import jax
    import jax.numpy as jnp

    from cca_jax.cca import components, dcm
    from cca_jax.model.transformer import unstack_layers

    model = _model(name)
    cfg, params = model.config, (unstack_layers(model.params()) if unroll else model.params())
    del model
    k = jax.random.split(jax.random.key(0), 3)
    tokens = _random_tokens(k[0], (BATCH, SEQ), cfg.vocab_size)
    mask = jnp.ones((BATCH, SEQ), bool)
    desired = _random_tokens(k[1], (BATCH,), cfg.vocab_size)
    undesired = _random_tokens(k[2], (BATCH,), cfg.vocab_size)
    t_cache = _median_time(lambda: dcm.prefix_cache(cfg, params, tokens, mask), warm=1, reps=5)
    # as train_mask runs: every step on another batch's cache (ROTATE batches, cached once)
    caches = [dcm.prefix_cache(cfg, params, jnp.roll(tokens, i, axis=0), mask) for i in range(ROTATE)]
    if not unroll:
        caches = [c.stacked() for c in caches]
    cache = caches[0]
    config = dcm.DCMConfig()
    opt = dcm.make_optimizer(config, DCM_BATCHES)
    m = components.full(cfg, 1.0)
    state = opt.init(m)
    last = tokens[:, -1]
    holder = {"m": m, "state": state, "i": 0}

    def step(rotate=True):  # mask_step donates m and state: each step's outputs feed the next
        holder["i"] += 1
        c = caches[holder["i"] % ROTATE] if rotate else cache
        out = dcm.mask_step(cfg, opt, config.reg, config.mode, params, holder["m"], holder["state"], c, last,
                            desired, undesired)
        holder["m"], holder["state"] = out[0], out[1]
        return out[2]

    t = time.perf_counter()
    jax.block_until_ready(step())
    first = time.perf_counter() - t
    t_step = _median_time(step, warm=3, reps=20)
    t_same = _median_time(lambda: step(rotate=False), warm=3, reps=20)
    # fewest bytes: weights read in the forward and again in the backward, the cached
    # keys/values read twice too
    kv_bytes = _tree_bytes((cache.k, cache.v))
    w_bytes = _tree_bytes(params)
    return {"dcm_step_s": t_step, "dcm_step_same_batch_s": t_same, "cache_batch_s": t_cache, "first_step_s": first,
            "dcm_step_amortised_1_epoch_s": t_step + t_cache,
            "dcm_step_amortised_50_epochs_s": t_step + t_cache / DCM_EPOCHS,
            "dcm_step_bytes_floor": 2 * (w_bytes + kv_bytes), "peak_GiB": _peak_gib()}


def part_amplify(name: str, remat: bool | str, trace_dir: str | None = None, unroll: bool = False) -> dict:
    import jax
    import numpy as np

    from cca_jax.cca import amplify as amp
    from cca_jax.cca import components
    from cca_jax.cca.examples import Batch

    model = _model(name)
    cfg, params = model.config, model.params()
    rng = np.random.default_rng(0)
    # a ~3% circuit (the row mask does not change the work, only which rows move)
    mask = {k: rng.random(s) < 0.03 for k, s in components.shapes(cfg).items()}
    acfg = amp.AmplifyConfig(remat=remat, unroll=unroll)
    opt = amp.make_optimizer(acfg, mask, params)
    master, opt_state, frozen = amp.init_state(params, opt)
    del params
    tokens = rng.integers(3, cfg.vocab_size, (BATCH, SEQ), dtype=np.int32)
    batch = Batch(tokens, np.ones((BATCH, SEQ), bool), rng.integers(3, cfg.vocab_size, BATCH, dtype=np.int32),
                  rng.integers(3, cfg.vocab_size, BATCH, dtype=np.int32))
    apply = amp.step_fn(opt)
    dtype = model.dtype
    holder = {"master": master, "opt": opt_state}

    def step():  # exactly the pipeline's amplification step
        train_now = jax.tree.map(lambda x: x.astype(dtype), holder["master"])
        _, grad = amp.full_batch_grad(cfg, train_now, frozen, [batch], BATCH, remat, unroll)
        del train_now
        holder["master"], holder["opt"] = apply(holder["master"], holder["opt"], grad)
        return holder["master"]

    t0 = time.perf_counter()
    jax.block_until_ready(step())
    first = time.perf_counter() - t0  # compile + one step
    t = _median_time(step, warm=1, reps=5)
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(step())
    flops = _flops_train_step(cfg, BATCH, SEQ, acfg.targets)
    return {"amplify_step_s": t, "remat": remat, "unroll": unroll, "first_step_s": first, "train_flops": flops,
            "peak_GiB": _peak_gib()}


def part_generate(name: str, shared: bool) -> dict:
    import jax
    import numpy as np

    from cca_jax.generate import generate

    model = _model(name)
    cfg = model.config
    rng = np.random.default_rng(0)
    if shared:
        ctx = rng.integers(3, cfg.vocab_size, SHARED).tolist()
        prompts = [ctx + rng.integers(3, cfg.vocab_size, GEN_PROMPT - SHARED).tolist() for _ in range(GEN_BATCH)]
    else:
        prompts = [rng.integers(3, cfg.vocab_size, GEN_PROMPT).tolist() for _ in range(GEN_BATCH)]

    def run():
        out = generate(model, prompts, GEN_NEW, eos_token_id=[], batch_size=GEN_BATCH, **_generate_options())
        assert all(len(o) == GEN_NEW for o in out)
        return jax.numpy.zeros(())

    t = _median_time(run, warm=1, reps=3)
    params = model.params()
    w_bytes = _tree_bytes(params) - params["embed"].size * params["embed"].dtype.itemsize * 0  # tied head reads it all
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    mean_len = GEN_PROMPT + GEN_NEW / 2
    if shared:  # the shared context need only be read once per step, not once per row
        kv_bytes = kv_per_token * (SHARED + GEN_BATCH * (mean_len - SHARED))
    else:
        kv_bytes = kv_per_token * GEN_BATCH * mean_len
    return {"gen_s": t, "gen_tokens_per_s": GEN_BATCH * GEN_NEW / t, "decode_bytes_per_step_floor": w_bytes + kv_bytes,
            "prefill_flops": 2 * GEN_BATCH * (GEN_PROMPT - (SHARED if shared else 0)) * _matmul_params(cfg),
            "peak_GiB": _peak_gib()}


def _real_model():
    """(model, tokenizer, name): BENCH_GGUF, else the offline SmolLM2-135M; bf16."""
    from cca_jax import load_model, models

    path = os.environ.get("BENCH_GGUF") or str(models.resolve("smollm2-135m"))
    model, tok = load_model(path, dtype="bfloat16", attention=os.environ.get("BENCH_ATTENTION", "xla"))
    return _tuning(model), tok, Path(path).name


def _gsm_prompts(tok, n: int) -> list[list[int]]:
    """n GSM 8-shot CoT prompts (the evaluation's), questions spread over the builtin templates."""
    from cca_jax.data import gsm_symbolic
    from cca_jax.data.prompt import encode

    items = gsm_symbolic.load_items("builtin", per_template=-(-n // 24) + 1, seed=0)
    items = items[::max(1, len(items) // n)][:n]
    return [encode(tok, it.question, 8) for it in items]


def part_generate_spec(_name: str) -> dict:
    """Plain vs speculative (n-gram) greedy generation, real weights, GSM 8-shot prompts."""
    import jax.numpy as jnp

    from cca_jax import speculative
    from cca_jax.generate import generate

    model, tok, label = _real_model()
    cfg = model.config
    prompts = _gsm_prompts(tok, GEN_BATCH)
    ks = [int(x) for x in os.environ.get("BENCH_SPEC_K", "2,3,4,6").split(",") if x.strip()]
    ngram = int(os.environ.get("BENCH_SPEC_NGRAM", "3"))
    iters = int(os.environ.get("BENCH_SPEC_ITERS", "8"))
    base = {"eos_token_id": [], "batch_size": GEN_BATCH, **_generate_options()}
    outs = {}

    def run(name, **kw):
        outs[name] = generate(model, prompts, GEN_NEW, **base, **kw)
        assert all(len(o) == GEN_NEW for o in outs[name])
        return jnp.zeros(())

    t_plain = _median_time(lambda: run("plain"), warm=1, reps=3)
    spec = {}
    for k in ks:
        t = _median_time(lambda k=k: run(k, speculative="ngram", spec_k=k, spec_ngram=ngram, spec_iters=iters),
                         warm=1, reps=3)
        st = speculative.last_stats()
        spec[str(k)] = {"gen_s": t, "gen_tokens_per_s": GEN_BATCH * GEN_NEW / t, "speedup_vs_plain": t_plain / t,
                        "acceptance": st.acceptance, "tokens_per_step": st.tokens_per_step,
                        "verify_steps_run": st.iterations,
                        "identical_rows": sum(a == b for a, b in zip(outs[k], outs["plain"]))}
    params = model.params()
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    mean_len = sum(map(len, prompts)) / len(prompts) + GEN_NEW / 2
    return {"model": label, "ngram": ngram, "iters": iters, "gen_s": t_plain, "gen_tokens_per_s": GEN_BATCH * GEN_NEW / t_plain,
            "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "spec": spec,
            "decode_bytes_per_step_floor": _tree_bytes(params) + kv_per_token * GEN_BATCH * mean_len,
            "prefill_flops": 2 * sum(map(len, prompts)) * _matmul_params(cfg), "peak_GiB": _peak_gib()}


def part_spec_cost(name: str) -> dict:
    """Per-step time of a plain decode step and of a speculative verify step (k + 1 tokens
    per row), and of the prefill, at the ``generate`` part's shape on ``name`` (random
    weights: what a step costs does not depend on what was drafted). With the verify steps
    a real model needed on GSM prompts (``generate_spec``), the report projects this
    model's speculative tokens/s against its plain-decode floor."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cca_jax import generate as gen
    from cca_jax import speculative as sp
    from cca_jax.model.cache import init_cache
    from cca_jax.model.prefill import left_pad, prefill

    model = _model(name)
    cfg = model.config
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, GEN_PROMPT).tolist() for _ in range(GEN_BATCH)]
    ks = [int(x) for x in os.environ.get("BENCH_SPEC_K", "2,3,4,6").split(",") if x.strip()]
    iters = int(os.environ.get("BENCH_SPEC_ITERS", "8"))
    config = gen.GenerationConfig.of(GEN_NEW, eos_token_id=[], batch_size=GEN_BATCH)
    plan = gen._plan(model, prompts, config)
    toks, mask = left_pad(prompts, plan.suffix_len, 0)

    def fresh():
        cache = init_cache(cfg, GEN_BATCH, plan.size, plan.dtype)
        return prefill(cfg, plan.stacked, jnp.asarray(toks), jnp.asarray(mask), cache)

    t_prefill = _median_time(lambda: fresh()[0], warm=1, reps=3)

    def per_step(call, n_calls: int) -> float:
        """Seconds per step over n_calls calls after a first one (compile); call() returns
        (an array to wait for, the steps the call ran)."""
        jax.block_until_ready(call()[0])
        t = time.perf_counter()
        done = [call() for _ in range(n_calls)]
        jax.block_until_ready(done[-1][0])
        return (time.perf_counter() - t) / sum(int(steps) for _, steps in done)

    logits, cache = fresh()
    holder = {"s": (cache, logits, jnp.zeros((GEN_BATCH,), bool), jax.random.key(0))}
    chunk = max(1, GEN_NEW // 4)

    def plain_chunk():  # 4 chunks fill the cache to the budget, as generate's decode does
        *st, out = gen.decode_chunk(cfg, plan.params, *holder["s"], plan.eos, 0, chunk, config.sampling, True)
        holder["s"] = tuple(st)
        return out, chunk

    t_step = per_step(plain_chunk, 3)
    del holder["s"], logits, cache
    P = jnp.int32(plan.shared + plan.suffix_len)
    # no budget: no row ever finishes, so every call runs all its steps whatever the random
    # weights' drafts keep (slots past the cache are dropped; a step costs the same)
    budget = jnp.int32(2**30)
    buf, offset = sp._buffer(plan, toks, mask)
    verify = {}
    for k in ks:
        logits, cache = fresh()
        spec = sp.Speculation("ngram", k, 3, iters)
        holder["s"], _ = sp.init_state(cache, None, logits, jnp.asarray(buf), jnp.asarray(offset), jax.random.key(0),
                                       plan.eos, P, budget, config.sampling)

        def verify_chunk(spec=spec):
            holder["s"], view = sp.verify_chunk(cfg, plan.params, None, None, holder["s"], jnp.zeros((GEN_BATCH,), bool),
                                                plan.eos, P, budget, spec, config.sampling, True)
            return view[0], view[-1]

        verify[str(k)] = per_step(verify_chunk, 4)
        del holder["s"], logits, cache
    params = model.params()
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    return {"model": name, "prefill_s": t_prefill, "decode_step_s": t_step, "verify_step_s": verify, "iters": iters,
            "decode_bytes_per_step_floor": _tree_bytes(params) + kv_per_token * GEN_BATCH * (GEN_PROMPT + GEN_NEW / 2),
            "prefill_flops": 2 * GEN_BATCH * GEN_PROMPT * _matmul_params(cfg)}


def _matmul_params(cfg) -> int:
    D, H, KV, Dh, F, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_layers
    return L * (D * H * Dh * 2 + 2 * D * KV * Dh + 3 * D * F)


PARTS = {
    "limits": lambda n: part_limits(n),
    "dcm": lambda n: part_dcm(n),
    "dcm_scan": lambda n: part_dcm(n, unroll=False),
    "amplify": lambda n: part_amplify(n, remat=False),
    "amplify_remat": lambda n: part_amplify(n, remat=True),
    **{f"amplify_{k}": (lambda n, k=k: part_amplify(n, remat=k)) for k in ("dots", "qkv_mlp", "qkv_mlp_out")},
    "amplify_dots_unroll": lambda n: part_amplify(n, remat="dots", unroll=True),
    "amplify_remat_unroll": lambda n: part_amplify(n, remat=True, unroll=True),
    "generate": lambda n: part_generate(n, shared=False),
    "generate_shared": lambda n: part_generate(n, shared=True),
    "generate_spec": lambda n: part_generate_spec(n),
    "spec_cost": lambda n: part_spec_cost(n),
}


# ------------------------------------------------------------------------------ driver

def _sub(args: list[str], timeout: float, env: dict | None = None) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower()
        return {"error": "OOM" if oom else " | ".join(tail)}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def _fmt(x, spec=".3f"):
    if isinstance(x, float) and spec == ".3f" and abs(x) < 0.1:
        spec = ".4f"  # step times of a few milliseconds
    return "-" if x is None else (x if isinstance(x, str) else format(x, spec))


def _ratio(base, ours):
    if isinstance(base, (int, float)) and isinstance(ours, (int, float)) and ours > 0:
        return base / ours
    return None


def report(r: dict) -> str:
    lim, base = r.get("limits", {}), r.get("baseline", {})
    bw = lim.get("copy_bandwidth_GBps", 0) * 1e9 or None
    mm = lim.get("bf16_matmul_TFLOPs", 0) * 1e12 or None
    rows = []

    def row(what, b, ours, ratio, frac, note=""):
        rows.append(f"| {what} | {_fmt(b)} | {_fmt(ours)} | {_fmt(ratio, '.2f')}x | {_fmt(frac, '.0%')} | {note} |")

    d = r.get("dcm", {})
    if "dcm_step_s" in d:
        floor = d["dcm_step_bytes_floor"] / bw if bw else None
        b = base.get("dcm_step_s_masks_only")
        bw_ = base.get("dcm_step_s_weights_grad")
        row(f"DCM mask step (s), cached prefix, {ROTATE} batches in turn", b, d["dcm_step_s"], _ratio(b, d["dcm_step_s"]),
            floor / d["dcm_step_s"] if floor else None,
            f"vs weights-grad baseline {_fmt(_ratio(bw_, d['dcm_step_s']), '.1f')}x; "
            f"one batch over and over {_fmt(d.get('dcm_step_same_batch_s'), '.4f')} s")
        row("DCM step + prefix caching over 1 epoch (s)", b, d["dcm_step_amortised_1_epoch_s"],
            _ratio(b, d["dcm_step_amortised_1_epoch_s"]), None, f"caching one batch {d['cache_batch_s']:.3f} s")
        row(f"DCM step + caching over {DCM_EPOCHS} epochs (s)", b, d["dcm_step_amortised_50_epochs_s"],
            _ratio(b, d["dcm_step_amortised_50_epochs_s"]), None, "")
    elif "dcm" in r:
        row("DCM mask step (s)", base.get("dcm_step_s_masks_only"), d.get("error"), None, None)
    ds = r.get("dcm_scan", {})
    if "dcm_step_s" in ds:
        b = base.get("dcm_step_s_masks_only")
        row(f"DCM mask step, layers scanned (s), {ROTATE} batches in turn", b, ds["dcm_step_s"],
            _ratio(b, ds["dcm_step_s"]), None,
            f"first call (compile) {_fmt(ds.get('first_step_s'), '.1f')} s vs unrolled {_fmt(d.get('first_step_s'), '.1f')} s")
    labels = {"amplify": "amplification grad step, no remat (s)", "amplify_remat": "amplification grad step, full remat (s)",
              "amplify_dots": "amplification grad step, remat dots (s)",
              "amplify_qkv_mlp": "amplification grad step, remat qkv_mlp (s)",
              "amplify_qkv_mlp_out": "amplification grad step, remat qkv_mlp_out (s)",
              "amplify_dots_unroll": "amplification grad step, remat dots, layers unrolled (s)",
              "amplify_remat_unroll": "amplification grad step, full remat, layers unrolled (s)"}
    for key, label in labels.items():
        a = r.get(key, {})
        if "amplify_step_s" in a:
            floor = a["train_flops"] / mm if mm else None
            b = base.get("update_step_s")
            row(label, b, a["amplify_step_s"], _ratio(b, a["amplify_step_s"]), floor / a["amplify_step_s"] if floor else None,
                f"peak {_fmt(a['peak_GiB'], '.1f')} GiB vs baseline {_fmt(base.get('peak_mem_GiB_train'), '.1f')} GiB; "
                f"first step (compile) {_fmt(a.get('first_step_s'), '.0f')} s")
        elif key in r:
            row(label, base.get("update_step_s"), a.get("error"), None, None)
    for key, label in (("generate", "greedy generation (tok/s)"), ("generate_shared", "greedy generation, shared 850-token context (tok/s)")):
        g = r.get(key, {})
        if "gen_tokens_per_s" in g:
            b = base.get("gen_tokens_per_s")
            # the decode floor only (prefill at the matmul rate added): tokens/s ceiling
            floor_s = GEN_NEW * g["decode_bytes_per_step_floor"] / bw + g["prefill_flops"] / mm if bw and mm else None
            ratio = g["gen_tokens_per_s"] / b if isinstance(b, (int, float)) else None
            row(label, b, g["gen_tokens_per_s"], ratio, floor_s / g["gen_s"] if floor_s else None,
                f"{g['gen_s']:.3f} s for {GEN_BATCH}x{GEN_NEW}")
        elif key in r:
            row(label, base.get("gen_tokens_per_s"), g.get("error"), None, None)
    g = r.get("generate_spec", {})
    if "spec" in g:
        # the plain-decode floor of this model: the tokens/s ceiling of any plain decoder
        floor_s = GEN_NEW * g["decode_bytes_per_step_floor"] / bw + g["prefill_flops"] / mm if bw and mm else None
        what = f"greedy generation, GSM 8-shot, {g['model']}"
        row(f"{what}, plain (tok/s)", None, g["gen_tokens_per_s"], None, floor_s / g["gen_s"] if floor_s else None,
            f"{g['gen_s']:.3f} s for {GEN_BATCH}x{GEN_NEW}")
        for k, v in g["spec"].items():
            # the limit column above 100% is speed beyond the plain-decode floor (target 150%)
            row(f"{what}, speculative ngram k={k} (tok/s)", None, v["gen_tokens_per_s"], v["speedup_vs_plain"],
                floor_s / v["gen_s"] if floor_s else None,
                f"speed-up vs plain; acceptance {v['acceptance']:.2f}, {v['tokens_per_step']:.2f} tokens/step, "
                f"{v['verify_steps_run']} verify steps; identical rows {v['identical_rows']}/{GEN_BATCH}")
    elif "generate_spec" in r:
        row("greedy generation, GSM 8-shot, speculative", None, g.get("error"), None, None)
    c = r.get("spec_cost", {})
    if "verify_step_s" in c:
        floor_s = GEN_NEW * c["decode_bytes_per_step_floor"] / bw + c["prefill_flops"] / mm if bw and mm else None
        plain_s = c["prefill_s"] + GEN_NEW * c["decode_step_s"]
        name = c.get("model", "gemma-2-2b")
        row(f"{name} plain: prefill + {GEN_NEW} decode steps, from step times (tok/s)", None, GEN_BATCH * GEN_NEW / plain_s,
            None, floor_s / plain_s if floor_s else None,
            f"prefill {c['prefill_s']:.3f} s, decode step {1e3 * c['decode_step_s']:.2f} ms")
        for k, t in c["verify_step_s"].items():
            real = g.get("spec", {}).get(k)
            if real is None:
                row(f"{name} verify step k={k} (ms)", None, 1e3 * t, c["decode_step_s"] / t, None,
                    "speed-up column: decode step / verify step")
                continue
            spec_s = c["prefill_s"] + real["verify_steps_run"] * t
            row(f"{name} speculative k={k}, projected with {g['model']}'s verify steps on GSM (tok/s)", None,
                GEN_BATCH * GEN_NEW / spec_s, plain_s / spec_s, floor_s / spec_s if floor_s else None,
                f"verify step {1e3 * t:.2f} ms ({t / c['decode_step_s']:.2f}x a decode step) x "
                f"{real['verify_steps_run']} steps run for {GEN_NEW} tokens; speed-up vs plain from step times")
    elif "spec_cost" in r:
        row("verify step cost", None, c.get("error"), None, None)
    for key in ("dcm_9b", "amplify_remat_9b"):
        if key in r:
            v = r[key]
            t = v.get("dcm_step_s", v.get("amplify_step_s"))
            row(f"gemma-2-9b {key.replace('_9b', '')} step (s)", "OOM (baseline README)", t if t is not None else v.get("error"),
                None, None, f"peak {_fmt(v.get('peak_GiB'), '.1f')} GiB" if t is not None else "")
    head = ("| measurement | torch baseline | cca_jax | speed-up | of hardware limit | notes |\n"
            "|---|---|---|---|---|---|")
    lim_line = (f"limits measured in this call on {lim.get('device', '?')}: copy {_fmt(lim.get('copy_bandwidth_GBps'), '.0f')} GB/s, "
                f"bf16 matmul {_fmt(lim.get('bf16_matmul_TFLOPs'), '.0f')} TFLOP/s; cca_jax attention: {r.get('attention', 'xla')}")
    return "\n".join([lim_line, head, *rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=list(PARTS), help="run one measurement and print it as JSON")
    ap.add_argument("--model", default="gemma-2-2b", choices=list(MODELS))
    ap.add_argument("--baseline", default=str(ROOT.parent / "shared/bench/torch_baseline.py"))
    ap.add_argument("--only", default="limits,dcm,amplify_dots,amplify_dots_unroll,amplify_remat,generate,generate_shared,"
                                      "generate_spec,spec_cost,baseline",
                    help="comma-separated parts for the driver")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--attention", default=os.environ.get("BENCH_ATTENTION", "xla"),
                    help="cca_jax's attention for calls without a cache: xla | tokamax | tokamax:<impl>")
    args = ap.parse_args()
    os.environ["BENCH_ATTENTION"] = args.attention  # the parts run as subprocesses
    if args.part:
        print(json.dumps(PARTS[args.part](args.model)))
        return
    only = args.only.split(",")
    results: dict = {"attention": args.attention}
    me = [sys.executable, str(Path(__file__).resolve())]
    for part in only:
        if part == "baseline":
            if not Path(args.baseline).exists():
                results["baseline"] = {"error": f"no baseline script at {args.baseline}"}
            else:
                results["baseline"] = _sub([sys.executable, args.baseline, "gemma-2-2b"], args.timeout)
        elif part == "9b":
            # JAX takes 75% of the card by default; a 9b step needs more of one 80 GB GPU
            env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
            for p in ("dcm", "amplify_remat"):
                results[f"{p}_9b"] = _sub(me + ["--part", p, "--model", "gemma-2-9b"], args.timeout, env)
        else:
            results[part] = _sub(me + ["--part", part, "--model", args.model], args.timeout)
        print(f"[{part}] {json.dumps(results.get(part, {k: v for k, v in results.items() if k.endswith('_9b')}))}",
              flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_perf.json").write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
