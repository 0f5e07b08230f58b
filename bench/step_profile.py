"""Where an ONNX Runtime engine's decode step goes, by operator: `python -m moetrt.bench.step_profile ENGINE`.

Loads ENGINE with onnxruntime's profiler on (`MOETRT_ORT_PROFILE`, runtime/ort/session.py), decodes `--tokens`
tokens greedily for `--batch` rows of `--prompt-len`-token prompts twice (the first run warms the arenas), and over
the second run's decode steps prints, per step: the sessions' run time, each operator type's kernel time and
node count, then the slowest nodes. A kernel engine joined into one graph lists its routed experts as the
`Experts` operator (moetrt's onnxruntime op); one run segment by segment (`MOETRT_SEGMENTED=1`) shows only the
segments, since the kernel then runs outside onnxruntime, between them.

The profiler adds its own cost to every node (a few microseconds), so small operators look larger than they are:
read shares and node counts here, and decode rates from `make bench` or `python -m moetrt.bench.ab`. bench/NOTES.md
quotes its tables.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path


@dataclasses.dataclass
class StepProfile:
    """Per decode step (means over `steps`): `run_ms`, the sessions' `model_run` time summed over sessions;
    `wall_ms`, the step as timed outside (profiler on); `ops`, operator type -> (kernel ms, nodes run);
    `nodes`, node name -> kernel ms."""

    steps: int
    run_ms: float
    wall_ms: float
    ops: dict[str, tuple[float, float]]
    nodes: dict[str, float]


def decode_runs(trace: list[dict], steps: int) -> list[dict]:
    """The last `steps` `model_run` events of one session's trace (onnxruntime's profile JSON), by start time: a
    plain decode step runs each session once, so these are the last `steps` steps'. Fewer when the session ran
    fewer times (an --mtp engine's module segments do not run on plain steps)."""
    runs = sorted((event for event in trace if event.get("name") == "model_run"), key=lambda event: event["ts"])
    return runs[-steps:] if len(runs) >= steps else []


def summarise(traces: list[list[dict]], steps: int, wall_s: float) -> StepProfile:
    """Fold the sessions' traces into per-step figures over their last `steps` runs (`decode_runs`)."""
    ops_us: collections.Counter = collections.Counter()
    ops_count: collections.Counter = collections.Counter()
    nodes_us: collections.Counter = collections.Counter()
    run_us = 0.0
    for trace in traces:
        runs = decode_runs(trace, steps)
        if not runs:
            continue
        run_us += sum(run["dur"] for run in runs)
        windows = [(run["ts"], run["ts"] + run["dur"]) for run in runs]
        for event in trace:
            name = event.get("name", "")
            if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
                continue
            if any(start <= event["ts"] <= end for start, end in windows):
                op = event.get("args", {}).get("op_name", "?")
                ops_us[op] += event["dur"]
                ops_count[op] += 1
                nodes_us[name[: -len("_kernel_time")]] += event["dur"]
    per = 1e3 * steps
    return StepProfile(steps, run_us / per, wall_s * 1e3 / steps,
                       {op: (us / per, ops_count[op] / steps) for op, us in ops_us.most_common()},
                       {node: us / per for node, us in nodes_us.most_common()})


def profile_engine(engine_dir: Path, batch: int = 1, tokens: int = 32, prompt_len: int = 16,
                   threads: int | None = 2) -> StepProfile:
    """Load `engine_dir` profiled, decode twice (see the module docstring) and summarise the second run's
    `tokens` - 1 decode steps. Raises MoetrtError for an engine that is not ONNX Runtime's."""
    from moetrt.errors import MoetrtError
    from moetrt.runtime.engine import Engine
    from moetrt.runtime.generate import GenerationOptions, generate_stream
    from moetrt.runtime.ort.session import PROFILE_ENV

    if tokens < 2:
        raise MoetrtError(f"--tokens must be at least 2 (the first token comes from the prefill), got {tokens}")
    with tempfile.TemporaryDirectory(prefix="moetrt-profile-") as directory:
        before = os.environ.get(PROFILE_ENV)
        os.environ[PROFILE_ENV] = directory
        try:
            engine = Engine.load(engine_dir, threads=threads)
        finally:
            if before is None:
                del os.environ[PROFILE_ENV]
            else:
                os.environ[PROFILE_ENV] = before
        if not hasattr(engine.session, "end_profiling"):
            raise MoetrtError(f"{engine_dir} is not an ONNX Runtime engine: step_profile reads onnxruntime's profiler")
        vocab = engine.config.vocab_size
        prompts = [[(7 + 13 * row + 5 * i) % vocab for i in range(prompt_len)] for row in range(batch)]
        options = GenerationOptions(max_new_tokens=tokens, prefill_chunk=engine.max_seq)
        wall = 0.0
        for _ in range(2):
            first = None
            for _event in generate_stream(engine.session, prompts, options, engine.tokenizer, engine.max_context):
                if first is None:
                    first = time.perf_counter()  # the prefill's token: decode steps start here
            wall = time.perf_counter() - first
        files = engine.session.end_profiling()
        traces = [json.loads(Path(file).read_text()) for file in files]
    return summarise(traces, tokens - 1, wall)


def report(profile: StepProfile, top: int = 15) -> str:
    """The table `main` prints."""
    lines = [f"{profile.steps} decode steps; per step: {profile.wall_ms:.3f} ms timed outside (profiler on), "
             f"{profile.run_ms:.3f} ms in session runs, "
             f"{sum(ms for ms, _ in profile.ops.values()):.3f} ms in node kernels", "",
             "| operator | ms per step | share of kernel time | nodes per step |", "|---|---|---|---|"]
    total = sum(ms for ms, _ in profile.ops.values()) or 1.0
    for op, (ms, count) in profile.ops.items():
        lines.append(f"| {op} | {ms:.3f} | {100 * ms / total:.1f}% | {count:g} |")
    lines += ["", f"Slowest {top} nodes (ms per step):"]
    lines += [f"  {node}: {ms:.3f}" for node, ms in list(profile.nodes.items())[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from moetrt.errors import MoetrtError

    parser = argparse.ArgumentParser(prog="python -m moetrt.bench.step_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row (decode steps: one fewer)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    options = parser.parse_args(argv)
    if options.threads < 1:
        parser.error(f"--threads must be at least 1, got {options.threads}")
    if options.top < 0:
        parser.error(f"--top must be 0 or more, got {options.top}")
    try:
        profile = profile_engine(options.engine, options.batch, options.tokens, options.prompt_len, options.threads)
    except MoetrtError as error:
        raise SystemExit(f"error: {error}") from None
    print(report(profile, options.top))


if __name__ == "__main__":
    main()
