"""The Triton routed experts on a GPU against the reference, on awkward shapes, from poisoned buffers."""

import pytest
import torch

from moetrt.plugins import triton_moe
from moetrt.plugins.moe_inputs import random_problem, relative_error
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.routed_experts import routed_experts_reference
from tests.plugins.gpu import ON_GPU, tolerance
from tests.plugins.poisoned_runs import run_poisoned

pytestmark = ON_GPU

CASES = [  # (T, H, I, E, k, activation dtype, weight dtype)
    (1, 200, 136, 8, 2, "float32", "float32"),
    (77, 300, 250, 16, 4, "float32", "float32"),
    (300, 1000, 520, 4, 2, "float32", "float32"),  # ~150 rows per expert: the prefill config
    (300, 1000, 520, 64, 8, "bfloat16", "bfloat16"),
    (600, 1000, 520, 8, 2, "bfloat16", "bfloat16"),
    (64, 2061, 519, 128, 6, "float16", "float16"),
    (33, 7168, 2048, 16, 8, "float32", "float32"),  # fp32 over DeepSeek-V3's reduction lengths
]


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=["T{}-H{}-I{}-E{}-k{}-{}".format(*c) for c in CASES])
def test_triton_matches_the_reference_writes_every_row_and_repeats_bitwise(seed, case):
    shape = ExpertsShape(*case)
    problem = random_problem(shape, seed, "cuda")
    plan = triton_moe.plan_for(shape)
    first, second = run_poisoned(plan, problem), run_poisoned(plan, problem)
    assert torch.isfinite(first["expert_out"].float()).all(), "expert_out rows left unwritten"
    error = relative_error(first["output"], routed_experts_reference(**problem))
    assert error <= tolerance(shape), f"relative error {error:.2e} (block_m={plan.config.block_m})"
    assert torch.equal(first["output"], second["output"]), "two runs differ"
