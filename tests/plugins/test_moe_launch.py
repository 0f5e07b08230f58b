"""Launch plans and the block-size table: pure functions of shapes."""

import random

import pytest

from moetrt.bench.tune_moe import merge_tuned
from moetrt.plugins.moe_configs import check_table, engine_configs, load_table, select_config, shape_key
from moetrt.plugins.moe_kernels import KERNELS
from moetrt.plugins.moe_launch import (
    ExpertsShape,
    GemmTile,
    TileConfig,
    max_blocks,
    plan_launch,
    triton_signature,
)
from moetrt.plugins.trt_stages import StageAttribute

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


@pytest.mark.parametrize("bad", [
    dict(block_m=24), dict(block_m=8), dict(gate_up=dict(block_n=64, block_k=8)),
    dict(down=dict(block_n=96, block_k=64)), dict(down=dict(block_n=64, block_k=64, num_warps=3)),
    dict(down=dict(block_n=64, block_k=64, num_stages=0)), dict(group_m=0),
])
def test_configurations_triton_cannot_compile_are_refused(bad):
    """Block sizes are powers of two, and every tl.dot dimension (block_m, block_n, block_k) is at least 16."""
    good = CONFIG.to_dict()
    with pytest.raises(ValueError, match="must be"):
        TileConfig.from_dict({**good, **{key: value if key in ("block_m", "group_m") else {**good[key], **value}
                                         for key, value in bad.items()}})


def test_a_bad_tuned_entry_is_named_when_the_table_loads():
    table = merge_tuned(dict(load_table(), tuned={}), ExpertsShape(num_tokens=1, **V3), "GPU", {8: (CONFIG, 0.1)})
    check_table(table)
    table["tuned"][shape_key(ExpertsShape(num_tokens=1, **V3))]["configs"]["8"]["gate_up"]["block_k"] = 8
    with pytest.raises(ValueError, match="tuned/E=256.*/8 is not a usable"):
        check_table(table)
    check_table(load_table())  # the shipped table


def test_engines_get_separate_decode_and_prefill_configurations():
    """An engine's kernels serve every T: decode steps get the bandwidth tiles, chunks from 1025 tokens (more than 32
    rows per expert at E=256, k=8) the matrix-rate tiles, on one 64-row layout."""
    decode, prefill, prefill_from = engine_configs(ExpertsShape(num_tokens=1, **V3).dims, "bfloat16")
    assert (decode.block_m, prefill.block_m, prefill_from) == (16, 64, 1025)
    assert decode == select_config(ExpertsShape(num_tokens=64, **V3))
    assert prefill == select_config(ExpertsShape(num_tokens=4096, **V3))
    attribute = StageAttribute.select(ExpertsShape(num_tokens=1, **V3).dims, "bfloat16")
    assert attribute.plan(4096).config == prefill and attribute.plan(512).config == decode
    assert attribute.plan(1).buffers["sorted_slots"].shape == (8 + 8 * 63,)  # 64-row blocks for both
