#!/bin/bash
# Experiment 2: a small Llama from scratch, AnSAN (EP anchors) vs causal attention: same data, steps, seed.
ATTN=$1; STEPS=$2
REPO=$(cd "$(dirname "$0")/../.." && pwd)        # the repository (its anllm_ext is the one run)
RUNS=${RUNS:-$REPO/runs}; PY=${ANLLM_PY:-$REPO/.venv/bin/python}   # where runs go; the Python that runs them
mkdir -p $RUNS
cd $RUNS && PYTHONPATH=$REPO $PY -m anllm_ext.cli train \
  --model $RUNS/scratch-init --attention $ATTN \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode ep --output-dir $RUNS/exp2-$ATTN \
  --block-size 256 --per-device-train-batch-size 8 --learning-rate 2e-3 --warmup-steps 10 \
  --lr-scheduler-type cosine --max-steps $STEPS --eval-blocks 24 --prefill-chunk 128 --no-eval-before \
  --logging-steps 5 --save-steps 1000 --seed 0 --threads 1 --disable-tqdm true
