#!/usr/bin/env bash
# One-command GPU check, run from the repository root on a machine with a CUDA GPU:
#   1. builds the extension in place with CUDA for the local GPU architecture only,
#   2. runs the CUDA cases of the test suite (every test parametrised with device="cuda", plus the
#      registration/smoke tests),
#   3. runs benchmarks/bench_gpu.py.
# Everything is written to $OUT/gpu_results.txt (or results/gpu_results.txt when OUT is unset).
# Budget: < 8 minutes on an H200 (build ~1-3 min on 16 cores, tests ~1-2 min, bench ~1 min).
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default nproc).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUTDIR=${OUT:-results}
mkdir -p "$OUTDIR"
RES="$OUTDIR/gpu_results.txt"
: > "$RES"
log() { echo "$@" | tee -a "$RES"; }

log "# gpu_check $(date -u +%FT%TZ) on $(hostname)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA GPU visible to torch; gpu_check needs one"
  exit 2
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$RES"
import torch
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {p.name} sm_{p.major}{p.minor} "
      f"{p.total_memory / 2**30:.0f} GiB")
EOF
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}')")
export ANLLM_CUDA_ARCHS="$ARCH"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

log "## build (arch $ARCH, CUDA_HOME=$CUDA_HOME, MAX_JOBS=$MAX_JOBS)"
t0=$(date +%s)
if ! timeout 300 "$PY" setup.py build_ext --inplace > "$OUTDIR/gpu_build.log" 2>&1; then
  log "BUILD FAILED (see gpu_build.log); last lines:"
  tail -30 "$OUTDIR/gpu_build.log" | tee -a "$RES"
  exit 1
fi
log "build ok in $(( $(date +%s) - t0 )) s"

log "## tests (CUDA cases)"
t0=$(date +%s)
ANLLM_EXPECT_CUDA=1 timeout 240 "$PY" -m pytest -q --maxfail=10 --no-header -p no:cacheprovider \
  python_tests -k "cuda" -rfEs 2>&1 | tail -60 | tee -a "$RES"
test_rc=${PIPESTATUS[0]}
log "tests exit code $test_rc in $(( $(date +%s) - t0 )) s"

log "## benchmark"
timeout 180 "$PY" benchmarks/bench_gpu.py --out "$RES.bench" 2>&1 | tail -80
bench_rc=${PIPESTATUS[0]}
[ -f "$RES.bench" ] && cat "$RES.bench" >> "$RES" && rm -f "$RES.bench"
log "benchmark exit code $bench_rc"
log "# done $(date -u +%FT%TZ)"
exit $(( test_rc != 0 || bench_rc != 0 ))
