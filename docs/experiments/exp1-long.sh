#!/bin/bash
# Experiment 1, EP, continued: resumes the 50-minute run at its step-50 checkpoint (optimizer and data order included)
# for MIN more minutes of training.
MIN=$1
cd /work/runs && PYTHONPATH=/work/main /work/main/.venv/bin/python -m anllm_ext.cli train \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode ep --output-dir /work/runs/exp1-ep-long \
  --resume-from-checkpoint /work/runs/exp1-ep/checkpoint-50 \
  --block-size 512 --per-device-train-batch-size 4 --learning-rate 2e-4 --warmup-steps 20 \
  --lora --lora-r 16 --lora-alpha 32 --max-minutes $MIN --eval-blocks 12 --prefill-chunk 256 --no-eval-before \
  --logging-steps 5 --save-steps 50 --seed 0 --threads 2 --disable-tqdm true
