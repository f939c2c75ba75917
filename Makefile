# fastrl — the two README commands (`make demo`, `make test`) and the rest.
# Every target installs what it needs into .venv first:
#   - CPU machine: a fresh venv, the local CPU wheel torch==$(TORCH_CPU_VERSION) (an unpinned torch
#     would pull gigabytes of CUDA wheels), then fastrl built against it (--no-build-isolation).
#   - GPU machine (a CUDA torch importable by $(PYTHON)): a venv that sees the system packages,
#     so that torch, triton and the test tools installed there are reused; nothing is downloaded.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
# Extra pip arguments for that torch install, e.g. an index that serves CPU-only wheels on a machine
# without a local CPU wheel (plain PyPI serves the CUDA build of torch on Linux).
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.fastrl-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
PYTEST_ARGS ?=
BENCH_DIR = $(shell $(PY) benchmarks/device.py)

.PHONY: install demo test bench bench-gpu gpu-test info clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@set -e; \
	if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "fastrl: reusing the CUDA torch of $(PYTHON)"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PY) -c "import setuptools, pybind11, pytest, triton" || { \
	    echo "fastrl: with a CUDA torch nothing is downloaded; install setuptools, pybind11, pytest and triton for $(PYTHON) first" >&2; exit 1; }; \
	  $(PIP) install --no-build-isolation --no-deps -e . ; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_CPU_VERSION)" $(TORCH_PIP_ARGS); \
	  $(PIP) install setuptools wheel pybind11 ninja; \
	  $(PIP) install --no-build-isolation -e ".[test]"; \
	fi
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/fastrl demo

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

info: $(STAMP)
	$(VENV)/bin/fastrl info

# CPU benchmarks at small shapes, one process per suite (benchmarks/bench_<op>.py), each writing
# benchmarks/results/<device>/bench_<op>.json; `python benchmarks/report.py FILE...` makes the tables.
BENCH_FILES := $(wildcard benchmarks/bench_*.py)
bench: $(STAMP)
	@mkdir -p $(BENCH_DIR)
	@set -e; for f in $(BENCH_FILES); do \
	  $(PY) -m pytest $$f --benchmark-only --benchmark-json=$(BENCH_DIR)/$$(basename $$f .py).json $(PYTEST_ARGS); \
	done

# The same suites at real shapes on a GPU.
bench-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs a CUDA device')"
	@mkdir -p $(BENCH_DIR)
	@set -e; for f in $(BENCH_FILES); do \
	  FASTRL_BENCH_SCALE=gpu $(PY) -m pytest $$f --benchmark-only \
	    --benchmark-json=$(BENCH_DIR)/$$(basename $$f .py).json $(PYTEST_ARGS); \
	done

gpu-test: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-test needs a CUDA device')"
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info fastrl/_C*.so $(VENV)
