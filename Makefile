# dsmath — two commands on a fresh machine:
#   make run    create .venv if missing, install (CPU recipe), run the default main job (tiny_cpu)
#   make test   same set-up, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsmath-installed
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers, a whole file per worker (module fixtures such as a test
# module's Ray cluster stay in one process), longest files first (tests/conftest.py); TEST_WORKERS=0 runs them
# in this process, one after another.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# Environment the CPU stack needs (dsmath/env.py holds the same values): offline hub, no Ray token auth, DeepSpeed on CPU,
# a small vLLM KV cache, the in-process vLLM engine, one OpenMP thread per process, one fp32 code path on every x86 CPU.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR := cpu
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export OMP_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export MKL_CBWR ?= AVX2,STRICT
export DNNL_MAX_CPU_ISA ?= AVX2
export ATEN_CPU_CAPABILITY ?= avx2

.PHONY: setup run test test-fast bench clean lock

# The versions of every package this recipe installs, as a fresh `make test` last passed on them: pip installs
# exactly these, so a release upstream cannot change what a fresh machine gets (grpcio-tools 1.85.4 failed a
# fresh clone on 2026-12-06); pip itself and the setuptools that builds dsmath and DeepSpeed's sdist are pinned
# too. `make lock` rewrites the file from .venv (upgrade there first, then run `make test` on a fresh clone);
# tests/test_packaging.py holds it within pyproject.toml's ranges.
CONSTRAINTS := constraints-cpu.txt

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e ".[cpu,dev,corpus]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dsmath train --overwrite   # the default job, from scratch each time (runs/tiny_cpu)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

lock: $(STAMP)
	@{ echo "# The CPU recipe's tested package versions (Makefile: CONSTRAINTS); written by make lock."; \
	   $(PY) -m pip freeze --all --exclude-editable | grep -v '^#'; } > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs build *.egg-info
