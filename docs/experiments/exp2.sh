#!/bin/bash
# Experiment 2: a small Llama from scratch, AnSAN (EP anchors) vs causal attention: same data, steps, seed.
ATTN=$1; STEPS=$2
cd /work/runs && PYTHONPATH=/work/main /work/main/.venv/bin/python -m anllm_ext.cli train \
  --model /work/runs/scratch-init --attention $ATTN \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode ep --output-dir /work/runs/exp2-$ATTN \
  --block-size 256 --per-device-train-batch-size 8 --learning-rate 2e-3 --warmup-steps 10 \
  --lr-scheduler-type cosine --max-steps $STEPS --eval-blocks 24 --prefill-chunk 128 --no-eval-before \
  --logging-steps 5 --save-steps 1000 --seed 0 --threads 1 --disable-tqdm true
