"""One benchmark run of one system on one model, in its own process (so its peak memory is its own).

`python -m moetrt.bench.systems SYSTEM MODEL_DIR ENGINE_DIR JSON_ARGS` prints one JSON object: prefill
tokens/s, time to first token, decode tokens/s at each batch size (one value per repeat), peak RSS, and for
the reference the distinct experts a decode step touches per MoE layer.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def parent_bandwidth() -> float | None:
    """The copy bandwidth now, measured by the parent `make bench` process on request (its buffers do not count
    in this process's peak memory); None when run on its own."""
    if os.environ.get("MOETRT_BENCH_PAIRED") != "1":
        return None
    print("bandwidth?", flush=True)
    return float(sys.stdin.readline())


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prompts_for(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, length).tolist() for _ in range(batch)]


class Timer:
    """Token timestamps of one generation: first token (TTFT) and the decode rate after it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def token(self) -> None:
        self.stamps.append(time.perf_counter())

    def ttft(self) -> float:
        return self.stamps[0] - self.start

    def decode_rate(self, batch: int) -> float:
        """Tokens per second over the steps after the first (batch rows each produce one per step)."""
        return batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


# -- systems: each returns a function (prompts, new_tokens) -> Timer ------------------------------------

def moetrt_engine(model_dir: str, engine_dir: str, threads: int):
    from moetrt.runtime.engine import Engine

    engine = Engine.load(engine_dir, threads=threads)
    backend_run = engine.session.run

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return backend_run(*args, **kwargs)
        finally:
            run.backend_seconds += time.perf_counter() - start

    engine.session.run = timed_run

    def run(prompts, new_tokens):
        """Through the runtime's own generation loop (sampling, detokenisation and all), timed per step."""
        from moetrt.runtime.generate import GenerationOptions, generate_stream

        # greedy, and no stop ids: every run generates exactly new_tokens
        options = GenerationOptions(max_new_tokens=new_tokens, prefill_chunk=engine.max_seq)
        timer = Timer()
        run.backend_seconds = 0.0
        for event in generate_stream(engine.session, prompts, options, engine.tokenizer, engine.max_context):
            if event.row == 0:
                timer.token()
                if len(timer.stamps) == 1:
                    run.backend_seconds = 0.0  # count decode steps only, not the prefill
        timer.backend_seconds = run.backend_seconds
        return timer

    run.backend_seconds = 0.0
    return run


def moetrt_reference(model_dir: str, engine_dir: str, threads: int):
    import torch

    from moetrt.export.reference_session import load_reference_session
    from moetrt.runtime.generate import GenerationOptions, generate_stream

    torch.set_num_threads(threads)
    session = load_reference_session(model_dir)

    def run(prompts, new_tokens):
        """The torch reference as a session of the runtime's generation loop; greedy, no stop ids, and the
        prompt prefilled in one call."""
        options = GenerationOptions(max_new_tokens=new_tokens, prefill_chunk=max(len(p) for p in prompts))
        timer = Timer()
        for event in generate_stream(session, prompts, options):
            if event.row == 0:
                timer.token()
        return timer

    run.session = session
    return run


def transformers_eager(model_dir: str, engine_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None

    class Streamer:
        def __init__(self, timer):
            self.timer, self.prompt_seen = timer, False

        def put(self, value):
            if self.prompt_seen:
                self.timer.token()
            self.prompt_seen = True

        def end(self):
            pass

    @torch.inference_mode()
    def run(prompts, new_tokens):
        ids = torch.tensor(prompts)  # equal-length prompts: no padding needed
        timer = Timer()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       streamer=Streamer(timer), pad_token_id=0)
        return timer

    return run


SYSTEMS = {"moetrt-ort": moetrt_engine, "moetrt-torch": moetrt_reference, "transformers": transformers_eager}


def distinct_experts(session, prompts, new_tokens) -> float:
    """Mean distinct routed experts per MoE layer per decode step, for the batch (reference routing)."""
    import torch

    from moetrt.export.model import Router
    from moetrt.runtime.generate import GenerationOptions, generate

    seen = []

    def hook(module, args, output):
        if args[0].shape[0] == len(prompts):  # decode steps only: one token per row
            seen.append(len(torch.unique(output[0])))

    handles = [m.register_forward_hook(hook) for m in session.model.modules() if isinstance(m, Router)]
    try:
        generate(session, prompts, GenerationOptions(max_new_tokens=new_tokens))
    finally:
        for handle in handles:
            handle.remove()
    return float(np.mean(seen))


def main() -> None:
    system, model_dir, engine_dir, raw = sys.argv[1:5]
    args = json.loads(raw)
    run = SYSTEMS[system](model_dir, engine_dir, args["threads"])
    vocab = args["vocab"]
    result: dict = {"system": system, "prefill_tps": [], "ttft_s": [], "decode_tps": {}}
    run(prompts_for(vocab, 1, 16), 4)  # warm up
    for repeat in range(args["repeats"]):
        timer = run(prompts_for(vocab, 1, args["prefill_len"], seed=repeat), 2)
        result["ttft_s"].append(timer.ttft())
        result["prefill_tps"].append(args["prefill_len"] / timer.ttft())
    result["runtime_overhead"] = {}
    result["decode_bandwidth"] = {}
    for batch in args["batches"]:
        rates, overheads, bandwidths = [], [], []
        for repeat in range(args["repeats"]):
            before = parent_bandwidth()
            timer = run(prompts_for(vocab, batch, args["decode_prompt_len"], seed=100 + repeat), args["new_tokens"])
            after = parent_bandwidth()
            rates.append(timer.decode_rate(batch))
            if before is not None and after is not None:
                bandwidths.append((before + after) / 2)
            if hasattr(timer, "backend_seconds"):
                # share of a decode step spent outside the backend call: sampling, detokenising, cache, binding
                overheads.append(1 - timer.backend_seconds / (timer.stamps[-1] - timer.stamps[0]))
        result["decode_tps"][str(batch)] = rates
        if bandwidths:
            result["decode_bandwidth"][str(batch)] = bandwidths
        if overheads:
            result["runtime_overhead"][str(batch)] = overheads
    if system == "moetrt-torch":
        result["distinct_experts"] = {
            str(batch): distinct_experts(run.session, prompts_for(vocab, batch, args["decode_prompt_len"], 7), 16)
            for batch in args["batches"]
        }
    result["peak_rss_bytes"] = peak_rss()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
