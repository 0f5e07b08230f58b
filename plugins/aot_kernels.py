"""Ahead-of-time PTX for the routed-experts stages, as a TensorRT AOT plugin (one kernel each) takes it. No tensorrt.

`aot_launch(shape)` compiles every stage of `moe_launch.plan_launch` for sm_90 with `triton.compile` (no GPU
needed) and describes its launch: kernel name, PTX, grid, threads per block, dynamic shared memory, and the kernel
parameters in order with what each binds to. TensorRT passes plugin inputs, then int32 extra args, then plugin
outputs. Triton appends hidden pointer parameters to every kernel (global scratch; profile scratch since 3.5): their
number is read from the PTX entry, the kernels must use none of them (checked here), and the launcher passes null
for them, as TensorRT does for arguments it was not given. pyproject pins the Triton versions this was checked with.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_kernels import KERNELS
from moetrt.plugins.moe_launch import (
    FP_FUSION,
    Buffer,
    ExpertsShape,
    LaunchPlan,
    StageLaunch,
    TileConfig,
    plan_launch,
    triton_signature,
)
from moetrt.plugins.trt_stages import DECODE_TACTIC, GEMM_STAGES, StageAttribute

HIDDEN_POINTERS = ("global_scratch", "profile_scratch")  # Triton's names, in its order; 3.4 has the first only
PORTABLE_SHARED_BYTES = 48 * 1024  # more needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) before launch
PTX_TYPES = {"pointer": ".u64", "i32": ".u32"}
# The oldest PTX ISA that can name each GPU target (Triton compiles sm_90 as sm_90a, which PTX 8.0 introduced).
ARCH_MIN_PTX = {80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 120: 87, 121: 88}


@dataclasses.dataclass(frozen=True)
class AotParam:
    """One kernel parameter. kind: 'input' / 'scalar' / 'output' (plugin inputs, extra args, plugin outputs, in
    TensorRT's order) or 'hidden' (Triton's scratch pointers: pass null). role: the buffer's role in the whole
    plan ('input', 'output', 'scratch'), None for scalars and hidden pointers."""

    name: str
    kind: str
    ptx_type: str
    value: int | None = None
    role: str | None = None


@dataclasses.dataclass(frozen=True)
class AotStage:
    """Everything one single-kernel plugin node needs."""

    name: str
    kernel_name: str
    ptx: str
    grid: tuple[int, int, int]
    block_threads: int
    shared_mem: int
    params: tuple[AotParam, ...]
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]
    launch: StageLaunch  # the launch compiled, after any shrinking to fit max_shared_bytes

    @property
    def extra_args(self) -> tuple[int, ...]:
        return tuple(param.value or 0 for param in self.params if param.kind == "scalar")

    @property
    def needs_shared_opt_in(self) -> bool:
        return self.shared_mem > PORTABLE_SHARED_BYTES


@dataclasses.dataclass(frozen=True)
class AotLaunch:
    """The plan (buffer shapes, scratch included) and its compiled stages in launch order."""

    plan: LaunchPlan
    stages: tuple[AotStage, ...]


def aot_launch(
    shape: ExpertsShape,
    config: TileConfig | None = None,
    *,
    arch: int = 90,
    ptx_version: int | None = None,
    max_shared_bytes: int | None = None,
) -> AotLaunch:
    """Compile every stage for sm_`arch`. ptx_version caps the PTX ISA (e.g. 87 for a CUDA 12.8 driver); None
    lets Triton pick from its bundled ptxas. max_shared_bytes (e.g. PORTABLE_SHARED_BYTES, for a launcher that
    never raises the 48 KiB default) shrinks pipeline depth and BLOCK_K until each GEMM fits; grids do not change.
    """
    plan = plan_launch(shape, config or select_config(shape))
    stages = tuple(
        compile_stage(plan, stage, arch=arch, ptx_version=ptx_version, max_shared_bytes=max_shared_bytes)
        for stage in plan.stages
    )
    return AotLaunch(plan, stages)


@functools.lru_cache(maxsize=64)
def engine_stage(
    stage: str, attribute: StageAttribute, arch: int, ptx_version: int | None, *, tactic: int = DECODE_TACTIC
) -> AotStage:
    """One stage's kernel for a TensorRT engine, whatever T it runs at: the PTX does not depend on T (grids and int32
    extra args carry it). A GEMM stage compiles the tactic's tiles (decode or prefill); align and combine have one
    kernel. Capped at 48 KiB of dynamic shared memory, since TensorRT's documentation does not say that it raises a
    kernel's limit (cuFuncSetAttribute) for an AOT plugin; grids do not change under the cap."""
    plan = attribute.plan(1, tactic=tactic if stage in GEMM_STAGES else DECODE_TACTIC)
    launch = next(candidate for candidate in plan.stages if candidate.name == stage)
    return compile_stage(plan, launch, arch=arch, ptx_version=ptx_version, max_shared_bytes=PORTABLE_SHARED_BYTES)


def launch_at(stage: AotStage, grid: tuple[int, int, int], scalars: tuple[int, ...]) -> AotStage:
    """`stage` as TensorRT launches it for another T: the same PTX, this grid and these int32 extra args."""
    values = iter(scalars)
    params = tuple(dataclasses.replace(p, value=next(values)) if p.kind == "scalar" else p for p in stage.params)
    return dataclasses.replace(stage, grid=grid, params=params)


def ptx_version_for_driver(driver_version: int, arch: int = 90, tensorrt_cuda_major: int | None = None) -> int:
    """The PTX ISA that Triton's ptxas, a driver (e.g. 12080 for CUDA 12.8: it JIT-compiles the PTX) and, when
    given, a TensorRT built for that CUDA major version all accept."""
    return ptx_version_cap(driver_version, ptxas_cuda_version(arch), arch, tensorrt_cuda_major)


def ptxas_cuda_version(arch: int) -> str:
    """The CUDA version ("12.8") of the ptxas Triton compiles `arch` with (Triton >= 3.5 may pick one per arch)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return str(get_ptxas(arch).version)
    except TypeError:  # Triton 3.4: one ptxas, no argument
        return str(get_ptxas().version)


def ptx_isa(cuda_version: str) -> int:
    """The newest PTX ISA a CUDA version reads, as 10 * major + minor (NVIDIA's table: 12.0 -> 8.0, 12.5 -> 8.5,
    12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8, 13.0 -> 9.0)."""
    major, minor = (int(part) for part in cuda_version.split(".")[:2])
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor - (minor >= 6)
    return 70 + minor if major == 11 else 63 + minor


def ptx_version_cap(driver_version: int, ptxas_cuda: str, arch: int, tensorrt_cuda_major: int | None) -> int:
    """The newest PTX ISA within every limit: the driver's CUDA version, ptxas's ("12.8"), and the oldest toolkit of
    TensorRT's CUDA major (its PTX compiler may be any minor of it), never below what `arch` needs. Raises
    ValueError when the driver or ptxas is too old for `arch`."""
    needed = ARCH_MIN_PTX.get(arch, 0)
    caps = {"driver": ptx_isa(f"{driver_version // 1000}.{driver_version % 1000 // 10}"), "ptxas": ptx_isa(ptxas_cuda)}
    if tensorrt_cuda_major is not None:
        caps["TensorRT"] = max(ptx_isa(f"{tensorrt_cuda_major}.0"), needed)
    version = min(caps.values())
    if version < needed:
        limits = ", ".join(f"{name} {cap // 10}.{cap % 10}" for name, cap in caps.items())
        raise ValueError(f"sm_{arch} needs PTX {needed // 10}.{needed % 10}; this machine allows {limits}")
    return version


def compile_stage(plan, stage, *, arch=90, ptx_version=None, max_shared_bytes=None) -> AotStage:
    for candidate in shrunk_launches(plan, stage, max_shared_bytes):
        compiled = compile_launch(plan, candidate, arch, ptx_version)
        if max_shared_bytes is None or compiled.metadata.shared <= max_shared_bytes:
            return describe(plan, candidate, compiled)
    raise ValueError(f"stage {stage.name}: no tile of {stage.constexprs} fits {max_shared_bytes} B of shared memory")


def jit_function(kernel) -> JITFunction:
    if not isinstance(kernel, JITFunction):
        # The interpreter also patches triton.language for the whole process: compile in another one.
        raise RuntimeError("AOT compilation needs the kernels imported without TRITON_INTERPRET=1")
    return kernel


def compile_launch(plan: LaunchPlan, stage: StageLaunch, arch: int, ptx_version: int | None):
    """triton.compile one stage. Pointers are declared 16-byte aligned, as Triton's JIT finds them on the GPU."""
    fn = jit_function(KERNELS[stage.kernel])
    constexprs = dict(stage.constexprs)
    if fn.arg_names != [*stage.kernel_params, *constexprs]:
        raise ValueError(f"{stage.kernel} takes {fn.arg_names}, the plan passes {[*stage.kernel_params, *constexprs]}")
    signature = {**triton_signature(plan, stage), **{name: "constexpr" for name in constexprs}}
    aligned = [i for i, name in enumerate(stage.kernel_params) if signature[name].startswith("*")]
    source = ASTSource(
        fn, signature=signature, constexprs=constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned}
    )
    options = {"num_warps": stage.num_warps, "num_stages": stage.num_stages, "enable_fp_fusion": FP_FUSION}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    check_launch_metadata(stage, compiled.metadata)
    return compiled


def check_launch_metadata(stage: StageLaunch, metadata) -> None:
    """Refuse what a plain cuLaunchKernel with null scratch pointers cannot reproduce."""
    # Fields a Triton version lacks (profile_scratch_size before 3.5) are features it does not have.
    unsupported = {
        "global_scratch_size": getattr(metadata, "global_scratch_size", 0),
        "profile_scratch_size": getattr(metadata, "profile_scratch_size", 0),
        "tmem_size": getattr(metadata, "tmem_size", 0) or 0,
        "launch_cooperative_grid": getattr(metadata, "launch_cooperative_grid", False),
        "launch_pdl": getattr(metadata, "launch_pdl", False),
        "num_ctas > 1": getattr(metadata, "num_ctas", 1) > 1,
    }
    used = [name for name, value in unsupported.items() if value]
    if used:
        raise ValueError(f"stage {stage.name} needs {used}: not launchable as a plain AOT kernel")


def shrunk_launches(plan: LaunchPlan, stage: StageLaunch, max_shared_bytes: int | None):
    """The stage itself, then (for GEMMs under a shared-memory cap) shallower pipelines and smaller BLOCK_K,
    largest estimated footprint first. Only num_stages and BLOCK_K change, so grids and buffers stay the same."""
    yield stage
    constexprs = dict(stage.constexprs)
    if max_shared_bytes is None or "BLOCK_K" not in constexprs:
        return
    element = 4 if plan.shape.compute_dtype == "float32" else 2
    b_tiles = 2 if stage.name == "gate_up" else 1
    options = []
    block_k = constexprs["BLOCK_K"]
    while block_k >= 16:
        for depth in range(stage.num_stages, 0, -1):
            per_stage = (constexprs["BLOCK_M"] + b_tiles * constexprs["BLOCK_N"]) * block_k * element
            # Triton keeps num_stages - 1 tiles in flight; compile_stage checks the real figure anyway.
            options.append((depth >= 2, max(depth - 1, 1) * per_stage, depth, block_k))
        block_k //= 2
    for _, footprint, depth, block_k in sorted(options, reverse=True):
        if footprint <= max_shared_bytes and (depth, block_k) != (stage.num_stages, constexprs["BLOCK_K"]):
            yield dataclasses.replace(
                stage, num_stages=depth, constexprs=tuple({**constexprs, "BLOCK_K": block_k}.items())
            )


def describe(plan: LaunchPlan, stage: StageLaunch, compiled) -> AotStage:
    metadata = compiled.metadata
    params = [tensor_param(plan, name, "input") for name in stage.inputs]
    params += [AotParam(name, "scalar", PTX_TYPES["i32"], value=value) for name, value in stage.scalars]
    params += [tensor_param(plan, name, "output") for name in stage.outputs]
    params += hidden_params(compiled.asm["ptx"], len(params))
    aot = AotStage(
        name=stage.name,
        kernel_name=metadata.name,
        ptx=compiled.asm["ptx"],
        grid=stage.grid,
        block_threads=metadata.num_warps * metadata.warp_size,
        shared_mem=metadata.shared,
        params=tuple(params),
        inputs=tuple(plan.buffers[name] for name in stage.inputs),
        outputs=tuple(plan.buffers[name] for name in stage.outputs),
        launch=stage,
    )
    problems = entry_param_problems(aot)
    if problems:
        raise ValueError(f"stage {stage.name}: PTX parameters do not match the launch: {problems}")
    return aot


def hidden_params(ptx: str, visible: int) -> list[AotParam]:
    """The parameters Triton's PTX entry declares after the `visible` ones the launch binds: its scratch pointers,
    as many as this Triton version appends. Raises ValueError for any that is not a global pointer."""
    _, declared = ptx_entry(ptx)
    hidden = []
    for index, (ptx_type, is_pointer) in enumerate(declared[visible:]):
        name = HIDDEN_POINTERS[index] if index < len(HIDDEN_POINTERS) else f"hidden_{index}"
        if ptx_type != PTX_TYPES["pointer"] or not is_pointer:
            raise ValueError(f"PTX parameter {visible + index} ({name}) is {ptx_type}, not a pointer to pass as null")
        hidden.append(AotParam(name, "hidden", PTX_TYPES["pointer"]))
    return hidden


def tensor_param(plan: LaunchPlan, name: str, kind: str) -> AotParam:
    return AotParam(name, kind, PTX_TYPES["pointer"], role=plan.buffers[name].role)


def ptx_entry(ptx: str) -> tuple[str, list[tuple[str, bool]]]:
    """(entry name, [(PTX type, is a global pointer) per parameter]) of the single `.visible .entry` in `ptx`."""
    entries = re.findall(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", ptx, flags=re.DOTALL)
    if len(entries) != 1:
        raise ValueError(f"expected one .visible .entry in the PTX, found {len(entries)}")
    name, body = entries[0]
    params = []
    for declaration in filter(None, (part.strip() for part in body.split(","))):
        tokens = declaration.split()
        if tokens[0] != ".param":
            raise ValueError(f"unexpected PTX parameter declaration {declaration!r}")
        params.append((tokens[1], ".ptr" in tokens))
    return name, params


def entry_param_problems(stage: AotStage) -> list[str]:
    """Where the PTX `.entry` disagrees with `stage.params` (the arguments a launcher will pass); [] if nowhere."""
    name, declared = ptx_entry(stage.ptx)
    problems = [] if name == stage.kernel_name else [f"entry is {name}, launch names {stage.kernel_name}"]
    if len(declared) != len(stage.params):
        problems.append(f"PTX declares {len(declared)} parameters, the launch passes {len(stage.params)}")
    for index, ((ptx_type, is_pointer), param) in enumerate(zip(declared, stage.params)):
        wants_pointer = param.kind != "scalar"
        if ptx_type != param.ptx_type or is_pointer != wants_pointer:
            problems.append(f"parameter {index} ({param.name}): PTX {ptx_type}{' .ptr' * is_pointer}")
    return problems


def stage_summary(stage: AotStage) -> dict:
    """A JSON-able description of a stage, all but the PTX text."""
    return {
        "name": stage.name,
        "kernel_name": stage.kernel_name,
        "grid": stage.grid,
        "block_threads": stage.block_threads,
        "shared_mem": stage.shared_mem,
        "params": [dataclasses.asdict(param) for param in stage.params],
        "inputs": [dataclasses.asdict(buffer) for buffer in stage.inputs],
        "outputs": [dataclasses.asdict(buffer) for buffer in stage.outputs],
        "launch": {"num_stages": stage.launch.num_stages, "constexprs": dict(stage.launch.constexprs)},
    }


def main(argv=None) -> int:
    """`python -m moetrt.plugins.aot_kernels --tokens 64 ...`: compile, check and print (or --out: write) the stages."""
    parser = argparse.ArgumentParser(description="Compile the routed-experts stages to PTX and describe them.")
    for flag, default in (("tokens", 64), ("hidden", 7168), ("inter", 2048), ("experts", 256), ("top-k", 8)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weight-dtype", default=None)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--ptx-version", type=int, default=None)
    parser.add_argument("--max-shared-bytes", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write <stage>.ptx files and stages.json here")
    args = parser.parse_args(argv)
    shape = ExpertsShape(
        args.tokens, args.hidden, args.inter, args.experts, args.top_k, args.dtype, args.weight_dtype or args.dtype
    )
    aot = aot_launch(shape, arch=args.arch, ptx_version=args.ptx_version, max_shared_bytes=args.max_shared_bytes)
    for stage in aot.stages:
        print(
            f"{stage.name}: {stage.kernel_name} grid {stage.grid} x {stage.block_threads} threads, "
            f"{stage.shared_mem} B shared, params " + ", ".join(f"{p.name}:{p.kind}" for p in stage.params)
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for stage in aot.stages:
            (args.out / f"{stage.name}.ptx").write_text(stage.ptx)
        summary = {"shape": dataclasses.asdict(shape), "stages": [stage_summary(s) for s in aot.stages]}
        (args.out / "stages.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
