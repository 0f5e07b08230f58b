"""Runs Triton routed-experts cases under TRITON_INTERPRET=1 in its own process (triton reads the flag at import).

stdin: a JSON list of cases `{id, shape: ExpertsShape fields, config: TileConfig dict | null, seed, skew, form}`, where
`form` says how the case runs (FORMS below; "stages" when absent); stdout: a JSON object
`{id: {"error": relative error vs the reference, "problems": [what was wrong]}}`.
Scratch and output buffers start poisoned (NaN, or INT32_MAX for ints), so unwritten rows show up.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from moetrt.plugins import triton_moe  # noqa: E402
from moetrt.plugins.moe_inputs import poisoned, random_problem, relative_error  # noqa: E402
from moetrt.plugins.moe_launch import ExpertsShape, TileConfig  # noqa: E402
from moetrt.plugins.routed_experts import routed_experts_reference  # noqa: E402
from moetrt.plugins.triton_moe import routed_experts_triton  # noqa: E402
from moetrt.plugins.trt_stages import StageAttribute  # noqa: E402
from tests.plugins.poisoned_runs import garbage_problems, run_poisoned, run_stage_nodes  # noqa: E402


def expected_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int, capacity: int):
    """(sorted_slots, block_experts, num_padded) as moe_align_kernel must write them: stable, padded, filled."""
    flat = topk_ids.reshape(-1).tolist()
    sentinel = len(flat)
    rows, experts = [], []
    for expert in range(num_experts):
        slots = [slot for slot, chosen in enumerate(flat) if chosen == expert]
        padded = -(-len(slots) // block_m) * block_m
        rows += slots + [sentinel] * (padded - len(slots))
        experts += [expert] * (padded // block_m)
    num_padded = len(rows)
    rows += [sentinel] * (capacity - len(rows))
    experts += [-1] * (capacity // block_m - len(experts))
    return rows, experts, num_padded


def alignment_problems(plan, tensors) -> list[str]:
    capacity = plan.buffers["sorted_slots"].shape[0]
    rows, experts, num_padded = expected_alignment(
        tensors["topk_ids"], plan.shape.num_experts, plan.align_block, capacity
    )
    problems = []
    if tensors["sorted_slots"].tolist() != rows:
        problems.append("sorted_slots differ from a stable padded sort")
    if tensors["block_experts"].tolist() != experts:
        problems.append("block_experts differ")
    if tensors["num_padded"].item() != num_padded:
        problems.append(f"num_padded {tensors['num_padded'].item()} != {num_padded}")
    return problems


def scratch_problems(tensors) -> list[str]:
    """Rows every run must write: all of expert_out, and act up to num_padded."""
    problems = []
    if not torch.isfinite(tensors["expert_out"].float()).all():
        problems.append("expert_out has unwritten (NaN) rows")
    if not torch.isfinite(tensors["act"][: tensors["num_padded"].item()].float()).all():
        problems.append("act has unwritten (NaN) rows below num_padded")
    return problems


def run_stages(shape, config, problem, want) -> dict:
    """Stage by stage, checking the alignment before the GEMMs read it, then every row the stages must write."""
    plan = triton_moe.plan_for(shape, config)
    tensors = triton_moe.plan_tensors(plan, problem, allocate=poisoned)
    triton_moe.launch_stage(plan, 0, tensors)
    problems = alignment_problems(plan, tensors)
    if problems:  # the GEMMs would read garbage offsets: stop here
        return {"error": float("inf"), "problems": problems}
    for index in range(1, len(plan.stages)):
        triton_moe.launch_stage(plan, index, tensors)
    return {"error": relative_error(tensors["output"], want), "problems": scratch_problems(tensors)}


def run_public(shape, config, problem, want) -> dict:
    """The entry point users import, with its own buffers."""
    return {"error": relative_error(routed_experts_triton(**problem, config=config), want), "problems": []}


def run_twice(shape, config, problem, want) -> dict:
    """The whole plan twice from poisoned buffers: every expert_out row written, the outputs bitwise equal."""
    plan = triton_moe.plan_for(shape, config)
    first, second = run_poisoned(plan, problem), run_poisoned(plan, problem)
    problems = [] if torch.isfinite(first["expert_out"].float()).all() else ["expert_out rows left unwritten"]
    if not torch.equal(first["output"], second["output"]):
        problems.append("two runs differ")
    return {"error": relative_error(first["output"], want), "problems": problems}


def engine_attribute(shape, config) -> StageAttribute:
    """The stage attribute the `trt` lowering writes for `shape`, or one with `config` for every T."""
    if config is None:
        return StageAttribute.select(shape.dims, shape.act_dtype)
    return StageAttribute.uniform(shape.dims, shape.act_dtype, config)


def run_nodes(shape, config, problem, want) -> dict:
    """The four stage nodes in their JIT form, as a TensorRT engine chains them, with the tiles for T; then with the
    other tactic's tiles in one GEMM stage (two autotune choices may differ)."""
    attribute = engine_attribute(shape, config)
    errors = [relative_error(run_stage_nodes(attribute, problem), want)]
    for stage in ("gate_up", "down"):
        other = 3 - attribute.tactic_for(shape.num_tokens)  # tactics are 1 and 2
        errors.append(relative_error(run_stage_nodes(attribute, problem, tactics={stage: other}), want))
    return {"error": max(errors), "problems": []}


def run_garbage(shape, config, problem, want) -> dict:
    """Each stage kernel alone on arbitrary alignment buffers and ids, in guarded buffers: no access outside."""
    return {"error": 0.0, "problems": garbage_problems(engine_attribute(shape, config), shape.num_tokens, seed=11)}


FORMS = {"stages": run_stages, "public": run_public, "twice": run_twice, "stage_nodes": run_nodes,
         "garbage": run_garbage}


def run_case(case: dict) -> dict:
    shape = ExpertsShape(**case["shape"])
    config = TileConfig.from_dict(case["config"]) if case["config"] else None
    problem = random_problem(shape, case["seed"], skew=case["skew"])
    return FORMS[case.get("form", "stages")](shape, config, problem, routed_experts_reference(**problem))


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump({case["id"]: run_case(case) for case in cases}, sys.stdout)


if __name__ == "__main__":
    main()
