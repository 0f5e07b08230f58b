"""The routed experts registered with TensorRT through `tensorrt.plugin`; importing this module registers them.

- `moetrt::RoutedExperts`, the spec's node (plugins/spec.py): shape function and a JIT implementation that runs
  the four Triton stages on TensorRT's stream (scratch from torch's allocator). No AOT form: that is one kernel.
- `moetrt::MoeAlign / MoeGateUp / MoeDown / MoeCombine`, the nodes the `trt` lowering expands it into: each has a
  shape function, a JIT implementation (its one Triton launch) and an ahead-of-time implementation returning its
  one kernel's PTX (plugins/aot_kernels.py), launch grid and int32 extra arguments as TensorRT expressions of T,
  so the engine runs without Python. The network's PREFER_AOT/PREFER_JIT flag picks the form. The GEMM stages
  (gate_up, down) offer their decode and prefill tiles as tactics, and their autotune functions keep the one for
  each optimization profile's opt T (plugins/trt_stages.py).

String attributes arrive from TensorRT's ONNX parser with their C terminator; every one is read through
`trt_stages.plugin_string` (StageAttribute.decode does it for `launch`).

Shapes and launches come from moe_launch.stage_geometry, the same formulas the plans and tests evaluate on ints.
Needs TensorRT (and, for the JIT forms and AOT compilation, torch and triton), imported only to build or run a
TensorRT engine. No `from __future__ import annotations`: tensorrt.plugin reads the annotations as objects.
"""

import functools
from typing import TYPE_CHECKING, List, Tuple, Union

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from moetrt.plugins.moe_launch import StageGeometry
from moetrt.plugins.spec import MOE_STAGES, ROUTED_EXPERTS, TensorSpec
from moetrt.plugins.trt_stages import DECODE_TACTIC, PREFILL_TACTIC, StageAttribute, plugin_string, tokens_input
from moetrt import hardware
from moetrt.versions import tensorrt_cuda_major

if TYPE_CHECKING:
    import torch

TRT_DTYPES = {
    "float32": trt.DataType.FLOAT,
    "float16": trt.DataType.HALF,
    "bfloat16": trt.DataType.BF16,
    "int32": trt.DataType.INT32,
}
DTYPE_NAMES = {dtype: name for name, dtype in TRT_DTYPES.items()}
TYPE_STRINGS = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int32": "INT32"}  # AutoTuneCombination's
# Ahead-of-time Python plugins arrived in TensorRT 10.x; tensorrt.plugin itself tests this attribute.
AOT_AVAILABLE = hasattr(trt, "QuickPluginCreationRequest")
if AOT_AVAILABLE:
    AotKernel = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]


def plugin_id(op_type: str) -> str:
    return f"{ROUTED_EXPERTS.domain}::{op_type}"


# -- shared by the stage plugins ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def decode(launch: str) -> StageAttribute:
    """The node's `launch` attribute, as tensorrt.plugin's creator hands it over (NUL-terminated from the parser)."""
    return StageAttribute.decode(launch)


def spec_dtype(spec: TensorSpec, dtype: str) -> str:
    """The dtype a stage tensor has: fixed by the spec, else the node's one dtype."""
    return spec.dtypes[0] if len(spec.dtypes) == 1 else dtype


def check_inputs(op_type: str, specs: Tuple[TensorSpec, ...], dtypes: Tuple[trt.DataType, ...], dtype: str) -> None:
    for spec, got in zip(specs, dtypes):
        want = spec_dtype(spec, dtype)
        if got != TRT_DTYPES[want]:
            raise ValueError(f"{plugin_id(op_type)}: input {spec.name} is {DTYPE_NAMES.get(got, got)}, not {want}")


def shape_exprs(dims: Tuple[Union[trtp.ShapeExpr, int], ...]) -> trtp.ShapeExprs:
    exprs = trtp.ShapeExprs(len(dims))
    for index, dim in enumerate(dims):
        exprs[index] = dim
    return exprs


def symbolic_geometry(stage: str, attribute: StageAttribute, first_dim: trtp.ShapeExpr,
                      tactic: int = DECODE_TACTIC) -> StageGeometry[trtp.ShapeExpr]:
    """The stage's geometry with T read from its own input (`first_dim`: that input's first dimension)."""
    _, per_slot = tokens_input(stage)
    tokens: trtp.ShapeExpr = first_dim // attribute.dims.top_k if per_slot else first_dim
    return attribute.geometry(stage, tokens, trtp.min, tactic)


def stage_outputs(stage: str, launch: str, inputs: Tuple[trtp.TensorDesc, ...]) -> Tuple[trtp.TensorDesc, ...]:
    """Shape function of a stage node: checks input dtypes, returns output descriptors."""
    spec = MOE_STAGES[stage]
    attribute = decode(launch)
    check_inputs(spec.op_type, spec.inputs, tuple(desc.dtype for desc in inputs), attribute.dtype)
    index, _ = tokens_input(stage)
    geometry = symbolic_geometry(stage, attribute, inputs[index].shape_expr[0])
    return tuple(
        trtp.from_shape_expr(shape_exprs(dims), TRT_DTYPES[spec_dtype(output, attribute.dtype)])
        for output, dims in zip(spec.outputs, geometry.outputs)
    )


def stage_tactics(stage: str, launch: str, inputs: Tuple[trtp.TensorDesc, ...]) -> List[trtp.AutoTuneCombination]:
    """Autotune function of a GEMM stage: its one type combination, and the tactic (decode or prefill tiles) for
    the opt T of the profile being built, so the profile runs those tiles whatever the autotuner would time."""
    spec = MOE_STAGES[stage]
    attribute = decode(launch)
    types = ",".join(TYPE_STRINGS[spec_dtype(tensor, attribute.dtype)] for tensor in (*spec.inputs, *spec.outputs))
    index, per_slot = tokens_input(stage)
    shape = inputs[index].shape
    first = shape.opt[0] if shape.is_dynamic else shape[0]
    tokens = first // attribute.dims.top_k if per_slot else first
    return [trtp.AutoTuneCombination(types, "LINEAR", [attribute.tactic_for(max(int(tokens), 1))])]


def stage_kernel(stage: str, launch: str, inputs: Tuple[trtp.TensorDesc, ...], tactic: int) -> "AotKernel":
    """AOT implementation of a stage node: its one kernel (for a GEMM stage, the tactic's tiles), launch parameters
    and int32 extra arguments."""
    from moetrt.plugins.aot_kernels import engine_stage

    attribute = decode(launch)
    tactic = tactic if tactic in (DECODE_TACTIC, PREFILL_TACTIC) else DECODE_TACTIC
    compiled = engine_stage(stage, attribute, *build_target(), tactic=tactic)
    index, _ = tokens_input(stage)
    geometry = symbolic_geometry(stage, attribute, inputs[index].shape_expr[0], tactic)
    grid_x, grid_y, grid_z = geometry.grid
    launch_params = trtp.KernelLaunchParams(
        grid_x=grid_x, grid_y=grid_y, grid_z=grid_z, block_x=compiled.block_threads, shared_mem=compiled.shared_mem
    )
    extra_args = trtp.SymIntExprs(len(geometry.scalars))
    for position, scalar in enumerate(geometry.scalars):
        extra_args[position] = trtp.SymInt32(scalar)
    return compiled.kernel_name, compiled.ptx, launch_params, extra_args


@functools.lru_cache(maxsize=1)
def build_target() -> Tuple[int, int]:
    """(sm arch, PTX ISA version) of this machine's first GPU, its driver and the CUDA TensorRT was built with, which
    the engine is built for."""
    from moetrt.plugins.aot_kernels import ptx_version_for_driver

    devices, driver = hardware.cuda_devices(), hardware.cuda_driver_version()
    if not devices or driver is None:
        raise RuntimeError("compiling the routed-experts kernels for a TensorRT engine needs a CUDA GPU and driver")
    major, minor = devices[0].compute_capability
    arch = major * 10 + minor
    return arch, ptx_version_for_driver(driver, arch, tensorrt_cuda_major())


def launch_stage_jit(
    stage: str, launch: str, inputs: Tuple[trtp.Tensor, ...], outputs: Tuple[trtp.Tensor, ...], stream: int
) -> None:
    """JIT implementation of a stage node: its one Triton launch, on TensorRT's stream."""
    import torch

    from moetrt.plugins import triton_moe

    spec = MOE_STAGES[stage]
    names = (*spec.input_names, *(output.name for output in spec.outputs))
    tensors = {name: torch_view(tensor) for name, tensor in zip(names, (*inputs, *outputs))}
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        triton_moe.run_stage(stage, decode(launch), tensors)


class _CudaArray:
    """A TensorRT buffer as `__cuda_array_interface__`, which torch reads; bfloat16 goes as int16 and is viewed."""

    TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int32": "<i4"}

    def __init__(self, tensor: trtp.Tensor):
        shape: Tuple[int, ...] = tuple(tensor.shape)
        typestr = self.TYPESTR[DTYPE_NAMES[tensor.dtype]]
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (tensor.data_ptr, False),
                                         "version": 3, "strides": None}


def torch_view(tensor: trtp.Tensor) -> "torch.Tensor":
    import torch

    view = torch.as_tensor(_CudaArray(tensor), device="cuda")
    return view.view(torch.bfloat16) if tensor.dtype == trt.DataType.BF16 else view


# -- moetrt::RoutedExperts: the spec's node, JIT ---------------------------------------------------------------


@trtp.register(plugin_id(ROUTED_EXPERTS.op_type))
def routed_experts_shape(
    hidden: trtp.TensorDesc,
    topk_ids: trtp.TensorDesc,
    topk_weights: trtp.TensorDesc,
    w_gate_up: trtp.TensorDesc,
    w_down: trtp.TensorDesc,
    activation: str,
    block_size: npt.NDArray[np.int32],
) -> trtp.TensorDesc:
    activation = plugin_string(activation)
    if activation != ROUTED_EXPERTS.attributes["activation"]:
        raise ValueError(f"{plugin_id(ROUTED_EXPERTS.op_type)}: activation {activation!r} is not supported")
    dtype = DTYPE_NAMES.get(hidden.dtype, str(hidden.dtype))
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{plugin_id(ROUTED_EXPERTS.op_type)}: hidden is {dtype}")
    dtypes = (hidden.dtype, topk_ids.dtype, topk_weights.dtype, w_gate_up.dtype, w_down.dtype)
    check_inputs(ROUTED_EXPERTS.op_type, ROUTED_EXPERTS.required_inputs, dtypes, dtype)
    return hidden.like()


@trtp.impl(plugin_id(ROUTED_EXPERTS.op_type))
def routed_experts_jit(
    hidden: trtp.Tensor,
    topk_ids: trtp.Tensor,
    topk_weights: trtp.Tensor,
    w_gate_up: trtp.Tensor,
    w_down: trtp.Tensor,
    outputs: Tuple[trtp.Tensor],
    stream: int,
) -> None:
    import torch

    from moetrt.plugins import triton_moe

    views = [torch_view(tensor) for tensor in (hidden, topk_ids, topk_weights, w_gate_up, w_down)]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        if views[0].shape[0] == 0:
            return
        plan = triton_moe.plan_for(triton_moe.experts_shape(views[0], views[1], views[3], views[4]))
        tensors = triton_moe.plan_tensors(plan, dict(zip(triton_moe.INPUTS, views)))
        tensors["output"] = torch_view(outputs[0])
        triton_moe.run_plan(plan, tensors)


# -- the stage nodes: shape function, JIT and AOT implementations --------------------------------------------------
# tensorrt.plugin binds by signature, so each stage spells out its tensors; the bodies are the shared helpers above.

ALIGN, GATE_UP, DOWN, COMBINE = (plugin_id(MOE_STAGES[name].op_type) for name in ("align", "gate_up", "down", "combine"))


@trtp.register(ALIGN)
def align_shape(topk_ids: trtp.TensorDesc, launch: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    sorted_slots, block_experts, num_padded = stage_outputs("align", launch, (topk_ids,))
    return sorted_slots, block_experts, num_padded


@trtp.impl(ALIGN)
def align_jit(topk_ids: trtp.Tensor, launch: str, outputs: Tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor],
              stream: int) -> None:
    launch_stage_jit("align", launch, (topk_ids,), outputs, stream)


@trtp.register(GATE_UP)
def gate_up_shape(hidden: trtp.TensorDesc, w_gate_up: trtp.TensorDesc, sorted_slots: trtp.TensorDesc,
                  block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc, launch: str) -> trtp.TensorDesc:
    (act,) = stage_outputs("gate_up", launch, (hidden, w_gate_up, sorted_slots, block_experts, num_padded))
    return act


@trtp.impl(GATE_UP)
def gate_up_jit(hidden: trtp.Tensor, w_gate_up: trtp.Tensor, sorted_slots: trtp.Tensor, block_experts: trtp.Tensor,
                num_padded: trtp.Tensor, launch: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    inputs = (hidden, w_gate_up, sorted_slots, block_experts, num_padded)
    launch_stage_jit("gate_up", launch, inputs, outputs, stream)


@trtp.autotune(GATE_UP)
def gate_up_autotune(hidden: trtp.TensorDesc, w_gate_up: trtp.TensorDesc, sorted_slots: trtp.TensorDesc,
                     block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc, launch: str,
                     outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return stage_tactics("gate_up", launch, (hidden, w_gate_up, sorted_slots, block_experts, num_padded))


@trtp.register(DOWN)
def down_shape(act: trtp.TensorDesc, w_down: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
               sorted_slots: trtp.TensorDesc, block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc,
               launch: str) -> trtp.TensorDesc:
    (expert_out,) = stage_outputs("down", launch, (act, w_down, topk_weights, sorted_slots, block_experts, num_padded))
    return expert_out


@trtp.impl(DOWN)
def down_jit(act: trtp.Tensor, w_down: trtp.Tensor, topk_weights: trtp.Tensor, sorted_slots: trtp.Tensor,
             block_experts: trtp.Tensor, num_padded: trtp.Tensor, launch: str, outputs: Tuple[trtp.Tensor],
             stream: int) -> None:
    inputs = (act, w_down, topk_weights, sorted_slots, block_experts, num_padded)
    launch_stage_jit("down", launch, inputs, outputs, stream)


@trtp.autotune(DOWN)
def down_autotune(act: trtp.TensorDesc, w_down: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
                  sorted_slots: trtp.TensorDesc, block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc,
                  launch: str, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return stage_tactics("down", launch, (act, w_down, topk_weights, sorted_slots, block_experts, num_padded))


@trtp.register(COMBINE)
def combine_shape(expert_out: trtp.TensorDesc, launch: str) -> trtp.TensorDesc:
    (output,) = stage_outputs("combine", launch, (expert_out,))
    return output


@trtp.impl(COMBINE)
def combine_jit(expert_out: trtp.Tensor, launch: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    launch_stage_jit("combine", launch, (expert_out,), outputs, stream)


if AOT_AVAILABLE:

    @trtp.aot_impl(ALIGN)
    def align_aot(topk_ids: trtp.TensorDesc, launch: str,
                  outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int) -> AotKernel:
        return stage_kernel("align", launch, (topk_ids,), tactic)

    @trtp.aot_impl(GATE_UP)
    def gate_up_aot(hidden: trtp.TensorDesc, w_gate_up: trtp.TensorDesc, sorted_slots: trtp.TensorDesc,
                    block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc, launch: str,
                    outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotKernel:
        return stage_kernel("gate_up", launch, (hidden, w_gate_up, sorted_slots, block_experts, num_padded), tactic)

    @trtp.aot_impl(DOWN)
    def down_aot(act: trtp.TensorDesc, w_down: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
                 sorted_slots: trtp.TensorDesc, block_experts: trtp.TensorDesc, num_padded: trtp.TensorDesc,
                 launch: str, outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotKernel:
        return stage_kernel("down", launch, (act, w_down, topk_weights, sorted_slots, block_experts, num_padded),
                            tactic)

    @trtp.aot_impl(COMBINE)
    def combine_aot(expert_out: trtp.TensorDesc, launch: str, outputs: Tuple[trtp.TensorDesc],
                    tactic: int) -> AotKernel:
        return stage_kernel("combine", launch, (expert_out,), tactic)
