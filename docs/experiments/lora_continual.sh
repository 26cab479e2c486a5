#!/bin/bash
# Experiment 1: continual pretraining of the bundled SmolLM2-135M with AnSAN, LoRA r=16 (+ the <AC> row in AC mode).
MODE=$1; MIN=$2
REPO=$(cd "$(dirname "$0")/../.." && pwd)        # the repository (its anllm_ext is the one run)
RUNS=${RUNS:-$REPO/runs}; PY=${ANLLM_PY:-$REPO/.venv/bin/python}   # where runs go; the Python that runs them
mkdir -p $RUNS
cd $RUNS && PYTHONPATH=$REPO $PY -m anllm_ext.cli train \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode $MODE --output-dir $RUNS/${RUN:-exp1-$MODE} \
  --block-size 512 --per-device-train-batch-size ${BS:-4} --gradient-accumulation-steps ${GA:-1} --learning-rate 2e-4 --warmup-steps 20 \
  --lora --lora-r 16 --lora-alpha 32 --max-minutes $MIN --eval-blocks ${EB:-12} --prefill-chunk 256 \
  --logging-steps 5 --save-steps 50 --seed 0 --threads ${THREADS:-1} --disable-tqdm true
