#!/bin/bash
# Experiment 2: a small Llama from scratch, AnSAN (EP anchors) vs causal attention: same data, steps, seed.
#   docs/experiments/scratch_ansan_vs_causal.sh ansan|causal STEPS     (the 2026-12-02 scale run: BLOCK=512 BATCH=4 STEPS=500)
# The first run (60 steps of 8 x 256 tokens): BLOCK=256 BATCH=8 EVAL_BLOCKS=24 SAVE_STEPS=1000 ... 60.
ATTN=$1; STEPS=$2
BLOCK=${BLOCK:-512}; BATCH=${BATCH:-4}; EVAL_BLOCKS=${EVAL_BLOCKS:-32}; SAVE_STEPS=${SAVE_STEPS:-125}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${RUNS:-$REPO/runs}; PY=${ANLLM_PY:-$REPO/.venv/bin/python}   # where runs go; the Python that runs them
mkdir -p $RUNS
cd $RUNS && $PY -m anllm_ext.cli train \
  --model $RUNS/scratch-init --attention $ATTN \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode ep --output-dir $RUNS/exp2-$ATTN \
  --block-size $BLOCK --per-device-train-batch-size $BATCH --learning-rate 2e-3 --warmup-steps 10 \
  --lr-scheduler-type cosine --max-steps $STEPS --eval-blocks $EVAL_BLOCKS --prefill-chunk 128 --no-eval-before \
  --logging-steps 5 --save-steps $SAVE_STEPS --seed 0 --threads ${THREADS:-1} --disable-tqdm true
