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
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site-cca .whl/orig/gguf-*.whl
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
  rm -rf /tmp/q10
  CUDA_VISIBLE_DEVICES=1 python3 -m cca_jax.cli run configs/qwen2.5-coder-0.5b.yaml --out /tmp/q10 \
    --set model=$GGUF --set data.templates=.devdata/templates --quiet "$@" 2>&1 | tail -n 12
  mkdir -p "$OUT/q10" && cp /tmp/q10/summary.json /tmp/q10/report.md "$OUT/q10/" 2>/dev/null
  python3 - <<'EOF'
import json
s = json.load(open("/tmp/q10/summary.json"))
for k, v in s["timings_seconds"].items():
    print(f"{k:14s} {v}")
EOF
}

perf() {
  CUDA_VISIBLE_DEVICES=1 BENCH_GGUF=$GGUF python3 bench/gpu_perf.py --baseline .devdata/bench/torch_baseline.py \
    --only "${PERF_ONLY:-limits,dcm,amplify_dots,generate,generate_shared,generate_spec,spec_cost,baseline}" \
    --out "$OUT/perf" "$@"
}

mesh() {
  python3 bench/mesh_perf.py --out "$OUT/mesh" "$@"
}

case "${1:-}" in
  prep) prep ;;
  sbs) sbs ;;
  wait) wait_sbs "${2:-500}" ;;
  qwen10) shift; qwen10 "$@" ;;
  perf) shift; perf "$@" ;;
  mesh) shift; mesh "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
