"""The GPU benchmark's CPU-checkable parts: the baseline it times, the work it divides by, what each point is judged
by, and its one-line refusal without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrt.bench.gpu_experts import H200_BF16_FLOPS, H200_BYTES_PER_S, Work, per_expert_loop, target
from moetrt.plugins.moe_inputs import random_problem, relative_error
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.routed_experts import routed_experts_reference

ROOT = Path(__file__).resolve().parents[2]
V3 = dict(hidden=7168, inter=2048, num_experts=256, top_k=8)


def test_the_per_expert_loop_baseline_matches_the_reference():
    problem = random_problem(ExpertsShape(37, 40, 24, 8, 3, "float32", "float32"), seed=0, skew=3.0)
    assert relative_error(per_expert_loop(**problem), routed_experts_reference(**problem)) <= 1e-5


def test_work_counts_the_experts_hit_and_the_activations():
    work = Work.of(ExpertsShape(num_tokens=2, **V3), experts_hit=9)
    assert work.traffic == 9 * 3 * 7168 * 2048 * 2 + 2 * 2 * 7168 * 2  # bf16 weights of 9 experts, hidden in and out
    assert work.flops == 2 * (2 * 8) * 3 * 7168 * 2048


def test_decode_is_judged_by_bandwidth_and_a_long_prefill_by_the_matrix_rate():
    decode = ExpertsShape(num_tokens=64, **V3)
    work = Work.of(decode, 256)
    at_full_bandwidth = work.traffic / H200_BYTES_PER_S * 1e3
    assert target(decode, work, at_full_bandwidth) == ("bandwidth", pytest.approx(1.0), 0.60)
    prefill = ExpertsShape(num_tokens=4096, **V3)
    work = Work.of(prefill, 256)
    at_half_the_rate = 2 * work.flops / H200_BF16_FLOPS * 1e3
    assert target(prefill, work, at_half_the_rate) == ("bf16 matrix rate", pytest.approx(0.5), 0.50)
    assert target(ExpertsShape(num_tokens=512, **V3), work, 1.0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_benchmark_exits_1_with_one_line(tmp_path):
    command = [sys.executable, "-m", "moetrt.bench.gpu_experts", "--out", str(tmp_path / "report.md")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu_experts: no CUDA GPU") and done.stderr.count("\n") == 1
    assert not (tmp_path / "report.md").exists()
