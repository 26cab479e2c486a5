#!/usr/bin/env bash
# Builds the extension's CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer in a separate copy
# of the source tree, then runs the op fuzz driver (tools/fuzz_ops.py) against that build.
#
#   tools/build_sanitized.sh [fuzz_ops.py arguments...]     e.g. --calls 10000 --seconds 600
#
# The copy lives in $SAN_DIR (default build/sanitized/tree) so the regular in-tree `anllm_ext/_C*.so` is
# never touched. Python itself is not instrumented, so libasan is loaded first with LD_PRELOAD. Leak
# detection is off (the interpreter keeps objects alive until exit by design). Sanitizer reports go to
# $SAN_DIR/../reports/{asan,ubsan}.<pid>; the script fails if there is any, or if the fuzz run fails.
# Only the CPU kernels are built (ANLLM_FORCE_CPU=1): the CUDA code is not reachable on this machine.
#
# SAN_EMU=1: the CUDA kernels instead, under the CUDA emulator (docs/gpu.md): csrc/emu/build.py builds the
# emulator extension with the same sanitizer flags into $SAN_DIR/../cuda_emu (the emulator then switches
# fibers with makecontext/swapcontext, which ASan knows about), and the fuzz driver runs with --emu
# against it; the installed anllm_ext provides the op wrappers and the oracle.
#
#   SAN_EMU=1 tools/build_sanitized.sh --calls 2000
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || echo python3)}
SAN_DIR=${SAN_DIR:-$ROOT/build/sanitized/tree}
REPORTS=${SAN_REPORTS:-$(dirname "$SAN_DIR")/reports}
CXX_BIN=${CXX:-g++}

mkdir -p "$SAN_DIR" "$REPORTS"
# vptr checks are off: they need the RTTI of the dynamic types to match across libtorch and this library,
# which -fvisibility=hidden does not guarantee.
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g"
FUZZ_EXTRA=()
if [ -n "${SAN_EMU:-}" ]; then
  EMU_DIR=$(dirname "$SAN_DIR")/cuda_emu
  SO=$EMU_DIR/anllm_ext_cuda_emu.so
  if [ -z "${SAN_SKIP_BUILD:-}" ]; then
    ANLLM_EMU_BUILD_DIR=$EMU_DIR ANLLM_EMU_CFLAGS="$SAN_FLAGS" CXX=$CXX_BIN "$PYTHON" csrc/emu/build.py \
      >"$(dirname "$SAN_DIR")/build_emu.log" 2>&1 || { tail -50 "$(dirname "$SAN_DIR")/build_emu.log"; exit 1; }
  fi
  FUZZ_EXTRA=(--emu "$SO")
  RUN_DIR=$ROOT
  IMPORT_ARGS=()
else
if [ -z "${SAN_SKIP_BUILD:-}" ]; then  # SAN_SKIP_BUILD=1: reuse the build (e.g. a second fuzz process)
# (tar keeps modification times, so an unchanged source is not recompiled on the next run)
tar -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=./results -cf - . | tar -C "$SAN_DIR" -xf -

(
  cd "$SAN_DIR"
  CC=${CC:-gcc} CXX=$CXX_BIN ANLLM_FORCE_CPU=1 MAX_JOBS=${MAX_JOBS:-2} \
    CFLAGS="$SAN_FLAGS" CXXFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined" \
    "$PYTHON" setup.py -q build_ext --inplace >"$(dirname "$SAN_DIR")/build.log" 2>&1 \
    || { tail -50 "$(dirname "$SAN_DIR")/build.log"; exit 1; }
)
fi
SO=$(ls "$SAN_DIR"/anllm_ext/_C*.so)
RUN_DIR=$SAN_DIR
IMPORT_ARGS=(--import-from "$SAN_DIR")
fi
# (nm's whole output first: `nm | grep -q` fails under pipefail when grep exits before nm is done)
if ! grep -q __asan_report <<<"$(nm -D "$SO")"; then
  echo "error: $SO is not instrumented (no __asan_report symbols); see $(dirname "$SAN_DIR")/build.log" >&2
  exit 1
fi
echo "sanitized build: $SO"

LIBASAN=$("$CXX_BIN" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX_BIN" -print-file-name=libubsan.so)
rm -f "$REPORTS"/asan.* "$REPORTS"/ubsan.*
set +e
(
  cd "$RUN_DIR"
  LD_PRELOAD="$LIBASAN $LIBUBSAN" \
    ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan:allocator_may_return_null=1:handle_segv=1" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$REPORTS/ubsan" \
    ANLLM_SANITIZED=1 "$PYTHON" "$ROOT/tools/fuzz_ops.py" "${IMPORT_ARGS[@]}" "${FUZZ_EXTRA[@]}" "$@"
)
status=$?
set -e
n_reports=$(ls "$REPORTS" | grep -cE '^(asan|ubsan)\.' || true)
echo "sanitizer reports: $n_reports (in $REPORTS)"
for f in "$REPORTS"/asan.* "$REPORTS"/ubsan.*; do [ -e "$f" ] && head -40 "$f"; done
[ "$status" -eq 0 ] && [ "$n_reports" -eq 0 ]
