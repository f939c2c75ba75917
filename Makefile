# fastrl — the two README commands (`make demo`, `make test`) and the rest (`make test-fast`: the quick test loop).
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
# Benchmarks: pytest-benchmark settings (per benchmark: rounds that fit BENCH_MAX_TIME seconds, at least
# BENCH_MIN_ROUNDS), the regression threshold of `make bench-compare`, and the scale (cpu | gpu) that
# bench-baseline / bench-compare run at.
BENCH_MAX_TIME ?= 1.0
BENCH_MIN_ROUNDS ?= 5
BENCH_THRESHOLD ?= 10%
BENCH_SCALE ?= cpu
BENCH_ARGS ?=
# Peers' wheels for a GPU machine without a package registry (`make wheels`): Python 3.12, manylinux x86-64.
# WHEELS_PEERS are the light ones (about 3.5 MB); WHEELS_FLASHINFER adds FlashInfer and the one dependency of
# `import flashinfer.sampling` that the GPU image lacks (about 65 MB, JIT-compiles its kernels with nvcc on first
# use; `make wheels WHEELS_FLASHINFER=` leaves it out where the folder must stay small).
WHEELS_DIR ?= wheels
WHEELS_PYTHON ?= 3.12
# ninja: parallel compilation of the extension on the GPU machine (its image has none; 0.2 MB). xformers 0.0.35
# (3.1 MB, torch>=2.10; its own compiled part needs CUDA 12's runtime, so on a CUDA 13 torch its
# memory_efficient_attention runs through PyTorch's built-in kernels): the packed-batch `attention: xformers` path.
WHEELS_PEERS ?= trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ninja==1.13.2 \
  xformers==0.0.35
WHEELS_FLASHINFER ?= flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2
WHEELS_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64
# Triton of the GPU machines, for the ahead-of-time compile checks (a second venv that reuses .venv's torch).
TRITON_GPU_VERSION ?= 3.6.0
VENV_TRITON_GPU ?= .venv-triton$(subst .,,$(basename $(TRITON_GPU_VERSION)))

.PHONY: install demo test test-fast bench bench-gpu gpu-smoke bench-baseline bench-compare bench-report wheels wheels-install \
  gpu-test gpu-all gpu-resources gpu-compile-triton-gpu info clean

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

demo: $(VENV)/.fastrl-demo
	$(VENV)/bin/fastrl demo

# The demo draws its curves and canvases with matplotlib: installed on a CPU machine (best effort; without
# it the demo still writes its tables); on a GPU machine whatever is installed is used.
$(VENV)/.fastrl-demo: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then :; \
	else $(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib || \
	  echo "fastrl: could not install matplotlib: the demo writes its tables without the PNGs" >&2; fi
	@touch $@

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The quick loop: the suite without the tests marked slow (compiles, two-process runs, the trainer benchmark,
# the demo pipeline; listed in tests/conftest.py), under 3 minutes on 2 CPU cores. `make test` (CI) runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

info: $(STAMP)
	$(VENV)/bin/fastrl info

# Benchmarks (see the README's "Benchmarks" section): one process per suite
# (benchmarks/bench_<op>.py), each writing benchmarks/results/<device>/bench_<op>.json; then the Markdown
# tables (and, with matplotlib, PNG plots next to the JSON) from benchmarks/report.py. Peers (Liger-Kernel,
# TRL, FlashInfer) run when installed (`pip install -e .[peers]`; on a GPU machine from wheels/), else skip.
BENCH_FILES := $(wildcard benchmarks/bench_*.py)
BENCH_PYTEST = --benchmark-only --benchmark-max-time=$(BENCH_MAX_TIME) --benchmark-min-rounds=$(BENCH_MIN_ROUNDS) \
  $(BENCH_ARGS) $(PYTEST_ARGS)
# On a GPU the suites run in order of value (a visit may end before the last); FASTRL_BENCH_DEADLINE (Unix
# seconds, set by gpu-all) skips the benchmarks that would start after it, so each suite still writes its JSON.
BENCH_GPU_FILES := $(addprefix benchmarks/,bench_logprobs.py bench_grpo.py bench_dpo.py bench_sampling.py \
  bench_rollout.py bench_trainer.py)
BENCH_GPU_FILES += $(filter-out $(BENCH_GPU_FILES),$(BENCH_FILES))
# run each suite with extra pytest arguments $(1) (suite name as $$name) at scale $(2), the suites $(3) (default
# all, alphabetically); fail at the end if one failed
define run_suites
	@status=0; for f in $(or $(3),$(BENCH_FILES)); do name=$$(basename $$f .py); \
	  FASTRL_BENCH_SCALE=$(2) $(PY) -m pytest $$f $(BENCH_PYTEST) $(1) || status=1; \
	done; exit $$status
endef

bench: $(STAMP) $(VENV)/.fastrl-bench
	@mkdir -p $(BENCH_DIR)
	$(call run_suites,--benchmark-json=$(BENCH_DIR)/$$name.json,cpu)
	@$(MAKE) --no-print-directory bench-report

# The same suites at real shapes on a GPU (peers installed from wheels/ first when it exists).
bench-gpu: $(STAMP) wheels-install
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs a CUDA device')"
	@mkdir -p $(BENCH_DIR)
	$(call run_suites,--benchmark-json=$(BENCH_DIR)/$$name.json,gpu,$(BENCH_GPU_FILES))
	@$(MAKE) --no-print-directory bench-report

# Tables of this machine's results (README "Benchmarks"), plots next to the JSON when matplotlib is there.
bench-report: $(STAMP)
	@$(PY) benchmarks/report.py --output $(BENCH_DIR)/REPORT.md $(wildcard $(BENCH_DIR)/bench_*.json)

# Regression runs: save a baseline per suite into .benchmarks/<device>/<suite>/ (git-ignored), then compare
# a new run with it; bench-compare fails when a benchmark's median is more than BENCH_THRESHOLD slower.
BENCH_STORAGE = file://.benchmarks/$(notdir $(BENCH_DIR))/$$name
bench-baseline: $(STAMP) $(VENV)/.fastrl-bench
	$(call run_suites,--benchmark-storage=$(BENCH_STORAGE) --benchmark-save=baseline,$(BENCH_SCALE))

bench-compare: $(STAMP) $(VENV)/.fastrl-bench
	@for f in $(BENCH_FILES); do name=$$(basename $$f .py); \
	  ls .benchmarks/$(notdir $(BENCH_DIR))/$$name/*/*.json >/dev/null 2>&1 || { \
	    echo "no baseline for $$name on this machine: run \`make bench-baseline\` first" >&2; exit 1; }; done
	$(call run_suites,--benchmark-storage=$(BENCH_STORAGE) --benchmark-compare \
	  --benchmark-compare-fail=median:$(BENCH_THRESHOLD),$(BENCH_SCALE))

# What the benchmarks use beyond the tests on a CPU machine: matplotlib (plots) and nvidia-ml-py (.[bench]).
# On a GPU machine nothing is downloaded: whatever is installed is used, and plots are skipped without it.
$(VENV)/.fastrl-bench: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then :; \
	else $(PIP) install -q "pytest-benchmark>=4" matplotlib nvidia-ml-py || \
	  echo "fastrl: could not install matplotlib / nvidia-ml-py: the benchmarks run without plots" >&2; fi
	@touch $@

# Peers' wheels for a GPU machine that cannot reach a registry: downloaded here (pure-Python and manylinux
# x86-64 wheels for Python $(WHEELS_PYTHON), without their dependencies: the list names those the GPU image
# lacks), carried along, installed there by wheels-install (bench-gpu and gpu-all do that when wheels/ exists).
wheels:
	@mkdir -p $(WHEELS_DIR)
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(WHEELS_PYTHON) --implementation cp \
	  $(foreach p,$(WHEELS_PLATFORMS),--platform $(p)) --platform any -d $(WHEELS_DIR) \
	  $(WHEELS_PEERS) $(WHEELS_FLASHINFER)
	@du -sh $(WHEELS_DIR)

wheels-install: $(STAMP)
	@if ls $(WHEELS_DIR)/*.whl >/dev/null 2>&1; then \
	  echo "fastrl: installing the peers' wheels from $(WHEELS_DIR)/"; \
	  $(PIP) install -q --no-index --no-deps --find-links $(WHEELS_DIR) $(WHEELS_DIR)/*.whl; \
	else echo "fastrl: no $(WHEELS_DIR)/ (make wheels): peers that are not installed are skipped"; fi

gpu-test: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-test needs a CUDA device')"
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

# The first command of a GPU visit (about 4 minutes, GPU_SMOKE_BUDGET_S): build, then every op once at a real
# shape against its torch reference and the headline ratios, each result written to
# benchmarks/results/<gpu>/smoke/ (and $$OUT/smoke/) as it finishes. `make gpu-smoke SMOKE_ARGS="--only sampler"`.
# On a CPU machine `benchmarks/gpu_smoke.py --scale cpu` runs the same checks at tiny shapes (the tests do).
GPU_SMOKE_BUDGET_S ?= 240
SMOKE_ARGS ?=
gpu-smoke:
	@GPU_SMOKE_BUDGET_S=$(GPU_SMOKE_BUDGET_S) bash benchmarks/gpu_smoke.sh "$(MAKE)" "$(PY)" $(SMOKE_ARGS)

# One command for a GPU machine's short visit (about 10 minutes on an H100): build, peers from wheels/, the GPU
# tests, the benchmarks at real shapes, report and plots; JSON, REPORT.md, PNGs and gpu-all.log go into
# benchmarks/results/<gpu>/. Steps that fail are reported at the end; the later steps still run.
gpu-all:
	@bash benchmarks/gpu_all.sh "$(MAKE)" "$(PY)"

# Ahead-of-time compile checks of every Triton kernel (tests/test_gpu_compile.py, part of `make test`):
# refresh the registers recorded in tests/gpu_resources.json, for Triton of .venv and, when its venv exists,
# for the GPU machines' Triton ($(TRITON_GPU_VERSION), `make gpu-compile-triton-gpu` creates it; the test file
# runs itself with it). The record is written even where a check fails (spills, shared memory).
gpu-resources: $(STAMP)
	FASTRL_UPDATE_GPU_RESOURCES=1 $(PY) -m pytest tests/test_gpu_compile.py -q $(PYTEST_ARGS)

# The same checks compiled with Triton $(TRITON_GPU_VERSION), in a venv that adds only that Triton (and
# numpy < 2.4, which its interpreter needs) to .venv's packages.
gpu-compile-triton-gpu: $(VENV_TRITON_GPU)/.stamp
	$(VENV_TRITON_GPU)/bin/python -m pytest tests/test_gpu_compile.py -q -p no:cacheprovider $(PYTEST_ARGS)

$(VENV_TRITON_GPU)/.stamp: $(STAMP)
	@set -e; [ -x $(VENV_TRITON_GPU)/bin/python ] || $(PY) -m venv $(VENV_TRITON_GPU); \
	main=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	own=$$($(VENV_TRITON_GPU)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$(realpath $$main)')" > $$own/zz-fastrl-main-venv.pth; \
	$(VENV_TRITON_GPU)/bin/python -m pip install -q "triton==$(TRITON_GPU_VERSION)" "numpy<2.4"
	@touch $@

clean:
	rm -rf build *.egg-info fastrl/_C*.so $(VENV) $(VENV_TRITON_GPU)
