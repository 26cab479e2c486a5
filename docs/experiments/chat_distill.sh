#!/bin/bash
# Self-distillation on the work the model will do: the bundled AnLLM's LoRA adapter goes on training, the AnSAN
# student matching the original SmolLM2-135M-Instruct (the same weights, adapter off, full attention) on chat
# conversations whose answers that teacher wrote (make_chat_corpus.py) plus plain passages of the same sources.
#   python docs/experiments/make_chat_corpus.py --out $DATA/chat.jsonl --conversations 260 --prose 120 \
#       --man $DATA/man_prose.jsonl --legal $DATA/legal.jsonl --max-new-tokens 64
#   RUN=chat-distill docs/experiments/chat_distill.sh
# One epoch (constant lr after 8 warm-up steps: a run cut by MIN is as trained), batch 1 x 4 accumulation (conversations are not padded to each other),
# 2,048-token rows (a conversation is one row), lr 2e-4; MODEL (default smollm2-anllm, the bundled adapter, which since
# 2026-12-06 is this script's RECALL_SPANS=2 run from experiment 10's adapter: the training log; "original": the bundled
# SmolLM2-135M-Instruct itself, i.e. a conversion from the original weights), TUNE (default LoRA r=16; "full": full
# fine-tuning, the teacher a frozen copy), RECALL_SPANS (default 0: --recall-spans), RECENT (default 0: --recent), RECENT_SHARE (default 1: --recent-share), FULL_SHARE (default 0: --full-attention-share), SINK (default: the model's own: --sink), LR, SCHED, EPOCHS, MIN, THREADS,
# RESUME (a checkpoint directory: go on from it, e.g. for more epochs), TRAIN_DATA (default $DATA/chat.jsonl; several
# files separated by spaces, e.g. with the compositions: "$DATA/chat.jsonl $DATA/compose.jsonl"), TEACHER (--teacher:
# a model directory; "original": the bundled SmolLM2-135M-Instruct, which full fine-tuning of a converted model
# needs, since its default teacher is a frozen copy of the student as loaded).
#   RUN=distill-full MODEL=original TUNE=full LR=5e-5 docs/experiments/chat_distill.sh
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:-$REPO/data}; RUNS=${RUNS:-$REPO/runs}
MODEL_ARG="--model ${MODEL:-smollm2-anllm}"; [ "${MODEL:-}" = original ] && MODEL_ARG=""
TUNE_ARGS="--lora --lora-r 16 --lora-alpha 32"; [ "${TUNE:-lora}" = full ] && TUNE_ARGS=""
PY=${ANLLM_PY:-$REPO/.venv/bin/python}
TEACHER_ARG=""; [ -n "${TEACHER:-}" ] && TEACHER_ARG="--teacher $TEACHER"
[ "${TEACHER:-}" = original ] && TEACHER_ARG="--teacher $($PY -c 'from anllm_ext.models import default_model_dir; print(default_model_dir())')"
mkdir -p $RUNS && cd $RUNS && $PY -m anllm_ext.cli train \
  --data ${TRAIN_DATA:-$DATA/chat.jsonl} $MODEL_ARG $TUNE_ARGS $TEACHER_ARG \
  --distill true --distill-alpha 1.0 --output-dir $RUNS/${RUN:-chat-distill} \
  --block-size 2048 --per-device-train-batch-size 1 --gradient-accumulation-steps 4 \
  --learning-rate ${LR:-2e-4} --lr-scheduler-type ${SCHED:-constant_with_warmup} --warmup-steps 8 --num-train-epochs ${EPOCHS:-1} \
  --max-minutes ${MIN:-80} --eval-blocks 4 --no-eval-before --prefill-chunk 256 \
  --recall-spans ${RECALL_SPANS:-0} --recent ${RECENT:-0} --recent-share ${RECENT_SHARE:-1} --full-attention-share ${FULL_SHARE:-0} ${SINK:+--sink $SINK} --logging-steps 5 --save-steps ${SAVE_STEPS:-20} --seed ${SEED:-0} --threads ${THREADS:-2} \
  --disable-tqdm true ${RESUME:+--resume-from-checkpoint $RESUME}
