"""The stage nodes of the trt lowering: their attribute, their geometry as formulas of T, their torch semantics."""

import dataclasses
import random

import pytest
import torch

from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_inputs import random_problem
from moetrt.plugins.moe_launch import ExpertsShape, plan_launch, stage_geometry
from moetrt.plugins.routed_experts import moe_stage_reference, routed_experts_reference
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import StageAttribute, tokens_input


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
        tokens = Symbol(lambda t: t)
        for stage in MOE_STAGES:
            geometry = stage_geometry(stage, tokens, shape.dims, config, symbolic_min)
            for t in (1, 2, 7, 64, 513, 4096):
                plan = plan_launch(dataclasses.replace(shape, num_tokens=t), config)
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
    attribute = StageAttribute(shape.dims, "bfloat16", select_config(shape))
    assert StageAttribute.decode(attribute.encode()) == attribute
    assert attribute.shape(9) == ExpertsShape(9, 48, 24, 8, 3, "bfloat16", "bfloat16")
    for bad in ("", "{}", attribute.encode().replace("bfloat16", "float8")):
        with pytest.raises(ValueError, match="bad `launch` attribute"):
            StageAttribute.decode(bad)


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
