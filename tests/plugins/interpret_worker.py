"""Runs Triton dispatch cases under TRITON_INTERPRET=1 in its own process (triton reads the flag at import).

stdin: a JSON list of cases `{id, shape: DispatchShape fields, config: DispatchConfig dict | null, seed, skew,
public: run through moetrt.plugins.moe_dispatch.moe_dispatch_triton instead of stage by stage}`;
stdout: a JSON object `{id: {"error": relative error vs the reference, "problems": [what was wrong]}}`.
Scratch and output buffers start poisoned (NaN, or INT32_MAX for ints), so unwritten rows show up.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from moetrt.plugins import triton_moe  # noqa: E402
from moetrt.plugins.moe_dispatch import moe_dispatch_reference, moe_dispatch_triton  # noqa: E402
from moetrt.plugins.moe_inputs import random_problem, relative_error  # noqa: E402
from moetrt.plugins.moe_launch import DispatchConfig, DispatchShape  # noqa: E402

POISON_INT = 2**31 - 1


def poisoned(buffer, device):
    tensor = triton_moe.empty_buffer(buffer, device)
    return tensor.fill_(POISON_INT if buffer.dtype == "int32" else float("nan"))


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
        tensors["topk_ids"], plan.shape.num_experts, plan.config.block_m, capacity
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


def run_case(case: dict) -> dict:
    shape = DispatchShape(**case["shape"])
    config = DispatchConfig.from_dict(case["config"]) if case["config"] else None
    problem = random_problem(shape, case["seed"], skew=case["skew"])
    want = moe_dispatch_reference(**problem)
    if case.get("public"):  # the entry point users import, with its own buffers
        return {"error": relative_error(moe_dispatch_triton(**problem, config=config), want), "problems": []}
    plan = triton_moe.plan_for(shape, config)
    tensors = triton_moe.dispatch_tensors(plan, problem, allocate=poisoned)
    triton_moe.launch_stage(plan, 0, tensors)
    problems = alignment_problems(plan, tensors)
    if problems:  # the GEMMs would read garbage offsets: stop here
        return {"error": float("inf"), "problems": problems}
    for index in range(1, len(plan.stages)):
        triton_moe.launch_stage(plan, index, tensors)
    return {"error": relative_error(tensors["output"], want), "problems": scratch_problems(tensors)}


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump({case["id"]: run_case(case) for case in cases}, sys.stdout)


if __name__ == "__main__":
    main()
