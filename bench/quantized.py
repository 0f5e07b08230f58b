"""`make bench-quantized`: moetrt's fp32, int8 and int4 engines beside llama.cpp's f32, Q8_0 and Q4_0 on ds-mini.

One run, alternating rounds: each round measures every system once, moetrt and llama.cpp of the same type next
to each other, and the next round runs the whole order reversed (A B, then B A), so slow drifts of memory
bandwidth fall on both sides of each ratio. Both sides use 2 threads with their weights in memory (llama.cpp
`-lm none`; moetrt's engines load theirs, and both run a warm-up first). Measured per system and round: decode
tokens/s at batch 1 (64 tokens), at batch 8 (16-token prompts, then 64 tokens each), prefill tokens/s of a
64-token prompt, and the size of its weights (engine directory, GGUF file); before and after each round, the copy
and read bandwidth (bench/bandwidth.py), over whose larger sample each system's batch-1 rate is put as a share of
the roofline. moetrt's numbers come from the same
process `make bench` runs (moetrt.bench.systems); llama.cpp's from llama-bench and llama-batched-bench.

Before any timing, llama.cpp's greedy continuation on the f32 GGUF must equal transformers' on the checkpoint.
Without a llama.cpp build (`make llamacpp`) only the moetrt rows are measured. Writes
bench/results/quantized.md (the table, per-round ratios moetrt/llama.cpp per type, size ratios) and
bench/results/quantized.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moetrt.bench import llamacpp
from moetrt.errors import MoetrtError

ROOT = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Pair:
    """One weight type on both sides: moetrt's `quantize` and llama.cpp's GGUF type."""

    label: str
    quantize: str
    gguf: str


PAIRS = (Pair("fp32", "none", "f32"), Pair("int8", "int8", "q8_0"), Pair("int4", "int4", "q4_0"))
GGUF_NAMES = {"f32": "f32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
METRICS = ("decode_b1", "decode_b8", "prefill")
# issue 19's targets, moetrt over llama.cpp at the same type (ratios, one run)
TARGETS = {"fp32": {"decode_b1": 1.0}, "int8": {"decode_b1": 1.0, "decode_b8": 1.5, "prefill": 1.0},
           "int4": {"decode_b1": 1.0, "decode_b8": 1.5, "prefill": 1.0}}
SIZE_TARGET = 1.05
ROOFLINE_TARGET = 0.70  # issue 19: int8 and int4 at batch 1, of the memory-bandwidth roofline in quantized bytes
# llama.cpp's bits per weight (ggml's block formats: Q8_0 is 32 int8 values and a float16 scale, Q4_0 32 nibbles and
# a float16 scale); its weight bytes a token are moetrt's float32 count scaled by bits / 32
GGUF_BITS = {"f32": 32.0, "q8_0": 8.5, "q4_0": 4.5}


def system_name(side: str, key: str) -> str:
    """The table's name of one system: side "moetrt" with a pair label, or "llama.cpp" with a GGUF type."""
    return f"moetrt {key}" if side == "moetrt" else f"llama.cpp {GGUF_NAMES.get(key, key)}"


def round_order(systems: list[tuple[str, str]], round_index: int) -> list[tuple[str, str]]:
    """The order of one round: `systems` as given (each moetrt type beside its llama.cpp type) in even rounds,
    reversed in odd ones, so each pair runs A B, then B A."""
    return list(systems) if round_index % 2 == 0 else list(reversed(systems))


def cell(values: list[float], digits: int = 0) -> str:
    """"median (min–max)" of per-round values; "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def per_round_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """moetrt / llama.cpp for each round in which both were measured (lists aligned by round)."""
    return [a / b for a, b in zip(ours, theirs) if b > 0]


def ratio_cell(ratios: list[float], target: float | None = None) -> str:
    """"0.83× (0.80, 0.86, 0.83)": the median ratio, then each round's, and PASS/MISS against `target`."""
    if not ratios:
        return "—"
    median = statistics.median(ratios)
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    verdict = "" if target is None else (f" ≥{target:g}× PASS" if median >= target else f" ≥{target:g}× MISS")
    return f"{median:.2f}× ({rounds}){verdict}"


def roofline_fractions(rates: list[float], token_bytes: int, bandwidths: list[float]) -> list[float]:
    """Per round, the share of the roofline a decode rate reaches: rate (tokens/s) x `token_bytes` (weight bytes a
    token) over that round's bandwidth (bytes/s); lists aligned by round."""
    return [rate * token_bytes / bandwidth for rate, bandwidth in zip(rates, bandwidths) if bandwidth > 0]


def roofline_lines(results: dict) -> list[str]:
    """The report's roofline table: each system's batch-1 decode as a share of the copy and of the read roofline
    (bench/bandwidth.py, sampled before and after every round), median over rounds (min–max), with issue 19's 70%
    for moetrt's int8 and int4, and a note when a round's share passes 100% (its samples missed the bandwidth the
    round had). Empty without bandwidth samples or byte counts."""
    bandwidth = results.get("bandwidth") or {}
    if not bandwidth.get("copy"):
        return []
    lines = ["", f"Batch-1 decode against the memory-bandwidth roofline: tok/s x weight bytes a token over the "
             f"round's bandwidth, the larger of the samples before and after it (copy "
             f"{cell([b / 1e9 for b in bandwidth['copy']], 1)} GB/s, "
             f"read {cell([b / 1e9 for b in bandwidth.get('read', [])], 1)} GB/s; bench/bandwidth.py). Bytes a "
             "token: `moetrt info`'s for moetrt; for llama.cpp the float32 count at its bits per weight.", "",
             "| system | weight bytes a token | of copy roofline | of read roofline |", "|---|---|---|---|"]
    over = False
    for name in sorted(results["systems"], key=lambda n: not n.startswith("llama.cpp")):
        data = results["systems"][name]
        if not data.get("token_bytes") or not data.get("decode_b1"):
            continue
        target = ROOFLINE_TARGET if name in (system_name("moetrt", "int8"), system_name("moetrt", "int4")) else None
        cells = []
        for kind in ("copy", "read"):
            shares = roofline_fractions(data["decode_b1"], data["token_bytes"], bandwidth.get(kind, []))
            over = over or any(share > 1 for share in shares)
            if not shares:
                cells.append("—")
                continue
            text = (f"{statistics.median(shares):.0%} ({min(shares):.0%}–{max(shares):.0%})" if len(shares) > 1
                    else f"{shares[0]:.0%}")
            if target is not None:
                text += f" ≥{target:.0%} {'PASS' if statistics.median(shares) >= target else 'MISS'}"
            cells.append(text)
        lines.append(f"| {name} | {data['token_bytes'] / 1e6:.0f} MB | {cells[0]} | {cells[1]} |")
    if over:
        lines += ["", "A share above 100% is a round whose bandwidth samples fell below what the round itself had "
                  "(this VM's bandwidth swings within seconds): read the medians."]
    return lines


def render(results: dict) -> str:
    """The markdown report from `results` ({"systems": {name: {metric: [per-round values], "bytes": int,
    "note": str}}, "pairs": [...], "header": [lines], "notes": [lines]})."""
    systems = results["systems"]
    lines = [*results.get("header", []), "",
             "| system | decode tok/s batch 1 | batch 8 | prefill tok/s (64) | weights |", "|---|---|---|---|---|"]
    # llama.cpp's rows first, then moetrt's, each side in the order measured
    for name in sorted(systems, key=lambda n: not n.startswith("llama.cpp")):
        data = systems[name]
        size = f"{data['bytes'] / 1e6:.0f} MB" if data.get("bytes") else "—"
        lines.append(f"| {name} | {cell(data.get('decode_b1', []))} | {cell(data.get('decode_b8', []))} | "
                     f"{cell(data.get('prefill', []))} | {size} |")
    lines += ["", "Per round, moetrt / llama.cpp at the same type (median, then each round's ratio; targets from "
              "issue 19):", "", "| moetrt / llama.cpp | decode batch 1 | batch 8 | prefill | weights |",
              "|---|---|---|---|---|"]
    for pair in results["pairs"]:
        ours = systems.get(system_name("moetrt", pair["label"]), {})
        theirs = systems.get(system_name("llama.cpp", pair["gguf"]), {})
        if not ours.get("decode_b1") or not theirs.get("decode_b1"):
            continue
        cells = [ratio_cell(per_round_ratios(ours[m], theirs[m]), TARGETS.get(pair["label"], {}).get(m))
                 for m in METRICS]
        size = "—"
        if ours.get("bytes") and theirs.get("bytes"):
            ratio = ours["bytes"] / theirs["bytes"]
            size = f"{ratio:.2f}× {'PASS' if ratio <= SIZE_TARGET else 'MISS'} (≤{SIZE_TARGET}×)"
        lines.append(f"| {pair['label']} / {GGUF_NAMES[pair['gguf']]} | " + " | ".join(cells) + f" | {size} |")
    lines += roofline_lines(results)
    if results.get("notes"):
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def busy_warning(load: float, threads: int, cores: int) -> str:
    """A warning for the report when the 1-minute load average (the benchmark's own `threads` included) shows
    other work on this machine's `cores`: llama.cpp's threads spin at barriers, so a shared core costs it far more
    than it costs moetrt, and the ratios mean little. Empty when the machine was quiet."""
    if load <= threads + 0.75 or load < cores * 0.5:
        return ""
    return (f"**Not quiet-machine figures**: the load average reached {load:.1f} on {cores} cores while "
            f"{threads} benchmark threads ran; rerun on an idle machine before quoting a ratio.")


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """CPU seconds since boot that every core spent busy or stolen by the hypervisor (`busy`, from /proc/stat), the
    CPU seconds of this process and the children it has waited for (`ours`, os.times), and perf_counter (`wall`)."""

    busy: float
    ours: float
    wall: float


def cpu_sample() -> CpuSample | None:
    """Now, or None without /proc/stat (not Linux)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal (proc(5)); guest time is counted in user already
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    times = os.times()
    return CpuSample(busy / os.sysconf("SC_CLK_TCK"), times.user + times.system + times.children_user
                     + times.children_system, time.perf_counter())


def other_cpu_share(before: CpuSample, after: CpuSample, cores: int) -> float:
    """The share of the machine's CPU time between two samples that went to other processes or, as steal, to
    other guests of the hypervisor: busy time not this process's or its waited-for children's, over wall time x
    `cores` (0 to 1)."""
    wall = (after.wall - before.wall) * cores
    other = (after.busy - before.busy) - (after.ours - before.ours)
    return min(1.0, max(0.0, other) / wall) if wall > 0 else 0.0


def contention_warning(shares: list[float]) -> str:
    """A warning for the report when other work took more than a tenth of the CPUs during a round (`shares`, per
    round, other_cpu_share): the 1-minute load average lags a round of a few seconds. Empty otherwise."""
    worst = max(shares, default=0.0)
    if worst <= 0.10:
        return ""
    return (f"**Not quiet-machine figures**: other processes or the hypervisor (steal) took {worst:.0%} of the CPUs "
            f"during round {shares.index(worst) + 1} (/proc/stat); rerun on an idle machine before quoting a ratio.")


# -- measuring ---------------------------------------------------------------------------------------------------

def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def moetrt_engine(checkpoint: Path, pair: Pair, engines: Path, rebuild: bool) -> tuple[Path | None, str]:
    """The engine for `pair` (built with `build_engine(..., backend="ort", quantize=...)` when missing or older
    than the checkpoint); (None, why) when this moetrt cannot build it or built it unquantized."""
    from moetrt.bench.run import build
    from moetrt.formats import read_manifest

    engine = engines / f"{checkpoint.name}-{pair.label}"
    wanted = {"none": 32, "int8": 8, "int4": 4}[pair.quantize]

    def bits() -> int:
        try:
            return getattr(getattr(read_manifest(engine), "quantization", None), "bits", 32)
        except MoetrtError:
            return 0

    manifest = engine / "manifest.json"
    stale = not manifest.is_file() or manifest.stat().st_mtime < (checkpoint / "config.json").stat().st_mtime
    if rebuild or stale or bits() != wanted:
        print(f"[{pair.label}] building the moetrt engine...", file=sys.stderr)
        try:
            build(checkpoint, engine, pair.quantize)
        except subprocess.CalledProcessError as error:
            last = (error.stderr or "").strip().splitlines()[-1:] or ["no message"]
            return None, f"build_engine(quantize={pair.quantize!r}) failed: {last[0]}"
    if bits() != wanted:
        got = bits()
        shutil.rmtree(engine, ignore_errors=True)  # not the engine asked for: do not keep gigabytes of it
        return None, f"build_engine(quantize={pair.quantize!r}) built a {got}-bit engine: not supported yet"
    return engine, ""


def measure_moetrt(checkpoint: Path, engine: Path, options) -> dict[str, float]:
    """One round of one engine, through moetrt.bench.systems (make bench's own measurement): medians over
    `options.repeats` of prefill and decode tokens/s."""
    from moetrt.bench.run import run_system
    from moetrt.config import load_config

    args = {"repeats": options.repeats, "new_tokens": options.new_tokens, "prefill_len": options.prefill,
            "decode_prompt_len": options.decode_prompt, "batches": [1, options.batch],
            "threads": options.threads, "vocab": load_config(checkpoint).vocab_size}
    got = run_system("moetrt-ort", checkpoint, engine, args)
    return {"decode_b1": statistics.median(got["decode_tps"]["1"]),
            "decode_b8": statistics.median(got["decode_tps"][str(options.batch)]),
            "prefill": statistics.median(got["prefill_tps"])}


def measure_llamacpp(llama: llamacpp.LlamaCpp, gguf: Path, options) -> dict[str, float]:
    """One round of one GGUF: llama-bench (prefill, decode batch 1; medians over repetitions) and
    llama-batched-bench (decode at options.batch)."""
    bench = llamacpp.run_llama_bench(llama, gguf, options.threads, options.prefill, options.new_tokens,
                                     options.repeats)
    batched = llamacpp.run_batched_bench(llama, gguf, options.batch, options.threads, options.decode_prompt,
                                         options.new_tokens)
    return {"decode_b1": statistics.median(bench[f"tg{options.new_tokens}"]),
            "decode_b8": batched["speed_tg"],
            "prefill": statistics.median(bench[f"pp{options.prefill}"])}


def run(options) -> dict:
    """Everything but writing the report: engines, GGUFs, the greedy check, then the alternating rounds."""
    from moetrt.bench.run import model_dirs

    checkpoint = model_dirs([options.model])[options.model].resolve()
    pairs = [p for p in PAIRS if p.label in options.types.split(",")]
    notes: list[str] = []
    systems: dict[str, dict] = {}
    runners: list[tuple[str, str]] = []  # (side, key), each moetrt type beside its llama.cpp type
    targets: dict[tuple[str, str], Path] = {}

    llama = llamacpp.LlamaCpp(Path(options.llamacpp_dir or llamacpp.default_dir()))
    have_llama = not options.without_llamacpp and (llama.build_dir / "bin" / "llama-bench").is_file()
    if not have_llama and not options.without_llamacpp:
        notes.append(f"llama.cpp is not built under {llama.root}: moetrt rows only (`make llamacpp` builds it)")
    extra = [t for t in options.extra_gguf.split(",") if t] if have_llama else []
    ggufs: dict[str, Path] = {}
    greedy = None
    if have_llama:
        gguf_types = tuple(dict.fromkeys([p.gguf for p in pairs] + extra))
        print("converting the checkpoint to GGUF...", file=sys.stderr)
        ggufs = llamacpp.convert(checkpoint, llama, gguf_types)
        if not options.skip_greedy_check:
            print("greedy check: llama.cpp f32 against transformers...", file=sys.stderr)
            greedy = llamacpp.greedy_check(checkpoint, llama, llamacpp.convert(checkpoint, llama, ("f32",))["f32"])
            print(f"greedy check: {llamacpp.describe_greedy(greedy)}", file=sys.stderr)
            if not (greedy["match"] or greedy["near_tie"]):
                raise MoetrtError(f"llama.cpp's greedy continuation differs from transformers' "
                                  f"({llamacpp.describe_greedy(greedy)}): the GGUF is not the same model, so "
                                  "nothing is timed")

    from moetrt.config import load_config
    from moetrt.export.info import decode_weight_bytes
    from moetrt.formats import read_manifest

    float32_token_bytes = sum(decode_weight_bytes(load_config(checkpoint), "float32", None).values())
    engines = Path(options.engines)
    for pair in pairs:
        engine, why = moetrt_engine(checkpoint, pair, engines, options.rebuild)
        name = system_name("moetrt", pair.label)
        systems[name] = {"bytes": directory_bytes(engine) if engine else 0, "note": why}
        if engine:
            manifest = read_manifest(engine)
            systems[name]["token_bytes"] = sum(decode_weight_bytes(manifest.model_config, manifest.dtype,
                                                                   manifest.quantization).values())
            notes.append(f"{name}: routed experts in {manifest.section.moe_kernel}")
            runners.append(("moetrt", pair.label))
            targets[("moetrt", pair.label)] = engine
        if have_llama:
            gname = system_name("llama.cpp", pair.gguf)
            systems[gname] = {"bytes": ggufs[pair.gguf].stat().st_size,
                              "token_bytes": round(float32_token_bytes * GGUF_BITS[pair.gguf] / 32)}
            runners.append(("llama.cpp", pair.gguf))
            targets[("llama.cpp", pair.gguf)] = ggufs[pair.gguf]
    for gguf_type in extra:
        if ("llama.cpp", gguf_type) not in targets:
            systems[system_name("llama.cpp", gguf_type)] = {"bytes": ggufs[gguf_type].stat().st_size}
            runners.append(("llama.cpp", gguf_type))
            targets[("llama.cpp", gguf_type)] = ggufs[gguf_type]

    from moetrt.bench.bandwidth import CopyProbe

    probe = CopyProbe(options.threads)
    bandwidth: dict[str, list[float]] = {"copy": [], "read": []}
    load = [os.getloadavg()[0]]
    other: list[float] = []  # per round, other_cpu_share
    started = time.perf_counter()
    for round_index in range(options.rounds):
        before = probe.sample(), probe.sample_read()
        cpu_before = cpu_sample()
        for side, key in round_order(runners, round_index):
            name = system_name(side, key)
            print(f"round {round_index + 1}/{options.rounds}: {name}", file=sys.stderr)
            got = measure_moetrt(checkpoint, targets[(side, key)], options) if side == "moetrt" \
                else measure_llamacpp(llama, targets[(side, key)], options)
            for metric, value in got.items():
                systems[name].setdefault(metric, []).append(value)
        cpu_after = cpu_sample()
        if cpu_before and cpu_after:
            other.append(other_cpu_share(cpu_before, cpu_after, os.cpu_count() or 1))
        # the larger of the samples before and after: one taken in a dip would put a round's rates over its roofline
        bandwidth["copy"].append(max(before[0], probe.sample()))
        bandwidth["read"].append(max(before[1], probe.sample_read()))
        load.append(os.getloadavg()[0])
    header = [
        f"{options.model}, {options.threads} threads both sides, {options.rounds} alternating rounds "
        f"(A B, then B A), {options.repeats} repeats per round; cells: median over rounds (min–max) of each round's "
        f"median. Decode b1: {options.new_tokens} tokens; b{options.batch}: {options.decode_prompt}-token prompts "
        f"then {options.new_tokens} tokens each; prefill: one {options.prefill}-token prompt. Weights: the engine "
        f"directory / the GGUF file. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{time.perf_counter() - started:.0f} s of timing, 1-min load average {min(load):.1f}–{max(load):.1f}"
        + (f", CPU taken by other work {max(other):.0%} at most in a round." if other else "."),
    ]
    busy = contention_warning(other) or busy_warning(max(load), options.threads, os.cpu_count() or 1)
    if busy:
        header.append(busy)
    if have_llama:
        amx = ", AMX compiled out" if llamacpp.NO_AMX else ""
        header.append(f"llama.cpp {llama.commit()} (from {llamacpp.SDIST} {llamacpp.SDIST_VERSION}, Release, "
                      f"GGML_NATIVE{amx}), weights in memory (-lm none), its defaults otherwise (float16 KV cache, "
                      f"flash attention auto, weights repacked for the CPU).")
    if greedy is not None:
        header.append(f"Greedy check, llama.cpp f32 GGUF against transformers on the checkpoint: "
                      f"{llamacpp.describe_greedy(greedy)}.")
    return {"systems": systems, "pairs": [dataclasses.asdict(p) for p in pairs], "header": header,
            "bandwidth": bandwidth,
            "notes": [*notes, *(f"{n}: {d['note']}" for n, d in systems.items() if d.get("note"))],
            "greedy": None if greedy is None else {k: v for k, v in greedy.items() if not isinstance(v, bytes)},
            "options": vars(options)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ds-mini")
    parser.add_argument("--types", default="fp32,int8,int4", help="moetrt types (and their llama.cpp pairs)")
    parser.add_argument("--extra-gguf", default="", help="llama.cpp-only rows, e.g. q4_k_m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--engines", default=str(ROOT / "engines"))
    parser.add_argument("--llamacpp-dir", default=None, help="default $MOETRT_CACHE_DIR/llama.cpp")
    parser.add_argument("--without-llamacpp", action="store_true")
    parser.add_argument("--skip-greedy-check", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the moetrt engines")
    parser.add_argument("--out", default=str(ROOT / "results"))
    options = parser.parse_args(argv)
    try:
        results = run(options)
    except MoetrtError as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    report = render(results)
    (out / "quantized.md").write_text(report)
    (out / "quantized.json").write_text(json.dumps(results, indent=2, default=str))
    print(report)


if __name__ == "__main__":
    main()
