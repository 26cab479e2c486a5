#!/bin/bash
# RULER's synthetic needle tasks through lm-evaluation-harness (the `anllm` backend), no download: TASKS (default
# niah_single_1: a number hidden in a haystack of repeated filler sentences; niah_multikey_2: a number for a key
# among many other key-number needles); haystacks built locally from the SmolLM2 tokenizer (pip install wonderwords
# nltk; nltk's failed punkt download is harmless for these tasks; niah_multikey_3's UUIDs: the original scores 0
# at 1,024 tokens). Raw prompts (RULER's template), greedy, 32 new tokens.
#   RUNS: NAME=MODEL_ARGS ... (default: the original with full attention; the bundled AnLLM full / anchor cache /
#   anchor cache + recall chosen by the question's tokens); LENGTHS (default 1024 4096); LIMIT (samples per task
#   and length, default 8: lm-eval's --limit takes a task's first samples, so each length is its own invocation);
#   THREADS (default 1). Writes docs/results/ruler/<NAME>-<LENGTH>/... (lm-eval's JSON + samples).
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${ANLLM_PY:-$REPO/.venv/bin/python}
OUT=${OUT:-$REPO/docs/results/ruler}; T=${THREADS:-1}; LIMIT=${LIMIT:-8}
TOK=$(cd /tmp && $PY -c 'from anllm_ext.models import default_model_dir; print(default_model_dir())')
RUNS=${RUNS:-"original-full=pretrained=$TOK,mode=full anllm-full=pretrained=smollm2-anllm,mode=full
anllm-cached=pretrained=smollm2-anllm,mode=cached
anllm-recall4-prompt-peak=pretrained=smollm2-anllm,mode=cached+recall,recall_budget=4,recall_every=prompt,recall_score=peak"}
for LEN in ${LENGTHS:-1024 4096}; do for RUN in $RUNS; do
  NAME=${RUN%%=*}; ARGS=${RUN#*=}
  echo "== $NAME $LEN ($ARGS)"
  (cd /tmp && HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $PY -m anllm_ext.lm_eval_backend run --model anllm \
    --model_args "$ARGS,threads=$T,prefill_chunk=64" --tasks ${TASKS:-niah_single_1,niah_multikey_2} \
    --metadata "{\"max_seq_lengths\":[$LEN],\"tokenizer\":\"$TOK\"}" --gen_kwargs max_gen_toks=32 \
    --limit $LIMIT --device cpu --batch_size 1 --log_samples --output_path $OUT/$NAME-$LEN) 2>&1 | grep -v "Generating synthetic\|nltk_data"
done; done
