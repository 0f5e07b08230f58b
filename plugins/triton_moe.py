"""The Triton routed experts on torch tensors: allocate the plan's buffers and launch its four kernels.

`routed_experts_triton` has `routed_experts_reference`'s signature. Tensors live on a CUDA device, or on the CPU
when the kernels were imported under TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_kernels import KERNELS
from moetrt.plugins.moe_launch import FP_FUSION, Buffer, ExpertsShape, LaunchPlan, TileConfig, plan_launch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
INPUTS = ("hidden", "topk_ids", "topk_weights", "w_gate_up", "w_down")
Allocator = Callable[[Buffer, torch.device], torch.Tensor]


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 and run on the CPU."""
    return not isinstance(KERNELS["moe_align_kernel"], triton.runtime.jit.JITFunction)


def experts_shape(hidden: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """The ExpertsShape of these tensors; raises ValueError on inconsistent shapes or dtypes the kernels lack."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w_gate_up.shape
    if w_gate_up.shape[2] != hidden_size or w_down.shape != (num_experts, hidden_size, two_inter // 2):
        raise ValueError(f"weights {tuple(w_gate_up.shape)}, {tuple(w_down.shape)} do not fit hidden {hidden_size}")
    if w_gate_up.dtype != w_down.dtype or w_gate_up.dtype not in DTYPE_NAMES or hidden.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"routed_experts_triton takes fp32/fp16/bf16 hidden and weights (fp8 weights: dequantize first or use "
            f"the reference); got hidden {hidden.dtype}, weights {w_gate_up.dtype}/{w_down.dtype}"
        )
    return ExpertsShape(
        num_tokens=num_tokens,
        hidden=hidden_size,
        inter=two_inter // 2,
        num_experts=num_experts,
        top_k=topk_ids.shape[1],
        act_dtype=DTYPE_NAMES[hidden.dtype],
        weight_dtype=DTYPE_NAMES[w_gate_up.dtype],
    )


def empty_buffer(buffer: Buffer, device: torch.device) -> torch.Tensor:
    return torch.empty(buffer.shape, dtype=TORCH_DTYPES[buffer.dtype], device=device)


def plan_tensors(plan: LaunchPlan, inputs: dict[str, torch.Tensor], allocate: Allocator = empty_buffer):
    """`{buffer name: tensor}`: the node inputs (contiguous, ids as int32) plus new scratch and output buffers."""
    device = inputs["hidden"].device
    tensors = {name: inputs[name].contiguous() for name in INPUTS}
    tensors["topk_ids"] = tensors["topk_ids"].to(torch.int32)
    tensors["topk_weights"] = tensors["topk_weights"].to(torch.float32)
    for buffer in plan.buffers.values():
        if buffer.role != "input":
            tensors[buffer.name] = allocate(buffer, device)
    return tensors


def launch_stage(plan: LaunchPlan, stage_index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Launch one stage of `plan` on the current stream with the plan's grid, arguments and constexprs."""
    stage = plan.stages[stage_index]
    args = [tensors[name] for name in stage.inputs] + [value for _, value in stage.scalars]
    args += [tensors[name] for name in stage.outputs]
    KERNELS[stage.kernel][stage.grid](
        *args,
        **dict(stage.constexprs),
        num_warps=stage.num_warps,
        num_stages=stage.num_stages,
        enable_fp_fusion=FP_FUSION,
    )


def run_plan(plan: LaunchPlan, tensors: dict[str, torch.Tensor]) -> None:
    for index in range(len(plan.stages)):
        launch_stage(plan, index, tensors)


def plan_for(shape: ExpertsShape, config: TileConfig | None = None) -> LaunchPlan:
    return plan_launch(shape, config or select_config(shape), interpret=interpreting())


def routed_experts_triton(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """`routed_experts_reference` with Triton kernels: hidden `[T, H]`, topk_ids `[T, k]` (ids in [0, E)),
    topk_weights `[T, k]`, w_gate_up `[E, 2I, H]`, w_down `[E, H, I]` (fp32/fp16/bf16) -> `[T, H]` in hidden's dtype.

    config overrides the block sizes from plugins/moe_configs.json. fp8 weights are not supported here.
    """
    if w_gate_up_scale is not None or w_down_scale is not None:
        raise ValueError("routed_experts_triton has no fp8 path yet: dequantize the weights or use the reference")
    if not interpreting() and hidden.device.type != "cuda":
        raise ValueError("routed_experts_triton needs CUDA tensors (or TRITON_INTERPRET=1: Triton's CPU interpreter)")
    if hidden.shape[0] == 0:
        return torch.empty_like(hidden)
    plan = plan_for(experts_shape(hidden, topk_ids, w_gate_up, w_down), config)
    inputs = dict(zip(INPUTS, (hidden, topk_ids, topk_weights, w_gate_up, w_down)))
    tensors = plan_tensors(plan, inputs)
    run_plan(plan, tensors)
    return tensors["output"]


def run_stage(stage: str, attribute, tensors: dict[str, torch.Tensor], tactic: int | None = None) -> None:
    """One stage node's JIT work (plugins/trt_plugin.py): T from the stage's own inputs, then its one launch on the
    current stream, with the tiles for T (or for `tactic`). `tensors`: the stage's inputs and outputs by spec name;
    attribute: its StageAttribute."""
    from moetrt.plugins.spec import MOE_STAGES
    from moetrt.plugins.trt_stages import tokens_input

    index, per_slot = tokens_input(stage)
    first = tensors[MOE_STAGES[stage].input_names[index]].shape[0]
    tokens = first // attribute.dims.top_k if per_slot else first
    plan = attribute.plan(tokens, tactic=tactic, interpret=interpreting())
    launch_stage(plan, list(MOE_STAGES).index(stage), tensors)
