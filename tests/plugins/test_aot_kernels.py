"""PTX for sm_90 compiled on the CPU, and each `.entry` parameter list against what TensorRT will pass."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from moetrt.plugins.aot_kernels import (
    HIDDEN_POINTERS,
    PORTABLE_SHARED_BYTES,
    aot_launch,
    entry_param_problems,
    hidden_params,
    main,
    ptx_entry,
    ptx_version_cap,
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


@pytest.mark.parametrize("driver, ptxas, tensorrt, want", [
    (13000, "13.0", 13, 90),  # all CUDA 13
    (13000, "13.0", 12, 80),  # a TensorRT for CUDA 12 (any 12.x toolkit) on a CUDA 13 driver: 12.0's PTX 8.0
    (12090, "13.0", 12, 80),
    (12080, "13.0", 13, 87),  # the driver caps first
    (13000, "12.8", 13, 87),  # Triton's ptxas caps first
    (12080, "12.8", None, 87),  # no TensorRT in the picture: driver and ptxas only
])
def test_ptx_version_is_capped_by_driver_ptxas_and_tensorrts_cuda(driver, ptxas, tensorrt, want):
    assert ptx_version_cap(driver, ptxas, 90, tensorrt) == want


def test_ptx_cap_for_cuda_12_tensorrt_keeps_what_the_gpu_target_needs():
    assert ptx_version_cap(13000, "13.0", 100, 12) == 86  # sm_100a needs PTX 8.6: a CUDA 12 TensorRT for it has it
    with pytest.raises(ValueError, match="sm_90 needs PTX 8.0"):
        ptx_version_cap(11080, "13.0", 90, 12)  # a CUDA 11.8 driver cannot run sm_90a PTX at all


def test_stages_compile_at_the_ptx_a_cuda_12_tensorrt_takes():
    """PTX 8.0 (what every CUDA 12 toolkit reads) compiles for sm_90a through Triton and its ptxas."""
    aot = aot_launch(SHAPES["fp32-ragged"], ptx_version=ptx_version_cap(13000, "13.0", 90, 12))
    for stage in aot.stages:
        assert re.search(r"^\.version 8\.0$", stage.ptx, re.MULTILINE) and ".target sm_90a" in stage.ptx
        assert entry_param_problems(stage) == []


def entry(*params: str) -> str:
    body = ",\n".join(f"\t.param {param} p{i}" for i, param in enumerate(params))
    return f".visible .entry k(\n{body}\n)\n{{\n}}\n"


def test_hidden_pointers_are_counted_from_the_ptx_entry():
    """Triton 3.4 appends one scratch pointer, 3.5 and later two: the launch passes null for each it declares."""
    pointer = ".u64 .ptr .global .align 1"
    one, two = entry(pointer, ".u32", pointer), entry(pointer, ".u32", pointer, pointer)
    assert [p.name for p in hidden_params(one, 2)] == ["global_scratch"]
    assert [(p.name, p.kind) for p in hidden_params(two, 2)] == [(name, "hidden") for name in HIDDEN_POINTERS]
    assert hidden_params(entry(pointer, ".u32"), 2) == []
    with pytest.raises(ValueError, match="not a pointer"):
        hidden_params(entry(pointer, ".u32", ".u32"), 2)


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
    from moetrt.plugins.trt_stages import StageAttribute

    from moetrt.plugins.trt_stages import DECODE_TACTIC, PREFILL_TACTIC

    attribute = StageAttribute.select(SHAPES["bf16-decode"].dims, "bfloat16")
    for tactic, tokens in ((DECODE_TACTIC, 1), (DECODE_TACTIC, 300), (PREFILL_TACTIC, 4096)):
        plan = attribute.plan(tokens, tactic=tactic)
        for launch in plan.stages:
            compiled = engine_stage(launch.name, attribute, 90, None, tactic=tactic)
            assert entry_param_problems(compiled) == [] and compiled.shared_mem <= PORTABLE_SHARED_BYTES
            geometry = attribute.geometry(launch.name, tokens, min, tactic)
            at_t = launch_at(compiled, geometry.grid, geometry.scalars)
            assert at_t.grid == launch.grid and at_t.extra_args == tuple(value for _, value in launch.scalars)
            assert at_t.ptx == compiled.ptx
    gate_up = [engine_stage("gate_up", attribute, 90, None, tactic=t).ptx for t in (DECODE_TACTIC, PREFILL_TACTIC)]
    assert gate_up[0] != gate_up[1]  # the two tactics are two kernels


def test_triton_is_pinned_to_one_range_that_admits_this_triton():
    """The AOT path reads Triton's compiler metadata and PTX; pyproject admits the versions it was checked with."""
    tomllib = pytest.importorskip("tomllib")
    import triton
    from packaging.specifiers import SpecifierSet

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {requirement for extra in ("gpu", "dev") for requirement in extras[extra] if requirement.startswith("triton")}
    assert len(pins) == 1, pins
    allowed = SpecifierSet(pins.pop().removeprefix("triton"))
    assert triton.__version__ in allowed
    assert {"3.4.0", "3.6.0", "3.9.0"} <= set(allowed.filter(["3.3.1", "3.4.0", "3.6.0", "3.9.0", "3.10.0"]))
    assert "3.10.0" not in allowed and "3.3.1" not in allowed
