#!/bin/bash
# Experiment 3: the objective of AnSAN training, self-distillation vs the LM loss, same data, seed, LoRA and steps.
# OBJ=distill|lm  STEPS=optimizer steps (cosine schedule)  Data: python3.11-doc prose + the segment corpus
# (docs/experiments/make_segment_corpus.py --out $DATA/segments.jsonl --documents 3000); EXTRA_DATA: more files
# (e.g. $DATA/man_prose.jsonl from docs/experiments/man_page_prose.py).
# ANLLM_PY: a python whose anllm_ext is installed (default: the project's .venv). MODEL: --model (e.g.
# smollm2-anllm: a LoRA adapter goes on training); SEED (default 0; it also picks the held-out split);
# DATA_SEED (the order of the training blocks; default: SEED); LR (1e-3); WARMUP (10 steps).
OBJ=$1; STEPS=${2:-100}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:-$REPO/data}; RUNS=${RUNS:-$REPO/runs}
case $OBJ in
  distill) OBJ_ARGS="--distill true --distill-alpha ${ALPHA:-1.0} --distill-temperature ${TEMP:-1.0}" ;;
  lm) OBJ_ARGS="" ;;
  *) echo "usage: $0 distill|lm [steps]"; exit 2 ;;
esac
mkdir -p $RUNS && cd $RUNS && ${ANLLM_PY:-$REPO/.venv/bin/python} -m anllm_ext.cli train \
  --data /usr/share/doc/python3.11/html/_sources $DATA/segments.jsonl ${EXTRA_DATA:-} --anchor-mode ep \
  ${MODEL:+--model $MODEL} \
  --output-dir $RUNS/${RUN:-exp3-$OBJ} $OBJ_ARGS \
  --block-size 512 --per-device-train-batch-size 4 --learning-rate ${LR:-1e-3} --lr-scheduler-type cosine \
  --warmup-steps ${WARMUP:-10} --max-steps $STEPS --max-minutes ${MIN:-80} \
  --lora --lora-r 16 --lora-alpha 32 --eval-blocks 12 --prefill-chunk 256 \
  --logging-steps 5 --save-steps ${SAVE_STEPS:-25} --seed ${SEED:-0} ${DATA_SEED:+--data-seed $DATA_SEED} --threads ${THREADS:-2} --disable-tqdm true
