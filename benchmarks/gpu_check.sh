#!/usr/bin/env bash
# The one GPU check, run from a copy of the repository on a machine with a CUDA GPU:
#   1. build the extension in place for the GPU's architecture (sm_90 on an H200) with all cores,
#      ANLLM_EXPECT_CUDA=1 (a build without the CUDA kernels fails);
#   2. the CUDA cases of the test suite: every op test against the oracle on device=cuda, the registration
#      and smoke tests, and the transformers-facing tests on cuda (tiny models: exactness of cached decoding
#      vs one masked pass, padded batches, compaction, generation);
#   3. compute-sanitizer memcheck and racecheck on a small problem of every kernel (benchmarks/gpu_sanitize.py);
#   4. the benchmarks (benchmarks/bench_gpu.py): attention forward/backward at T=8192 and 32768, compaction
#      of a 32-layer cache, the decode step, SmolLM2 decode latency at 8k context with batch 1 and 16.
# Every step has a timeout, and all steps share one time budget (GPU_CHECK_BUDGET_S, default 480 s), so
# the script ends in time and a late step is skipped rather than cut off the whole run.
# Everything goes to $OUT (when set) or results/gpu/: gpu_check.log (all output), build.log, tests.xml
# (junit), sanitize.log, bench.json, steps.tsv and summary.json (7 files). Without a GPU it stops at once
# with exit code 2. Exit code 0 only when every step passed.
#
# Rehearsal without a GPU: ANLLM_GPU_CHECK_DRY=1 runs the same steps on the CPU (a few tests, the sanitizer
# driver without compute-sanitizer, tiny benchmark sizes); the in-place build is skipped there unless
# ANLLM_GPU_CHECK_BUILD=1 (it replaces anllm_ext/_C*.so, so rehearse it in a copy of the tree).
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default nproc),
# GPU_CHECK_STEPS (default "build tests sanitize bench": e.g. "build bench" for a rerun of the figures).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY=${ANLLM_GPU_CHECK_DRY:-0}
OUTDIR=${OUT:-results/gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
STEPS="$OUTDIR/steps.tsv"
: > "$LOG"
printf 'step\trc\tseconds\n' > "$STEPS"
log() { echo "$@" | tee -a "$LOG"; }

START=$(date +%s)
WANT=" ${GPU_CHECK_STEPS:-build tests sanitize bench} "
want() { [[ "$WANT" == *" $1 "* ]]; }
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-3600}; else BUDGET=${GPU_CHECK_BUDGET_S:-480}; fi
DEADLINE=$((START + BUDGET))

# run_step NAME CAP_SECONDS OUTPUT_FILE CMD...: runs CMD with a timeout of min(CAP, what is left of the
# budget), its output appended to OUTPUT_FILE (and shown when that is the log), and records the exit code
# (124: timed out; 125: skipped, no budget left).
run_step() {
  local name=$1 cap=$2 out=$3; shift 3
  local left=$((DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    log "## $name: SKIPPED (time budget of ${BUDGET}s spent)"
    printf '%s\t125\t0\n' "$name" >> "$STEPS"
    return 125
  fi
  log "## $name (timeout ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  if [ "$out" = "$LOG" ]; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$limit" "$@" >> "$out" 2>&1
    rc=$?
  fi
  local dt=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && log "!! $name TIMED OUT after ${dt}s"
  log "## $name: exit code $rc in ${dt}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$STEPS"
  return "$rc"
}

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

summary() {
  "$PY" - "$OUTDIR" "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, re, sys
import xml.etree.ElementTree as ET

out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [dict(zip(("step", "rc", "seconds"), l.rstrip("\n").split("\t"))) for l in open(os.path.join(out, "steps.tsv"))][1:]
s = {"dry_run": dry, "steps": steps, "tests": None, "sanitizer": {}, "bench": None}
try:
    root = ET.parse(os.path.join(out, "tests.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    cnt = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    s["tests"] = dict(cnt, failed=bad[:50])
except (OSError, ET.ParseError) as e:
    s["tests"] = {"error": f"no junit results: {e}"}
try:
    text = open(os.path.join(out, "sanitize.log"), errors="replace").read()
    for tool, block in re.findall(r"### tool (\w+)\n(.*?)(?=### tool |\Z)", text, re.S):
        lines = [l.strip("= ").strip() for l in block.splitlines() if "SUMMARY" in l]
        if "Device not supported" in block or "not supported on this" in block:
            lines.append("compute-sanitizer does not support this device/runtime")
        s["sanitizer"][tool] = lines or ["no summary line (see sanitize.log)"]
except OSError:
    pass
try:
    b = json.load(open(os.path.join(out, "bench.json")))
    s["bench"] = {"summary": b["summary"], "failed_sections": [k for k, v in b["sections"].items() if "error" in v]}
except (OSError, ValueError, KeyError) as e:
    s["bench"] = {"error": f"no benchmark results: {e}"}
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("=" * 30, "gpu_check summary", "(DRY RUN on the CPU)" if dry else "", "=" * 30)
for st in steps:
    print(f"  {st['step']:22s} exit {st['rc']:>4s}  {st['seconds']:>4s} s")
t = s["tests"]
print("  tests:", t if "error" in t else f"{t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
for name in t.get("failed", [])[:15]:
    print("    FAILED", name)
for tool, lines in s["sanitizer"].items():
    print(f"  {tool}: " + "; ".join(lines))
for line in (s["bench"].get("summary") or [s["bench"].get("error")]):
    print("  " + str(line))
EOF
}

finish() {
  summary
  local failed
  failed=$(awk -F'\t' 'NR > 1 && $2 != 0' "$STEPS" | wc -l)
  log "# gpu_check done in $(( $(date +%s) - START ))s: $failed step(s) not passed; results in $OUTDIR"
  [ "$failed" -eq 0 ]
  exit $?
}

log "# gpu_check $(date -u +%FT%TZ) on $(hostname) $([ "$DRY" = 1 ] && echo '(DRY RUN: CPU, tiny sizes)')"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
else
  DEVICE=cuda
  if ! timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>>"$LOG"; then
    "$PY" -c "import torch" >/dev/null 2>&1 || log "gpu_check: $PY cannot import torch (set PYTHON)"
    log "gpu_check: no CUDA GPU visible to torch ($PY); this script needs one. Nothing was run."
    log "gpu_check: to rehearse the steps on a CPU, run ANLLM_GPU_CHECK_DRY=1 benchmarks/gpu_check.sh"
    exit 2
  fi
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, sys, torch, transformers
line = f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, {os.cpu_count()} cores"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    line += f", {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
print(line)
EOF

# 1. build
if [ "$DRY" = 1 ]; then
  ARCH=${ANLLM_CUDA_ARCHS:-9.0}
else
  ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}')")
fi
export ANLLM_CUDA_ARCHS="$ARCH" TORCH_CUDA_ARCH_LIST="$ARCH" ANLLM_EXPECT_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# The scripts import the in-place build of the source tree (nothing is installed on the GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUTDIR/build.log"
if ! want build; then
  log "## build: not selected (GPU_CHECK_STEPS)"
elif [ "$DRY" = 1 ] && [ "${ANLLM_GPU_CHECK_BUILD:-0}" != 1 ]; then
  log "## build: skipped in the dry run (ANLLM_GPU_CHECK_BUILD=1 rebuilds anllm_ext/_C in place)"
else
  log "# build for arch $ARCH with MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME"
  if ! run_step build 300 "$OUTDIR/build.log" "$PY" setup.py build_ext --inplace; then
    log "BUILD FAILED; last lines of build.log:"
    grep -E "error|Error" "$OUTDIR/build.log" | head -20 | tee -a "$LOG"
    tail -25 "$OUTDIR/build.log" | tee -a "$LOG"
    finish
  fi
  grep -E "^anllm_ext:" "$OUTDIR/build.log" | tee -a "$LOG"
fi

# 2. tests: the CUDA cases (a few CPU cases in the dry run, enough to exercise the plumbing)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --no-header -rfEs --maxfail=25 --junitxml "$OUTDIR/tests.xml")
has_module pytest_timeout && PYTEST+=(--timeout 120)
if [ "$DRY" = 1 ]; then
  PYTEST+=(python_tests/test_cuda_registration.py python_tests/test_hf_exact.py
           -k "registered or (cpu and llama and (cached_equals or rows_alone))")
else
  has_module xdist && PYTEST+=(-n 4)
  PYTEST+=(python_tests -k cuda)
fi
want tests && run_step tests 180 "$LOG" "${PYTEST[@]}"

# 3. compute-sanitizer on small problems of every kernel (our kernels only: --kernel-name kns=anllm)
: > "$OUTDIR/sanitize.log"
SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" 2>/dev/null | head -1)
if ! want sanitize; then
  :
elif [ "$DRY" = 1 ]; then
  echo "### tool driver-on-cpu" >> "$OUTDIR/sanitize.log"
  run_step sanitize_driver_cpu 600 "$OUTDIR/sanitize.log" "$PY" benchmarks/gpu_sanitize.py --device cpu
elif [ -z "$SAN" ]; then
  log "!! compute-sanitizer not found (PATH, \$CUDA_HOME/bin); sanitizer steps not run"
  printf 'sanitize\t127\t0\n' >> "$STEPS"
else
  for tool in memcheck racecheck; do
    echo "### tool $tool" >> "$OUTDIR/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "sanitize_$tool" 100 "$OUTDIR/sanitize.log" "$SAN" --tool "$tool" \
      --kernel-name kns=anllm --error-exitcode 9 --report-api-errors no --print-limit 20 \
      "$PY" benchmarks/gpu_sanitize.py --device cuda
    grep -E "SUMMARY|BAD|gpu_sanitize:|not supported" "$OUTDIR/sanitize.log" | tail -4 | tee -a "$LOG"
    if grep -q "Device not supported" "$OUTDIR/sanitize.log"; then  # seen on gVisor machines: no tool works
      log "!! compute-sanitizer does not support this machine's device/runtime; the other tool is not tried"
      break
    fi
  done
fi

# 4. benchmarks
if [ "$DRY" = 1 ]; then
  BENCH=(--device cpu --tiny)
else
  BENCH=(--device cuda)
fi
rm -f "$OUTDIR/bench.json"
want bench && run_step bench 300 "$LOG" "$PY" benchmarks/bench_gpu.py --json "$OUTDIR/bench.json" "${BENCH[@]}"
finish
