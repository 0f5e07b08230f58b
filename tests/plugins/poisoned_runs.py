"""The Triton routed experts run as the tests check them, on a GPU or under Triton's CPU interpreter.

Every scratch and output buffer starts poisoned (moe_inputs.poisoned: NaN, INT32_MAX for ints), so a row a kernel
forgets to write shows up. Imports triton: a process that interprets sets TRITON_INTERPRET=1 before importing this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetrt.plugins import triton_moe
from moetrt.plugins.moe_inputs import poisoned
from moetrt.plugins.moe_launch import Buffer, LaunchPlan, StageGeometry, stage_geometry
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import StageAttribute

# Launches one stage node: (stage name, its tensors by spec name, its geometry at this T).
StageLauncher = Callable[[str, dict[str, torch.Tensor], StageGeometry], None]


def run_poisoned(plan: LaunchPlan, problem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of `plan`, by buffer name, after its four launches from poisoned buffers."""
    tensors = triton_moe.plan_tensors(plan, problem, allocate=poisoned)
    triton_moe.run_plan(plan, tensors)
    return tensors


def run_stage_nodes(
    attribute: StageAttribute, problem: dict[str, torch.Tensor], launch: StageLauncher | None = None
) -> torch.Tensor:
    """The four stage nodes chained as an engine runs them; returns the output `[T, H]`.

    Each stage's outputs are sized by the plugin's shape formulas (moe_launch.stage_geometry at this T) and poisoned;
    `launch` runs the stage, by default in its JIT form (the one Triton launch @trtp.impl makes).
    """
    tokens, device = problem["hidden"].shape[0], problem["hidden"].device
    tensors = triton_moe.plan_tensors(triton_moe.plan_for(attribute.shape(tokens), attribute.config), problem)
    for stage, spec in MOE_STAGES.items():
        geometry = stage_geometry(stage, tokens, attribute.dims, attribute.config, min)
        for output, dims in zip(spec.outputs, geometry.outputs):
            dtype = output.dtypes[0] if len(output.dtypes) == 1 else attribute.dtype
            tensors[output.name] = poisoned(Buffer(output.name, tuple(dims), dtype, "scratch"), device)
        names = (*spec.input_names, *(output.name for output in spec.outputs))
        stage_tensors = {name: tensors[name] for name in names}
        if launch is None:
            triton_moe.run_stage(stage, attribute, stage_tensors)
        else:
            launch(stage, stage_tensors, geometry)
    return tensors["output"]
