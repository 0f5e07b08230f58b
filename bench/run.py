"""`make bench` / `moetrt bench`: moetrt against transformers and the memory-bandwidth roofline, in one run.

For each model (the embedded tiny-r1 and ds-mini) it builds the ONNX Runtime engine (timing the build and
the export's peak memory), runs every system in its own process on the same prompts (prefill tokens/s,
time to first token, decode tokens/s at batch 1 and 8, peak RSS; medians over repeats with min and max),
measures this machine's copy bandwidth right before and after every decode repeat (it swings by 2x within
seconds on shared machines, so each repeat's rate is held against the bandwidth of its own moment: the roofline
fractions are medians of per-repeat fractions), and writes a markdown table, a JSON file and a PNG chart to bench/results/, printing the ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moetrt.bench.bandwidth import CopyProbe
from moetrt.config import load_config
from moetrt.export.info import count_parameters
from moetrt.formats import read_manifest

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SYSTEMS = ("moetrt-ort", "moetrt-torch", "transformers")
TARGET = 0.70

BUILD_SCRIPT = """
import sys, time
from moetrt.export.engine import build_engine
start = time.perf_counter()
build_engine(sys.argv[1], sys.argv[2], backend="ort", quantize=sys.argv[3])  # the model's own context
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(seconds, peak)
"""


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def model_dirs(names: list[str]) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "tiny-r1":
            dirs[name] = REPO / "models" / "tiny-r1"
        elif name == "ds-mini":
            path = ROOT / "checkpoints" / "ds-mini"
            if not (path / "config.json").is_file():
                from moetrt.bench.ds_mini import write_ds_mini

                print("writing the ds-mini checkpoint (random, 3.3 GB fp32)...", file=sys.stderr)
                write_ds_mini(path)
            dirs[name] = path
        else:
            raise SystemExit(f"unknown model {name!r}: tiny-r1 or ds-mini")
    return dirs


def build(model_dir: Path, engine_dir: Path, quantize: str = "none") -> dict[str, float]:
    """Engine build time and the build's (export included) peak RSS, in a fresh process; `quantize` as
    build_engine takes it ("none", "int8", "int4")."""
    env = {**os.environ, "MOETRT_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(model_dir), str(engine_dir), quantize],
                         capture_output=True, text=True, env=env, check=True)
    seconds, peak = out.stdout.split()
    return {"build_seconds": float(seconds), "export_peak_rss_bytes": int(peak)}


def run_system(system: str, model_dir: Path, engine_dir: Path, args: dict, probe: CopyProbe | None = None,
               samples: list[float] | None = None) -> dict:
    """One system in its own process. With a probe, it asks for a bandwidth sample ("bandwidth?") around each
    decode repeat, appended to `samples`."""
    env = {**os.environ, "MOETRT_QUIET": "1", "OMP_NUM_THREADS": str(args["threads"]),
           "MOETRT_BENCH_PAIRED": "1" if probe else "0"}
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, "-m", "moetrt.bench.systems", system, str(model_dir),
                                    str(engine_dir), json.dumps(args)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        last = ""
        for line in process.stdout:
            if line.strip() == "bandwidth?" and probe is not None and samples is not None:
                samples.append(probe.sample())
                process.stdin.write(f"{samples[-1]}\n")
                process.stdin.flush()
            elif line.strip():
                last = line
        if process.wait() != 0:
            errors.seek(0)
            raise SystemExit(f"{system} failed:\n{errors.read()[-3000:]}")
    return json.loads(last)


def roofline(config, distinct_experts: dict[str, float], bandwidth: float, batch: int) -> float:
    """Tokens/s if a decode step only streamed the weights it touches at `bandwidth` (fp32 weights).

    Batch 1 touches the active parameters (k experts per MoE layer); a batch touches the distinct experts
    its tokens route to (measured), everything else once per step."""
    counts = count_parameters(config)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = len(config.moe_layers)
    shared = counts.active - counts.active_routed_experts  # attention, dense, shared experts, router, head
    experts = config.num_experts_per_tok if batch == 1 else distinct_experts[str(batch)]
    step_bytes = 4 * (shared + moe_layers * experts * per_expert)
    return batch * bandwidth / step_bytes


def bench_model(name: str, model_dir: Path, args: dict, probe: CopyProbe, bandwidth_samples: list[float]) -> dict:
    """Build and run every system on one model; appends the copy-bandwidth samples taken around its repeats."""
    config = load_config(model_dir)
    engine_dir = ROOT / "engines" / name
    print(f"[{name}] building the ONNX Runtime engine...", file=sys.stderr)
    result = {"model": name, **build(model_dir, engine_dir), "systems": {}}
    result["moe_kernel"] = read_manifest(engine_dir).section.moe_kernel
    run_args = {**args, "vocab": config.vocab_size}
    for system in SYSTEMS:
        print(f"[{name}] {system}...", file=sys.stderr)
        result["systems"][system] = run_system(system, model_dir, engine_dir, run_args, probe, bandwidth_samples)
    experts = result["systems"]["moetrt-torch"]["distinct_experts"]
    result["distinct_experts"] = experts
    result["active_bytes_per_token"] = 4 * count_parameters(config).active
    return result


def table(results: list[dict], bandwidth_samples: list[float]) -> str:
    def cell(values, scale=1.0, digits=1):
        s = stats([v * scale for v in values])
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"

    lines = [
        f"Copy bandwidth {statistics.median(bandwidth_samples) / 1e9:.1f} GB/s (read + write, 2 threads; median of "
        f"{len(bandwidth_samples)} samples, one before and one after every decode repeat, "
        f"{min(bandwidth_samples) / 1e9:.1f}–{max(bandwidth_samples) / 1e9:.1f}). Medians over repeats (min–max); "
        "the roofline columns are medians of each repeat's rate over the roofline at its own bandwidth.",
        "",
        "| model | system | prefill tok/s | TTFT ms | decode tok/s b1 | decode tok/s b8 | b1 roofline | b8 roofline | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        roof = result["roofline_tps"]
        for system, data in result["systems"].items():
            b1, b8 = data["decode_tps"]["1"], data["decode_tps"]["8"]
            lines.append(
                f"| {result['model']} | {system} | {cell(data['prefill_tps'])} | {cell(data['ttft_s'], 1000)} | "
                f"{cell(b1)} | {cell(b8)} | {statistics.median(data['roofline_fraction']['1']):.0%} | "
                f"{statistics.median(data['roofline_fraction']['8']):.0%} | {data['peak_rss_bytes'] / 1e6:.0f} |"
            )
        lines.append(
            f"| {result['model']} | engine build | {result['build_seconds']:.1f} s, experts in {result['moe_kernel']}, export peak "
            f"{result['export_peak_rss_bytes'] / 1e6:.0f} MB | | roofline {roof['1']:.1f} | roofline {roof['8']:.1f} "
            f"(experts/layer {result['distinct_experts']['8']:.1f}) | | | |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    lines = []
    for result in results:
        ours, theirs = result["systems"]["moetrt-ort"], result["systems"]["transformers"]
        torch_ref = result["systems"]["moetrt-torch"]
        for batch in ("1", "8"):
            tps = statistics.median(ours["decode_tps"][batch])
            fraction = statistics.median(ours["roofline_fraction"][batch])
            verdict = "" if result["model"] != "ds-mini" else (" PASS" if fraction >= TARGET else " MISS")
            overhead = statistics.median(ours["runtime_overhead"][batch])
            lines.append(
                f"{result['model']} batch {batch}: moetrt-ort {tps:.1f} tok/s = {fraction:.0%} of roofline "
                f"(target {TARGET:.0%}){verdict}; {tps / statistics.median(theirs['decode_tps'][batch]):.2f}x "
                f"transformers, {tps / statistics.median(torch_ref['decode_tps'][batch]):.2f}x moetrt-torch; "
                f"runtime overhead {overhead:.1%} of a decode step"
            )
    return lines


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        systems = list(result["systems"])
        for offset, batch in ((-0.2, "1"), (0.2, "8")):
            values = [statistics.median(result["systems"][s]["decode_tps"][batch]) for s in systems]
            ax.bar([i + offset for i in range(len(systems))], values, width=0.4, label=f"batch {batch}")
            ax.axhline(result["roofline_tps"][batch], linestyle="--", linewidth=1,
                       color="C0" if batch == "1" else "C1", label=f"roofline b{batch}")
        ax.set_xticks(range(len(systems)), systems)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(result["model"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-r1,ds-mini")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results"))
    options = parser.parse_args(argv)
    args = {"repeats": options.repeats, "new_tokens": options.new_tokens, "prefill_len": options.prefill_len,
            "decode_prompt_len": 16, "batches": [1, 8], "threads": options.threads}
    started = time.perf_counter()
    dirs = model_dirs(options.models.split(","))
    probe = CopyProbe(options.threads)
    samples: list[float] = []
    results = [bench_model(name, path, args, probe, samples) for name, path in dirs.items()]
    bandwidth = statistics.median(samples)
    for result in results:
        config = load_config(dirs[result["model"]])
        # the roofline at the run's median bandwidth, for scale; fractions are per repeat at its own bandwidth
        result["roofline_tps"] = {str(b): roofline(config, result["distinct_experts"], bandwidth, b)
                                  for b in args["batches"]}
        for data in result["systems"].values():
            data["roofline_fraction"] = {
                str(b): [rate / roofline(config, result["distinct_experts"], bw, b)
                         for rate, bw in zip(data["decode_tps"][str(b)], data["decode_bandwidth"][str(b)])]
                for b in args["batches"]
            }
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    report = table(results, samples)
    (out / "results.md").write_text(report + "\n\n" + "\n".join(ratios(results)) + "\n")
    (out / "results.json").write_text(json.dumps({"bandwidth": samples,
                                                  "args": args, "results": results}, indent=2))
    chart(results, out / "decode.png")
    print(report)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; results in {out}/")
    print("\n".join(ratios(results)))


if __name__ == "__main__":
    main()
