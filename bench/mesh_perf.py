"""Each CCA stage on 1 and 2 GPUs (issue 20), with the planner's memory beside the
measured peak; a whole small run on 1 and 2 GPUs; the real Qwen run on 1 vs 2 GPUs.

One command, about 5 minutes on two GPUs (``--quick``; what the lead runs on nvidia-h200-x2):

    python bench/mesh_perf.py --quick [--model gemma-2-9b] [--budget 290] [--out DIR]

  1. steps: generation, DCM mask steps and amplification steps of the random-weight
     gemma-2-9b (bfloat16, the shapes below) in one process per device count: on one GPU,
     on a 1 x 2 mesh (heads over tp) and on a 2 x 1 mesh (model dimension over fsdp), each
     stage in the layout a run picks for it (``mesh: auto``: ``cca_jax.mesh.resolve``);
     median step time, speed-up over one GPU, and the peak ``peak_bytes_in_use`` so far
     in that process (stages run in the order below, so each row's peak covers it and
     those before it).
  2. a whole small run: ``configs/tiny.yaml`` (float32, matmul precision highest) on one
     GPU, with ``mesh.tp=2`` and with ``mesh.fsdp=2``: each stage's seconds and whether
     templates, pivots, circuit, best step and accuracies equal the one-GPU run's.
  The one-GPU parts run side by side (steps on GPU 0, the small run on GPU 1), then the
  two-GPU steps, then both two-GPU small runs side by side; a part that would overrun
  ``--budget`` seconds is cut off and reported as such.

The full measurements, one subprocess per (stage, mesh, layout) (peak memory is per
process), about 8-10 minutes per model: run them in separate calls:

    python bench/mesh_perf.py [--only gemma-2-9b,olmo-2-13b,plan,qwen] [--stages dcm,generate,amplify,sft]

Random-weight models of the paper's sizes (configs/models/gemma-2-9b.yaml and
olmo-2-13b.yaml, bfloat16) at the paper's shapes: generation at batch 32 (1,024-token
prompts sharing a 896-token few-shot context, 64 new tokens, EOS ignored), DCM mask
steps on batch-8 (gemma) / batch-6 (OLMo) prefix caches of 1,024 tokens (4 batches
cached, used in turn, as ``dcm.train_mask`` runs), an amplification step (full batch of
the same size, remat ``dots``, float32 masters of q/k/v/up), a LoRA SFT step (batch 8 /
6 of 1,024 tokens, remat). Each is measured on one GPU (``CUDA_VISIBLE_DEVICES=0``) and
on both with each layout of ``cca_jax.mesh`` worth trying for the stage; each reports
the median step time, the peak ``peak_bytes_in_use`` over the GPUs, and the planner's
prediction for the same shapes (``cca_jax.plan``, compiled on this GPU at 2 and 4
layers, extrapolated).

``--only plan`` prints ``cca-jax plan`` for the paper's gemma-2-9b and OLMo-2-13B configs
on 1 and 2 GPUs (the whole run, batch 6 for OLMo). ``--only qwen`` runs
``configs/demo.yaml`` (or $QWEN_CONFIG) on the Qwen2.5-Coder-0.5B GGUF at $QWEN_GGUF in
float32 on one GPU and on two (mesh 1 x 2), and compares circuit, pivots and
accuracies.

On the CPU (a smoke test of this script): ``XLA_FLAGS=--xla_force_host_platform_device_count=2
JAX_PLATFORMS=cpu python bench/mesh_perf.py --quick --model tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's cca_jax

from gpu_perf import _median_time  # noqa: E402 (bench/ is the script's folder)

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

def _peak() -> float | None:
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / GIB if peaks else None


def _spec(spec: str) -> tuple[int, int, str]:
    """'1' -> (1, 1, 'auto'); 'FxT' -> (F, T, 'auto'); 'FxT:LAYOUT' -> (F, T, LAYOUT)."""
    if spec == "1":
        return 1, 1, "auto"
    shape, _, layout = spec.partition(":")
    fsdp, tp = (int(v) for v in shape.split("x"))
    return fsdp, tp, layout or "auto"


def _load(name: str, spec: str):
    """(the model in its stored layout, its mesh or None): one GPU, or the first fsdp x tp
    devices, loaded sharded as a run loads it."""
    import jax

    from cca_jax import load_model, make_mesh

    fsdp, tp, _ = _spec(spec)
    mesh = None if spec == "1" else make_mesh(fsdp, tp, jax.devices()[:fsdp * tp])
    model, _ = load_model(ROOT / MODELS[name][0], dtype="bfloat16", with_tokenizer=False, mesh=mesh)
    return model, mesh


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


def _time_generate(model, params, cfg, B, rng) -> dict:
    import jax

    from cca_jax.generate import generate

    ctx = rng.integers(3, cfg.vocab_size, SHARED).tolist()
    prompts = [ctx + rng.integers(3, cfg.vocab_size, PROMPT - SHARED).tolist() for _ in range(GEN_BATCH)]
    m = model.with_params(params)

    def run():
        res = generate(m, prompts, GEN_NEW, eos_token_id=[], batch_size=GEN_BATCH)
        assert all(len(r) == GEN_NEW for r in res)
        return jax.numpy.zeros(())

    t = _median_time(run, warm=1, reps=3)
    return {"seconds": t, "tokens_per_s": GEN_BATCH * GEN_NEW / t}


def _time_dcm(model, params, cfg, B, rng) -> dict:
    import jax

    from cca_jax import mesh as mesh_lib
    from cca_jax.cca import components, dcm
    from cca_jax.cca.examples import Batch

    bs = [Batch(rng.integers(3, cfg.vocab_size, (B, PROMPT), dtype=np.int32), np.ones((B, PROMPT), bool),
                rng.integers(3, cfg.vocab_size, B, dtype=np.int32), rng.integers(3, cfg.vocab_size, B, dtype=np.int32))
          for _ in range(ROTATE)]
    caches = dcm.prefix_caches(cfg, params, bs)  # as train_mask makes them
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

    return {"seconds": _median_time(step, warm=3, reps=20)}


def _trainer_steps(trainer) -> float:
    state = {"s": trainer.init(), "i": 0}

    def step():
        m, o, _ = trainer.step(*state["s"], state["i"])
        state["s"], state["i"] = (m, o), state["i"] + 1
        return m

    return _median_time(step, warm=1, reps=5)


def _time_amplify(model, params, cfg, B, rng, acfg) -> dict:
    from cca_jax.cca import amplify as amp
    from cca_jax.cca import components
    from cca_jax.cca.examples import LocalizationExample

    exs = [LocalizationExample(tuple(int(t) for t in rng.integers(3, cfg.vocab_size, PROMPT)),
                               int(rng.integers(3, cfg.vocab_size)), int(rng.integers(3, cfg.vocab_size)), 0, i)
           for i in range(B)]
    mask = {k: rng.random(s) < 0.03 for k, s in components.shapes(cfg).items()}  # a ~3% circuit
    # the stored model stays beside the trainer's copy, as in a run
    return {"seconds": _trainer_steps(amp.Amplifier(model.with_params(params), exs, mask, acfg))}


def _time_sft(model, params, cfg, B, rng, scfg) -> dict:
    from cca_jax.baselines import sft

    exs = [sft.Example(0, i, tuple(int(t) for t in rng.integers(3, cfg.vocab_size, PROMPT)),
                       tuple(int(t) for t in rng.integers(3, cfg.vocab_size, LORA_ANSWER))) for i in range(2 * B)]
    return {"seconds": _trainer_steps(sft.FineTuner("sft_lora", model.with_params(params), exs, scfg))}


_KINDS = {"generate": "generate", "dcm": "dcm", "amplify": "train", "sft": "train"}


def part(name: str, stages: list[str], spec: str, with_plan: bool = True):
    """Each of ``stages`` on ``spec``'s devices, in this process, one after the other; a
    JSON line per stage (``peak_GiB``: the peak so far in this process)."""
    from cca_jax import mesh as mesh_lib
    from cca_jax import plan

    model, mesh = _load(name, spec)
    cfg, B = model.config, MODELS[name][1]
    w = _workload(B)
    rng = np.random.default_rng(0)
    stored = model.params()
    for stage in stages:
        layout = _spec(spec)[2]
        if mesh is None:
            layout = "one device"
        elif layout == "auto":  # the layout a run picks for the stage
            layout = mesh_lib.resolve("auto", _KINDS[stage], stored)
        params = stored if mesh is None else mesh_lib.relayout(stored, layout)
        out = {"model": name, "stage": stage, "mesh": spec, "layout": layout,
               "devices": 1 if mesh is None else mesh.size}
        extra = None
        if stage == "amplify":
            from cca_jax.cca import amplify as amp

            extra = amp.AmplifyConfig(remat="dots", batch_size=B)
            out.update(_time_amplify(model, params, cfg, B, rng, extra))
        elif stage == "sft":
            from cca_jax.baselines import sft

            extra = sft.SFTConfig(batch_size=B, steps=100, remat=True)
            out.update(_time_sft(model, params, cfg, B, rng, extra))
        else:
            out.update({"generate": _time_generate, "dcm": _time_dcm}[stage](model, params, cfg, B, rng))
        out["peak_GiB"] = _peak()
        if with_plan:
            out["planned_GiB"] = _planned(stage, cfg, mesh or plan.make_mesh(1, 1),
                                          "sharded" if mesh is None else layout, w, extra)
        print(json.dumps(out), flush=True)
        del params


# ------------------------------------------------------------------------------ driver

def _env(spec: str, gpu: int = 0) -> dict:
    """One GPU (``spec`` "1"): only GPU ``gpu`` visible. NVLink multicast stays off (the
    machine's NCCL setting: a program that uses it can take a shared host's GPUs down)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if spec == "1":
        visible = env.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")
        env["CUDA_VISIBLE_DEVICES"] = visible[min(gpu, len(visible) - 1)]
    return env


def _error(text: str) -> str:
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return "OOM" if oom else " | ".join(text.strip().splitlines()[-3:])[-400:]


def _rows_of(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]


def _sub(args: list[str], env: dict, timeout: float) -> list[dict]:
    """The JSON rows a ``--part`` subprocess printed, or one row with its error."""
    t = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout:.0f} s"}]
    rows = _rows_of(p.stdout)
    if p.returncode != 0 or not rows:
        return [*rows, {"error": _error(p.stderr or p.stdout)}]
    for r in rows:
        r["wall_s"] = round(time.perf_counter() - t, 1)
    return rows


def _row(r: dict, one: dict | None) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['stage']} | {r['mesh']} | {r['error']} | | | | |"
    speed = one["seconds"] / r["seconds"] if one and "seconds" in one and r["devices"] > 1 else None
    ratio = r["planned_GiB"] / r["peak_GiB"] if r.get("peak_GiB") else None
    f = (lambda x, s: "-" if x is None else format(x, s))
    return (f"| {r['model']} | {r['stage']} | {r['mesh']}:{r.get('layout', '')} | {f(r['seconds'], '.4f')} | {f(speed, '.2f')} | "
            f"{f(r.get('peak_GiB'), '.1f')} | {f(r['planned_GiB'], '.1f')} | {f(ratio, '.2f')} |")


def run_model(name: str, stages: list[str], timeout: float, log) -> list[dict]:
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    for stage in stages:
        one = None
        for spec in ("1", *LAYOUTS[stage]):
            r = _sub(me + ["--part", f"{name}:{stage}:{spec}"], _env(spec), timeout)[-1]
            r = {"model": name, "stage": stage, "mesh": spec, "devices": 1 if spec == "1" else 2, **r}
            if spec == "1":
                one = r
            log(_row(r, one))
            rows.append(r)
    return rows


# ------------------------------------------------------------------ --quick: one command, ~5 minutes

QUICK_STAGES = {"1": ("dcm", "generate", "amplify"), "1x2": ("dcm", "generate", "amplify"),
                # DCM's auto layout on 2 GPUs is replicated (rows over both) whatever the mesh's
                # shape: the 1 x 2 row stands for 2 x 1 too
                "2x1": ("generate", "amplify")}
SMALL_RUNS = {"1": [], "1x2": ["--set", "mesh.tp=2"], "2x1": ["--set", "mesh.fsdp=2"]}
SMALL_SAME = ("selected_templates", "localization", "components_selected", "best_step", "val_accuracy_by_step",
              "test_accuracy_before", "test_accuracy_after")


class _Job:
    """A subprocess writing to files, in a session of its own (cut off as a whole)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
            self.p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)

    def wait(self, deadline: float) -> tuple[int | None, str, str]:
        """(exit status or None if cut off at ``deadline``, stdout, stderr)."""
        import signal

        try:
            rc = self.p.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            rc = None
        return rc, self.log.with_suffix(".out").read_text(), self.log.with_suffix(".err").read_text()


def _steps_job(name: str, spec: str, tmp: Path, gpu: int = 0) -> _Job:
    me = [sys.executable, str(Path(__file__).resolve())]
    return _Job(me + ["--part", f"{name}:{','.join(QUICK_STAGES[spec])}:{spec}", "--no-plan"], _env(spec, gpu),
                tmp / f"steps_{spec}")


def _small_job(spec: str, tmp: Path, gpu: int = 0) -> _Job:
    env = dict(_env(spec, gpu), JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               CCA_JAX_COMPILE_CACHE="off")  # two small runs share the GPUs; compiles counted in full
    args = [sys.executable, "-m", "cca_jax.cli", "run", "configs/tiny.yaml", "--out", str(tmp / f"small_{spec}"),
            "--quiet", "--set", "dtype=float32", *SMALL_RUNS[spec]]
    return _Job(args, env, tmp / f"small_{spec}")


def _steps_result(name: str, spec: str, got: tuple, rows: list, one: dict, log) -> None:
    rc, out, err = got
    done = _rows_of(out)
    for r in done:
        if spec == "1":
            one[r["stage"]] = r
        base = one.get(r["stage"])
        speed = base["seconds"] / r["seconds"] if base and spec != "1" else None
        rows.append({**r, "speedup": speed})
        log(f"| {name} | {r['stage']} | {r['devices']} | {spec} | {r['layout']} | {r['seconds']:.4f} | "
            f"{'-' if speed is None else format(speed, '.2f')} | "
            f"{'-' if r['peak_GiB'] is None else format(r['peak_GiB'], '.1f')} |")
    left = [s for s in QUICK_STAGES[spec] if s not in {r["stage"] for r in done}]
    if left:
        why = "cut off (--budget)" if rc is None else _error(err or out)
        rows.append({"model": name, "mesh": spec, "stages": left, "error": why})
        log(f"| {name} | {', '.join(left)} | {1 if spec == '1' else 2} | {spec} | {why} | | | |")


def _small_result(spec: str, got: tuple, tmp: Path) -> dict:
    rc, out, err = got
    f = tmp / f"small_{spec}" / "summary.json"
    if rc != 0 or not f.is_file():
        return {"error": "cut off (--budget)" if rc is None else _error(err or out)}
    s = json.loads(f.read_text())
    return {"summary": {k: s.get(k) for k in SMALL_SAME},
            "stage_seconds": {k: v.get("total") for k, v in s["timings_seconds"].items() if isinstance(v, dict)},
            "compile_seconds": {k: v.get("compile") for k, v in s["timings_seconds"].items() if isinstance(v, dict)},
            "files": {f: (tmp / f"small_{spec}" / "stages" / f).read_bytes()
                      for f in ("localize/examples.jsonl", "circuit/mask.npz")}}


def _report_small(small: dict, log) -> dict:
    names = {"1": "1 GPU", "1x2": "tp=2", "2x1": "fsdp=2"}
    log("\nwhole small run (configs/tiny.yaml, float32): seconds per stage (compile in brackets)\n"
        f"| stage | {' | '.join(names.values())} |\n|---|---:|---:|---:|")
    ok = {k: v for k, v in small.items() if "error" not in v}
    stages = next(iter(ok.values()))["stage_seconds"] if ok else {}
    for st in stages:
        cells = [f"{ok[k]['stage_seconds'].get(st, 0):.2f} [{ok[k]['compile_seconds'].get(st) or 0:.2f}]"
                 if k in ok else "-" for k in names]
        log(f"| {st} | {' | '.join(cells)} |")
    out = {}
    for k, v in small.items():
        if "error" in v:
            log(f"small run {names[k]}: {v['error']}")
            out[k] = {"error": v["error"]}
            continue
        out[k] = {kk: vv for kk, vv in v.items() if kk != "files"}
        if k != "1" and "1" in ok:
            differs = [f for f in SMALL_SAME if v["summary"][f] != ok["1"]["summary"][f]]
            differs += [f for f in v["files"] if v["files"][f] != ok["1"]["files"][f]]
            out[k]["differs_from_1_gpu"] = differs
            log(f"small run {names[k]} vs 1 GPU: " + ("same templates, pivots, circuit, best step and accuracies"
                                                      if not differs else f"DIFFERS in {', '.join(differs)}"))
    if "1" in ok:
        s = ok["1"]["summary"]
        log(f"small run 1 GPU: test accuracy {s['test_accuracy_before']['overall']:.3f} -> "
            f"{s['test_accuracy_after']['overall']:.3f}, best step {s['best_step']}")
    return out


def run_quick(name: str, budget: float, log) -> dict:
    """Steps on 1 GPU, 1 x 2 and 2 x 1 and the whole small run on 1 GPU, tp=2 and fsdp=2,
    within ``budget`` seconds (phases get shares of it; time one leaves goes to the next)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="mesh_perf_"))
    start = time.monotonic()
    shares = [0.34, 0.28, 0.20, 0.18]  # 1 GPU (steps + small run) | steps 1x2 | steps 2x1 | small runs on 2

    def deadline(phase: int) -> float:
        return min(start + budget * sum(shares[:phase + 1]), start + budget)

    rows, one, small = [], {}, {}
    log(f"steps of {name} (bfloat16, random weights; prompts {PROMPT} tokens): each stage in the layout a run picks "
        f"(mesh: auto)\n| model | stage | GPUs | mesh | layout | step (s) | speed-up vs 1 GPU | peak GiB/GPU so far |\n"
        "|---|---|---:|---|---|---:|---:|---:|")
    jobs = [_steps_job(name, "1", tmp, gpu=0), _small_job("1", tmp, gpu=1)]
    _steps_result(name, "1", jobs[0].wait(deadline(0)), rows, one, log)
    small["1"] = _small_result("1", jobs[1].wait(deadline(0)), tmp)
    for phase, spec in ((1, "1x2"), (2, "2x1")):
        _steps_result(name, spec, _steps_job(name, spec, tmp).wait(deadline(phase)), rows, one, log)
    jobs = {spec: _small_job(spec, tmp) for spec in ("1x2", "2x1")}  # side by side: seconds are upper bounds
    for spec, job in jobs.items():
        small[spec] = _small_result(spec, job.wait(deadline(3)), tmp)
    res = {"steps": rows, "small_run": _report_small(small, log), "seconds": round(time.monotonic() - start, 1)}
    log(f"\n(all in {res['seconds']:.0f} s; logs in {tmp})")
    return res


def run_stagewise(jobs: list[str], stages: list[str], budget: float, log) -> list[dict]:
    """Each ``MODEL:MESH[:GPU[:MEM_FRACTION]]`` job in one process (its stages in order,
    ``mesh: auto`` layouts, the planner's peak beside each), the jobs side by side (one
    GPU each, or both GPUs for a 2-GPU mesh); cut off after ``budget`` seconds. One process
    per model and mesh keeps the loads few: order the stages by memory (dcm, generate,
    amplify), so the peak so far is each stage's own."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="mesh_stagewise_"))
    me = [sys.executable, str(Path(__file__).resolve())]
    started = []
    for j in jobs:
        name, spec, *rest = j.split(":")
        env = _env(spec, int(rest[0]) if rest else 0)
        if len(rest) > 1:  # two jobs share a GPU: each its share of the memory
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = rest[1]
        started.append((name, spec, _Job(me + ["--part", f"{name}:{','.join(stages)}:{spec}"], env,
                                         tmp / f"{name}_{spec}")))
    deadline = time.monotonic() + budget
    rows = []
    for name, spec, job in started:
        rc, out, err = job.wait(deadline)
        done = _rows_of(out)
        for r in done:
            log(_row(r, None))
        rows += done
        left = [s for s in stages if s not in {r["stage"] for r in done}]
        if left:
            why = "cut off (--budget)" if rc is None else _error(err or out)
            rows.append({"model": name, "mesh": spec, "stages": left, "error": why})
            log(f"| {name} | {', '.join(left)} | {spec} | {why} | | | | |")
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
                           check=False, timeout=1200)
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
    # QWEN_WHICH=one|two: only that half (two device calls; the other half's run dir stays
    # on the machine and is compared once both exist); QWEN_GPU: the GPU of the one-GPU run
    which = os.environ.get("QWEN_WHICH", "one,two").split(",")
    for name, spec, sets in (("one", "1", []), ("two", "1x2", ["--set", "mesh.tp=2"])):
        d = out_dir / f"qwen_{name}"
        if name not in which:
            continue
        args = [sys.executable, "-m", "cca_jax.cli", "run", config, "--out", str(d), "--quiet", "--set",
                f"model={gguf}", "--set", "dtype=float32", *sets, *os.environ.get("QWEN_SETS", "").split()]
        t = time.perf_counter()
        p = subprocess.run(args, capture_output=True, text=True, env=_env(spec, int(os.environ.get("QWEN_GPU", "0"))),
                           cwd=ROOT, timeout=timeout, check=False)
        res[name] = {"rc": p.returncode, "seconds": round(time.perf_counter() - t, 1), "tail": p.stdout[-600:],
                     "err": p.stderr[-1500:] if p.returncode else ""}
        log(f"qwen {name}: rc {p.returncode}, {res[name]['seconds']} s\n{p.stdout[-400:]}{res[name]['err']}")
    if all((out_dir / f"qwen_{n}" / "summary.json").is_file() for n in ("one", "two")) and \
            all(r["rc"] == 0 for r in res.values()):
        a, b = (json.loads((out_dir / f"qwen_{n}" / "summary.json").read_text()) for n in ("one", "two"))
        keys = ("selected_templates", "localization", "components_selected", "best_step", "val_accuracy_by_step",
                "test_accuracy_before", "test_accuracy_after")
        res["differs"] = [k for k in keys if a[k] != b[k]]
        same = [(out_dir / f"qwen_{n}/stages" / f).read_bytes() for n in ("one", "two")
                for f in ("localize/examples.jsonl", "circuit/mask.npz")]
        res["same_files"] = {"localize/examples.jsonl": same[0] == same[2], "circuit/mask.npz": same[1] == same[3]}
        res["timings"] = {n: {k: v.get("total") for k, v in s["timings_seconds"].items()} for n, s in
                          (("one", a), ("two", b))}
        log(f"qwen 1 vs 2 GPUs: differing summary fields {res['differs'] or 'none'}; same files {res['same_files']}; "
            f"stage seconds {json.dumps(res['timings'])}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="steps and a whole small run on 1 and 2 GPUs, ~5 minutes")
    ap.add_argument("--model", default="gemma-2-9b", choices=list(MODELS), help="--quick: the model of the steps")
    ap.add_argument("--budget", type=float, default=290, help="--quick: seconds for everything")
    ap.add_argument("--part", help="MODEL:STAGE[,STAGE...]:MESH (MESH 1, FxT or FxT:LAYOUT): JSON per stage")
    ap.add_argument("--no-plan", action="store_true", help="--part: without the planner's prediction")
    ap.add_argument("--only", default="gemma-2-9b,olmo-2-13b,plan,qwen", help="comma-separated: models, plan, qwen")
    ap.add_argument("--stages", default="dcm,generate,amplify,sft", help="comma-separated stages of the models")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--timeout", type=float, default=400, help="per measurement (s)")
    ap.add_argument("--stagewise", action="append", default=[],
                    help="MODEL:MESH[:GPU[:MEM_FRACTION]] (repeat: side by side): --stages in one process each")
    args = ap.parse_args()
    if args.part:
        name, stages, spec = args.part.split(":", 2)
        part(name, stages.split(","), spec, with_plan=not args.no_plan)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, flush=True)

    if args.stagewise:
        log("| model | stage | GPUs: mesh:layout | step (s) | speed-up vs 1 GPU | peak GiB/GPU so far | planned GiB | "
            "planned/peak |\n|---|---|---|---:|---:|---:|---:|---:|")
        rows = run_stagewise(args.stagewise, args.stages.split(","), args.budget, log)
        tag = "_".join(j.split(":")[0] + "-" + j.split(":")[1] for j in args.stagewise)
        (out / f"mesh_stagewise_{tag}.json").write_text(json.dumps(rows, indent=1))
        return
    if args.quick:
        (out / "mesh_perf_quick.json").write_text(json.dumps(run_quick(args.model, args.budget, log), indent=1))
        return
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
