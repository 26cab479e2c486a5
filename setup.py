"""Build of anllm_ext._C with torch's cpp_extension.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built as well whenever the installed
torch has CUDA and a CUDA toolkit is found, even on a machine without a GPU.

Environment switches:
  ANLLM_FORCE_CPU=1        build the CPU kernels only
  ANLLM_CUDA_ARCHS="8.0;9.0"  CUDA architectures (default 8.0;9.0; TORCH_CUDA_ARCH_LIST also works)
  ANLLM_CPU_FLAGS="..."    host compiler flags replacing the default (AVX2+FMA where the build CPU has them)
  MAX_JOBS=N               parallel compile jobs (honoured by torch's ninja build)
  ANLLM_EXPECT_CUDA=1      fail unless the CUDA kernels are built (CI sets it; ANLLM_FORCE_CPU=1 still wins)
Install with `pip install --no-build-isolation .` so the extension is built against the torch you run.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA toolkit root, or None. Prefers a real toolkit dir over wrapper scripts on PATH."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return cpp_extension.CUDA_HOME


def _nvidia_wheel_includes():
    """Headers that ship in torch's nvidia-* wheels (cusparse.h etc.), needed by ATen/cuda headers
    when the system toolkit holds the runtime only."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cpu_flags():
    if "ANLLM_CPU_FLAGS" in os.environ:
        return os.environ["ANLLM_CPU_FLAGS"].split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return []
    if " avx2" in info and " fma" in info and " f16c" in info:
        # Also select ATen's AVX2 Vectorized<> specialisations (vectorised exp etc.) in our kernels.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _build_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # OpenMP: ATen's parallel_for is a header template that only runs in parallel when the extension
    # itself is compiled with OpenMP; without it every kernel silently runs on one thread.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"] + openmp + _cpu_flags()
    version_macro = [("ANLLM_TORCH_VERSION", f'"{torch.__version__}"')]
    use_cuda = False
    if not _env_flag("ANLLM_FORCE_CPU") and torch.version.cuda is not None and cuda_sources:
        cuda_home = _find_cuda_home()
        if cuda_home is not None:
            use_cuda = True
            os.environ["CUDA_HOME"] = cuda_home
            cpp_extension.CUDA_HOME = cuda_home
            archs = os.environ.get("ANLLM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            print(f"anllm_ext: building CUDA kernels for {archs} with {cuda_home}")
        else:
            print("anllm_ext: torch has CUDA but no CUDA toolkit was found; building CPU kernels only")
    else:
        print("anllm_ext: building CPU kernels only")
    if not use_cuda and _env_flag("ANLLM_EXPECT_CUDA") and not _env_flag("ANLLM_FORCE_CPU"):
        # CI sets this: a lost toolkit or a CPU torch must not pass as a CPU-only build.
        raise RuntimeError(
            f"ANLLM_EXPECT_CUDA=1 but the CUDA kernels would not be built: torch {torch.__version__} has "
            f"CUDA {torch.version.cuda}, CUDA toolkit {_find_cuda_home()}, {len(cuda_sources)} csrc/cuda/*.cu files "
            "(install the CUDA build of torch and a toolkit, set CUDA_HOME, or unset ANLLM_EXPECT_CUDA)"
        )

    if not use_cuda:
        return cpp_extension.CppExtension(
            "anllm_ext._C", sources, define_macros=version_macro, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return cpp_extension.CUDAExtension(
        "anllm_ext._C",
        sources + cuda_sources,
        include_dirs=_nvidia_wheel_includes(),
        define_macros=[("ANLLM_WITH_CUDA", "1")] + version_macro,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp,
    )


setup(
    name="anllm_ext",
    version="0.1.0",
    description="Anchor-based LLM (AnLLM) attention and KV-cache compaction for PyTorch and transformers",
    packages=find_packages(include=["anllm_ext", "anllm_ext.*"]),
    ext_modules=[_build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "safetensors", "tqdm"],
    # The ops need torch only; the transformers integration (patch, AnchorCache, generate, the CLI) needs [hf].
    extras_require={"hf": ["transformers>=5.0"], "gguf": ["transformers>=5.0", "gguf", "accelerate"], "test": ["pytest"]},
    entry_points={"console_scripts": ["anllm=anllm_ext.cli:main"]},
)
