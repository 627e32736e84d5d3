"""Each CCA stage on 1 and 2 GPUs (issue 20), with the planner's memory beside the
measured peak, and the real Qwen run on 1 vs 2 GPUs.

    python bench/mesh_perf.py [--only gemma-2-9b,olmo-2-13b,plan,qwen] [--stages dcm,generate,amplify,sft]
                              [--out DIR]

Random-weight models of the paper's sizes (configs/models/gemma-2-9b.yaml and
olmo-2-13b.yaml, bfloat16) at the paper's shapes: generation at batch 32 (1,024-token
prompts sharing a 896-token few-shot context, 64 new tokens, EOS ignored), DCM mask
steps on batch-8 (gemma) / batch-6 (OLMo) prefix caches of 1,024 tokens (4 batches
cached, used in turn, as ``dcm.train_mask`` runs), an amplification step (full batch of
the same size, remat ``dots``, float32 masters of q/k/v/up), a LoRA SFT step (batch 8 /
6 of 1,024 tokens, remat). Every measurement is a subprocess of its own (peak memory is
per process), on one GPU (``CUDA_VISIBLE_DEVICES=0``) and on both with each layout of
``cca_jax.mesh`` worth trying for the stage; each reports the median step time, the
peak ``peak_bytes_in_use`` over the GPUs, and the planner's prediction for the same
shapes (``cca_jax.plan``, compiled on this GPU at 2 and 4 layers, extrapolated).

``--only plan`` prints ``cca-jax plan`` for the paper's gemma-2-9b and OLMo-2-13B configs
on 1 and 2 GPUs (the whole run, batch 6 for OLMo). ``--only qwen`` runs
``configs/demo.yaml`` (or $QWEN_CONFIG) on the Qwen2.5-Coder-0.5B GGUF at $QWEN_GGUF in
float32 on one GPU and on two (mesh 1 x 2), and compares circuit, pivots and
accuracies. One model's parts take about 8-10 minutes: run them in separate calls.
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
sys.path.insert(0, str(ROOT))  # this checkout's cca_jax
MODELS = {"gemma-2-9b": ("configs/models/gemma-2-9b.yaml", 8), "olmo-2-13b": ("configs/models/olmo-2-13b.yaml", 6),
          "tiny": ("configs/models/tiny-llama.yaml", 4)}  # tiny: a CPU smoke test of the script
PROMPT, SHARED, GEN_BATCH, GEN_NEW, ROTATE, LORA_ANSWER = 1024, 896, 32, 64, 4, 128
# per stage, the 2-GPU meshes and layouts tried (mesh.py): 1x2 splits heads over tp,
# 2x1 the model dimension over fsdp
LAYOUTS = {"generate": ("1x2:tp", "1x2:replicated", "2x1:sharded"),
           "dcm": ("1x2:replicated", "1x2:tp", "2x1:sharded"),
           "amplify": ("1x2:sharded", "2x1:sharded", "1x2:replicated"),
           "sft": ("1x2:sharded", "2x1:sharded", "1x2:replicated")}
GIB = 2**30


# ------------------------------------------------------------------ one measurement (subprocess)

def _median(fn, warm: int = 1, reps: int = 5) -> float:
    import jax

    for _ in range(warm):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _peak() -> float | None:
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / GIB if peaks else None


def _setup(name: str, spec: str):
    """(model in its stored layout, the stage's params, mesh or None, layout, planner mesh)."""
    import jax

    from cca_jax import load_model, make_mesh, mesh as mesh_lib
    from cca_jax import plan

    path, _ = MODELS[name]
    if spec == "1":
        model, _ = load_model(ROOT / path, dtype="bfloat16", with_tokenizer=False)
        return model, model.params(), None, "sharded", plan.make_mesh(1, 1)
    shape, layout = spec.split(":")
    fsdp, tp = (int(v) for v in shape.split("x"))
    mesh = make_mesh(fsdp, tp, jax.devices()[:fsdp * tp])
    model, _ = load_model(ROOT / path, dtype="bfloat16", with_tokenizer=False, mesh=mesh)
    return model, mesh_lib.relayout(model.params(), layout), mesh, layout, mesh


def _planned(stage: str, cfg, mesh, layout: str, w, extra=None) -> float:
    """The planner's peak per device for this measurement's shapes (GiB)."""
    import jax.numpy as jnp

    from cca_jax import plan

    def at(c):
        stored = plan.abstract_params(c, jnp.bfloat16, mesh)
        if stage == "generate":
            return [plan.plan_generate(c, jnp.bfloat16, mesh, stored, layout, w)]
        if stage == "dcm":
            return [plan.plan_dcm(c, jnp.bfloat16, mesh, stored, layout, w)]
        if stage == "amplify":
            return plan.plan_amplify(c, jnp.bfloat16, mesh, stored, layout, w, extra, layout)[:1]
        return plan.plan_sft(c, jnp.bfloat16, mesh, stored, layout, w, extra, "sft_lora", layout)[:1]

    return plan.extrapolated(at, cfg)[0].peak / GIB


def _workload(B: int):
    from cca_jax import plan

    return plan.Workload(prompt=PROMPT, gen_batch=GEN_BATCH, gen_new=GEN_NEW, val_batch=GEN_BATCH,
                         examples=ROTATE * B, pivot_len=PROMPT, dcm_batch=B, amp_batch=B, sft_batch=B, sft_micro=1,
                         sft_len=PROMPT + LORA_ANSWER, sft_answer=LORA_ANSWER)


def part(name: str, stage: str, spec: str) -> dict:
    import jax
    import numpy as np

    from cca_jax import mesh as mesh_lib

    model, params, mesh, layout, pmesh = _setup(name, spec)
    cfg, B = model.config, MODELS[name][1]
    w = _workload(B)
    rng = np.random.default_rng(0)
    out = {"model": name, "stage": stage, "mesh": spec, "devices": 1 if mesh is None else mesh.size}
    if stage == "generate":
        from cca_jax.generate import generate

        planned = _planned(stage, cfg, pmesh, layout, w)
        ctx = rng.integers(3, cfg.vocab_size, SHARED).tolist()
        prompts = [ctx + rng.integers(3, cfg.vocab_size, PROMPT - SHARED).tolist() for _ in range(GEN_BATCH)]
        m = model.with_params(params)

        def run():
            res = generate(m, prompts, GEN_NEW, eos_token_id=[], batch_size=GEN_BATCH)
            assert all(len(r) == GEN_NEW for r in res)
            return jax.numpy.zeros(())

        t = _median(run, warm=1, reps=3)
        out.update(seconds=t, tokens_per_s=GEN_BATCH * GEN_NEW / t)
    elif stage == "dcm":
        from cca_jax.cca import components, dcm
        from cca_jax.cca.examples import Batch

        planned = _planned(stage, cfg, pmesh, layout, w)
        bs = [Batch(rng.integers(3, cfg.vocab_size, (B, PROMPT), dtype=np.int32), np.ones((B, PROMPT), bool),
                    rng.integers(3, cfg.vocab_size, B, dtype=np.int32), rng.integers(3, cfg.vocab_size, B, dtype=np.int32))
              for _ in range(ROTATE)]
        caches = dcm._prefix_caches(cfg, params, bs)  # as train_mask makes them
        layers = mesh_lib.per_layer(params)
        c = dcm.DCMConfig()
        opt = dcm.make_optimizer(c, ROTATE)
        m0 = components.full(cfg, 1.0)
        holder = {"m": m0, "state": opt.init(m0), "i": 0}
        args = [[mesh_lib.rows(x, layers) for x in (b.tokens[:, -1], b.desired, b.undesired)] for b in bs]

        def step():
            i = holder["i"] = holder["i"] + 1
            r = dcm.mask_step(cfg, opt, jax.numpy.float32(c.reg), c.mode, layers, holder["m"], holder["state"],
                              caches[i % ROTATE], *args[i % ROTATE])
            holder["m"], holder["state"] = r[0], r[1]
            return r[2]

        out.update(seconds=_median(step, warm=3, reps=20))
    elif stage == "amplify":
        from cca_jax.cca import amplify as amp
        from cca_jax.cca import components
        from cca_jax.cca.examples import LocalizationExample

        acfg = amp.AmplifyConfig(remat="dots", batch_size=B)
        planned = _planned(stage, cfg, pmesh, layout, w, acfg)
        exs = [LocalizationExample(tuple(int(t) for t in rng.integers(3, cfg.vocab_size, PROMPT)),
                                   int(rng.integers(3, cfg.vocab_size)), int(rng.integers(3, cfg.vocab_size)), 0, i)
               for i in range(B)]
        mask = {k: rng.random(s) < 0.03 for k, s in components.shapes(cfg).items()}  # a ~3% circuit
        trainer = amp.Amplifier(model.with_params(params), exs, mask, acfg)  # the stored model stays, as in a run
        state = {"s": trainer.init(), "i": 0}

        def step():
            m, o, _ = trainer.step(*state["s"], state["i"])
            state["s"], state["i"] = (m, o), state["i"] + 1
            return m

        out.update(seconds=_median(step, warm=1, reps=5))
    else:  # sft: LoRA
        from cca_jax.baselines import sft

        scfg = sft.SFTConfig(batch_size=B, steps=100, remat=True)
        planned = _planned(stage, cfg, pmesh, layout, w, scfg)
        exs = [sft.Example(0, i, tuple(int(t) for t in rng.integers(3, cfg.vocab_size, PROMPT)),
                           tuple(int(t) for t in rng.integers(3, cfg.vocab_size, LORA_ANSWER))) for i in range(2 * B)]
        trainer = sft.FineTuner("sft_lora", model.with_params(params), exs, scfg)
        state = {"s": trainer.init(), "i": 0}

        def step():
            m, o, _ = trainer.step(*state["s"], state["i"])
            state["s"], state["i"] = (m, o), state["i"] + 1
            return m

        out.update(seconds=_median(step, warm=1, reps=5))
    out.update(peak_GiB=_peak(), planned_GiB=planned)
    return out


# ------------------------------------------------------------------------------ driver

def _env(spec: str) -> dict:
    # one GPU: the other is hidden; NCCL's multicast settings of the machine are kept
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
    if spec == "1":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def _sub(args: list[str], env: dict, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = p.stderr or p.stdout
        oom = "RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower()
        return {"error": "OOM" if oom else " | ".join(err.strip().splitlines()[-3:])[-400:]}
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def _row(r: dict, one: dict | None) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['stage']} | {r['mesh']} | {r['error']} | | | | |"
    speed = one["seconds"] / r["seconds"] if one and "seconds" in one and r["devices"] > 1 else None
    ratio = r["planned_GiB"] / r["peak_GiB"] if r.get("peak_GiB") else None
    f = (lambda x, s: "-" if x is None else format(x, s))
    return (f"| {r['model']} | {r['stage']} | {r['mesh']} | {f(r['seconds'], '.4f')} | {f(speed, '.2f')} | "
            f"{f(r.get('peak_GiB'), '.1f')} | {f(r['planned_GiB'], '.1f')} | {f(ratio, '.2f')} |")


def run_model(name: str, stages: list[str], timeout: float, log) -> list[dict]:
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    for stage in stages:
        one = None
        for spec in ("1", *LAYOUTS[stage]):
            r = _sub(me + ["--part", f"{name}:{stage}:{spec}"], _env(spec), timeout)
            r = {"model": name, "stage": stage, "mesh": spec, "devices": 1 if spec == "1" else 2, **r}
            if spec == "1":
                one = r
            log(_row(r, one))
            rows.append(r)
    return rows


def run_plan(log) -> dict:
    """``cca-jax plan`` on this GPU for the paper's configs, 1 and 2 devices."""
    out = {}
    for config, model in (("configs/gemma-2-9b-it.yaml", "models/gemma-2-9b.yaml"),
                          ("configs/olmo-2-13b-instruct.yaml", "models/olmo-2-13b.yaml")):
        code = (f"import json, sys; from cca_jax import plan, runconfig; "
                f"c = runconfig.load({config!r}, ['model={model}', 'attention=xla', 'data.templates=builtin']); "
                f"w = plan.workload(c, prompt_tokens={PROMPT}, examples=256, log=lambda s: None); "
                f"r = plan.plan(c, meshes=[(1, 1), (1, 2), (2, 1)], w=w, log=lambda s: None); "
                f"print(plan.format_table(r)); print(json.dumps(r))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env("1x2"), cwd=ROOT,
                           timeout=1200)
        text = [ln for ln in p.stdout.splitlines() if not ln.startswith("{")]
        log(f"\n{config} (model {model}, prompts {PROMPT} tokens, 256 examples):\n" + "\n".join(text)
            + ("" if p.returncode == 0 else p.stderr[-2000:]))
        js = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        out[config] = json.loads(js[-1]) if js else {"error": p.stderr[-2000:]}
    return out


def run_qwen(out_dir: Path, timeout: float, log) -> dict:
    """The real Qwen run, float32, on one GPU and on two: the same circuit and accuracies?"""
    gguf = os.environ.get("QWEN_GGUF")
    if not gguf:
        log("qwen: set QWEN_GGUF to the Qwen2.5-Coder-0.5B-Instruct GGUF")
        return {"error": "QWEN_GGUF not set"}
    config = os.environ.get("QWEN_CONFIG", "configs/demo.yaml")
    res = {}
    for name, spec, sets in (("one", "1", []), ("two", "1x2", ["--set", "mesh.tp=2"])):
        d = out_dir / f"qwen_{name}"
        args = [sys.executable, "-m", "cca_jax.cli", "run", config, "--out", str(d), "--quiet", "--set",
                f"model={gguf}", "--set", "dtype=float32", *sets, *os.environ.get("QWEN_SETS", "").split()]
        t = time.perf_counter()
        p = subprocess.run(args, capture_output=True, text=True, env=_env(spec), cwd=ROOT, timeout=timeout)
        res[name] = {"rc": p.returncode, "seconds": round(time.perf_counter() - t, 1), "tail": p.stdout[-600:],
                     "err": p.stderr[-1500:] if p.returncode else ""}
        log(f"qwen {name}: rc {p.returncode}, {res[name]['seconds']} s\n{p.stdout[-400:]}{res[name]['err']}")
    if all(res[n]["rc"] == 0 for n in res):
        a, b = (json.loads((out_dir / f"qwen_{n}" / "summary.json").read_text()) for n in ("one", "two"))
        keys = ("selected_templates", "localization", "components_selected", "best_step", "val_accuracy_by_step",
                "test_accuracy_before", "test_accuracy_after")
        res["differs"] = [k for k in keys if a[k] != b[k]]
        res["same_files"] = {f: (out_dir / "qwen_one/stages" / f).read_bytes() == (out_dir / "qwen_two/stages" / f).read_bytes()
                             for f in ("localize/examples.jsonl", "circuit/mask.npz")}
        res["timings"] = {n: {k: v.get("total") for k, v in s["timings_seconds"].items()} for n, s in
                          (("one", a), ("two", b))}
        log(f"qwen 1 vs 2 GPUs: differing summary fields {res['differs'] or 'none'}; same files {res['same_files']}; "
            f"stage seconds {json.dumps(res['timings'])}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", help="MODEL:STAGE:MESH (MESH 1, or FxT:LAYOUT): one measurement as JSON")
    ap.add_argument("--only", default="gemma-2-9b,olmo-2-13b,plan,qwen", help="comma-separated: models, plan, qwen")
    ap.add_argument("--stages", default="dcm,generate,amplify,sft", help="comma-separated stages of the models")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--timeout", type=float, default=400, help="per measurement (s)")
    args = ap.parse_args()
    if args.part:
        name, stage, spec = args.part.split(":", 2)
        print(json.dumps(part(name, stage, spec)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, flush=True)

    results: dict = {}
    log("| model | stage | GPUs: mesh:layout | step (s) | speed-up vs 1 GPU | peak GiB/GPU | planned GiB | "
        "planned/peak |\n|---|---|---|---:|---:|---:|---:|---:|")
    for what in args.only.split(","):
        if what in MODELS:
            results[what] = run_model(what, args.stages.split(","), args.timeout, log)
        elif what == "plan":
            results["plan"] = run_plan(log)
        elif what == "qwen":  # the run directories stay on the machine (many files)
            results["qwen"] = run_qwen(Path(os.environ.get("QWEN_RUNS", "/tmp/mesh_perf_qwen")), 600, log)
        (out / "mesh_perf.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
