"""The stage nodes of the trt lowering: their attribute, their geometry as formulas of T, their torch semantics."""

import dataclasses
import json
import random
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_inputs import random_problem
from moetrt.plugins.moe_launch import ExpertDims, ExpertsShape, plan_launch, stage_geometry
from moetrt.plugins.routed_experts import moe_stage_reference, routed_experts_reference
from moetrt.plugins.spec import MOE_STAGES, ROUTED_EXPERTS
from moetrt.plugins.trt_stages import (
    DECODE_TACTIC,
    PREFILL_TACTIC,
    StageAttribute,
    plugin_string,
    tokens_input,
)

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = sorted((ROOT / "build" / "trt-plugin").glob("*/tensorrt/plugin/_lib.py"))
V3 = ExpertDims(hidden=7168, inter=2048, num_experts=256, top_k=8)
# How tensorrt.plugin's creator (_TemplatePluginCreator.create_plugin, 10.13 and 11.4) turns a STRING field into
# the `str` a plugin function receives; test_the_creators_decode_is_the_one_tested_here reads it from NVIDIA's code.
CREATOR_STRING_DECODE = 'f.data.tobytes().decode("utf-8")'


class Symbol:
    """A symbolic dimension with only the operators TensorRT's ShapeExpr has (no reflected ones, no int()):
    formulas that run on it also run on TensorRT's expressions; `value(T)` evaluates it."""

    def __init__(self, evaluate):
        self.value = evaluate

    def _op(self, other, fn):
        right = other.value if isinstance(other, Symbol) else (lambda t, constant=other: constant)
        return Symbol(lambda t: fn(self.value(t), right(t)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)


def symbolic_min(a, b):
    return a._op(b, min)


def evaluate(dim, tokens):
    return dim.value(tokens) if isinstance(dim, Symbol) else dim


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_symbolic_geometry_matches_every_plan(dtype):
    rng = random.Random(0)
    for _ in range(40):
        experts = rng.randint(1, 70)
        shape = ExpertsShape(1, rng.randint(8, 300), rng.randint(8, 300), experts, rng.randint(1, min(8, experts)),
                              dtype, dtype)
        config = select_config(shape)
        align_block = config.block_m * rng.choice([1, 2, 4])
        tokens = Symbol(lambda t: t)
        for stage in MOE_STAGES:
            geometry = stage_geometry(stage, tokens, shape.dims, config, symbolic_min, align_block)
            for t in (1, 2, 7, 64, 513, 4096):
                plan = plan_launch(dataclasses.replace(shape, num_tokens=t), config, align_block=align_block)
                launch = next(s for s in plan.stages if s.name == stage)
                assert tuple(evaluate(d, t) for d in geometry.grid) == launch.grid
                assert tuple(evaluate(d, t) for d in geometry.scalars) == tuple(v for _, v in launch.scalars)
                for name, dims in zip(launch.outputs, geometry.outputs):
                    assert tuple(evaluate(d, t) for d in dims) == plan.buffers[name].shape


def test_each_stage_finds_the_token_count_in_its_own_inputs():
    shape = ExpertsShape(37, 40, 24, 8, 3, "float32", "float32")
    plan = plan_launch(shape, select_config(shape))
    for stage, spec in MOE_STAGES.items():
        index, per_slot = tokens_input(stage)
        first = plan.buffers[spec.input_names[index]].shape[0]
        assert (first // shape.top_k if per_slot else first) == shape.num_tokens


def test_stage_specs_name_the_plans_tensors():
    shape = ExpertsShape(5, 40, 24, 8, 3, "float32", "float32")
    for launch in plan_launch(shape, select_config(shape)).stages:
        spec = MOE_STAGES[launch.name]
        assert launch.inputs == spec.input_names
        assert launch.outputs == tuple(output.name for output in spec.outputs)


def test_attribute_round_trips_and_rejects_garbage():
    shape = ExpertsShape(64, 48, 24, 8, 3, "bfloat16", "bfloat16")
    attribute = StageAttribute.select(shape.dims, "bfloat16")
    assert StageAttribute.decode(attribute.encode()) == attribute
    assert attribute.shape(9) == ExpertsShape(9, 48, 24, 8, 3, "bfloat16", "bfloat16")
    for bad in ("", "{}", attribute.encode().replace("bfloat16", "float8")):
        with pytest.raises(ValueError, match="bad `launch` attribute"):
            StageAttribute.decode(bad)


def parser_field(text: str) -> types.SimpleNamespace:
    """A STRING attribute as TensorRT's ONNX parser hands it to a plugin creator: a PluginField whose data is the
    string's bytes with the C terminator (a numpy int8 array, as the bindings give CHAR fields)."""
    return types.SimpleNamespace(name="launch", data=np.frombuffer(text.encode() + b"\0", dtype=np.int8))


def creator_decode(field: types.SimpleNamespace, expression: str = CREATOR_STRING_DECODE) -> str:
    return eval(expression, {}, {"f": field})  # NVIDIA's one expression, applied as their creator applies it


def test_a_nul_terminated_launch_attribute_decodes_through_the_creators_path():
    attribute = StageAttribute.select(V3, "bfloat16")
    received = creator_decode(parser_field(attribute.encode()))
    assert received.endswith("\x00")
    with pytest.raises(json.JSONDecodeError, match="Extra data"):  # what an exact decode would do
        json.loads(received)
    assert StageAttribute.decode(received) == attribute
    activation = creator_decode(parser_field(ROUTED_EXPERTS.attributes["activation"]))
    assert activation == "silu\x00" and plugin_string(activation) == "silu"
    assert plugin_string("silu") == "silu"


@pytest.mark.skipif(not PLUGIN_SOURCES, reason="tensorrt.plugin sources not fetched (build/trt-plugin; `make test`)")
@pytest.mark.parametrize("source", PLUGIN_SOURCES, ids=[p.parents[2].name for p in PLUGIN_SOURCES])
def test_the_creators_decode_is_the_one_tested_here(source):
    """Read from NVIDIA's own tensorrt.plugin source: how create_plugin decodes a `str` attribute."""
    branch = re.search(r"if issubclass\(attr_type_annot, str\):\s*\n\s*attrs\[f\.name\] = (.+)", source.read_text())
    assert branch, f"{source}: create_plugin no longer decodes str attributes where this test looks"
    expression = branch.group(1).strip()
    assert expression == CREATOR_STRING_DECODE
    attribute = StageAttribute.select(V3, "float16")
    assert StageAttribute.decode(creator_decode(parser_field(attribute.encode()), expression)) == attribute


def test_engine_attribute_has_decode_and_prefill_tiles_on_one_layout():
    attribute = StageAttribute.select(V3, "bfloat16")
    assert attribute.decode_tiles.block_m == 16 and attribute.prefill_tiles.block_m == 64
    assert attribute.block_m == 64 and attribute.prefill_from == 32 * 256 // 8 + 1  # > 32 rows per expert
    assert [attribute.tactic_for(t) for t in (1, 64, 1024, 1025, 4096)] == [DECODE_TACTIC] * 3 + [PREFILL_TACTIC] * 2
    for stage in MOE_STAGES:  # TensorRT's shape functions see no tactic: outputs must not depend on it
        for tokens in (1, 64, 4096):
            decode, prefill = (attribute.geometry(stage, tokens, min, t) for t in (DECODE_TACTIC, PREFILL_TACTIC))
            assert decode.outputs == prefill.outputs
            plan = attribute.plan(tokens)
            launch = next(s for s in plan.stages if s.name == stage)
            assert attribute.geometry(stage, tokens, min, attribute.tactic_for(tokens)).grid == launch.grid


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 8, 3, 16), (37, 8, 3, 16), (300, 4, 2, 64)])
def test_stage_references_compose_to_the_routed_experts_reference(tokens, experts, top_k, block_m):
    shape = ExpertsShape(tokens, 40, 24, experts, top_k, "float32", "float32")
    problem = random_problem(shape, 3, "cpu", skew=3.0)
    aligned = moe_stage_reference("align", shape.dims, block_m, problem["topk_ids"])
    sorted_slots, block_experts, num_padded = aligned
    config = dataclasses.replace(select_config(shape), block_m=block_m)
    assert sorted_slots.shape == plan_launch(shape, config).buffers["sorted_slots"].shape
    assert (block_experts[int(num_padded) // block_m:] == -1).all()
    act, = moe_stage_reference("gate_up", shape.dims, block_m, problem["hidden"], problem["w_gate_up"], *aligned)
    expert_out, = moe_stage_reference("down", shape.dims, block_m, act, problem["w_down"], problem["topk_weights"],
                                      *aligned)
    output, = moe_stage_reference("combine", shape.dims, block_m, expert_out)
    want = routed_experts_reference(**problem)
    assert torch.allclose(output, want, rtol=1e-5, atol=1e-6)
