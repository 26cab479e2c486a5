#!/bin/bash
# The state-facts tasks (tasks/make_state_facts.py: capital, postal code, flower of a bare state name; only the
# demonstrations say which) at 0 and 3 shots, full attention and the anchor cache.
# NAME=label MODEL=dir|smollm2-anllm|"" (the original SmolLM2). Writes docs/results/quality/state_facts/NAME-REL.json;
# docs/experiments/state_facts_table.py makes the table.
NAME=$1; MODEL=$2
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/docs/results/quality/state_facts}
mkdir -p $OUT
MODEL_ARGS=$([ -n "$MODEL" ] && echo "--model $MODEL" || echo "--anchors ep")
for REL in capital postal flower; do
  ${ANLLM:-$REPO/.venv/bin/anllm} eval $MODEL_ARGS --mc $REPO/tasks/state_$REL.jsonl --shots 0 3 --mode full,cached \
    --threads ${THREADS:-2} --no-progress --json $OUT/$NAME-$REL.json || exit 1
done
