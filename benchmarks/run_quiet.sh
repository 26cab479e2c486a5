#!/usr/bin/env bash
# The timing runs behind docs/benchmarks.md and docs/evaluation.md, one after another on an otherwise idle
# machine (nothing else may run meanwhile: every figure is a same-run ratio, but a second job still skews
# them). Writes JSON (and logs, PNGs) under docs/results/benchmarks/ (OUT=... to change).
# Usage: benchmarks/run_quiet.sh [step ...]   steps: ops cpp decode train eval serving (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/results/benchmarks}
mkdir -p "$OUT"
STEPS=${*:-ops cpp decode train eval serving}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run_quiet.log"; }
for step in $STEPS; do
  log "start $step"
  case $step in
    ops) for i in 1 2 3; do
           $PY benchmarks/bench_ops.py --threads 2 --repeats 9 --json "$OUT/bench_ops-$i.json" > "$OUT/bench_ops-$i.log" 2>&1
         done ;;
    cpp) benchmarks/run_cpp.sh --benchmark_min_time=0.5 --benchmark_out="$OUT/bench_ops_cpp.json" \
           > "$OUT/bench_ops_cpp.log" 2>&1 ;;
    decode) for i in 1 2 3; do
              $PY benchmarks/bench_decode.py --context 8190 --threads 2 --json "$OUT/bench_decode-$i.json" \
                > "$OUT/bench_decode-$i.log" 2>&1
            done ;;
    train) $PY benchmarks/bench_train.py --threads 2 --blocks 512 2048 8192 --steps 3 --dense-limit-gb 12 \
             --json "$OUT/bench_train.json" > "$OUT/bench_train.log" 2>&1 ;;
    eval) for model in smollm2-anllm default; do
            margs=(); [ "$model" != default ] && margs=(--model "$model")
            anchors=(); [ "$model" = default ] && anchors=(--anchors ep)
            .venv/bin/anllm eval "${margs[@]}" "${anchors[@]}" --mc tasks/capitals.jsonl --limit 40 --shots 0 3 \
              --text /usr/share/common-licenses/GPL-3 --max-blocks 4 --block-size 512 \
              --prefill-chunk 64 --threads 2 --json "$OUT/eval_$model.json" --plot "$OUT/eval_$model.png" \
              > "$OUT/eval_$model.log" 2>&1
          done ;;
    serving) $PY benchmarks/bench_serving.py --contexts 2048 8192 --batches 1 4 16 --budget-batch-cap 16 --threads 2 \
               --json "$OUT/serving.json" --plot "$OUT/serving.png" > "$OUT/serving.log" 2>&1 ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
  log "end $step (exit $?)"
done
