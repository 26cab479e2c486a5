#!/usr/bin/env bash
# Builds the C++ microbenchmarks (CMakeLists.txt) against the installed torch and runs them.
# Usage: benchmarks/run_cpp.sh [google-benchmark flags...]   e.g. --benchmark_min_time=0.2 --T=1024
# PYTHON selects the interpreter whose torch is used (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BUILD=${BUILD_DIR:-benchmarks/build}
read -r PREFIX SITE CPU_FLAGS < <("$PYTHON" - <<'PY'
import importlib.util, os, sys, torch
sys.argv = ["setup.py"]  # import setup.py's flag logic without running setup()
src = open("setup.py").read().split("\nsetup(")[0]
ns = {"__file__": os.path.abspath("setup.py")}
exec(compile(src, "setup.py", "exec"), ns)
site = os.path.dirname(os.path.dirname(torch.__file__))
print(torch.utils.cmake_prefix_path, site, "|".join(ns["_cpu_flags"]()) or "-")
PY
)
CPU_FLAGS=${CPU_FLAGS//|/ }; [ "$CPU_FLAGS" = "-" ] && CPU_FLAGS=""
mkdir -p "$BUILD"
CUDA_ARGS=()
if [ -d /usr/local/cuda ] && "$PYTHON" -c 'import torch,sys; sys.exit(torch.version.cuda is None)'; then
  # A CUDA build of torch makes its CMake config look for the toolkit (see ../shared/ENV.md).
  NVRTC=$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | head -1 || true)
  CUDA_ARGS=(-DCUDAToolkit_ROOT=/usr/local/cuda -DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # else it probes for a GPU (none here)
  [ -n "$NVRTC" ] && CUDA_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
fi
cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DANLLM_CPU_FLAGS="$CPU_FLAGS" "${CUDA_ARGS[@]}" >"$BUILD/cmake-configure.log" 2>&1 \
  || { cat "$BUILD/cmake-configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
"$BUILD/bench_ops" "$@"
