#!/bin/bash
# Experiment 1, continued: resumes a run at a checkpoint (optimizer, scheduler and data order included)
# for MIN more minutes of training. Defaults: the EP run behind the bundled adapter (its step-50
# checkpoint). The longer AC run: MODE=ac FROM=$RUNS/exp1-ac-s5/checkpoint-85 RUN=exp1-ac-long BS=2 GA=2
MIN=$1
REPO=$(cd "$(dirname "$0")/../.." && pwd)        # the repository (its anllm_ext is the one run)
RUNS=${RUNS:-$REPO/runs}; PY=${ANLLM_PY:-$REPO/.venv/bin/python}   # where runs go; the Python that runs them
mkdir -p $RUNS
MODE=${MODE:-ep}; FROM=${FROM:-$RUNS/exp1-ep/checkpoint-50}; RUN=${RUN:-exp1-ep-long}
cd $RUNS && PYTHONPATH=$REPO $PY -m anllm_ext.cli train \
  --data /usr/share/doc/python3.11/html/_sources --anchor-mode $MODE --output-dir $RUNS/$RUN \
  --resume-from-checkpoint $FROM \
  --block-size 512 --per-device-train-batch-size ${BS:-4} --gradient-accumulation-steps ${GA:-1} \
  --learning-rate 2e-4 --warmup-steps 20 \
  --lora --lora-r 16 --lora-alpha 32 --max-minutes $MIN --eval-blocks 12 --prefill-chunk 256 --no-eval-before \
  --logging-steps 5 --save-steps 50 --seed 0 --threads ${THREADS:-2} --disable-tqdm true
