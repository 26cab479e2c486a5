#!/bin/bash
# The questions `make demo` was chosen from: each about the GNU GPL version 2 (docs/experiments/gpl2.txt, ~4,100
# tokens, read by no training run), answered by the original SmolLM2-135M-Instruct with its full cache and by the
# AnLLM (MODEL, default the bundled smollm2-anllm) with its full cache, the anchor cache, and the anchor cache with
# recall: `make demo` itself, with each question in turn. Writes the reports one after the other to standard output:
#   docs/experiments/demo_questions.sh > docs/results/demo/gpl2_questions.txt
REPO=$(cd "$(dirname "$0")/../.." && pwd); cd $REPO
echo "# $(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), THREADS=${THREADS:-0}: $0"
while IFS='|' read -r Q E; do
  echo "=== $Q  [$E]"
  make -s --no-print-directory demo DEMO_MODEL="${MODEL:-smollm2-anllm}" DEMO_QUESTION="$Q" DEMO_EXPECT="$E" \
    DEMO_ARGS="--threads ${THREADS:-0} --no-progress" 2>/dev/null | grep -v "^\s*$"
done <<'Q'
Who publishes this license?|Free Software Foundation
In which city is the Free Software Foundation?|Boston
What is the name of the example program in this license?|Gnomovision
Who is the President of Vice?|Ty Coon
What license should a subroutine library use instead?|Lesser General Public License
Which command shows the warranty details?|show w
Q
