"""PTX for sm_90 compiled on the CPU, and each `.entry` parameter list against what TensorRT will pass."""

import dataclasses
import json
import re

import pytest

from moetrt.plugins.aot_kernels import (
    HIDDEN_POINTERS,
    PORTABLE_SHARED_BYTES,
    aot_launch,
    entry_param_problems,
    main,
    ptx_entry,
)
from moetrt.plugins.moe_launch import ExpertsShape

V3 = dict(hidden=7168, inter=2048, num_experts=256, top_k=8)
SHAPES = {
    "bf16-decode": ExpertsShape(num_tokens=4, **V3),
    "bf16-prefill": ExpertsShape(num_tokens=4096, **V3),
    "fp32-ragged": ExpertsShape(37, 200, 136, 8, 2, "float32", "float32"),
}
# What TensorRT binds per stage: plugin inputs, int32 extra args, plugin outputs; then Triton's two scratch pointers.
EXPECTED = {
    "align": (("topk_ids",), ("num_slots", "max_blocks"), ("sorted_slots", "block_experts", "num_padded")),
    "gate_up": (("hidden", "w_gate_up", "sorted_slots", "block_experts", "num_padded"), ("num_slots",), ("act",)),
    "down": (
        ("act", "w_down", "topk_weights", "sorted_slots", "block_experts", "num_padded"), ("num_slots",), ("expert_out",)
    ),
    "combine": (("expert_out",), (), ("output",)),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def compiled(request):
    return request.param, aot_launch(SHAPES[request.param])


def test_ptx_parameters_match_the_arguments_tensorrt_passes(compiled):
    _, aot = compiled
    assert [stage.name for stage in aot.stages] == list(EXPECTED)
    for stage in aot.stages:
        inputs, scalars, outputs = EXPECTED[stage.name]
        kinds = [(p.name, p.kind) for p in stage.params]
        want = [(n, "input") for n in inputs] + [(n, "scalar") for n in scalars] + [(n, "output") for n in outputs]
        assert kinds == want + [(name, "hidden") for name in HIDDEN_POINTERS]
        name, declared = ptx_entry(stage.ptx)
        assert name == stage.kernel_name
        assert declared == [(".u32", False) if p.kind == "scalar" else (".u64", True) for p in stage.params]
        assert entry_param_problems(stage) == []


def test_stages_describe_their_launch_and_buffers(compiled):
    _, aot = compiled
    plan = aot.plan
    for stage in aot.stages:
        assert stage.block_threads == stage.launch.num_warps * 32
        assert stage.shared_mem <= 227 * 1024  # an H200 block's most
        assert ".target sm_90a" in stage.ptx
        assert stage.inputs == tuple(plan.buffers[p.name] for p in stage.params if p.kind == "input")
        assert stage.outputs == tuple(plan.buffers[p.name] for p in stage.params if p.kind == "output")
        scalars = dict(stage.launch.scalars)
        assert stage.extra_args == tuple(scalars.values())
    assert aot.stages[0].extra_args == (plan.shape.num_slots, plan.buffers["block_experts"].shape[0])


def test_the_check_catches_a_launch_that_disagrees_with_the_ptx():
    stage = aot_launch(SHAPES["fp32-ragged"]).stages[1]
    swapped = dataclasses.replace(stage, params=(stage.params[5], *stage.params[:5], *stage.params[6:]))
    assert entry_param_problems(swapped)
    short = dataclasses.replace(stage, params=stage.params[:-1])  # forgetting a hidden pointer
    assert any("declares 9 parameters" in problem for problem in entry_param_problems(short))


def test_a_shared_memory_cap_keeps_grids_and_fits():
    shape = SHAPES["bf16-prefill"]
    capped = aot_launch(shape, max_shared_bytes=PORTABLE_SHARED_BYTES)
    free = aot_launch(shape)
    assert [s.grid for s in capped.stages] == [s.grid for s in free.stages]
    assert all(s.shared_mem <= PORTABLE_SHARED_BYTES for s in capped.stages)
    assert any(s.needs_shared_opt_in for s in free.stages)


def test_ptx_version_can_be_held_to_an_older_driver():
    stage = aot_launch(SHAPES["fp32-ragged"], ptx_version=84).stages[3]
    assert re.search(r"^\.version 8\.4$", stage.ptx, re.MULTILINE)


def test_command_line_writes_ptx_and_a_description(tmp_path, capsys):
    assert main(["--tokens=3", "--hidden=40", "--inter=24", "--experts=4", "--top-k=2", f"--out={tmp_path}"]) == 0
    described = json.loads((tmp_path / "stages.json").read_text())
    assert [stage["name"] for stage in described["stages"]] == list(EXPECTED)
    assert (tmp_path / "gate_up.ptx").read_text().count(".entry") == 1
    assert "gate_up: moe_gate_up_kernel" in capsys.readouterr().out


def test_ptx_does_not_depend_on_the_token_count():
    """One engine serves every T of a profile: only grids and int32 extra args change with T."""
    config = aot_launch(SHAPES["bf16-decode"]).plan.config
    few, many = (aot_launch(dataclasses.replace(SHAPES["bf16-decode"], num_tokens=t), config) for t in (3, 300))
    assert [s.ptx for s in few.stages] == [s.ptx for s in many.stages]
    assert [s.extra_args for s in few.stages] != [s.extra_args for s in many.stages]


def test_engine_kernels_are_one_ptx_per_stage_launched_at_every_t():
    """What the TensorRT AOT implementations return: one capped PTX per stage, launched with the geometry's grid and
    extra args for each T, exactly as a plan compiled at that T would be."""
    from moetrt.plugins.aot_kernels import engine_stage, launch_at
    from moetrt.plugins.moe_launch import plan_launch, stage_geometry
    from moetrt.plugins.trt_stages import StageAttribute

    shape = SHAPES["bf16-decode"]
    attribute = StageAttribute(shape.dims, "bfloat16", aot_launch(shape).plan.config)
    for tokens in (1, 300):
        plan = plan_launch(attribute.shape(tokens), attribute.config)
        for launch in plan.stages:
            compiled = engine_stage(launch.name, attribute, 90, None)
            assert entry_param_problems(compiled) == [] and compiled.shared_mem <= PORTABLE_SHARED_BYTES
            geometry = stage_geometry(launch.name, tokens, attribute.dims, attribute.config, min)
            at_t = launch_at(compiled, geometry.grid, geometry.scalars)
            assert at_t.grid == launch.grid and at_t.extra_args == tuple(value for _, value in launch.scalars)
            assert at_t.ptx == compiled.ptx
