# moetrt developer commands. `make test` installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; GPU users: make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CHECKPOINT ?= models/tiny-r1
ENGINE ?= engines/tiny-r1
BACKEND ?= auto

.PHONY: install test test-slow typecheck gpu-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# tensorrt-stubs declares a dependency on tensorrt, whose wheels need NVIDIA's index: stubs only.
	$(PY) -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
	touch $@

install: $(STAMP)

test: $(STAMP)
	MOETRT_QUIET=1 $(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	MOETRT_QUIET=1 $(PY) -m pytest -q -m slow

# The Triton expert dispatch and its AOT PTX on a CUDA GPU: correctness, driver-API launches, timings (a few
# minutes; exits 1 with one line where there is no GPU). Retune block sizes: $(PY) -m moetrt.plugins.tune_moe
gpu-check: $(STAMP)
	$(PY) -m moetrt.plugins.gpu_check
