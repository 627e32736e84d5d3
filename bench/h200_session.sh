#!/usr/bin/env bash
# The GPU measurements of issues 19-22 and 25 in one device session on an nvidia-h200-x2
# machine (two H200s): the original release on GPU 0 while cca_jax's timed runs use GPU 1,
# then the two-GPU mesh benchmark. Run from the repository root; each subcommand is one
# device call (the machine is given back 30 s after a call returns, so they go back to back).
#
#   bash bench/h200_session.sh prep          join the Qwen GGUF chunks (/tmp/w), gguf for cca_jax
#   bash bench/h200_session.sh sbs           side-by-side setup; the original (GPU 0) and cca_jax
#                                            (GPU 1) in the background
#   bash bench/h200_session.sh qwen10        the 10-template Qwen run of RESULTS.md on GPU 1 (timed split)
#   bash bench/h200_session.sh perf          step benchmarks + speculative decoding on GPU 1
#   bash bench/h200_session.sh wait [S]      both side-by-side runs: progress, tables when done
#   bash bench/h200_session.sh mesh          bench/mesh_perf.py on both GPUs
#
# What travels (CARRY.md in bench/original): .devcarry/NN (the GGUF), .whl/orig (the
# original's wheels, gguf among them), .devdata (the release, the templates, the baseline).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
export PYTHONPATH=/tmp/site-cca:$REPO HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
GGUF=/tmp/w/q.gguf
say() { echo "[$(date +%H:%M:%S)] $*"; }

prep() {
  if [ ! -f "$GGUF" ]; then
    cat /tmp/w/part_* > "$GGUF.part" && mv "$GGUF.part" "$GGUF"
  fi
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $GGUF" | sha256sum -c - || exit 2
  local whl=.whl/orig/gguf-*.whl
  [ -d .whl/nb ] && whl=".whl/nb/*.whl"  # gguf, penzai and ordered-set (the notebook's views)
  python3 -c "import gguf, penzai" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site-cca $whl
  python3 -c "import jax, gguf, cca_jax; print('jax', jax.__version__, jax.devices(), 'gguf', gguf.__file__)"
  nvidia-smi --query-gpu=name,memory.total --format=csv
}

sbs() {
  bash bench/original/side_by_side.sh setup || exit 2
  # cca_jax's half in its own work dir sharing the model, items and release (GPU 1)
  mkdir -p /tmp/sbs2
  for f in model-hf gsm_main.jsonl orig; do ln -sfn /tmp/sbs/$f /tmp/sbs2/$f; done
  CUDA_VISIBLE_DEVICES=0 SKIP=cca bash bench/original/side_by_side.sh start 1
  CUDA_VISIBLE_DEVICES=1 SKIP=orig SBS_WORK=/tmp/sbs2 bash bench/original/side_by_side.sh start 1
}

wait_sbs() {
  local limit=${1:-500} t=0
  while [ $t -lt "$limit" ] && ! { [ -f /tmp/sbs/latest/DONE ] && [ -f /tmp/sbs2/latest/DONE ]; }; do
    sleep 10; t=$((t + 10))
  done
  for w in /tmp/sbs2 /tmp/sbs; do
    echo "== $w"; tail -n 5 $w/background.log
    mkdir -p "$OUT/$(basename $w)" && SBS_WORK=$w OUT="$OUT/$(basename $w)" bash bench/original/side_by_side.sh report
  done
}

qwen10() {
  local gpu=${1:-1}; shift || true
  local dir=${Q10_DIR:-/tmp/q10}
  rm -rf "$dir"
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu CCA_JAX_COMPILE_CACHE=${Q10_CACHE:-$dir.cache} CCA_JAX_GGUF_CACHE=${Q10_GGUF:-$dir.gguf} \
    timeout "${Q10_LIMIT:-3000}" \
    python3 -m cca_jax.cli run \
    configs/qwen2.5-coder-0.5b.yaml --out "$dir" --set model=$GGUF --set data.templates=.devdata/templates \
    --quiet "$@" 2>&1 | tail -n 12
  echo "qwen10 $dir (GPU $gpu, XLA_FLAGS='${XLA_FLAGS:-}'): $(( $(date +%s) - t0 )) s wall"
  local o="$OUT/$(basename "$dir")"
  mkdir -p "$o" && cp "$dir/summary.json" "$dir/report.md" "$o/" 2>/dev/null
  # every finished stage's split, also when the run was cut off
  python3 - "$dir" <<'EOF2'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for f in sorted(d.glob("stages/*/done.json"), key=lambda p: p.stat().st_mtime):
    t = json.loads(f.read_text()).get("timing", {})
    print(f"{f.parent.name:14s} " + " ".join(f"{k}={t.get(k)}" for k in ("total", "compile", "compiles", "device", "host")))
if (d / "summary.json").is_file():
    s = json.loads((d / "summary.json").read_text())
    t = s["timings_seconds"]
    print("load", t["load_model"]["total"], "setup", t.get("setup", {}).get("total"), "wall", s.get("wall_seconds"),
          "compile", round(sum(v.get("compile", 0) for v in t.values()), 1))
EOF2
}

perf() {
  CUDA_VISIBLE_DEVICES=1 BENCH_GGUF=$GGUF python3 bench/gpu_perf.py --baseline .devdata/bench/torch_baseline.py \
    --only "${PERF_ONLY:-limits,dcm,amplify_dots,generate,generate_shared,generate_spec,spec_cost,baseline}" \
    --out "$OUT/perf" "$@"
}

mesh() {
  python3 bench/mesh_perf.py --out "$OUT/mesh" "$@"
}

# ---- eighth session (issues 20, 21, 23): three calls on nvidia-h200-x2
# s1: GPU 0 each stage of gemma-2-9b then OLMo-2-13B on one GPU; GPU 1 (background) the
#     quickstart notebook on the real Qwen GGUF, then the one-GPU float32 Qwen run
# s2: the same stages on both GPUs (mesh 1 x 2, layouts as a run picks them)
# s3: the two-GPU Qwen run (compared with s1's), then the 10-template Qwen run cold, with
#     XLA's defaults (GPU 0) beside the same without autotuning (GPU 1)
STAGES=dcm,generate,amplify
s1() {
  prep || exit 2
  mkdir -p /tmp/bg && : > /tmp/bg/status
  setsid nohup bash -c "
    CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 CCA_NOTEBOOK_MODEL=$GGUF CCA_NOTEBOOK_OUT=/tmp/nb/run \
      python3 bench/run_notebook.py colab/quickstart.ipynb --out /tmp/nb > /tmp/bg/nb.log 2>&1; echo nb-rc \$? >> /tmp/bg/status
    QWEN_WHICH=one QWEN_GPU=1 QWEN_GGUF=$GGUF XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
      python3 bench/mesh_perf.py --only qwen --out /tmp/bg/qwen1 > /tmp/bg/qwen1.log 2>&1; echo q1-rc \$? >> /tmp/bg/status
  " > /dev/null 2>&1 < /dev/null &
  python3 bench/mesh_perf.py --stagewise gemma-2-9b:1:0 --stages $STAGES --budget "${B1:-240}" --out "$OUT/mesh"
  python3 bench/mesh_perf.py --stagewise olmo-2-13b:1:0 --stages $STAGES --budget "${B2:-240}" --out "$OUT/mesh"
  bg_report
}
bg_report() {
  echo "== background: $(tr '\n' ' ' < /tmp/bg/status)"
  grep -E "^\[cell|^notebook|test accuracy|LOGITS|CIRCUIT_ONLY|Error|error" /tmp/bg/nb.log | tail -n 25
  tail -n 6 /tmp/bg/qwen1.log 2>/dev/null
  mkdir -p "$OUT/bg" && cp /tmp/nb/notebook_times.json /tmp/bg/qwen1/mesh_perf.json "$OUT/bg/" 2>/dev/null
  tail -c 300000 /tmp/bg/nb.log > "$OUT/bg/nb.log" 2>/dev/null; true
}
s2() {
  python3 bench/mesh_perf.py --stagewise gemma-2-9b:1x2 --stages $STAGES --budget "${B1:-230}" --out "$OUT/mesh"
  python3 bench/mesh_perf.py --stagewise olmo-2-13b:1x2 --stages $STAGES --budget "${B2:-230}" --out "$OUT/mesh"
  bg_report
}
s3() {
  QWEN_WHICH=two QWEN_GGUF=$GGUF timeout "${B1:-130}" python3 bench/mesh_perf.py --only qwen --out "$OUT/qwen2"
  # the 10-template run, cold (fresh compilation caches), twice side by side: XLA's
  # defaults on GPU 0, no autotuning (--xla_gpu_autotune_level=0) on GPU 1
  export Q10_LIMIT=${B2:-380}
  (Q10_DIR=/tmp/q10b XLA_FLAGS=--xla_gpu_autotune_level=0 bash "$0" qwen10 1 > /tmp/bg/q10b.log 2>&1) &
  Q10_DIR=/tmp/q10 bash "$0" qwen10 0
  wait
  echo "== no autotuning"; cat /tmp/bg/q10b.log
}

# issue 22's runs: 3 seeds x (a DCM circuit of 1.5% +-20% (<= 2%), a random circuit of its size, full
# fine-tuning) on the 10 templates. Calls back to back on one machine resume in /tmp; across
# device sessions the sweep folder comes back as $OUT/controls.tgz (carry it back as
# .devdata/controls.tgz): checkpoints are left out (0.5 GB each), so a finished run's
# amplification or fine-tuning stage runs again there (its other stages are reused)
controls() {
  local sw=/tmp/controls
  if [ ! -d $sw ] && [ -f .devdata/controls.tgz ]; then mkdir -p $sw && tar -xzf .devdata/controls.tgz -C $sw; fi
  timeout "${CONTROLS_LIMIT:-540}" python3 -m cca_jax.cli sweep configs/qwen2.5-coder-0.5b.yaml --seeds 0,1,2 \
    --vary localize=dcm,random --vary method=cca,sft_full --out $sw --quiet \
    --set model=$GGUF --set data.templates=.devdata/templates --set dcm.target_fraction=0.015 "$@" 2>&1 | tail -n 40
  tar --exclude='ckpt-*' -czf "$OUT/controls.tgz" -C $sw . && ls -la "$OUT/controls.tgz"
}

# ---- ninth session (issues 20, 22): everything at once on nvidia-h200-x2. c9start returns
# at once; c9wait [S] waits up to S seconds, then reports and packs what has finished.
#   GPU 0: issue 22's controls, seeds 0 and 2 (one sweep process per seed, same --out)
#   GPU 1: seed 1, and seed 0's circuit-size curve (dcm.target_fraction 0.005, 0.03, 0.06;
#          the 0.015 point is the controls' DCM run)
#   issue 20: the float32 Qwen demo run on GPU 1 and on both GPUs (tp=2), then compared
Q="configs/qwen2.5-coder-0.5b.yaml --quiet --set model=$GGUF --set data.templates=.devdata/templates"
CONTROLS="--vary localize=dcm,random --vary method=cca,sft_full --set dcm.target_fraction=0.015 --out /tmp/controls"
SIZES="--seeds 0 --vary dcm.target_fraction=0.005,0.03,0.06 --out /tmp/sizecurve"
bgrun() {  # NAME GPU(S) COMMAND...: in the background, detached, log in /tmp/bg/NAME.log
  local name=$1 gpus=$2; shift 2
  setsid nohup env CUDA_VISIBLE_DEVICES=$gpus XLA_PYTHON_CLIENT_MEM_FRACTION=${MEMF:-0.18} bash -c \
    "$* > /tmp/bg/$name.log 2>&1; echo $name rc \$? >> /tmp/bg/status" > /dev/null 2>&1 < /dev/null &
}
c9start() {
  prep || exit 2
  mkdir -p /tmp/bg && : > /tmp/bg/status
  local ctl="python3 -m cca_jax.cli sweep $Q $CONTROLS"
  # 0.3 of a GPU each: full fine-tuning's step ran out of memory at 0.18 (ninth session)
  MEMF=0.3 bgrun c0 0 "$ctl --seeds 0"
  MEMF=0.3 bgrun c1 1 "$ctl --seeds 1"
  MEMF=0.3 bgrun c2 0 "$ctl --seeds 2"
  bgrun size 1 "python3 -m cca_jax.cli sweep $Q $SIZES"
  q20_start
  sleep 60; c9report
}
c9report() {
  echo "== finished: $(tr '\n' ' ' < /tmp/bg/status)"
  for f in /tmp/bg/*.log; do echo "-- $f"; grep -v "^\s*$" "$f" | tail -n 4 | cut -c1-300; done
  ls -d /tmp/controls/*/seed*/summary.json /tmp/sizecurve/*/seed*/summary.json 2>/dev/null
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
}
c9wait() {
  local limit=${1:-540} t=0
  while [ $t -lt "$limit" ] && [ "$(wc -l < /tmp/bg/status)" -lt 6 ]; do sleep 10; t=$((t + 10)); done
  c9report
  if grep -q "q1 rc 0" /tmp/bg/status && grep -q "q2 rc 0" /tmp/bg/status; then q20_compare; fi
  python3 -m cca_jax.cli sweep $Q $CONTROLS --seeds 0,1,2 --aggregate-only 2>&1 | tail -n 20
  python3 -m cca_jax.cli sweep $Q $SIZES --aggregate-only 2>&1 | tail -n 8
  tar --exclude='ckpt-*' --exclude='amplified' --exclude='finetuned' -czf "$OUT/controls.tgz" -C /tmp controls sizecurve bg \
    && ls -la "$OUT/controls.tgz"
}

# issue 20's check alone (~5 minutes after prep): the float32 demo run on one GPU and on two
# (tp=2) at the same time, then compared (summary fields, examples.jsonl, mask.npz)
q20_start() {  # the one-GPU and the two-GPU run, in the background
  bgrun q1 1 "QWEN_WHICH=one QWEN_GPU=0 QWEN_GGUF=$GGUF python3 bench/mesh_perf.py --only qwen --out /tmp/bg/q1"
  bgrun q2 0,1 "QWEN_WHICH=two QWEN_GGUF=$GGUF python3 bench/mesh_perf.py --only qwen --out /tmp/bg/q2"
}
q20_compare() {
  QWEN_WHICH=none QWEN_GGUF=$GGUF python3 bench/mesh_perf.py --only qwen --out "$OUT/qwen" 2>&1 | tail -n 3
  for n in one two; do mkdir -p "$OUT/qwen_$n" && cp /tmp/mesh_perf_qwen/qwen_$n/summary.json "$OUT/qwen_$n/"; done
}
eq20() {
  prep || exit 2
  mkdir -p /tmp/bg && : > /tmp/bg/status && rm -rf /tmp/mesh_perf_qwen
  MEMF=0.4 q20_start
  local t=0
  while [ $t -lt "${EQ_LIMIT:-480}" ] && [ "$(wc -l < /tmp/bg/status)" -lt 2 ]; do sleep 5; t=$((t + 5)); done
  cat /tmp/bg/status; tail -n 4 /tmp/bg/q1.log /tmp/bg/q2.log
  q20_compare
}

# ---- tenth session (issues 20, 21): three calls on nvidia-h200-x2 after the GGUF carry
# t10a: prep; the side-by-side setup (CPU, background); DCM step benchmarks, unrolled and
#       scanned (GPU 0, background); issue 20's one-vs-two-GPU check (eq20, foreground)
# t10b: the 10-template Qwen run cold, alone on the machine (GPU 0)
# t10c: cca_jax's half of the side-by-side subset (cold, then warm cache; GPU 1) beside the
#       10-template run again on the cold run's compilation cache (GPU 0)
t10a() {
  prep || exit 2
  mkdir -p /tmp/bg && : > /tmp/bg/status
  setsid nohup bash -c "bash bench/original/side_by_side.sh setup > /tmp/bg/setup.log 2>&1; echo setup rc \$? >> /tmp/bg/status" \
    > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 bash -c \
    "python3 bench/gpu_perf.py --only dcm,dcm_scan --out /tmp/bg/perf > /tmp/bg/perf.log 2>&1; echo perf rc \$? >> /tmp/bg/status" \
    > /dev/null 2>&1 < /dev/null &
  eq20
  local t=0
  while [ $t -lt 120 ] && [ "$(grep -c -E 'setup|perf' /tmp/bg/status)" -lt 2 ]; do sleep 5; t=$((t + 5)); done
  cat /tmp/bg/status; tail -n 4 /tmp/bg/setup.log; tail -n 30 /tmp/bg/perf.log
  mkdir -p "$OUT/perf" && cp -r /tmp/bg/perf/. "$OUT/perf/" 2>/dev/null; true
}
t10b() {
  Q10_DIR=/tmp/q10 Q10_LIMIT=${B1:-560} bash "$0" qwen10 0
}
t10c() {
  (Q10_DIR=/tmp/q10w Q10_CACHE=/tmp/q10.cache Q10_LIMIT=${B1:-540} bash "$0" qwen10 0 > /tmp/bg/q10w.log 2>&1) &
  CUDA_VISIBLE_DEVICES=1 SKIP=orig timeout "${B1:-540}" bash bench/original/side_by_side.sh run 2>&1 | tail -n 30
  wait
  echo "== warm 10-template run"; cat /tmp/bg/q10w.log
}
# eleventh session (issue 21): where the load's import time goes, then the 10-template run
# cold (fresh compilation cache) and warm, alone on GPU 0
imports() {
  python3 - <<'EOF2'
import time
t = time.perf_counter(); import jax; jax.devices(); a = time.perf_counter() - t
t = time.perf_counter(); import torch; b = time.perf_counter() - t
t = time.perf_counter(); import transformers; transformers.AutoConfig.for_model("qwen2"); c = time.perf_counter() - t
print(f"import jax + GPU init {a:.1f} s; import torch {b:.1f} s; then transformers + a config {c:.1f} s")
EOF2
}
# where `import transformers` spends its seconds here (cumulative, the 12 largest)
imports_detail() {
  python3 -X importtime -c "import transformers; transformers.AutoConfig.for_model('qwen2')" 2>&1 \
    | sort -t'|' -k2 -n | tail -n 12
  python3 -c "import time; t = time.perf_counter(); from transformers import PreTrainedTokenizerFast; \
print(f'PreTrainedTokenizerFast alone {time.perf_counter() - t:.1f} s')"
  python3 -c "import time, importlib.metadata as m; t = time.perf_counter(); n = len(list(m.distributions())); \
print(f'{n} distributions listed in {time.perf_counter() - t:.1f} s')"
}
t11b() {
  imports_detail
  python3 bench/compile_probe.py
}
t11a() {
  imports
  Q10_DIR=/tmp/q11c Q10_LIMIT=${B1:-320} bash "$0" qwen10 0
  Q10_DIR=/tmp/q11w Q10_CACHE=/tmp/q11c.cache Q10_LIMIT=${B2:-230} bash "$0" qwen10 0
}
# twelfth session: GGUF load (first, cached, host path), the cold run (nothing cached);
# then the warm run with every program timed alone, a warm normal run, and the ratios
t12a() {
  local q=${T12:-q13}
  python3 bench/load_probe.py "$GGUF"
  Q10_DIR=/tmp/${q}c Q10_LIMIT=${B1:-300} bash "$0" qwen10 0
}
t12b() {
  local q=${T12:-q13}
  Q10_DIR=/tmp/${q}p Q10_CACHE=/tmp/${q}c.cache Q10_GGUF=/tmp/${q}c.gguf Q10_LIMIT=${B2:-300} CCA_JAX_STEP_PROBE=1 \
    bash "$0" qwen10 0
  Q10_DIR=/tmp/${q}w Q10_CACHE=/tmp/${q}c.cache Q10_GGUF=/tmp/${q}c.gguf Q10_LIMIT=${B3:-220} bash "$0" qwen10 0
  python3 bench/stage_cost.py /tmp/${q}w /tmp/${q}p | tee "$OUT/stage_cost_warm.txt"
  python3 bench/stage_cost.py /tmp/${q}c /tmp/${q}p | tee "$OUT/stage_cost_cold.txt"
}
case "${1:-}" in
  prep) prep ;;
  sbs) sbs ;;
  wait) wait_sbs "${2:-500}" ;;
  qwen10) shift; qwen10 "$@" ;;
  perf) shift; perf "$@" ;;
  mesh) shift; mesh "$@" ;;
  s1) s1 ;;
  s2) s2 ;;
  s3) s3 ;;
  controls) shift; controls "$@" ;;
  c9start) c9start ;;
  c9wait) c9wait "${2:-540}" ;;
  eq20) eq20 ;;
  t10a) t10a ;;
  t10b) t10b ;;
  t10c) t10c ;;
  imports) imports ;;
  t11a) t11a ;;
  t11b) t11b ;;
  t12a) t12a ;;
  t12b) t12b ;;
  imports_detail) imports_detail ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
