"""`python -m moetrt.bench.step_profile`: onnxruntime's profile of a kernel engine's decode steps, joined and
segment by segment (tiny-r1 int8 with moetrt's expert kernel: 3 MoE layers, int8 dense weights as MatMulNBits)."""

from __future__ import annotations

import pytest

from moetrt.bench.step_profile import profile_engine, report
from moetrt.errors import MoetrtError


@pytest.fixture(scope="module")
def engine(tiny_r1_quantized):
    return tiny_r1_quantized("int8", "moetrt")  # shared with tests/export/test_quantized_engine.py


def test_a_joined_engine_lists_its_expert_layers_as_one_operator(engine):
    profile = profile_engine(engine, batch=2, tokens=5, prompt_len=6)
    print(report(profile, top=5))
    assert profile.steps == 4
    assert profile.ops["Experts"][1] == 3  # one node per MoE layer per step, run inside onnxruntime
    assert profile.ops["MatMulNBits"][1] > 0
    kernels = sum(ms for ms, _ in profile.ops.values())
    assert 0 < kernels <= profile.run_ms <= profile.wall_ms


def test_segment_by_segment_the_experts_run_outside_onnxruntime(engine, monkeypatch):
    monkeypatch.setenv("MOETRT_SEGMENTED", "1")
    profile = profile_engine(engine, batch=1, tokens=3, prompt_len=4)
    assert "Experts" not in profile.ops and profile.ops["MatMulNBits"][1] > 0
    assert 0 < sum(ms for ms, _ in profile.ops.values()) <= profile.run_ms


def test_an_engine_loaded_without_the_profiler_says_how_to_turn_it_on(engine, monkeypatch):
    import moetrt

    monkeypatch.delenv("MOETRT_ORT_PROFILE", raising=False)
    with pytest.raises(MoetrtError, match="set MOETRT_ORT_PROFILE=DIR before loading it"):
        moetrt.Engine.load(engine).session.end_profiling()
    with pytest.raises(MoetrtError, match="--tokens must be at least 2"):
        profile_engine(engine, tokens=1)
