"""The Triton routed experts run as the tests check them, on a GPU or under Triton's CPU interpreter.

Every scratch and output buffer starts poisoned (moe_inputs.poisoned: NaN, INT32_MAX for ints), so a row a kernel
forgets to write shows up. `garbage_problems` runs each stage kernel alone on arbitrary alignment buffers, as
TensorRT's autotuner does, inside guarded buffers. Imports triton: a process that interprets sets TRITON_INTERPRET=1
before importing this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetrt.plugins import triton_moe
from moetrt.plugins.moe_inputs import DTYPES, poisoned
from moetrt.plugins.moe_launch import Buffer, LaunchPlan, StageGeometry
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import DECODE_TACTIC, GEMM_STAGES, PREFILL_TACTIC, StageAttribute

# Launches one stage node: (stage name, its tensors by spec name, its geometry at this T, the tactic).
StageLauncher = Callable[[str, dict[str, torch.Tensor], StageGeometry, int], None]
GUARD = 4096  # elements of guard before and after every buffer of a garbage run
GUARD_INT = -0x5A5A5A5A
GUARD_FLOAT = -1234.5
INT32 = (-(2**31), 2**31 - 1)


def run_poisoned(plan: LaunchPlan, problem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of `plan`, by buffer name, after its four launches from poisoned buffers."""
    tensors = triton_moe.plan_tensors(plan, problem, allocate=poisoned)
    triton_moe.run_plan(plan, tensors)
    return tensors


def stage_outputs(attribute: StageAttribute, stage: str, tokens: int, device) -> dict[str, torch.Tensor]:
    """A stage node's outputs, sized by the plugin's shape formulas at this T and poisoned."""
    geometry = attribute.geometry(stage, tokens, min)
    outputs = {}
    for output, dims in zip(MOE_STAGES[stage].outputs, geometry.outputs):
        dtype = output.dtypes[0] if len(output.dtypes) == 1 else attribute.dtype
        outputs[output.name] = poisoned(Buffer(output.name, tuple(dims), dtype, "scratch"), device)
    return outputs


def run_stage_nodes(
    attribute: StageAttribute,
    problem: dict[str, torch.Tensor],
    launch: StageLauncher | None = None,
    tactics: dict[str, int] | None = None,
) -> torch.Tensor:
    """The four stage nodes chained as an engine runs them; returns the output `[T, H]`.

    Each stage's outputs are sized by the plugin's shape formulas (its StageAttribute's geometry at this T) and
    poisoned; `launch` runs the stage, by default in its JIT form (the one Triton launch @trtp.impl makes). tactics:
    a GEMM stage's tactic (decode or prefill tiles), by default the one for this T; the two GEMMs may differ, as two
    TensorRT autotune choices may.
    """
    tokens, device = problem["hidden"].shape[0], problem["hidden"].device
    tensors = triton_moe.plan_tensors(attribute.plan(tokens, interpret=triton_moe.interpreting()), problem)
    for stage, spec in MOE_STAGES.items():
        tactic = (tactics or {}).get(stage, attribute.tactic_for(tokens))
        tensors.update(stage_outputs(attribute, stage, tokens, device))
        names = (*spec.input_names, *(output.name for output in spec.outputs))
        stage_tensors = {name: tensors[name] for name in names}
        if launch is None:
            triton_moe.run_stage(stage, attribute, stage_tensors, tactic)
        else:
            launch(stage, stage_tensors, attribute.geometry(stage, tokens, min, tactic), tactic)
    return tensors["output"]


# -- the kernels on arbitrary inputs, as TensorRT's autotuner feeds them -------------------------------------------


class Guarded:
    """Tensors inside larger allocations with GUARD elements either side. Inputs' guards hold NaN (GUARD_INT for
    ints): a kernel that reads past an input takes in NaN. Outputs' guards hold GUARD_FLOAT (GUARD_INT): a kernel
    that writes past an output changes them, NaN included."""

    def __init__(self, device):
        self.device = device
        self.arenas: dict[str, tuple[torch.Tensor, float]] = {}

    def tensor(self, name: str, values: torch.Tensor, output: bool = False) -> torch.Tensor:
        fill = (GUARD_FLOAT if output else float("nan")) if values.dtype.is_floating_point else GUARD_INT
        arena = torch.full((values.numel() + 2 * GUARD,), fill, dtype=values.dtype, device=self.device)
        view = arena[GUARD : GUARD + values.numel()].view(values.shape)
        view.copy_(values.to(self.device))
        self.arenas[name] = arena, fill
        return view

    def problems(self) -> list[str]:
        found = []
        for name, (arena, fill) in self.arenas.items():
            guards = torch.cat([arena[:GUARD], arena[-GUARD:]])
            intact = guards.isnan().all() if fill != fill else (guards == fill).all()
            if not bool(intact):
                found.append(f"{name}: a guard region was written")
        return found


def garbage_ints(count: int, low: int, high: int, generator: torch.Generator, kind: str) -> torch.Tensor:
    """int32 values a buffer of alignment results might hold when it is not one: `kind` 'wild' (anything, INT32's
    ends included), 'near' (around the valid range, either side) or 'valid' (inside [low, high))."""
    if kind == "valid":
        return torch.randint(low, max(high, low + 1), (count,), generator=generator, dtype=torch.int32)
    span = max(high - low, 1)
    values = torch.randint(low - 3 * span, high + 3 * span, (count,), generator=generator, dtype=torch.int64)
    if kind == "wild":
        picks = torch.randint(0, 4, (count,), generator=generator)
        ends = torch.tensor(INT32)[torch.randint(0, 2, (count,), generator=generator)]
        values = torch.where(picks == 0, ends, values)
    return values.clamp(*INT32).to(torch.int32)


GARBAGE_KINDS = ("wild", "near", "valid")


def garbage_problems(attribute: StageAttribute, tokens: int, seed: int, device="cpu",
                     launch: StageLauncher | None = None) -> list[str]:
    """Each stage kernel (both tactics of the GEMMs) run alone at T=`tokens` on arbitrary alignment buffers and
    topk_ids, every buffer guarded: what went wrong (guards written, NaN read from a guard), [] when nothing.
    `launch` as for run_stage_nodes (JIT by default)."""
    generator = torch.Generator().manual_seed(seed)
    finite = finite_inputs(attribute, tokens, generator)
    found = []
    for stage in MOE_STAGES:
        tactics = (DECODE_TACTIC, PREFILL_TACTIC) if stage in GEMM_STAGES else (DECODE_TACTIC,)
        for tactic in tactics:
            for trial, kind in enumerate(GARBAGE_KINDS * 2):
                values = {**finite, **garbage_inputs(attribute, tokens, kind, generator)}
                guarded = Guarded(device)
                tensors = {name: guarded.tensor(name, values[name]) for name in MOE_STAGES[stage].input_names}
                for name, output in stage_outputs(attribute, stage, tokens, device).items():
                    tensors[name] = guarded.tensor(name, torch.zeros_like(output), output=True)
                if launch is None:
                    triton_moe.run_stage(stage, attribute, tensors, tactic)
                else:
                    launch(stage, tensors, attribute.geometry(stage, tokens, min, tactic), tactic)
                label = f"{stage} tactic {tactic} trial {trial} ({kind})"
                found += [f"{label}: {problem}" for problem in guarded.problems()]
                for output in MOE_STAGES[stage].outputs:
                    values = tensors[output.name]
                    if values.dtype.is_floating_point and not bool(torch.isfinite(values.float()).all()):
                        found.append(f"{label}: {output.name} took in NaN: a read outside the inputs")
    return found


def finite_inputs(attribute: StageAttribute, tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random activations and weights for every stage, sized as at T=`tokens` (host tensors)."""
    d, dtype = attribute.dims, DTYPES[attribute.dtype]
    rows = attribute.geometry("align", tokens, min).outputs[0][0]
    return {
        "topk_weights": torch.rand(tokens, d.top_k, generator=generator),
        "hidden": torch.randn(tokens, d.hidden, generator=generator).to(dtype),
        "w_gate_up": (torch.randn(d.num_experts, 2 * d.inter, d.hidden, generator=generator) * 0.05).to(dtype),
        "w_down": (torch.randn(d.num_experts, d.hidden, d.inter, generator=generator) * 0.05).to(dtype),
        "act": torch.randn(rows, d.inter, generator=generator).to(dtype),
        "expert_out": torch.randn(tokens * d.top_k, d.hidden, generator=generator).to(dtype),
    }


def garbage_inputs(attribute: StageAttribute, tokens: int, kind: str, generator: torch.Generator):
    """topk_ids and alignment buffers of `kind` (GARBAGE_KINDS), sized as at T=`tokens`."""
    d = attribute.dims
    slots = tokens * d.top_k
    (rows,), (blocks,), _ = attribute.geometry("align", tokens, min).outputs
    num_padded = {"wild": garbage_ints(1, -rows, 1000 * rows, generator, "wild"),
                  "near": garbage_ints(1, rows, rows + 3 * attribute.block_m, generator, "valid"),
                  "valid": torch.tensor([rows], dtype=torch.int32)}[kind]
    return {
        "topk_ids": garbage_ints(slots, 0, d.num_experts, generator, kind).view(tokens, d.top_k),
        "sorted_slots": garbage_ints(rows, 0, slots, generator, kind),
        "block_experts": garbage_ints(blocks, -1, d.num_experts, generator, kind),
        "num_padded": num_padded,
    }
