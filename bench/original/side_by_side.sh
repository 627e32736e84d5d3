#!/usr/bin/env bash
# cca_jax and the original PyTorch release side by side on one GPU: the same model directory,
# items, splits and SPEC settings; each stage's wall clock for both (bench/original/README.md,
# the device calls in CARRY.md). Run from the repository root.
#
#   bash bench/original/side_by_side.sh setup       wheels, model dir, original's code, checks
#   bash bench/original/side_by_side.sh run         both, in the foreground, then the table
#   bash bench/original/side_by_side.sh start [S]   `run` in the background (setsid), then wait
#   bash bench/original/side_by_side.sh wait [S]    follow the background run for up to S s
#   bash bench/original/side_by_side.sh report [R]  the table of run dir R (default: latest)
#
# Settings (environment): TEMPLATES ("269 103"), MAX_NEW (256: every generation's token
# budget, both sides), BATCH (64), CCA_RUNS (2: cold, then warm compile cache), SKIP
# ("cca" or "orig": run one side only), CCA_SET (extra cca-jax --set items, space separated);
# for tests only: STEPS and EPOCHS (50: amplification steps, DCM epochs), SBS_TEST_FLOAT32=1
# (the original loads float32 instead of float16: float16 matmuls crawl on a CPU).
# Paths: SBS_WORK (/tmp/sbs), GGUF (/tmp/w/q.gguf; joined from /tmp/w/part_* if missing),
# MODEL_DIR ($SBS_WORK/model-hf), ORIG_SRC (.devdata/orig: the release's files), TEMPLATE_SOURCES
# (.devdata/templates), WHEELS (.whl/orig), ORIG_SITE (/tmp/site-orig), CCA_SITE (/tmp/site-cca),
# ORIG_PY / CCA_PY (python3).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/bench/original
W=${SBS_WORK:-/tmp/sbs}
TEMPLATES=${TEMPLATES:-"269 103"}
MAX_NEW=${MAX_NEW:-256}
BATCH=${BATCH:-64}
CCA_RUNS=${CCA_RUNS:-2}
SKIP=${SKIP:-}
CCA_SET=${CCA_SET:-}
STEPS=${STEPS:-50}     # amplification steps and DCM epochs: SPEC's 50; fewer only for tests
EPOCHS=${EPOCHS:-50}
PER_TEMPLATE=${PER_TEMPLATE:-50}
GGUF=${GGUF:-/tmp/w/q.gguf}
GGUF_SHA=${GGUF_SHA:-1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32}
MODEL_DIR=${MODEL_DIR:-$W/model-hf}
ORIG_SRC=${ORIG_SRC:-$REPO/.devdata/orig}
TEMPLATE_SOURCES=${TEMPLATE_SOURCES:-$REPO/.devdata/templates}
WHEELS=${WHEELS:-$REPO/.whl/orig}
ORIG_SITE=${ORIG_SITE:-/tmp/site-orig}
CCA_SITE=${CCA_SITE:-/tmp/site-cca}
ORIG_PY=${ORIG_PY:-python3}
CCA_PY=${CCA_PY:-python3}
WRAP=$HERE/run_original.py
ORIG=$W/orig   # the release's files, copied here from ORIG_SRC

die() { echo "side_by_side: error: $*" >&2; exit 2; }
now() { date +%s.%N; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

orig_env() {  # the original's environment: its pinned packages first on the path, offline
  env PYTHONPATH="$ORIG_SITE" SBS_ORIG="$ORIG" SBS_DATA="$W/gsm_main.jsonl" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$W/hf-home" \
    WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONUNBUFFERED=1 "$@"
}
cca_env() { env PYTHONPATH="$CCA_SITE:$REPO" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 "$@"; }

# -- setup ----------------------------------------------------------------------------------------
setup() {
  mkdir -p "$W"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $ORIG_SITE (the original's packages only)"
    "$ORIG_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$ORIG_SITE" "$WHEELS"/*.whl || die "pip install into $ORIG_SITE failed"
    if ! cca_env "$CCA_PY" -c "import gguf" 2>/dev/null && ls "$WHEELS"/gguf-*.whl >/dev/null 2>&1; then
      "$CCA_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$CCA_SITE" "$WHEELS"/gguf-*.whl || die "pip install gguf into $CCA_SITE failed"
    fi
  else
    say "no wheels in $WHEELS: using $ORIG_PY's own packages for the original"
  fi
  if [ ! -f "$GGUF" ] && ls "$(dirname "$GGUF")"/part_* >/dev/null 2>&1; then
    say "joining $(ls "$(dirname "$GGUF")"/part_* | wc -l) chunks into $GGUF"
    cat "$(dirname "$GGUF")"/part_* > "$GGUF.part" && mv "$GGUF.part" "$GGUF"
    echo "$GGUF_SHA  $GGUF" | sha256sum -c - || die "$GGUF: sha256 mismatch (a chunk missing or damaged)"
  fi
  [ -d "$ORIG_SRC/math_reasoning" ] || die "$ORIG_SRC holds no math_reasoning/: carry the release (CARRY.md step 0)"
  if [ ! -d "$ORIG/math_reasoning" ]; then
    mkdir -p "$ORIG" && cp -r "$ORIG_SRC"/. "$ORIG"/
  fi
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    [ -f "$GGUF" ] || die "no model: $GGUF is missing (carry it: CARRY.md)"
    say "GGUF -> HF dir with the original's transformers (dequantized by its GGUF loader)"
    orig_env "$ORIG_PY" "$HERE/gguf_to_hf.py" "$GGUF" "$MODEL_DIR" 2>&1 | grep -v "de-quantizing" | tail -3
    [ -f "$MODEL_DIR/config.json" ] || die "conversion failed"
  fi
  if [ ! -f "$W/gsm_main.jsonl" ]; then
    local srcs=()
    for s in $TEMPLATE_SOURCES; do srcs+=(--templates "$s"); done
    say "GSM-Symbolic items from the templates (cca_jax's template engine)"
    cca_env "$CCA_PY" "$HERE/prepare_data.py" instances "${srcs[@]}" --per-template "$PER_TEMPLATE" \
      --out "$W/gsm_main.jsonl" || die "making the items failed"
  fi
  say "checks"
  orig_env "$ORIG_PY" -c "
import torch, transformers, tokenizers, huggingface_hub, datasets, nnsight
print('original env: torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers',
      tokenizers.__version__, '| hub', huggingface_hub.__version__, '| datasets', datasets.__version__,
      '| nnsight', nnsight.__version__, '| cuda', torch.cuda.is_available())" || die "the original's environment does not import"
  cca_env "$CCA_PY" -c "import jax, transformers, cca_jax; print('cca_jax env: jax', jax.__version__, jax.devices(), '| transformers', transformers.__version__)" \
    || die "cca_jax's environment does not import"
  say "setup done: model $MODEL_DIR, items $W/gsm_main.jsonl, original $ORIG"
}

# -- run ------------------------------------------------------------------------------------------
timed() {  # timed NAME LOG CMD...: the command's outside wall clock into walls.jsonl
  local name=$1 log=$2; shift 2
  local t0 t1 rc
  t0=$(now)
  "$@" > "$log" 2>&1
  rc=$?
  t1=$(now)
  local dt
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  echo "{\"step\": \"$name\", \"seconds\": $dt, \"exit\": $rc, \"t0\": $t0}" >> "$R/walls.jsonl"
  say "$name: exit $rc, $dt s ($log)"
  return $rc
}

run_all() {
  [ -f "$MODEL_DIR/config.json" ] && [ -f "$W/gsm_main.jsonl" ] && [ -d "$ORIG/math_reasoning" ] \
    || die "run setup first"
  R=$W/run-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$R/orig"
  ln -sfn "$R" "$W/latest"
  trap 'touch "$R/DONE"' EXIT  # a failed run is finished too: `wait` stops and reports
  export SBS_TIMELINE=$R/timeline.jsonl
  say "run dir $R: templates [$TEMPLATES], max_new_tokens $MAX_NEW, batch $BATCH"
  echo "{\"templates\": \"$TEMPLATES\", \"max_new_tokens\": $MAX_NEW, \"batch\": $BATCH, \"steps\": $STEPS, \"epochs\": $EPOCHS, \"model\": \"$MODEL_DIR\", \"float32_test\": \"${SBS_TEST_FLOAT32:-}\"}" > "$R/settings.json"

  # the original's own split of the subset; cca_jax's items renumbered to it (not timed)
  (cd "$ORIG" && orig_env "$ORIG_PY" "$WRAP" split --templates "$TEMPLATES" --work "$R/split" \
     --out "$R/split.json") > "$R/split.log" 2>&1 || die "the original's split failed ($R/split.log)"
  cca_env "$CCA_PY" "$HERE/prepare_data.py" cca-subset --instances "$W/gsm_main.jsonl" --split "$R/split.json" \
    --out "$R/cca_subset.jsonl" >> "$R/split.log" 2>&1 || die "renumbering for cca_jax failed ($R/split.log)"

  if [ "$SKIP" != cca ]; then
    local sets=(--set "model=$MODEL_DIR" --set "data.templates=$R/cca_subset.jsonl"
                --set "eval.max_new_tokens=$MAX_NEW" --set "eval.test_max_new_tokens=$MAX_NEW"
                --set "eval.batch_size=$BATCH" --set "compile_cache=$R/xla-cache"
                --set "amplify.steps=$STEPS" --set "dcm.epochs=$EPOCHS")
    for s in $CCA_SET; do sets+=(--set "$s"); done
    for i in $(seq 1 "$CCA_RUNS"); do
      (cd "$REPO" && timed "cca$i" "$R/cca$i.log" cca_env "$CCA_PY" -m cca_jax.cli run "$HERE/cca_qwen_subset.yaml" \
         --out "$R/cca$i" --quiet "${sets[@]}") || say "cca_jax run $i failed: tail $R/cca$i.log"
    done
  fi

  if [ "$SKIP" != orig ]; then
    # 1. base evaluation (train/val/test) and template selection
    (cd "$ORIG" && timed orig_base_eval "$R/orig_base_eval.log" orig_env SBS_LABEL=base_eval "$ORIG_PY" "$WRAP" \
       base-eval --templates "$TEMPLATES" --model "$MODEL_DIR" --work "$R/orig/base" --out "$R/orig/selected.json" \
       --max-new-tokens "$MAX_NEW" --batch-size "$BATCH") || { finish; die "original base evaluation failed"; }
    local selected
    selected=$(python3 -c "import json,sys; print(' '.join(map(str, json.load(open(sys.argv[1]))['selected'])))" \
               "$R/orig/selected.json")
    [ -n "$selected" ] || { finish; die "the original selected no template (all above the threshold)"; }
    say "original selected templates: $selected"
    # 2. pivots: generate_dataset.py (prefix method), the selected templates' train items
    orig_env "$ORIG_PY" "$WRAP" pivot-config --templates "$selected" --seed 10 --max-new-tokens "$MAX_NEW" \
      --out "$R/orig/generate.yaml" > /dev/null || die "pivot config"
    (cd "$ORIG" && timed orig_pivots "$R/orig_pivots.log" orig_env SBS_SPLIT="$R/split.json" ARTIFACT_DIR="$R/orig/artifacts" \
       "$ORIG_PY" "$WRAP" exec math_reasoning/generate_dataset.py --config_file "$R/orig/generate.yaml" \
       --config_key side_by_side --model_name "$MODEL_DIR" --generation_method prefix --batch_size "$BATCH") \
      || { finish; die "the original's generate_dataset.py failed"; }
    local loc
    loc=$(ls "$R"/orig/artifacts/*_prefix_*side_by_side.json 2>/dev/null | grep -v -e '_greedy.json' -e '_non_greedy.json' | head -1)
    [ -n "$loc" ] || { finish; die "no localization dataset in $R/orig/artifacts"; }
    # 3. DCM, amplification with validation, test: run_fixing_pipeline.py -> fixing_pipeline.py
    orig_env "$ORIG_PY" "$WRAP" fix-config --templates "$selected" --model "$MODEL_DIR" --dataset "$loc" \
      --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --n-steps "$STEPS" --n-epochs "$EPOCHS" \
      --out "$R/orig/fix.json" > /dev/null || die "fix config"
    mkdir -p "$R/shim"  # the launcher runs `python math_reasoning/fixing_pipeline.py`: this python is the wrapper
    printf '#!/bin/sh\nexec "%s" "%s" exec "$@"\n' "$(command -v "$ORIG_PY")" "$WRAP" > "$R/shim/python"
    chmod +x "$R/shim/python"
    (cd "$ORIG" && timed orig_fix "$R/orig_fix.log" orig_env PATH="$R/shim:$PATH" ARTIFACT_DIR="$R/orig/artifacts" \
       "$ORIG_PY" "$WRAP" exec math_reasoning/run_fixing_pipeline.py --config_file "$R/orig/fix.json")
    ls "$R"/orig/artifacts/experiments/*/accuracy_results.json > /dev/null 2>&1 \
      || say "the original's fixing pipeline wrote no accuracy_results.json: see $R/orig_fix.log"
  fi
  finish
}

finish() { touch "$R/DONE"; report "$R"; }

report() {
  local r=${1:-$W/latest}
  [ -d "$r" ] || die "no run dir $r"
  python3 "$HERE/compare.py" "$r" ${OUT:+--out "$OUT"}
}

wait_run() {  # follow the latest background run for up to $1 seconds
  local limit=${1:-540} t=0 r=$W/latest
  while [ $t -lt "$limit" ]; do
    if [ -f "$r/DONE" ]; then tail -n 40 "$W/background.log"; report "$r"; return 0; fi
    if [ $((t % 60)) -eq 0 ]; then
      say "running: $(tail -n 1 "$r/walls.jsonl" 2>/dev/null) | last event: $(tail -n 1 "$r/timeline.jsonl" 2>/dev/null)"
      tail -n 2 "$W/background.log" 2>/dev/null
    fi
    sleep 10; t=$((t + 10))
  done
  say "still running after ${limit}s: call 'side_by_side.sh wait' again (report so far below)"
  report "$r"
}

case "${1:-}" in
  setup) setup ;;
  run) run_all ;;
  start)
    mkdir -p "$W"; rm -f "$W/latest"
    setsid nohup bash "$0" run > "$W/background.log" 2>&1 < /dev/null &
    sleep 5; wait_run "${2:-540}" ;;
  wait) wait_run "${2:-540}" ;;
  report) report "${2:-}" ;;
  *) sed -n '2,23p' "$0"; exit 2 ;;
esac
