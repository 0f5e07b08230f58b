"""One process of the expert-parallel benchmark (bench/expert_parallel.py): loads the engine, plain or under
`mpiexec -n N` with expert parallelism, and on rank 0 measures decode and prefill.

`python -m moetrt.bench.ep_driver ENGINE_DIR JSON_ARGS`. Rank 0 (or the plain process) prints one JSON line of
measurements last on stdout, with every rank's memory: peak RSS and the resident bytes of its experts.bin mapping,
which rank 0 reads from /proc/PID of each rank (the ranks swap their process ids over MPI before loading the
engine) once it has measured, while the other ranks still wait in their loop with their engine loaded. (Ranks
other than 0 never return from `Engine.load`, and by the time an exit handler of theirs runs, their session and
its experts.bin mapping are gone: the report must be taken while they run.)

JSON_ARGS: mode ("plain" or "ep"), combine ("allreduce"/"alltoallv"), threads (plain only; under expert
parallelism the group's default, this host's cores divided among its ranks), repeats, new_tokens,
decode_prompt_len, batches, prefill_len, prefill_repeats, vocab, isolated_repeats ({tokens: calls} of the
isolated combine timing, expert parallelism only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from moetrt.bench.systems import Timer, prompts_for

EXPERTS_FILE = "experts.bin"


def mapped_rss(smaps: str, name: str) -> int:
    """Bytes resident (the `Rss:` lines, kB) of the mappings in `smaps` (the text of /proc/PID/smaps) whose path
    ends with `name`."""
    total, inside = 0, False
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: "start-end perms offset ..."
            inside = len(fields) >= 6 and fields[-1].endswith(name)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def status_bytes(status: str, field: str) -> int:
    """A kB field of /proc/PID/status text (`VmHWM`, `VmRSS`) in bytes; 0 when absent."""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def held_expert_bytes(manifest, group, rank: int) -> int:
    """Bytes of routed-expert weights rank `rank` reads into private memory under expert parallelism (its experts
    of every MoE layer, runtime/ort/session.py `_read_local_experts`); 0 without a group (the plain engine maps
    experts.bin instead)."""
    if group is None:
        return 0
    total = 0
    for index, layer in enumerate(manifest.section.expert_layers):
        itemsize = 4 if layer.bits == 32 else 1
        per_expert = (layer.gate_up.count + layer.down.count) * itemsize // layer.num_experts
        total += int((group.owners[index] == rank).sum()) * per_expert
    return total


def rank_report(rank: int, pid: int, held_bytes: int = 0) -> dict:
    """Process `pid`'s memory now: peak RSS (VmHWM), RSS and its resident expert bytes: the resident part of its
    experts.bin mapping (the plain engine) plus `held_bytes` of experts read into private memory (a rank under
    expert parallelism, whose RSS includes them)."""
    status = Path(f"/proc/{pid}/status").read_text()
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    return {"rank": rank, "pid": pid, "peak_rss_bytes": status_bytes(status, "VmHWM"),
            "rss_bytes": status_bytes(status, "VmRSS"),
            "experts_resident_bytes": mapped_rss(smaps, EXPERTS_FILE) + held_bytes}


def stats_snapshot(group) -> dict:
    """The group's combine statistics since the last reset (calls, seconds, bytes, per_layer_seconds)."""
    if group is None:
        return {}
    stats = group.stats
    return {"calls": stats.calls, "seconds": stats.seconds, "bytes": stats.bytes,
            "per_layer_seconds": list(stats.per_layer_seconds)}


def timed_generation(engine, group, prompts: list[list[int]], new_tokens: int, decode_only: bool):
    """Greedy generation of `new_tokens` per prompt through the runtime's loop. Returns the Timer, every
    row's token ids and the combine statistics of the decode steps (`decode_only`: reset at the first token, after the
    prefill) or of the whole call."""
    from moetrt.runtime.generate import GenerationOptions, generate_stream

    options = GenerationOptions(max_new_tokens=new_tokens, prefill_chunk=engine.max_seq)
    tokens: list[list[int]] = [[] for _ in prompts]
    if group is not None:
        group.stats.reset()
    timer = Timer()
    for event in generate_stream(engine.session, prompts, options, engine.tokenizer, engine.max_context):
        tokens[event.row].extend(event.token_ids)
        if event.row == 0:
            timer.token()
            if decode_only and len(timer.stamps) == 1 and group is not None:
                group.stats.reset()
    return timer, tokens, stats_snapshot(group)


def isolated_combine(group, config, repeats: dict[int, int]) -> dict[str, dict[str, float]]:
    """The group's own combine (`group.combine`, its configured method) of a `[T, hidden]` float32 output, for
    random top-k routing over round-robin experts, with every rank entering each call together (a barrier first):
    the exchange and the sums, without the wait for a slower rank that the in-engine figures include. Per token
    count T (`repeats`: T -> calls), median and min ms on this rank's clock. Every rank must call it, before the
    engine loads (the engine's placement then replaces this one's)."""

    experts, top_k, hidden = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    group.place([experts])
    rng = np.random.default_rng(0)  # the same ids on every rank, as the router's are
    timings = {}
    for tokens, calls in repeats.items():
        seconds = []
        for _ in range(calls):
            ids = rng.random((tokens, experts)).argsort(axis=1)[:, :top_k].astype(np.int32)
            partial = np.ones((tokens, hidden), dtype=np.float32)
            group.wait(group.comm.Ibarrier(), "the benchmark's barrier")
            start = time.perf_counter()
            group.combine(0, partial, ids)
            seconds.append(time.perf_counter() - start)
        timings[str(tokens)] = {"median_ms": 1e3 * float(np.median(seconds)), "min_ms": 1e3 * min(seconds)}
    group.stats.reset()
    return timings


def measure(engine, group, args: dict) -> dict:
    """Decode at each batch (args["repeats"] runs of new_tokens after decode_prompt_len-token prompts) and the
    prefill of one prefill_len-token prompt (prefill_repeats runs); rates, seconds, combine statistics and the
    first repeat's greedy tokens."""
    vocab = args["vocab"]
    timed_generation(engine, group, prompts_for(vocab, 1, 16), 4, False)  # warm-up
    result: dict = {"decode": {}, "prefill": {"seconds": [], "combine": []}}
    for batch in args["batches"]:
        runs = {"tps": [], "step_seconds": [], "combine": [], "tokens": None}
        for repeat in range(args["repeats"]):
            prompts = prompts_for(vocab, batch, args["decode_prompt_len"], seed=100 + repeat)
            timer, tokens, combine = timed_generation(engine, group, prompts, args["new_tokens"], True)
            steps = len(timer.stamps) - 1
            runs["tps"].append(timer.decode_rate(batch))
            runs["step_seconds"].append((timer.stamps[-1] - timer.stamps[0]) / steps)
            runs["combine"].append({**combine, "steps": steps})
            if repeat == 0:
                runs["tokens"] = tokens
        result["decode"][str(batch)] = runs
    for repeat in range(args["prefill_repeats"]):
        prompt = prompts_for(vocab, 1, args["prefill_len"], seed=repeat)
        timer, tokens, combine = timed_generation(engine, group, prompt, 1, False)
        result["prefill"]["seconds"].append(timer.ttft())
        result["prefill"]["combine"].append(combine)
        if repeat == 0:
            result["prefill"]["tokens"] = tokens
    return result


def main(argv: list[str] | None = None) -> None:
    engine_dir, raw = (argv if argv is not None else sys.argv[1:])[:2]
    args = json.loads(raw)
    from moetrt.formats import read_manifest
    from moetrt.runtime.engine import Engine

    started = time.perf_counter()
    if args["mode"] == "plain":
        engine = Engine.load(engine_dir, threads=args["threads"])
        group, pids = None, [os.getpid()]
    else:
        from moetrt.runtime.parallel import ExpertParallelOptions
        from moetrt.runtime.parallel.job import join

        options = ExpertParallelOptions(combine=args["combine"])
        group = join(options)  # starts MPI; Engine.load joins the same group
        every = np.zeros(group.size, dtype=np.int64)  # raw buffers, not mpi4py's pickled lowercase calls
        group.MPI.COMM_WORLD.Allgather(np.array([os.getpid()], dtype=np.int64), every)
        pids = every.tolist()
        isolated = isolated_combine(group, read_manifest(engine_dir).model_config,
                                    {int(t): n for t, n in args["isolated_repeats"].items()})
        started = time.perf_counter()
        engine = Engine.load(engine_dir, expert_parallel=options)  # ranks other than 0 never return
    load_seconds = time.perf_counter() - started
    result = measure(engine, group, args)
    if group is not None:
        result["isolated_combine"] = isolated
    result.update(load_seconds=load_seconds, ranks=group.size if group else 1,
                  threads=group.default_threads if group else args["threads"],
                  moe_layers=len(group.owners) if group else None,
                  ranks_report=[rank_report(rank, pid, held_expert_bytes(engine.manifest, group, rank))
                                for rank, pid in enumerate(pids)])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
