"""The steps of `make gpu-check` (plugins/gpu_check.py), imported once TRITON_INTERPRET is settled.

`Check` runs each step, prints as it goes (flushed, so a timeout still shows what ran) and collects failures and
missed performance targets for the summary.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

from moetrt.plugins import triton_moe
from moetrt.plugins.aot_kernels import PORTABLE_SHARED_BYTES, AotDispatch, aot_dispatch, ptx_version_for_driver
from moetrt.plugins.gpu_check import (
    DECODE_BANDWIDTH_TARGET,
    H200_BF16_FLOPS,
    H200_BYTES_PER_S,
    PREFILL_MATRIX_TARGET,
    Scale,
)
from moetrt.plugins.moe_dispatch import moe_dispatch_reference
from moetrt.plugins.moe_inputs import random_problem, random_routing, relative_error
from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_launch import Buffer, DispatchPlan, DispatchShape, stage_geometry
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import StageAttribute

TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
# Triton's CPU interpreter casts fp32 -> bf16 by truncation, doubling the bf16 error of a GPU run.
INTERPRETER_TOLERANCE = {**TOLERANCE, "bfloat16": 2e-2}
POISON_INT = 2**31 - 1


def poisoned(buffer, device) -> torch.Tensor:
    """A scratch or output buffer filled with NaN (INT32_MAX for ints): rows a kernel forgets stay visible."""
    tensor = triton_moe.empty_buffer(buffer, device)
    return tensor.fill_(POISON_INT if buffer.dtype == "int32" else float("nan"))


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


def graphed(fn):
    """`fn` captured once into a CUDA graph: returns its replay, or None (with a note) if capture fails."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as error:
        print(f"  (CUDA graph capture failed, {type(error).__name__}: {error}; eager timing only)", flush=True)
        return None


class Check:
    def __init__(self, device: str, dry_run: bool):
        self.device, self.dry_run = device, dry_run
        self.failures: list[str] = []
        self.misses: list[str] = []
        self._driver = None
        if not dry_run:
            torch.set_float32_matmul_precision("highest")  # the fp32 reference must not use TF32 either

    def step(self, name: str, fn, *args) -> None:
        """Run one step; an exception becomes a failure (with its traceback) and the next step still runs."""
        try:
            fn(*args)
        except Exception as error:
            traceback.print_exc()
            self.fail(f"{name}: {type(error).__name__}: {error}"[:500])

    # -- reporting ------------------------------------------------------------------------------------------
    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL {what}", flush=True)

    def header(self) -> None:
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
        if self.dry_run:
            print(f"gpu-check --dry-run: CPU, TRITON_INTERPRET=1, tiny shapes, no driver launches ({versions})")
            return
        major, minor = torch.cuda.get_device_capability()
        driver = self.driver.driver_version()
        print(f"gpu-check on {torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA driver {driver}, {versions}")

    def summary(self) -> int:
        if self.misses:
            print("performance targets missed:\n  " + "\n  ".join(self.misses))
        if self.failures:
            print(f"gpu-check: FAIL ({len(self.failures)}): " + "; ".join(self.failures))
        elif not self.misses:
            print("gpu-check: PASS")
        return 1 if self.failures or self.misses else 0

    def tolerance(self, shape: DispatchShape) -> float:
        table = INTERPRETER_TOLERANCE if self.dry_run else TOLERANCE
        return max(table[shape.compute_dtype], table[shape.act_dtype])

    # -- correctness ----------------------------------------------------------------------------------------
    def small_shapes(self, cases) -> None:
        print("Triton vs moe_dispatch_reference (scratch poisoned with NaN, run twice for repeatability)", flush=True)
        for seed, case in enumerate(cases):
            shape = DispatchShape(*case)
            problem = random_problem(shape, seed, self.device)
            plan = triton_moe.plan_for(shape)
            first, second = self.run_poisoned(plan, problem), self.run_poisoned(plan, problem)
            error = relative_error(first, moe_dispatch_reference(**problem))
            label = f"T={shape.num_tokens} H={shape.hidden} I={shape.inter} E={shape.num_experts} k={shape.top_k} "
            label += f"{shape.act_dtype}/{shape.weight_dtype} block_m={plan.config.block_m}"
            print(f"  {label}: relative error {error:.2e}", flush=True)
            if error > self.tolerance(shape):
                self.fail(f"{label}: error {error:.2e}")
            if not torch.equal(first, second):
                self.fail(f"{label}: two runs differ")

    def run_poisoned(self, plan: DispatchPlan, problem: dict) -> torch.Tensor:
        tensors = triton_moe.dispatch_tensors(plan, problem, allocate=poisoned)
        triton_moe.run_plan(plan, tensors)
        if not torch.isfinite(tensors["expert_out"].float()).all():
            self.fail(f"{plan.shape}: expert_out rows left unwritten")
        return tensors["output"]

    # -- AOT PTX through the driver -------------------------------------------------------------------------
    @property
    def driver(self):
        if self._driver is None:
            from moetrt.plugins.cuda_driver import CudaDriver

            self._driver = CudaDriver()
        return self._driver

    def ptx_version(self) -> int | None:
        """The PTX ISA both Triton's ptxas and this machine's driver accept (the driver JIT-compiles the PTX)."""
        if self.dry_run:
            return None
        return ptx_version_for_driver(self.driver.driver_version())

    def compile_aot(self, shape: DispatchShape, max_shared_bytes: int | None) -> AotDispatch | None:
        if self.dry_run:  # this process runs the interpreter, which patches triton.language: compile elsewhere
            self.compile_aot_elsewhere(shape, max_shared_bytes)
            return None
        start = time.perf_counter()
        aot = aot_dispatch(shape, ptx_version=self.ptx_version(), max_shared_bytes=max_shared_bytes)
        seconds = time.perf_counter() - start
        stages = ", ".join(
            f"{s.name}: grid {s.grid} x {s.block_threads} threads, {s.shared_mem} B shared, {len(s.params)} params"
            for s in aot.stages
        )
        print(f"  compiled PTX in {seconds:.1f} s, .entry parameters checked: {stages}", flush=True)
        return aot

    def compile_aot_elsewhere(self, shape: DispatchShape, max_shared_bytes: int | None) -> None:
        flags = [f"--tokens={shape.num_tokens}", f"--hidden={shape.hidden}", f"--inter={shape.inter}"]
        flags += [f"--experts={shape.num_experts}", f"--top-k={shape.top_k}", f"--dtype={shape.act_dtype}"]
        flags += [f"--weight-dtype={shape.weight_dtype}"]
        flags += [f"--max-shared-bytes={max_shared_bytes}"] if max_shared_bytes else []
        env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "moetrt.plugins.aot_kernels", *flags]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        print("  " + done.stdout.strip().replace("\n", "\n  "), flush=True)
        if done.returncode != 0:
            self.fail(f"AOT compile of {shape} (cap {max_shared_bytes}): {done.stderr.strip()[-2000:]}")

    def run_aot(self, aot: AotDispatch, tensors: dict[str, torch.Tensor], functions: dict) -> None:
        """Launch every stage's PTX; `functions` caches the loaded CUfunctions of this `aot` between calls."""
        from moetrt.plugins.cuda_driver import run_stages

        pointers = {name: tensor.data_ptr() for name, tensor in tensors.items()}
        run_stages(self.driver, aot.stages, pointers, torch.cuda.current_stream().cuda_stream, functions)

    def aot_run_error(self, aot: AotDispatch | None, inputs: dict, want: torch.Tensor, label: str, functions: dict):
        """Launch the PTX on poisoned buffers, compare with `want`; returns the tensors for timing, or None."""
        if aot is None:
            print(f"  {label}: driver launch skipped (no GPU)")
            return None
        tensors = triton_moe.dispatch_tensors(aot.plan, inputs, allocate=poisoned)
        self.run_aot(aot, tensors, functions)
        error = relative_error(tensors["output"], want)
        print(f"  {label}: driver-launched PTX, relative error {error:.2e}", flush=True)
        if error > self.tolerance(aot.plan.shape):
            self.fail(f"{label}: AOT error {error:.2e}")
        return tensors

    def aot_small(self, case) -> None:
        shape = DispatchShape(*case)
        print(f"AOT PTX for sm_90 (ptx_version {self.ptx_version() or 'default'}) at {shape}", flush=True)
        problem = random_problem(shape, 99, self.device)
        want = moe_dispatch_reference(**problem)
        for cap in (None, PORTABLE_SHARED_BYTES):
            self.aot_run_error(self.compile_aot(shape, cap), problem, want, f"shared memory cap {cap}", {})

    # -- the TensorRT stage plugins, without TensorRT ------------------------------------------------------
    def trt_stages(self, cases, token_counts) -> None:
        """Each stage node as an engine runs it: one compilation for every T, outputs sized by the plugin's shape
        formulas, chained stage to stage from poisoned buffers, against the reference."""
        from moetrt.plugins.aot_kernels import engine_stage

        for hidden, inter, experts, top_k, dtype in cases:
            dims_shape = DispatchShape(512, hidden, inter, experts, top_k, dtype, dtype)
            attribute = StageAttribute(dims_shape.dims, dtype, select_config(dims_shape))
            compiled = None
            if not self.dry_run:
                major, minor = torch.cuda.get_device_capability()
                arch = major * 10 + minor
                compiled = {stage: engine_stage(stage, attribute, arch, self.ptx_version()) for stage in MOE_STAGES}
                shared = ", ".join(f"{stage} {aot.shared_mem} B" for stage, aot in compiled.items())
                print(f"TensorRT stage plugins: PTX for sm_{arch} compiled once ({shared} shared)", flush=True)
            else:
                print("TensorRT stage plugins: JIT form only (the AOT form needs driver launches)", flush=True)
            functions: dict = {}
            for tokens in token_counts:
                shape = dataclasses.replace(dims_shape, num_tokens=tokens)
                problem = random_problem(shape, 7 + tokens, self.device, skew=3.0)
                want = moe_dispatch_reference(**problem)
                for form in ("jit",) if compiled is None else ("jit", "aot"):
                    got = self.run_stage_nodes(attribute, problem, form, compiled, functions)
                    error = relative_error(got, want)
                    label = f"  H={hidden} I={inter} E={experts} k={top_k} {dtype} T={tokens} {form}"
                    print(f"{label}: relative error {error:.2e}", flush=True)
                    if error > self.tolerance(shape):
                        self.fail(f"TensorRT stage plugins{label}: error {error:.2e}")

    def run_stage_nodes(self, attribute: StageAttribute, problem: dict, form: str, compiled, functions: dict):
        from moetrt.plugins.aot_kernels import launch_at

        tokens = problem["hidden"].shape[0]
        tensors = triton_moe.dispatch_tensors(triton_moe.plan_for(attribute.shape(tokens), attribute.config), problem)
        for stage, spec in MOE_STAGES.items():
            geometry = stage_geometry(stage, tokens, attribute.dims, attribute.config, min)
            for output, dims in zip(spec.outputs, geometry.outputs):
                dtype = output.dtypes[0] if len(output.dtypes) == 1 else attribute.dtype
                tensors[output.name] = poisoned(Buffer(output.name, tuple(dims), dtype, "scratch"), self.device)
            names = (*spec.input_names, *(output.name for output in spec.outputs))
            if form == "jit":
                triton_moe.run_stage(stage, attribute, {name: tensors[name] for name in names})
            else:
                if stage not in functions:
                    functions[stage] = self.driver.load(compiled[stage])
                launch = launch_at(compiled[stage], tuple(geometry.grid), tuple(geometry.scalars))
                pointers = {name: tensors[name].data_ptr() for name in names}
                self.driver.launch(launch, functions[stage], pointers, torch.cuda.current_stream().cuda_stream)
        return tensors["output"]

    def cuda_python(self) -> None:
        """The TensorRT session's device layer: a DeviceLatentCache written and read back, a graph captured and
        replayed on fresh inputs. Skipped (not failed) where cuda-python is not installed."""
        if self.dry_run:
            print("cuda-python: skipped (no GPU)")
            return
        import numpy as np

        from moetrt.errors import MoetrtError
        from moetrt.runtime import cuda_memory as cuda
        from moetrt.runtime.device_cache import DeviceLatentCache

        try:
            stream = cuda.stream_create()
        except MoetrtError as error:
            print(f"cuda-python: skipped ({error})")
            return
        cache = DeviceLatentCache(2, 8, 3, 16, 4, stream)
        rows = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
        first, second = cache.reserve(2)
        cuda.to_device(first.pointer, rows, stream)
        cache.advance(2)
        back = np.empty_like(rows)
        cuda.to_host(back, cache.past()[0].pointer, stream)
        padding = np.ones((14, 3, 8), np.float32)
        cuda.to_host(padding, cache.past()[0].pointer + rows.nbytes, stream)
        cuda.synchronize(stream)
        if not np.array_equal(back, rows) or padding.any():
            self.fail("cuda-python: latent cache rows did not round-trip, or the unused rows are not zero")
        source, target = cuda.DeviceBuffer(rows.nbytes), cuda.DeviceBuffer(rows.nbytes)
        cuda.begin_capture(stream)
        cuda.device_copy(target.pointer, source.pointer, rows.nbytes, stream)
        graph = cuda.end_capture(stream)
        graph_exec = cuda.instantiate(graph)
        cuda.to_device(source.pointer, rows * 2, stream)
        cuda.launch_graph(graph_exec, stream)
        cuda.to_host(back, target.pointer, stream)
        cuda.synchronize(stream)
        if not np.array_equal(back, rows * 2):
            self.fail("cuda-python: a replayed graph did not copy the current source")
        cuda.destroy_graph(graph, graph_exec)
        for buffer in (source, target):
            buffer.close()
        cache.close()
        cuda.stream_destroy(stream)
        print("cuda-python: device latent cache round trip, zero padding and graph replay ok", flush=True)

    # -- benchmark ------------------------------------------------------------------------------------------
    def benchmark(self, scale: Scale) -> None:
        print(f"timings: H={scale.hidden} I={scale.inter} k={scale.top_k} bf16, medians of CUDA-event timings")
        w_gate_up, w_down = self.bench_weights(scale, max(scale.experts))
        for experts in scale.experts:
            for tokens in scale.tokens:
                shape = DispatchShape(tokens, scale.hidden, scale.inter, experts, scale.top_k)
                label = f"E={experts} T={tokens}"
                self.step(label, self.bench_point, scale, shape, w_gate_up[:experts], w_down[:experts])

    def bench_weights(self, scale: Scale, experts: int):
        """bf16 weights made on the device (22.5 GB at E=256); smaller E take a leading slice."""
        torch.manual_seed(0)
        shape = (experts, 2 * scale.inter, scale.hidden), (experts, scale.hidden, scale.inter)
        w_gate_up = torch.randn(shape[0], device=self.device, dtype=torch.bfloat16).mul_(scale.hidden**-0.5)
        w_down = torch.randn(shape[1], device=self.device, dtype=torch.bfloat16).mul_(scale.inter**-0.5)
        return w_gate_up, w_down

    def bench_inputs(self, shape: DispatchShape, w_gate_up, w_down) -> dict:
        generator = torch.Generator().manual_seed(shape.num_tokens * 1000 + shape.num_experts)
        topk_ids, topk_weights = random_routing(shape.num_tokens, shape.num_experts, shape.top_k, generator)
        hidden = torch.randn(shape.num_tokens, shape.hidden, generator=generator, dtype=torch.float32)
        inputs = dict(hidden=hidden.to(torch.bfloat16), topk_ids=topk_ids, topk_weights=topk_weights)
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        return {**inputs, "w_gate_up": w_gate_up, "w_down": w_down}

    def bench_point(self, scale: Scale, shape: DispatchShape, w_gate_up, w_down) -> None:
        inputs = self.bench_inputs(shape, w_gate_up, w_down)
        plan = triton_moe.plan_for(shape)
        tensors = triton_moe.dispatch_tensors(plan, inputs)
        triton_moe.run_plan(plan, tensors)
        want = moe_dispatch_reference(**inputs)
        error = relative_error(tensors["output"], want)
        hit = inputs["topk_ids"].unique().numel()
        element = 2  # bf16
        traffic = hit * 3 * shape.hidden * shape.inter * element + 2 * shape.num_tokens * shape.hidden * element
        flops = 2 * shape.num_slots * 3 * shape.hidden * shape.inter
        label = f"E={shape.num_experts} T={shape.num_tokens}"
        print(f"{label}: {hit} experts hit, {traffic / 1e9:.2f} GB, {flops / 1e12:.3f} TFLOP, "
              f"block_m={plan.config.block_m}, relative error {error:.2e}", flush=True)
        if error > self.tolerance(shape):
            self.fail(f"{label}: error {error:.2e}")
        triton_ms = self.time_triton(plan, tensors, traffic, flops)
        self.report("reference", self.time(lambda: moe_dispatch_reference(**inputs)), traffic, flops)
        self.report("expert loop", self.time(lambda: per_expert_loop(**inputs)), traffic, flops)
        if (shape.num_experts, shape.num_tokens) in scale.aot_points:
            self.step(f"{label} AOT", self.bench_aot, shape, inputs, want, traffic, flops)
        self.judge(label, shape, triton_ms, traffic, flops)

    def time_triton(self, plan: DispatchPlan, tensors: dict, traffic: int, flops: int) -> float:
        """Eager launches, then (on a GPU) the same four launches replayed from a CUDA graph, which is what the
        targets judge: Python's launch overhead is not the kernels' and would dominate at T=1."""
        run = lambda: triton_moe.run_plan(plan, tensors)  # noqa: E731
        eager = self.time(run)
        stages = ", ".join(f"{name} {ms:.3f}" for name, ms in self.stage_times(plan, tensors).items())
        self.report("triton", eager, traffic, flops, f"[{stages} ms]")
        replay = None if self.dry_run else graphed(run)
        if replay is None:
            return eager
        graph_ms = self.time(replay)
        self.report("triton graph", graph_ms, traffic, flops)
        return graph_ms

    def bench_aot(self, shape: DispatchShape, inputs: dict, want, traffic: int, flops: int) -> None:
        for cap in (None, PORTABLE_SHARED_BYTES):
            aot, functions = self.compile_aot(shape, cap), dict[str, object]()
            tensors = self.aot_run_error(aot, inputs, want, f"AOT, shared memory cap {cap}", functions)
            if tensors is not None:
                run = lambda: self.run_aot(aot, tensors, functions)  # noqa: E731
                self.report(f"AOT cap {cap}", self.time(run), traffic, flops)
                replay = graphed(run)
                if replay is not None:
                    self.report(f"AOT cap {cap} graph", self.time(replay), traffic, flops)

    def report(self, name: str, ms: float, traffic: int, flops: int, extra: str = "") -> None:
        bandwidth, rate = traffic / (ms * 1e-3), flops / (ms * 1e-3)
        print(
            f"  {name:<14} {ms:9.3f} ms {bandwidth / 1e9:8.0f} GB/s ({100 * bandwidth / H200_BYTES_PER_S:5.1f}%) "
            f"{rate / 1e12:7.1f} TFLOP/s ({100 * rate / H200_BF16_FLOPS:5.1f}%) {extra}",
            flush=True,
        )

    def judge(self, label: str, shape: DispatchShape, ms: float, traffic: int, flops: int) -> None:
        if self.dry_run:
            return
        if shape.num_tokens <= 64:
            achieved, target, what = traffic / (ms * 1e-3) / H200_BYTES_PER_S, DECODE_BANDWIDTH_TARGET, "bandwidth"
        elif shape.num_tokens == 4096:
            achieved, target, what = flops / (ms * 1e-3) / H200_BF16_FLOPS, PREFILL_MATRIX_TARGET, "bf16 matrix rate"
        else:
            return
        verdict = "met" if achieved >= target else "MISSED"
        print(f"  target {100 * target:.0f}% of {what}: {100 * achieved:.1f}% {verdict}", flush=True)
        if achieved < target:
            self.misses.append(f"{label}: {100 * achieved:.1f}% of {what} < {100 * target:.0f}%")

    # -- timing ---------------------------------------------------------------------------------------------
    def time(self, fn, budget_s: float = 0.25, max_iterations: int = 50) -> float:
        """Median milliseconds per call: CUDA events on a GPU (after a warm-up call), wall clock on the CPU."""
        if self.dry_run:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        fn()
        estimate = self.event_samples(fn, 1)[0]
        iterations = max(3, min(max_iterations, int(budget_s * 1e3 / max(estimate, 1e-3))))
        return statistics.median(self.event_samples(fn, iterations))

    @staticmethod
    def event_samples(fn, iterations: int) -> list[float]:
        make = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        events = [(make(), make()) for _ in range(iterations)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    def stage_times(self, plan: DispatchPlan, tensors: dict, iterations: int = 5) -> dict[str, float]:
        """Median milliseconds of each stage, from events recorded between launches."""
        names = [stage.name for stage in plan.stages]
        if self.dry_run:
            timed = {}
            for index, name in enumerate(names):
                start = time.perf_counter()
                triton_moe.launch_stage(plan, index, tensors)
                timed[name] = 1e3 * (time.perf_counter() - start)
            return timed
        runs = []
        for _ in range(iterations):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
            events[0].record()
            for index in range(len(names)):
                triton_moe.launch_stage(plan, index, tensors)
                events[index + 1].record()
            runs.append(events)
        torch.cuda.synchronize()
        return {
            name: statistics.median(run[i].elapsed_time(run[i + 1]) for run in runs) for i, name in enumerate(names)
        }
