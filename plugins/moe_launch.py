"""Launch plans for the Triton routed-experts kernels: pure functions of shapes, no torch, triton or tensorrt.

The routed experts run as four single-kernel stages; the JIT path (`triton_moe.run_plan`), the ahead-of-time PTX
(`aot_kernels`) and the TensorRT lowering (one plugin node per stage, plugins/spec.py's MOE_STAGES) all read the
same `LaunchPlan`:

    align    topk_ids [T,k]                    -> sorted_slots [P], block_experts [P/BM], num_padded [1]
    gate_up  hidden, w_gate_up, align's outs   -> act [P, I]      silu(x W_gate^T) * (x W_up^T), rows by expert
    down     act, w_down, topk_weights, align's outs -> expert_out [T*k, H]   w[t, j] * act W_down^T at each slot
    combine  expert_out                        -> output [T, H]   sum_j expert_out[t*k + j], in fp32

A slot is `t * k + j` (token t's j-th choice). `P = max_blocks * BM` bounds the expert-sorted, block-padded rows.
Every kernel takes its tensor inputs, then int32 scalars, then its tensor outputs: the order TensorRT's AOT
plugins pass arguments in, so a stage's `args` is both the Triton signature and the plugin's binding.

`stage_geometry` gives each stage's grid, int32 scalars and output shapes as formulas of the token count T that
also accept TensorRT's symbolic shape expressions: the plan here and the plugin's shape and launch functions
evaluate the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from moetrt.plugins.spec import MOE_STAGES

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
# Fused multiply-adds, stated rather than left to Triton's default (which 3.10 flips): JIT and AOT agree.
FP_FUSION = True
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32"}


@dataclasses.dataclass(frozen=True)
class ExpertsShape:
    """What a plan depends on: T tokens, H hidden, I expert intermediate, E experts, k slots per token."""

    num_tokens: int
    hidden: int
    inter: int
    num_experts: int
    top_k: int
    act_dtype: str = "bfloat16"  # hidden and output
    weight_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("act_dtype", "weight_dtype"):
            if getattr(self, name) not in ACTIVATION_DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}: the Triton kernels take {ACTIVATION_DTYPES}")
        if min(self.num_tokens, self.hidden, self.inter, self.num_experts, self.top_k) < 1:
            raise ValueError(f"every dimension must be positive: {self}")

    @property
    def compute_dtype(self) -> str:
        """The reference's rule: compute in the activation dtype when the weights share it, else in fp32."""
        return self.act_dtype if self.weight_dtype == self.act_dtype else "float32"

    @property
    def num_slots(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def dims(self) -> ExpertDims:
        return ExpertDims(self.hidden, self.inter, self.num_experts, self.top_k)


@dataclasses.dataclass(frozen=True)
class ExpertDims:
    """The static dimensions of a routed-experts node: everything but T, which an engine leaves dynamic."""

    hidden: int
    inter: int
    num_experts: int
    top_k: int


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# tl.dot needs every tile dimension to be at least 16 (the MMA shapes' smallest M, N and K).
MIN_DOT_DIM = 16


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """Tile of one grouped GEMM: BLOCK_N output columns, BLOCK_K reduction step, launch options."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        check_tile(self, block_n=self.block_n, block_k=self.block_k, num_warps=self.num_warps)
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be at least 1: {self}")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes for one shape. block_m: rows of a GEMM tile, all of one expert; the layout align writes pads
    each expert's rows to a multiple of it, or of a multiple of it (plan_launch's align_block)."""

    block_m: int
    gate_up: GemmTile
    down: GemmTile
    group_m: int = 8

    def __post_init__(self) -> None:
        check_tile(self, block_m=self.block_m)
        if self.group_m < 1:
            raise ValueError(f"group_m must be at least 1: {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileConfig:
        return cls(
            block_m=data["block_m"],
            gate_up=GemmTile(**data["gate_up"]),
            down=GemmTile(**data["down"]),
            group_m=data.get("group_m", 8),
        )


def check_tile(owner: object, **sizes: int) -> None:
    """Refuse what Triton cannot compile: block sizes and warp counts are powers of two, tile dimensions >= 16."""
    for name, value in sizes.items():
        least = 1 if name == "num_warps" else MIN_DOT_DIM
        if not is_pow2(value) or value < least:
            raise ValueError(f"{name}={value} must be a power of two and at least {least}: {owner}")


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A tensor a stage reads or writes. role: 'input' / 'output' of the plugin node, or 'scratch' between stages."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str


@dataclasses.dataclass(frozen=True)
class StageLaunch:
    """One kernel launch. Kernel parameters are `inputs + scalars + outputs` (names), then the constexprs."""

    name: str
    kernel: str  # function name in plugins/triton_moe.py
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    inputs: tuple[str, ...]
    scalars: tuple[tuple[str, int], ...]  # (parameter name, value), all int32
    outputs: tuple[str, ...]
    constexprs: tuple[tuple[str, object], ...]

    @property
    def args(self) -> tuple[str, ...]:
        """Runtime parameter names in kernel (and TensorRT AOT) order."""
        return (*self.inputs, *(name for name, _ in self.scalars), *self.outputs)

    @property
    def kernel_params(self) -> tuple[str, ...]:
        """`args` as the kernel spells them: a tensor `x` arrives as the pointer `x_ptr`."""
        tensors = {*self.inputs, *self.outputs}
        return tuple(f"{name}_ptr" if name in tensors else name for name in self.args)

    @property
    def block_threads(self) -> int:
        return self.num_warps * 32


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    shape: ExpertsShape
    config: TileConfig
    buffers: dict[str, Buffer]
    stages: tuple[StageLaunch, ...]
    align_block: int  # rows per block of align's layout: config.block_m or a multiple of it

    def scratch(self) -> list[Buffer]:
        return [buffer for buffer in self.buffers.values() if buffer.role == "scratch"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Dim(Protocol):
    """A dimension formulas can compute with: an int, or a TensorRT shape expression (tensorrt.plugin.ShapeExpr)."""

    def __add__(self: D, other: D | int, /) -> D: ...

    def __mul__(self: D, other: D | int, /) -> D: ...

    def __floordiv__(self: D, other: D | int, /) -> D: ...


D = TypeVar("D", bound=Dim)
# `min` for ints, `tensorrt.plugin.min` for shape expressions.
Minimum = Callable[[D, int], D]


def max_blocks_expr(num_slots: D, num_experts: int, block_m: int, minimum: Callable[[D, int], D]) -> D:
    """Upper bound on BM-row blocks after padding each hit expert's rows to a multiple of BM.

    At most min(E, T*k) experts are hit and each wastes at most BM-1 rows. `minimum` is `min` for ints and
    `tensorrt.plugin.min` for shape expressions.
    """
    return (num_slots + minimum(num_slots, num_experts) * (block_m - 1)) // block_m


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    return max_blocks_expr(num_slots, num_experts, block_m, min)


@dataclasses.dataclass(frozen=True)
class StageGeometry(Generic[D]):
    """A stage's launch grid, its int32 scalars in kernel order and its output shapes, as formulas of T."""

    grid: tuple[D | int, D | int, D | int]
    scalars: tuple[D | int, ...]
    outputs: tuple[tuple[D | int, ...], ...]


def stage_geometry(
    stage: str,
    tokens: D,
    dims: ExpertDims,
    config: TileConfig,
    minimum: Callable[[D, int], D],
    align_block: int | None = None,
) -> StageGeometry[D]:
    """`stage`'s geometry for `tokens` tokens (an int or a symbolic expression). align_block: rows per block of the
    layout align writes (config.block_m by default; else a multiple of it). A GEMM program covers one such block,
    in tiles of config.block_m rows, and one tile of N columns."""
    align_block = check_align_block(config, align_block)
    slots = tokens * dims.top_k
    blocks = max_blocks_expr(slots, dims.num_experts, align_block, minimum)
    rows = blocks * align_block
    if stage == "align":
        return StageGeometry((1, 1, 1), (slots, blocks), ((rows,), (blocks,), (1,)))
    if stage == "gate_up":
        n_tiles = cdiv(dims.inter, config.gate_up.block_n)
        return StageGeometry((blocks * n_tiles, 1, 1), (slots,), ((rows, dims.inter),))
    if stage == "down":
        n_tiles = cdiv(dims.hidden, config.down.block_n)
        return StageGeometry((blocks * n_tiles, 1, 1), (slots,), ((slots, dims.hidden),))
    if stage == "combine":
        return StageGeometry((tokens, cdiv(dims.hidden, combine_block(dims.hidden)), 1), (), ((tokens, dims.hidden),))
    raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(MOE_STAGES)}")


def check_align_block(config: TileConfig, align_block: int | None) -> int:
    """The layout's rows per block: config.block_m, or a multiple of it that is a power of two."""
    if align_block is None:
        return config.block_m
    if not is_pow2(align_block) or align_block % config.block_m:
        raise ValueError(f"align_block={align_block} must be a power-of-two multiple of block_m={config.block_m}")
    return align_block


def combine_block(hidden: int) -> int:
    return min(1024, next_pow2(hidden))


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def buffers(shape: ExpertsShape, config: TileConfig, align_block: int | None = None) -> dict[str, Buffer]:
    """Every tensor of the plan, by name: node inputs, scratch buffers between stages, the output."""
    T, H, I, E, k = shape.num_tokens, shape.hidden, shape.inter, shape.num_experts, shape.top_k
    listing = [
        Buffer("hidden", (T, H), shape.act_dtype, "input"),
        Buffer("topk_ids", (T, k), "int32", "input"),
        Buffer("topk_weights", (T, k), "float32", "input"),
        Buffer("w_gate_up", (E, 2 * I, H), shape.weight_dtype, "input"),
        Buffer("w_down", (E, H, I), shape.weight_dtype, "input"),
    ]
    dtypes = {"act": shape.compute_dtype, "expert_out": shape.compute_dtype, "output": shape.act_dtype}
    for stage, spec in MOE_STAGES.items():
        geometry = stage_geometry(stage, T, shape.dims, config, min, align_block)
        for output, dims in zip(spec.outputs, geometry.outputs):
            role = "output" if output.name == "output" else "scratch"
            listing.append(Buffer(output.name, tuple(dims), dtypes.get(output.name, "int32"), role))
    return {buffer.name: buffer for buffer in listing}


def plan_launch(
    shape: ExpertsShape, config: TileConfig, *, interpret: bool = False, align_block: int | None = None
) -> LaunchPlan:
    """The four launches for `shape` with `config`. interpret=True adds the CPU interpreter's bf16 workaround.
    align_block: rows per block of align's layout (config.block_m by default); an engine's stages pad to the larger
    block_m of their two configurations, so either configuration's GEMMs read the one layout."""
    align_block = check_align_block(config, align_block)
    return LaunchPlan(
        shape,
        config,
        buffers(shape, config, align_block),
        (
            align_stage(shape, config, align_block),
            gemm_stage(shape, config, "gate_up", interpret, align_block),
            gemm_stage(shape, config, "down", interpret, align_block),
            combine_stage(shape, config),
        ),
        align_block,
    )


def launch(
    shape: ExpertsShape,
    config: TileConfig,
    stage: str,
    scalars: tuple[str, ...],
    num_warps: int,
    num_stages: int,
    constexprs: tuple[tuple[str, object], ...],
    align_block: int | None = None,
) -> StageLaunch:
    """A stage's launch: tensors named as its plugin node's (plugins/spec.py), geometry from stage_geometry."""
    spec = MOE_STAGES[stage]
    geometry = stage_geometry(stage, shape.num_tokens, shape.dims, config, min, align_block)
    grid_x, grid_y, grid_z = geometry.grid
    return StageLaunch(
        name=stage,
        kernel=f"moe_{stage}_kernel",
        grid=(grid_x, grid_y, grid_z),
        num_warps=num_warps,
        num_stages=num_stages,
        inputs=spec.input_names,
        scalars=tuple(zip(scalars, geometry.scalars)),
        outputs=tuple(output.name for output in spec.outputs),
        constexprs=constexprs,
    )


def align_stage(shape: ExpertsShape, config: TileConfig, align_block: int) -> StageLaunch:
    """One program: counts per expert, padded offsets, then a stable scatter of slots (deterministic)."""
    experts_pow2 = next_pow2(shape.num_experts)
    return launch(
        shape,
        config,
        "align",
        ("num_slots", "max_blocks"),
        num_warps=8,
        num_stages=1,
        constexprs=(
            ("NUM_EXPERTS", shape.num_experts),
            ("EXPERTS_POW2", experts_pow2),
            ("BLOCK_M", align_block),
            ("CHUNK", 128),  # slots per step of the scatter: [CHUNK, CHUNK] compares
            ("BLOCKS_CHUNK", max(16, min(1024, 8192 // experts_pow2))),  # [BLOCKS_CHUNK, E] compares
        ),
        align_block=align_block,
    )


def gemm_stage(
    shape: ExpertsShape, config: TileConfig, which: str, interpret: bool = False, align_block: int | None = None
) -> StageLaunch:
    """gate_up (N = I per half, K = H) or down (N = H, K = I): one program per (layout block, N tile)."""
    tile: GemmTile = getattr(config, which)
    align_block = check_align_block(config, align_block)
    return launch(
        shape,
        config,
        which,
        ("num_slots",),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        constexprs=(
            ("HIDDEN", shape.hidden),
            ("INTER", shape.inter),
            ("TOP_K", shape.top_k),
            ("NUM_EXPERTS", shape.num_experts),
            ("ALIGN_M", align_block),
            ("BLOCK_M", config.block_m),
            ("BLOCK_N", tile.block_n),
            ("BLOCK_K", tile.block_k),
            ("GROUP_M", config.group_m),
            # fp32 tl.dot would use TF32 on a GPU; the reference is exact fp32.
            ("DOT_PRECISION", "ieee" if shape.compute_dtype == "float32" else "tf32"),
            # Triton's CPU interpreter multiplies bf16 tiles as raw uint16: upcast there.
            ("UPCAST_DOT", bool(interpret and shape.compute_dtype == "bfloat16")),
        ),
        align_block=align_block,
    )


def combine_stage(shape: ExpertsShape, config: TileConfig) -> StageLaunch:
    """One program per (token, H tile): sums its k slots in a fixed order, so no atomics and bitwise repeatable."""
    constexprs = (("HIDDEN", shape.hidden), ("TOP_K", shape.top_k), ("BLOCK_H", combine_block(shape.hidden)))
    return launch(shape, config, "combine", (), num_warps=4, num_stages=1, constexprs=constexprs)


def triton_signature(plan: LaunchPlan, stage: StageLaunch) -> dict[str, str]:
    """`{kernel parameter: type}` for triton.compiler.ASTSource: {'hidden_ptr': '*bf16', 'num_slots': 'i32', ...}."""
    types = {name: "*" + TRITON_TYPES[plan.buffers[name].dtype] for name in (*stage.inputs, *stage.outputs)}
    types.update({name: "i32" for name, _ in stage.scalars})
    return {param: types[name] for param, name in zip(stage.kernel_params, stage.args)}
