"""Launch plans and the block-size table: pure functions of shapes."""

import random

import pytest

from moetrt.bench.tune_moe import merge_tuned
from moetrt.plugins.moe_configs import load_table, select_config, shape_key
from moetrt.plugins.moe_kernels import KERNELS
from moetrt.plugins.moe_launch import (
    ExpertsShape,
    GemmTile,
    TileConfig,
    max_blocks,
    plan_launch,
    triton_signature,
)

V3 = dict(hidden=7168, inter=2048, num_experts=256, top_k=8)
CONFIG = TileConfig(16, GemmTile(64, 128), GemmTile(64, 64))


def test_max_blocks_bounds_every_routing():
    rng = random.Random(0)
    for _ in range(500):
        experts, block_m = rng.randint(1, 70), rng.choice([16, 32, 64, 128])
        slots = rng.randint(1, 600)
        counts = [0] * experts
        for _ in range(slots):
            counts[rng.randrange(experts) if rng.random() < 0.5 else 0] += 1
        used = sum(-(-count // block_m) for count in counts)
        assert used <= max_blocks(slots, experts, block_m)


def test_decode_plan_is_tight_at_deepseek_v3_shapes():
    plan = plan_launch(ExpertsShape(num_tokens=1, **V3), CONFIG)
    assert plan.buffers["block_experts"].shape == (8,)  # one block per chosen expert, nothing wasted
    assert plan.buffers["sorted_slots"].shape == (128,)
    assert plan.buffers["expert_out"].shape == (8, 7168)
    assert [stage.grid for stage in plan.stages] == [(1, 1, 1), (8 * 32, 1, 1), (8 * 112, 1, 1), (1, 7, 1)]


def test_stage_arguments_follow_the_kernels_and_tensorrts_order():
    plan = plan_launch(ExpertsShape(num_tokens=5, **V3), CONFIG)
    for stage in plan.stages:
        kernel = KERNELS[stage.kernel]
        assert kernel.arg_names == [*stage.kernel_params, *dict(stage.constexprs)]
        kinds = ["tensor"] * len(stage.inputs) + ["scalar"] * len(stage.scalars) + ["tensor"] * len(stage.outputs)
        signature = triton_signature(plan, stage)
        assert [("scalar" if kind == "i32" else "tensor") for kind in signature.values()] == kinds


def test_every_scratch_buffer_is_written_before_it_is_read():
    plan = plan_launch(ExpertsShape(num_tokens=3, **V3), CONFIG)
    written = {name for name, buffer in plan.buffers.items() if buffer.role == "input"}
    for stage in plan.stages:
        assert set(stage.inputs) <= written, stage.name
        written |= set(stage.outputs)
    assert {buffer.name for buffer in plan.scratch()} | {"output"} <= written


def test_fp32_compute_uses_ieee_dots_and_mixed_dtypes_compute_in_fp32():
    shape = ExpertsShape(num_tokens=4, **V3, act_dtype="bfloat16", weight_dtype="float32")
    plan = plan_launch(shape, CONFIG)
    assert plan.buffers["act"].dtype == "float32" and plan.buffers["output"].dtype == "bfloat16"
    assert dict(plan.stages[1].constexprs)["DOT_PRECISION"] == "ieee"
    bf16 = plan_launch(ExpertsShape(num_tokens=4, **V3), CONFIG, interpret=True)
    assert dict(bf16.stages[1].constexprs)["UPCAST_DOT"] is True


def test_shipped_table_picks_decode_and_prefill_defaults():
    assert select_config(ExpertsShape(num_tokens=1, **V3)).block_m == 16
    assert select_config(ExpertsShape(num_tokens=4096, **V3)).block_m == 64
    fp32 = select_config(ExpertsShape(num_tokens=1, **V3, act_dtype="float32", weight_dtype="float32"))
    assert fp32.gate_up.block_k == 32


def test_tuned_entries_win_at_the_nearest_measured_token_count():
    table = load_table()
    shape = ExpertsShape(num_tokens=1, **V3)
    fast = TileConfig(32, GemmTile(32, 256), GemmTile(64, 64), group_m=1)
    big = TileConfig(128, GemmTile(128, 64, 8), GemmTile(256, 64, 8))
    tuned = merge_tuned(dict(table, tuned={}), shape, "test GPU", {8: (fast, 0.1), 4096: (big, 9.0)})
    assert tuned["tuned"][shape_key(shape)]["device"] == "test GPU"
    assert select_config(ExpertsShape(num_tokens=30, **V3), tuned) == fast
    assert select_config(ExpertsShape(num_tokens=2000, **V3), tuned) == big


@pytest.mark.parametrize("bad", [dict(act_dtype="float8e4m3fn"), dict(top_k=0)])
def test_shape_rejects_what_the_kernels_cannot_run(bad):
    with pytest.raises(ValueError):
        ExpertsShape(**{**dict(num_tokens=2, **V3), **bad})
