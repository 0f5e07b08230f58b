"""The routed experts timed on a CUDA GPU at DeepSeek-V3 shapes against the H200's roofline, into a report.

    python -m moetrt.bench.gpu_experts [--experts 256 32] [--tokens 1 8 64 512 4096] [--paths ...] [--out PATH]

At H=7168, I=2048, k=8 in bf16, for each E and T, each path as GB/s (bytes of the experts hit + activations) and
TFLOP/s against the H200's 4.8 TB/s and ~790 TFLOP/s bf16:
- engine: the stage kernels a TensorRT engine runs: the PTX its AOT plugins embed (the `trt` lowering's decode or
  prefill tiles, whichever the profile for this T would pick; 48 KiB of shared memory; the PTX ISA capped as for
  this machine's TensorRT), launched through the CUDA driver with the plugins' grids and extra arguments, eager and
  replayed from a CUDA graph. The targets judge its graph replay: T <= 64 at >= 60% of bandwidth, T = 4096 at
  >= 50% of the matrix rate.
- triton: the JIT kernels with the per-T block sizes of plugins/moe_configs.json (eager, then a CUDA graph replay,
  which the targets judge when the engine path is not run: Python's launch overhead would dominate at T=1).
- reference, loop: the torch reference and a per-expert loop.
- aot: at (E=256, T=64) and (E=32, T=4096), the per-T PTX with Triton's shared memory and capped at 48 KiB.
Correctness is `make gpu-check`'s; this checks only that each timed path still gets the right answer.

The markdown report (default bench/results/gpu_experts.md) is rewritten after every line, so a cut-short run keeps
what it measured. Exit status 1 when a result is wrong or (without --advisory-targets) a target is missed, or (one
line) without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from moetrt.plugins import triton_moe
from moetrt.plugins.aot_kernels import PORTABLE_SHARED_BYTES, aot_launch, engine_stage, launch_at, ptx_version_for_driver
from moetrt.plugins.cuda_driver import CudaDriver, run_stages
from moetrt.plugins.moe_inputs import poisoned, random_routing, relative_error
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.routed_experts import routed_experts_reference
from moetrt.plugins.trt_stages import DECODE_TACTIC, GEMM_STAGES, PREFILL_TACTIC, StageAttribute
from moetrt.progress import track
from moetrt.versions import tensorrt_cuda_major

H200_BYTES_PER_S = 4.8e12
H200_BF16_FLOPS = 790e12
DECODE_BANDWIDTH_TARGET = 0.60
PREFILL_MATRIX_TARGET = 0.50
BF16_TOLERANCE = 1e-2
HIDDEN, INTER, TOP_K = 7168, 2048, 8  # DeepSeek-V3's routed experts
AOT_POINTS = ((256, 64), (32, 4096))  # (E, T) where the per-T AOT PTX is timed too
PATHS = ("engine", "triton", "reference", "loop", "aot")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_experts.md"
TABLE_HEAD = "| path | ms | GB/s | of 4.8 TB/s | TFLOP/s | of 790 TFLOP/s | |\n|---|---:|---:|---:|---:|---:|---|"


@dataclasses.dataclass(frozen=True)
class Work:
    """What one call moves and computes: the bytes of the experts hit plus the activations, and the FLOPs."""

    traffic: int
    flops: int

    @classmethod
    def of(cls, shape: ExpertsShape, experts_hit: int) -> Work:
        element = 2  # bf16
        weights = experts_hit * 3 * shape.hidden * shape.inter * element
        activations = 2 * shape.num_tokens * shape.hidden * element
        return cls(weights + activations, 2 * shape.num_slots * 3 * shape.hidden * shape.inter)

    def bandwidth_fraction(self, ms: float) -> float:
        return self.traffic / (ms * 1e-3) / H200_BYTES_PER_S

    def matrix_fraction(self, ms: float) -> float:
        return self.flops / (ms * 1e-3) / H200_BF16_FLOPS


def target(shape: ExpertsShape, work: Work, ms: float) -> tuple[str, float, float] | None:
    """(what, achieved fraction, target fraction) a point is judged by: the bandwidth while decoding (T <= 64), the
    bf16 matrix rate at T = 4096; None in between."""
    if shape.num_tokens <= 64:
        return "bandwidth", work.bandwidth_fraction(ms), DECODE_BANDWIDTH_TARGET
    if shape.num_tokens == 4096:
        return "bf16 matrix rate", work.matrix_fraction(ms), PREFILL_MATRIX_TARGET
    return None


class Report:
    """Markdown lines, printed (flushed, so a timeout still shows what ran) and written to `path` as they come, with
    the failures and missed targets for the summary."""

    def __init__(self, path: Path, advisory_targets: bool = False):
        self.path = path
        self.advisory_targets = advisory_targets
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.misses: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")

    def timing(self, name: str, ms: float, work: Work, extra: str = "") -> None:
        bandwidth, rate = work.bandwidth_fraction(ms), work.matrix_fraction(ms)
        self.add(f"| {name} | {ms:.3f} | {bandwidth * H200_BYTES_PER_S / 1e9:.0f} | {100 * bandwidth:.1f}% | "
                 f"{rate * H200_BF16_FLOPS / 1e12:.1f} | {100 * rate:.1f}% | {extra} |")

    def check(self, label: str, error: float) -> None:
        if error > BF16_TOLERANCE:
            self.fail(f"{label}: relative error {error:.2e} > {BF16_TOLERANCE:.0e}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.add(f"\nFAIL {what}\n")

    def finish(self) -> int:
        if self.misses:
            self.add("\n## Performance targets missed\n\n" + "\n".join(f"- {miss}" for miss in self.misses))
        if self.failures:
            self.add("\n## Failures\n\n" + "\n".join(f"- {failure}" for failure in self.failures))
        print(f"wrote {self.path}")
        return 1 if self.failures or (self.misses and not self.advisory_targets) else 0


def per_expert_loop(hidden, topk_ids, topk_weights, w_gate_up, w_down) -> torch.Tensor:
    """The transformers-style baseline: gather each hit expert's tokens, two matmuls, index_add the result."""
    num_experts, intermediate = w_gate_up.shape[0], w_down.shape[-1]
    hits = F.one_hot(topk_ids.long(), num_experts)  # [T, k, E]
    output = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in (hits.sum((0, 1)) > 0).nonzero().flatten().tolist():
        token, slot = torch.where(hits[..., expert])
        gate_up = hidden[token] @ w_gate_up[expert].t()
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        output.index_add_(0, token, (act @ w_down[expert].t()).float() * topk_weights[token, slot, None])
    return output.to(hidden.dtype)


# -- timing ---------------------------------------------------------------------------------------------------------


def time_ms(fn, budget_s: float = 0.25, max_iterations: int = 50) -> float:
    """Median milliseconds per call from CUDA events, after a warm-up call."""
    fn()
    estimate = event_samples(fn, 1)[0]
    iterations = max(3, min(max_iterations, int(budget_s * 1e3 / max(estimate, 1e-3))))
    return statistics.median(event_samples(fn, iterations))


def event_samples(fn, iterations: int) -> list[float]:
    make = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    events = [(make(), make()) for _ in range(iterations)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def stage_times(launches, names: list[str], iterations: int = 5) -> dict[str, float]:
    """Median milliseconds of each launch (callables, in order), from events recorded between them."""
    runs = []
    for _ in range(iterations):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        events[0].record()
        for index, launch in enumerate(launches):
            launch()
            events[index + 1].record()
        runs.append(events)
    torch.cuda.synchronize()
    return {name: statistics.median(run[i].elapsed_time(run[i + 1]) for run in runs) for i, name in enumerate(names)}


def graphed(fn, report: Report, name: str):
    """`fn` captured once into a CUDA graph: returns its replay, or None (noted as row `name`) if capture fails."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as error:
        report.add(f"| {name} | capture failed ({type(error).__name__}: {error}); eager timing only ||||||")
        return None


# -- one point ------------------------------------------------------------------------------------------------------


def bench_weights(experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 weights made on the device (22.5 GB at E=256); smaller E take a leading slice."""
    torch.manual_seed(0)
    w_gate_up = torch.randn(experts, 2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16).mul_(HIDDEN**-0.5)
    w_down = torch.randn(experts, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16).mul_(INTER**-0.5)
    return w_gate_up, w_down


def bench_inputs(shape: ExpertsShape, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(shape.num_tokens * 1000 + shape.num_experts)
    topk_ids, topk_weights = random_routing(shape.num_tokens, shape.num_experts, shape.top_k, generator)
    hidden = torch.randn(shape.num_tokens, shape.hidden, generator=generator, dtype=torch.float32)
    inputs = dict(hidden=hidden.to(torch.bfloat16), topk_ids=topk_ids, topk_weights=topk_weights)
    inputs = {name: tensor.to("cuda") for name, tensor in inputs.items()}
    return {**inputs, "w_gate_up": w_gate_up, "w_down": w_down}


def bench_point(report: Report, shape: ExpertsShape, w_gate_up, w_down, driver: CudaDriver,
                paths: tuple[str, ...] = PATHS) -> None:
    inputs = bench_inputs(shape, w_gate_up, w_down)
    want = routed_experts_reference(**inputs)
    hit = inputs["topk_ids"].unique().numel()
    work = Work.of(shape, hit)
    label = f"E={shape.num_experts} T={shape.num_tokens}"
    report.add(f"\n## {label}\n\n{hit} experts hit, {work.traffic / 1e9:.2f} GB, {work.flops / 1e12:.3f} TFLOP\n")
    report.add(TABLE_HEAD)
    judged_ms = None
    if "engine" in paths:
        judged_ms = attempt(report, f"{label} engine", bench_engine, report, shape, inputs, want, work, driver)
    if "triton" in paths:
        triton_ms = attempt(report, f"{label} triton", time_triton, report, shape, inputs, want, work)
        judged_ms = triton_ms if judged_ms is None else judged_ms
    if "reference" in paths:
        report.timing("reference", time_ms(lambda: routed_experts_reference(**inputs)), work)
    if "loop" in paths:
        report.timing("expert loop", time_ms(lambda: per_expert_loop(**inputs)), work)
    if "aot" in paths and (shape.num_experts, shape.num_tokens) in AOT_POINTS:
        for cap in (None, PORTABLE_SHARED_BYTES):
            attempt(report, f"{label} AOT cap {cap}", bench_aot, report, shape, cap, inputs, want, work, driver)
    if judged_ms is not None:
        judge(report, label, target(shape, work, judged_ms))


def bench_engine(report: Report, shape: ExpertsShape, inputs: dict, want: torch.Tensor, work: Work,
                 driver: CudaDriver) -> float | None:
    """The engine's own stage kernels (module docstring), checked against `want` and timed; the graph replay's ms."""
    attribute = StageAttribute.select(shape.dims, shape.act_dtype)
    tokens, tactic = shape.num_tokens, attribute.tactic_for(shape.num_tokens)
    major, minor = torch.cuda.get_device_capability()
    ptx = ptx_version_for_driver(driver.driver_version(), major * 10 + minor, tensorrt_cuda_major())
    start = time.perf_counter()
    plan = attribute.plan(tokens, tactic=tactic)
    stages = []
    for launch in plan.stages:
        compiled = engine_stage(launch.name, attribute, major * 10 + minor, ptx,
                                tactic=tactic if launch.name in GEMM_STAGES else DECODE_TACTIC)
        geometry = attribute.geometry(launch.name, tokens, min, tactic)
        stages.append(launch_at(compiled, tuple(geometry.grid), tuple(geometry.scalars)))
    tiles = "prefill" if tactic == PREFILL_TACTIC else "decode"
    name = f"engine ({tiles} tiles, block_m {plan.config.block_m} of {plan.align_block})"
    shared = ", ".join(f"{stage.name} {stage.shared_mem} B" for stage in stages)
    report.add(f"| {name}: PTX {ptx // 10}.{ptx % 10} compiled in {time.perf_counter() - start:.1f} s "
               f"({shared} shared) ||||||")
    tensors = triton_moe.plan_tensors(plan, inputs, allocate=poisoned)
    pointers = {buffer: tensor.data_ptr() for buffer, tensor in tensors.items()}
    functions: dict = {}

    def run() -> None:
        run_stages(driver, stages, pointers, torch.cuda.current_stream().cuda_stream, functions)

    launches = [lambda stage=stage: run_stages(driver, [stage], pointers, torch.cuda.current_stream().cuda_stream,
                                               functions) for stage in stages]
    return time_path(report, f"E={shape.num_experts} T={tokens}", name, run, tensors["output"], want, launches,
                     [stage.name for stage in stages], work)


def time_path(report: Report, label: str, name: str, run, output: torch.Tensor, want: torch.Tensor, launches: list,
              stage_names: list[str], work: Work) -> float:
    """Check `run`'s `output` (filled in place) against `want`, then time it eagerly, stage by stage (`launches`),
    and replayed from a CUDA graph; returns the graph's ms, or the eager ms where capture fails."""
    run()
    error = relative_error(output, want)
    report.check(f"{label} {name}", error)
    eager_ms = time_ms(run)
    per_stage = ", ".join(f"{stage} {ms:.3f}" for stage, ms in stage_times(launches, stage_names).items())
    report.timing(name, eager_ms, work, f"error {error:.1e}; {per_stage} ms")
    replay = graphed(run, report, f"{name} graph")
    if replay is None:
        return eager_ms
    graph_ms = time_ms(replay)
    report.timing(f"{name} graph", graph_ms, work)
    return graph_ms


def judge(report: Report, label: str, judged: tuple[str, float, float] | None) -> None:
    if judged is None:
        return
    what, achieved, goal = judged
    verdict = "met" if achieved >= goal else "MISSED"
    report.add(f"\ntarget {100 * goal:.0f}% of {what}: {100 * achieved:.1f}% {verdict}\n")
    if achieved < goal:
        report.misses.append(f"{label}: {100 * achieved:.1f}% of {what} < {100 * goal:.0f}%")


def time_triton(report: Report, shape: ExpertsShape, inputs: dict, want: torch.Tensor, work: Work) -> float:
    """The JIT kernels with the per-T block sizes: eager launches, then the same four replayed from a CUDA graph."""
    plan = triton_moe.plan_for(shape)
    tensors = triton_moe.plan_tensors(plan, inputs)
    run = lambda: triton_moe.run_plan(plan, tensors)  # noqa: E731
    launches = [lambda index=index: triton_moe.launch_stage(plan, index, tensors) for index in range(len(plan.stages))]
    return time_path(report, f"E={shape.num_experts} T={shape.num_tokens}", f"triton (block_m {plan.config.block_m})",
                     run, tensors["output"], want, launches, [stage.name for stage in plan.stages], work)


def bench_aot(report: Report, shape: ExpertsShape, cap: int | None, inputs: dict, want: torch.Tensor, work: Work,
              driver: CudaDriver) -> None:
    """The PTX (shared memory capped at `cap` bytes) launched through the driver on poisoned buffers: checked against
    `want`, then timed."""
    start = time.perf_counter()
    aot = aot_launch(shape, ptx_version=ptx_version_for_driver(driver.driver_version()), max_shared_bytes=cap)
    shared = ", ".join(f"{stage.name} {stage.shared_mem} B" for stage in aot.stages)
    name = f"AOT cap {cap}"
    report.add(f"| {name}: PTX compiled in {time.perf_counter() - start:.1f} s ({shared} shared) ||||||")
    tensors = triton_moe.plan_tensors(aot.plan, inputs, allocate=poisoned)
    pointers = {buffer: tensor.data_ptr() for buffer, tensor in tensors.items()}
    functions: dict = {}  # the loaded CUfunctions, by stage

    def run() -> None:  # on the current stream when called: a graph captures on its own
        run_stages(driver, aot.stages, pointers, torch.cuda.current_stream().cuda_stream, functions)

    run()
    report.check(f"E={shape.num_experts} T={shape.num_tokens} {name}", relative_error(tensors["output"], want))
    report.timing(name, time_ms(run), work)
    replay = graphed(run, report, f"{name} graph")
    if replay is not None:
        report.timing(f"{name} graph", time_ms(replay), work)


def attempt(report: Report, label: str, fn, *args):
    """`fn(*args)`; an exception is reported as a failure (traceback on stderr), None returned, and the benchmark
    goes on."""
    try:
        return fn(*args)
    except Exception as error:
        traceback.print_exc()
        report.fail(f"{label}: {type(error).__name__}: {error}"[:500])
        return None


# -- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Time the routed experts on this GPU against the H200.")
    parser.add_argument("--experts", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="what to time (docstring)")
    parser.add_argument("--advisory-targets", action="store_true",
                        help="report missed targets without failing (exit 1 only for wrong results)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_experts: no CUDA GPU visible to torch {torch.__version__}; the benchmark needs one",
              file=sys.stderr)
        return 1
    torch.set_float32_matmul_precision("highest")
    driver = CudaDriver()
    major, minor = torch.cuda.get_device_capability()
    report = Report(args.out, args.advisory_targets)
    report.add(f"# Triton routed experts on {torch.cuda.get_device_name()} (sm_{major}{minor})\n\n"
               f"CUDA driver {driver.driver_version()}, torch {torch.__version__}, triton {triton.__version__}; "
               f"H={HIDDEN} I={INTER} k={TOP_K} bf16, medians of CUDA-event timings, {time.strftime('%Y-%m-%d')}.")
    w_gate_up, w_down = bench_weights(max(args.experts))
    points = [(experts, tokens) for experts in args.experts for tokens in args.tokens]
    for experts, tokens in track(points, "timing the routed experts"):
        shape = ExpertsShape(tokens, HIDDEN, INTER, experts, TOP_K)
        attempt(report, f"E={experts} T={tokens}", bench_point, report, shape, w_gate_up[:experts], w_down[:experts],
                driver, tuple(args.paths))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
