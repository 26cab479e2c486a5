#!/bin/bash
# Judge a converted model as a user would: anllm eval on held-out prose no training run read (the Debian
# Administrator's Handbook paragraphs of heldout_text.py; they fill the 12 blocks before the GPL-3 listed after
# them, which docs/training.md experiment 5 scores on its own) and the capitals task (0- and 3-shot,
# demonstrations compressed into their anchors). NAME=label MODEL=dir|smollm2-anllm|"" (the original SmolLM2).
# Writes docs/results/quality/eval_$NAME.{json,png}.
NAME=$1; MODEL=$2
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:-$REPO/data}; OUT=${OUT:-$REPO/docs/results/quality}
mkdir -p $OUT
MODEL_ARGS=$([ -n "$MODEL" ] && echo "--model $MODEL" || echo "--anchors ep")
${ANLLM:-$REPO/.venv/bin/anllm} eval $MODEL_ARGS --text $DATA/heldout/handbook.txt /usr/share/common-licenses/GPL-3 \
  --max-blocks 12 --block-size 512 --prefill-chunk 64 \
  --mc $REPO/tasks/capitals.jsonl --limit 40 --shots 0 3 \
  --threads ${THREADS:-1} --json $OUT/eval_$NAME.json --plot $OUT/eval_$NAME.png
