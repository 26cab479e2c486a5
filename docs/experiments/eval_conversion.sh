#!/bin/bash
# Judge a conversion on held-out text of six kinds (heldout_domains.py: no training run or recipe decision
# reads them), in-context recall asked in chat (needle_recall.py: a fact in ~300 / ~1,000 tokens of handbook
# prose) and the capitals task 0- and 3-shot.
#   NAME=label MODEL=adapter-or-model-dir ("" = the original SmolLM2-135M-Instruct: full attention, plus the
#   untrained model under EP anchors for contrast)
# Writes docs/results/conversion/{ppl_$NAME_<domain>,mc_$NAME,needle_$NAME}.json; quality_domains_table.py
# turns them into the table of docs/training.md.
set -e
NAME=$1; MODEL=$2; [ -d "$MODEL" ] && MODEL=$(cd "$MODEL" && pwd)  # the needle step runs from docs/experiments
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:-$REPO/data}; OUT=${OUT:-$REPO/docs/results/conversion}; T=${THREADS:-2}
PY=${ANLLM_PY:-$REPO/.venv/bin/python}
DOMAINS=${DOMAINS:-"handbook-tech reference faq glossary narrative quotations"}
mkdir -p $OUT
MODEL_ARGS=$([ -n "$MODEL" ] && echo "--model $MODEL" || echo "--anchors ep")
for D in $DOMAINS; do
  $PY -m anllm_ext.cli eval $MODEL_ARGS --mode full,cached --text $DATA/heldout/$D.txt --max-blocks ${BLOCKS:-8} \
    --block-size 512 --prefill-chunk 64 --threads $T --no-progress --json $OUT/ppl_${NAME}_$D.json
done
$PY -m anllm_ext.cli eval $MODEL_ARGS --mode full,cached --mc $REPO/tasks/capitals.jsonl --limit 40 --shots 0 3 \
  --threads $T --no-progress --json $OUT/mc_$NAME.json
if [ -n "$MODEL" ]; then RUNS="anllm-full anllm-cached"; ANLLM="--anllm $MODEL"; else RUNS="original-full"; ANLLM=""; fi
cd $REPO/docs/experiments && PYTHONPATH=$REPO $PY needle_recall.py --lengths 300 1000 --depths 0.1 0.5 0.9 \
  --per-cell 4 --runs $RUNS $ANLLM --threads $T --json $OUT/needle_$NAME.json
