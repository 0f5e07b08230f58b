# moetrt developer commands. `make test` installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; GPU users: make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
# pip's arguments, one per word of TORCH, each quoted for the shell (so `torch>=2.9` stays a requirement).
TORCH_ARGS = $(foreach word,$(TORCH),'$(word)')
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CHECKPOINT ?= models/tiny-r1
ENGINE ?= engines/tiny-r1
BACKEND ?= auto

.PHONY: install test test-slow typecheck gpu-check gpu-check-quick bench bench-serve moonlight bench-moonlight serve train-tiny build-engine \
	demo llamacpp bench-quantized bench-ep bench-spec

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_ARGS)
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

# Every test marked `gpu` (pytest -m gpu): the Triton routed experts and their AOT PTX against the torch reference,
# launched as TensorRT launches them, and the TensorRT session's CUDA layer (a few minutes; exits 1 with one line
# where there is no GPU). Timings against the H200 roofline: $(PY) -m moetrt.bench.gpu_experts (writes
# bench/results/gpu_experts.md); retune block sizes: $(PY) -m moetrt.bench.tune_moe
gpu-check: $(STAMP)
	@$(PY) -m tests.gpu_check
	MOETRT_QUIET=1 $(PY) -m pytest -q -m gpu

# What fits one lent GPU in 8 minutes, from a bare machine with torch, Triton and cuda-python (no TensorRT, no
# network, nothing installed): a trimmed set of the `gpu` tests (the stage kernels as TensorRT runs them, on
# autotuner-like garbage, capture-failure recovery), then the engine's own stage kernels timed at T = 1, 64, 4096 at
# DeepSeek-V3 shapes. Report in $(QUICK_REPORT); exits 1 with one line where there is no GPU. No venv needed:
# QUICK_PY is the venv's Python where there is one, else python3.
QUICK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
QUICK_REPORT ?= bench/results/gpu_check_quick.md
gpu-check-quick:
	@$(QUICK_PY) -m tests.gpu_check_quick --out $(QUICK_REPORT)

# moetrt against transformers and the copy-bandwidth roofline on tiny-r1 and ds-mini (~4 minutes on 2 cores;
# the first run also writes the random 3.3 GB ds-mini checkpoint).
bench: $(STAMP)
	$(PY) -m moetrt.bench.run

# llama.cpp beside moetrt (optional, never in CI): downloads the llama-cpp-python sdist (which vendors llama.cpp;
# version pinned in bench/llamacpp.py) and builds llama-bench, llama-batched-bench, llama-quantize and llama-completion
# (Release, CPU only, native ISA; 10-15 minutes on 2 cores at nice 10) under $$MOETRT_CACHE_DIR/llama.cpp (default
# ~/.cache/moetrt/llama.cpp), never in the repository.
llamacpp: $(STAMP)
	$(PY) -m moetrt.bench.llamacpp build

# moetrt's fp32/int8/int4 engines beside llama.cpp's f32/Q8_0/Q4_0 on ds-mini in one run of alternating rounds
# (2 threads each; llama.cpp's rows after `make llamacpp`, and only once its greedy continuation equals
# transformers'); writes bench/results/quantized.md. Options in QUANT_BENCH_ARGS, e.g. "--extra-gguf q4_k_m".
bench-quantized: $(STAMP)
	$(PY) -m moetrt.bench.quantized $(QUANT_BENCH_ARGS)

# Expert parallelism on ds-mini: the plain engine beside `mpiexec.gforker -n N` (N = 1, 2, 4; Allreduce and Alltoallv
# combines) in one run: decode tok/s at batch 1 and 8, a 512-token prefill, the combine time per step and per MoE
# layer, per-rank peak RSS and resident experts, greedy equality with the plain engine (about 5 minutes on 2 cores;
# needs the mpi extra; the first run builds the fp32 engine into bench/engines). Writes
# bench/results/expert_parallel.md. Options in EP_BENCH_ARGS, e.g. "--quantize int4" or "--ranks 1,2".
bench-ep: $(STAMP)
	$(PY) -m moetrt.bench.expert_parallel $(EP_BENCH_ARGS)

# Speculative decoding with the MTP module (moetrt bench speculative): plain engines beside --mtp engines drafting,
# tiny-r1 (held-out arithmetic) and ds-mini (random, with an MTP layer: the first run writes a 3.6 GB checkpoint and
# builds four engines into bench/engines) at batch 1 and 8 in alternating rounds: decode tok/s, acceptance rate,
# tokens per step, ds-mini's break-even acceptance; writes bench/results/speculative.md. Options in SPEC_BENCH_ARGS.
bench-spec: $(STAMP)
	$(PY) -m moetrt.cli bench speculative $(SPEC_BENCH_ARGS)

# Bigger than memory: a Moonlight-16B-A3B-shaped checkpoint (DeepSeek-V3 architecture, 15.96B parameters, random
# weights in DeepSeek's FP8 layout with 128x128 block scales, a byte-level tokenizer): 16.6 GB written shard by shard
# into $(MOONLIGHT_DIR) in about a minute (never in CI). bench-moonlight builds it into an int4 engine with the
# streaming build (about 10 minutes, peak RSS printed by /usr/bin/time) and measures decode tok/s at batch 1 and 8,
# the time to first token of 512 tokens and the batch-1 roofline fraction.
MOONLIGHT_DIR ?= bench/checkpoints/moonlight
MOONLIGHT_ENGINE ?= bench/engines/moonlight-int4
moonlight: $(STAMP)
	$(PY) -m moetrt.bench.moonlight $(MOONLIGHT_DIR)

$(MOONLIGHT_ENGINE)/manifest.json: $(STAMP)
	$(MAKE) moonlight
	/usr/bin/time -v $(PY) -m moetrt.cli build-engine $(MOONLIGHT_DIR) -o $(MOONLIGHT_ENGINE) --quantize int4

bench-moonlight: $(MOONLIGHT_ENGINE)/manifest.json
	$(PY) -m moetrt.bench.moonlight --bench $(MOONLIGHT_ENGINE)

# The serving benchmark (moetrt bench serve; not part of `make test`): tiny-r1 behind `moetrt serve` at 8 and 32
# streams in flight, 1 in 8 prompts long, chunked prefill against whole-prompt prefill in alternating rounds;
# writes bench/results/serve.md. Its engine decodes 32 requests together. Options go in SERVE_BENCH_ARGS.
SERVE_BENCH_ENGINE ?= engines/tiny-r1-b32
$(SERVE_BENCH_ENGINE)/manifest.json: $(STAMP) $(wildcard $(CHECKPOINT)/*)
	$(PY) -m moetrt.cli build-engine $(CHECKPOINT) -o $(SERVE_BENCH_ENGINE) --backend $(BACKEND) --max-batch 32

bench-serve: $(SERVE_BENCH_ENGINE)/manifest.json
	$(PY) -m moetrt.cli bench serve $(SERVE_BENCH_ENGINE) --max-concurrency 8 32 --num-prompts 64 \
		--compare 'whole-prompt prefill=--max-prefill-tokens 0' 'chunked prefill=' $(SERVE_BENCH_ARGS)

# An engine for $(CHECKPOINT) in $(ENGINE); BACKEND=auto picks TensorRT where it and a GPU are present, else
# ONNX Runtime. `make build-engine` always rebuilds; the demo rebuilds only when the checkpoint changed.
build-engine: $(STAMP)
	$(PY) -m moetrt.cli build-engine $(CHECKPOINT) -o $(ENGINE) --backend $(BACKEND)

$(ENGINE)/manifest.json: $(STAMP) $(wildcard $(CHECKPOINT)/*)
	$(PY) -m moetrt.cli build-engine $(CHECKPOINT) -o $(ENGINE) --backend $(BACKEND)

# The embedded tiny R1-style model answers an arithmetic question through its engine: thinking, then answer.
DEMO_PROMPT ?= What is 4827 + 593?
demo: $(ENGINE)/manifest.json
	$(PY) -m moetrt.cli generate $(ENGINE) "$(DEMO_PROMPT)" --greedy

# The OpenAI-compatible server on 127.0.0.1:8000 for $(ENGINE) (built first when missing).
serve: $(ENGINE)/manifest.json
	$(PY) -m moetrt.cli serve $(ENGINE)

# Retrain the embedded model from its seed (about 20 minutes on 2 CPU cores); the checkpoint is replaced only
# once complete. Options go in TRAIN_ARGS, e.g. TRAIN_ARGS="--out /tmp/tiny-r1 --seed 1".
train-tiny: $(STAMP)
	$(PY) models/train_tiny_r1.py --out $(CHECKPOINT) $(TRAIN_ARGS)
