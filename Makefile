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

.PHONY: install test test-slow typecheck gpu-check bench serve

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# tensorrt-stubs declares a dependency on tensorrt, whose wheels need NVIDIA's index: stubs only.
	$(PY) -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
	touch $@

install: $(STAMP)

# NVIDIA's pure-Python tensorrt.plugin sources, extracted from the tensorrt-cu13-bindings wheels (nothing is
# installed), for the mypy check of the TensorRT code. Offline the fetch is skipped and that test says why.
TRT_PLUGIN_VERSIONS := 10.13.3.9 11.4.0.106
TRT_PLUGIN_STAMP := build/trt-plugin/.stamp-$(subst $() ,_,$(TRT_PLUGIN_VERSIONS))

$(TRT_PLUGIN_STAMP): tests/typecheck/trt_plugin_sources.py | $(STAMP)
	$(PY) -m tests.typecheck.trt_plugin_sources build/trt-plugin $(TRT_PLUGIN_VERSIONS) && touch $@ \
		|| echo "(could not fetch the tensorrt.plugin sources: the TensorRT type check will skip)"

test: $(STAMP) $(TRT_PLUGIN_STAMP)
	MOETRT_QUIET=1 $(PY) -m pytest -q -m "not slow and not gpu"

# mypy over the TensorRT code against tensorrt-stubs and each tensorrt.plugin version above (also part of `test`).
typecheck: $(STAMP) $(TRT_PLUGIN_STAMP)
	$(PY) -m pytest -q tests/typecheck

test-slow: $(STAMP)
	MOETRT_QUIET=1 $(PY) -m pytest -q -m slow

# The Triton expert dispatch and its AOT PTX on a CUDA GPU: correctness, driver-API launches, timings (a few
# minutes; exits 1 with one line where there is no GPU). Retune block sizes: $(PY) -m moetrt.plugins.tune_moe
gpu-check: $(STAMP)
	$(PY) -m moetrt.plugins.gpu_check

# moetrt against transformers and the copy-bandwidth roofline on tiny-r1 and ds-mini (~10 minutes, CPU).
bench: $(STAMP)
	$(PY) -m moetrt.bench.run

# The OpenAI-compatible server on 127.0.0.1:8000 for $(ENGINE) (build it first with moetrt build-engine).
serve: $(STAMP)
	$(PY) -m moetrt.cli serve $(ENGINE)
