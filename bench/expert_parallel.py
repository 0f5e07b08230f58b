"""`make bench-ep`: ds-mini under expert parallelism (`mpiexec.gforker -n N`, N = 1, 2, 4) beside the plain
single-process engine, in one run.

Each setup is a job of its own (bench/ep_driver.py on every rank; rank 0 measures): the plain engine (no MPI),
then N = 1, 2, 4 ranks, each with both combines of the routed experts' partial outputs (`allreduce`,
`alltoallv`; N = 1 only the default, which has nothing to combine). Measured: decode tokens/s at batch 1 and 8
(greedy, a fixed number of new tokens after short prompts), the time of one 512-token prefill, and for N >= 2
the combine time from the session's group statistics (reset after the prefill of each decode run): per decode
step, per MoE layer combine and as a share of the step, beside the same combine timed in isolation (all ranks
entering each call together, so without the wait for a slower rank); every rank's peak RSS and the resident
bytes of its experts.bin mapping; and whether rank 0's greedy tokens equal the plain engine's (a report, not a
test).

All ranks share this machine's cores (each rank gets cores / ranks threads), so the tokens/s of N >= 2 here say
little about a real multi-host job; the per-layer combine time is the figure that carries over. Writes
bench/results/expert_parallel.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moetrt.errors import MoetrtError

ROOT = Path(__file__).resolve().parent
LAUNCHER = "mpiexec.gforker"  # forks every rank on this host; opens no sockets (docs/expert-parallel.md)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One job: `ranks` processes under expert parallelism combining with `combine`, or the plain engine
    (ranks 1, combine None)."""

    ranks: int
    combine: str | None

    @property
    def label(self) -> str:
        return "plain" if self.combine is None else f"EP n={self.ranks} {self.combine}"


def setups(ranks: list[int], combines: list[str]) -> list[Setup]:
    """The plain engine first, then each N in `ranks` with each combine (N = 1 with the first only: one rank has
    nothing to combine)."""
    chosen = [Setup(1, None)]
    for n in ranks:
        chosen += [Setup(n, c) for c in (combines[:1] if n == 1 else combines)]
    return chosen


# -- summaries (pure) ----------------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def decode_combine(runs: dict) -> dict[str, float]:
    """Per decode run (`runs["combine"]`: calls, seconds, bytes, steps; `runs["step_seconds"]`) the combine time
    per step (ms), per MoE layer combine (ms), its share of the step, and the bytes rank 0 sent per step; medians
    over the runs. {} without combine statistics (plain engine)."""
    rows = [(c, s) for c, s in zip(runs["combine"], runs["step_seconds"]) if c.get("calls")]
    if not rows:
        return {}
    return {"step_ms": median([1e3 * c["seconds"] / c["steps"] for c, _ in rows]),
            "layer_ms": median([1e3 * c["seconds"] / c["calls"] for c, _ in rows]),
            "share": median([c["seconds"] / (c["steps"] * s) for c, s in rows]),
            "bytes_per_step": median([c["bytes"] / c["steps"] for c, _ in rows])}


def prefill_combine(prefill: dict) -> dict[str, float]:
    """decode_combine for the prefill runs: the whole prompt in one call, so "per step" is per prefill."""
    rows = [(c, s) for c, s in zip(prefill["combine"], prefill["seconds"]) if c.get("calls")]
    if not rows:
        return {}
    return {"step_ms": median([1e3 * c["seconds"] for c, _ in rows]),
            "layer_ms": median([1e3 * c["seconds"] / c["calls"] for c, _ in rows]),
            "share": median([c["seconds"] / s for c, s in rows]),
            "bytes_per_step": median([c["bytes"] for c, _ in rows])}


def greedy_match(reference: list[list[int]] | None, tokens: list[list[int]] | None) -> str:
    """"equal", or where `tokens` first leave `reference` ("row 3 token 12"); "—" when either is missing."""
    if reference is None or tokens is None:
        return "—"
    for row, (want, got) in enumerate(zip(reference, tokens)):
        for index, (a, b) in enumerate(zip(want, got)):
            if a != b:
                return f"row {row} token {index}"
        if len(want) != len(got):
            return f"row {row} length {len(got)} vs {len(want)}"
    return "equal" if len(reference) == len(tokens) else f"{len(tokens)} rows vs {len(reference)}"


def greedy_summary(reference: dict, result: dict) -> str:
    """rank 0's greedy tokens against the plain engine's: batch 1, batch 8 and the prefill's token, as
    "b1 equal, b8 equal, prefill equal"."""
    parts = []
    for key in sorted(result["decode"], key=int):
        parts.append(f"b{key} " + greedy_match(reference["decode"].get(key, {}).get("tokens"),
                                               result["decode"][key].get("tokens")))
    parts.append("prefill " + greedy_match(reference["prefill"].get("tokens"), result["prefill"].get("tokens")))
    return ", ".join(parts)


def combine_verdicts(results: dict[str, dict]) -> list[str]:
    """For each N measured with both combines and each workload: which combine spent less per MoE layer, and
    by what factor. `results` maps setup labels to job results (with "setup": {"ranks", "combine"})."""
    lines = []
    by_ranks: dict[int, dict[str, dict]] = {}
    for data in results.values():
        setup = data["setup"]
        if setup["combine"] is not None and setup["ranks"] > 1:
            by_ranks.setdefault(setup["ranks"], {})[setup["combine"]] = data
    for ranks, combines in sorted(by_ranks.items()):
        if len(combines) < 2:
            continue
        parts = []
        for workload in workloads(next(iter(combines.values()))):
            times = {name: summarise(data)[workload].get("layer_ms", float("nan")) for name, data in combines.items()}
            best = min(times, key=times.get)
            worst = max(times, key=times.get)
            parts.append(f"{workload}: {best} ({times[best]:.3f} vs {times[worst]:.3f} ms per layer, "
                         f"{times[worst] / times[best]:.2f}x)")
        lines.append(f"n={ranks}: " + "; ".join(parts))
    return lines


def workloads(data: dict) -> list[str]:
    return [f"decode b{key}" for key in sorted(data["decode"], key=int)] + [f"prefill {data['prefill_len']}"]


def workload_tokens(workload: str) -> str:
    """The rows one MoE layer combines in `workload`: "decode b8" -> "8", "prefill 512" -> "512"."""
    return workload.split()[-1].lstrip("b")


def merge_rounds(first: dict, later: dict) -> dict:
    """One job's results over two rounds: the per-run lists joined (decode rates, step times, combine stats,
    prefill times; the isolated combine's medians and mins as lists), memory and greedy tokens from `first`."""
    merged = json.loads(json.dumps(first))
    for batch, runs in later["decode"].items():
        for key in ("tps", "step_seconds", "combine"):
            merged["decode"][batch][key] += runs[key]
    for key in ("seconds", "combine"):
        merged["prefill"][key] += later["prefill"][key]
    merged["load_seconds"] = min(first["load_seconds"], later["load_seconds"])
    for tokens, got in later.get("isolated_combine", {}).items():
        mine = merged["isolated_combine"][tokens]
        for key in ("median_ms", "min_ms"):
            mine[key] = (mine[key] if isinstance(mine[key], list) else [mine[key]]) + [got[key]]
    return merged


def isolated_cell(data: dict, workload: str) -> str:
    """The isolated combine's "median (min) ms" per call for `workload`'s row count; "—" when not measured."""
    got = data.get("isolated_combine", {}).get(workload_tokens(workload))
    if not got:
        return "—"
    medians = got["median_ms"] if isinstance(got["median_ms"], list) else [got["median_ms"]]
    mins = got["min_ms"] if isinstance(got["min_ms"], list) else [got["min_ms"]]
    return f"{median(medians):.3f} ({min(mins):.3f})"


def summarise(data: dict) -> dict[str, dict[str, float]]:
    """Combine summaries of one job per workload ("decode b1", "decode b8", "prefill 512")."""
    out = {f"decode b{key}": decode_combine(runs) for key, runs in data["decode"].items()}
    out[f"prefill {data['prefill_len']}"] = prefill_combine(data["prefill"])
    return out


def cell(values: list[float], digits: int = 1) -> str:
    """"median (min–max)"; "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def render(report: dict) -> str:
    """The markdown report: throughput and greedy equality, combine time, per-rank memory.

    `report`: {"header": [lines], "results": {label: job result + "setup", "prefill_len", "ranks_report":
    [per-rank dicts], "experts_bytes"}, "notes": [lines]}."""
    results = report["results"]
    reference = results.get("plain")
    batches = sorted(next(iter(results.values()))["decode"], key=int) if results else []
    lines = [*report.get("header", []), ""]
    lines += ["| setup | ranks × threads | " + " | ".join(f"decode tok/s b{b}" for b in batches)
              + " | prefill s (tok/s) | load s | greedy vs plain |",
              "|---|---|" + "---|" * len(batches) + "---|---|---|"]
    for label, data in results.items():
        seconds = data["prefill"]["seconds"]
        prefill = f"{cell(seconds, 2)} ({data['prefill_len'] / median(seconds):.0f})" if seconds else "—"
        greedy = "reference" if label == "plain" else greedy_summary(reference, data) if reference else "—"
        lines.append(f"| {label} | {data['ranks']} × {data['threads']} | "
                     + " | ".join(cell(data["decode"][b]["tps"]) for b in batches)
                     + f" | {prefill} | {data['load_seconds']:.1f} | {greedy} |")
    lines += ["", "Combine of the routed experts' outputs, rank 0's view: in the engine (group stats, medians over "
              "runs; the time includes waiting for the slowest rank), and isolated (the same combine called with all "
              "ranks entering together after a barrier, random top-k routing; median and min over calls).", "",
              "| setup | workload | per step ms | per MoE layer ms | share of step | rank 0 sent per step | "
              "isolated, per layer ms: median (min) |",
              "|---|---|---|---|---|---|---|"]
    for label, data in results.items():
        if data["setup"]["combine"] is None or data["ranks"] < 2:
            continue
        for workload, got in summarise(data).items():
            if got:
                lines.append(f"| {label} | {workload} | {got['step_ms']:.2f} | {got['layer_ms']:.3f} | "
                             f"{got['share']:.0%} | {got['bytes_per_step'] / 1e3:.1f} kB | "
                             f"{isolated_cell(data, workload)} |")
    verdicts = combine_verdicts(results)
    if verdicts:
        lines += ["", "Less time per MoE layer combine:", "", *[f"- {v}" for v in verdicts]]
    lines += ["", "Memory per rank after the measurements, read by rank 0 from each running rank's /proc/PID: peak RSS "
              "(VmHWM) and its resident experts (the plain engine: the resident part of its experts.bin mapping; a "
              "rank under expert parallelism: the experts it read into private memory).", "",
              "| setup | rank | peak RSS MB | experts resident MB | share of experts.bin |",
              "|---|---|---|---|---|"]
    for label, data in results.items():
        total = data.get("experts_bytes") or 0
        for rank in data.get("ranks_report", []):
            share = f"{rank['experts_resident_bytes'] / total:.1%}" if total else "—"
            lines.append(f"| {label} | {rank['rank']} | {rank['peak_rss_bytes'] / 1e6:.0f} | "
                         f"{rank['experts_resident_bytes'] / 1e6:.0f} | {share} |")
    if report.get("notes"):
        lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


# -- running -------------------------------------------------------------------------------------------------------

def launcher() -> str:
    """The path of mpiexec.gforker (next to this Python first, then PATH); MoetrtError naming the extra."""
    found = shutil.which(LAUNCHER, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if found is None:
        raise MoetrtError(f"{LAUNCHER} not found next to {sys.executable} or on PATH: pip install 'moetrt[mpi]'")
    return found


def job_env() -> dict[str, str]:
    """The ranks' environment: quiet, and PATH with this Python's bin first (gforker execs programs by name)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "MOETRT_QUIET": "1", "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def run_job(setup: Setup, engine: Path, args: dict, timeout: float) -> dict:
    """One setup as its own job; returns rank 0's result ("ranks_report": every rank's memory, by rank).
    MoetrtError with the job's last output when it fails or outlives `timeout` seconds (the whole job is
    killed)."""
    job_args = {**args, "mode": "plain" if setup.combine is None else "ep", "combine": setup.combine}
    driver = [sys.executable, "-m", "moetrt.bench.ep_driver", str(engine), json.dumps(job_args)]
    command = driver if setup.combine is None else [launcher(), "-n", str(setup.ranks), *driver]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=job_env(), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise MoetrtError(f"{setup.label} ran past {timeout:.0f}s:\n{output[-2000:]}") from None
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise MoetrtError(f"{setup.label} failed (exit status {process.returncode}):\n{output[-2000:]}")
    result = json.loads(lines[-1])
    result["setup"] = dataclasses.asdict(setup)
    return result


def ep_engine(checkpoint: Path, quantize: str, engines: Path, rebuild: bool) -> Path:
    """The segmented (`moe_kernel: moetrt`) engine expert parallelism runs, built as `make bench-quantized` builds
    its engines; MoetrtError when this machine builds another kind."""
    from moetrt.bench.quantized import PAIRS, moetrt_engine
    from moetrt.formats import read_manifest

    pair = next(p for p in PAIRS if p.quantize == quantize)
    engine, why = moetrt_engine(checkpoint, pair, engines, rebuild)
    if engine is None:
        raise MoetrtError(why)
    section = read_manifest(engine).section
    if not getattr(section, "segmented", False):
        raise MoetrtError(f"{engine} runs its experts in {section.moe_kernel}: expert parallelism needs moetrt's "
                          "kernel (a C compiler on this machine, `--moe-kernel moetrt`)")
    return engine


def run(options) -> dict:
    from moetrt.bench.bandwidth import CopyProbe
    from moetrt.bench.run import model_dirs
    from moetrt.config import load_config
    from moetrt.formats import read_manifest

    checkpoint = model_dirs([options.model])[options.model].resolve()
    engine = ep_engine(checkpoint, options.quantize, Path(options.engines), options.rebuild)
    manifest = read_manifest(engine)
    experts_bytes = manifest.path(manifest.section.experts_file).stat().st_size
    args = {"threads": options.threads, "repeats": options.repeats, "new_tokens": options.new_tokens,
            "decode_prompt_len": options.decode_prompt, "batches": [1, options.batch],
            "prefill_len": options.prefill, "prefill_repeats": options.prefill_repeats,
            "vocab": load_config(checkpoint).vocab_size,
            "isolated_repeats": {1: options.isolated_repeats, options.batch: options.isolated_repeats,
                                 options.prefill: max(5, options.isolated_repeats // 5)}}
    probe = CopyProbe(options.threads)
    bandwidth = [probe.sample()]
    del probe  # its 1 GiB of buffers would sit beside the jobs
    load, results = [os.getloadavg()[0]], {}
    started = time.perf_counter()
    chosen = setups([int(n) for n in options.ranks.split(",")], options.combines.split(","))
    for round_index in range(options.rounds):
        for setup in chosen if round_index % 2 == 0 else reversed(chosen):
            print(f"round {round_index + 1}/{options.rounds}: {setup.label}...", file=sys.stderr)
            result = run_job(setup, engine, args, options.job_timeout)
            result.update(prefill_len=options.prefill, experts_bytes=experts_bytes)
            results[setup.label] = merge_rounds(results[setup.label], result) if setup.label in results else result
            load.append(os.getloadavg()[0])
    results = {setup.label: results[setup.label] for setup in chosen}
    wall = time.perf_counter() - started
    probe = CopyProbe(options.threads)
    bandwidth.append(probe.sample())
    header = [
        f"{options.model} ({options.quantize if options.quantize != 'none' else 'fp32'}, experts.bin "
        f"{experts_bytes / 1e6:.0f} MB), {engine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} cores shared by every rank (and by other work: 1-min load average "
        f"{min(load):.1f}–{max(load):.1f}); copy bandwidth {bandwidth[0] / 1e9:.1f} GB/s before, "
        f"{bandwidth[1] / 1e9:.1f} after; {wall:.0f} s for the jobs.",
        f"Each setup is one job ({LAUNCHER} -n N; the plain engine without MPI, {options.threads} threads), "
        f"{options.rounds} round(s), the order reversed in odd rounds; greedy tokens and memory from the first. "
        f"Decode: {options.repeats} runs per round of {options.new_tokens} greedy tokens after "
        f"{options.decode_prompt}-token prompts per batch; prefill: {options.prefill_repeats} runs of one "
        f"{options.prefill}-token prompt (one call). "
        "Cells: median (min–max) over runs.",
    ]
    notes = ["Ranks share the cores (threads per rank = cores / ranks): tokens/s at N >= 2 on this machine "
             "measure time-slicing, not expert parallelism; the combine time per MoE layer is what carries over."]
    return {"header": header, "results": results, "notes": notes, "bandwidth": bandwidth, "load": load,
            "wall_seconds": wall, "options": vars(options)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ds-mini")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "int4"))
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--combines", default="allreduce,alltoallv")
    parser.add_argument("--rounds", type=int, default=1, help="every setup once per round; odd rounds reversed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--isolated-repeats", type=int, default=100,
                        help="calls of the isolated combine at batch 1 and 8 (a fifth of them for the prefill)")
    parser.add_argument("--threads", type=int, default=2, help="the plain engine's threads")
    parser.add_argument("--job-timeout", type=float, default=600.0, help="seconds per job before it is killed")
    parser.add_argument("--engines", default=str(ROOT / "engines"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the engine")
    parser.add_argument("--out", default=str(ROOT / "results"))
    options = parser.parse_args(argv)
    try:
        report = run(options)
    except MoetrtError as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "expert_parallel" if options.quantize == "none" else f"expert_parallel_{options.quantize}"
    text = render(report)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
