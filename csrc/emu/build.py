"""Builds the test-only CUDA emulator extension (csrc/emu/emu_module.cpp: the kernels of csrc/cuda/ as host
C++ under csrc/emu/cuda_emu.h) into build/cuda_emu/anllm_ext_cuda_emu.so, with torch's JIT extension
builder (ninja; MAX_JOBS honoured). Never part of the wheel. Prints the library's path.

  python csrc/emu/build.py                 # build/cuda_emu
  ANLLM_EMU_BUILD_DIR=... ANLLM_EMU_CFLAGS="-fsanitize=address,undefined" python csrc/emu/build.py
"""
import os
import sys

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    build = os.environ.get("ANLLM_EMU_BUILD_DIR", os.path.join(ROOT, "build", "cuda_emu"))
    os.makedirs(build, exist_ok=True)
    extra = os.environ.get("ANLLM_EMU_CFLAGS", "").split()
    cflags = ["-O2", "-std=c++20", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wno-unknown-pragmas",
              "-Wno-attributes"] + extra
    ldflags = [f for f in extra if f.startswith("-fsanitize")]
    # Build only: the tests load the library themselves (a sanitized one needs libasan preloaded, which
    # this process has not).
    cpp_extension.torch.ops.load_library = lambda path: None
    cpp_extension.load(
        name="anllm_ext_cuda_emu",
        sources=[os.path.join(ROOT, "csrc", "emu", "emu_module.cpp")],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        build_directory=build,
        is_python_module=False,
        verbose=os.environ.get("ANLLM_EMU_VERBOSE") == "1",
    )
    lib = os.path.join(build, "anllm_ext_cuda_emu.so")
    assert os.path.exists(lib), lib
    print(lib)


if __name__ == "__main__":
    sys.exit(main())
