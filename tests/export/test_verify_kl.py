"""`moetrt verify`'s next-token statistics (llama.cpp's --kl-divergence quantities) against independent torch
computations, and the PASS/FAIL they decide: unquantized engines show KL ~0, quantized ones pass on their
scheme's KL thresholds."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moetrt.errors import MoetrtError
from moetrt.export.verify import (
    QUANTIZED_THRESHOLDS,
    RANDOM_POSITIONS,
    NextTokenStats,
    VerifyReport,
    fidelity_sequences,
    kl_divergences,
    next_token_stats,
    verify_engine,
)

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"


def random_logits(seed: int, positions: int = 400, vocab: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference logits, engine logits near them (some positions far off), and targets."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(0, 3, (positions, vocab)).astype(np.float32)
    noise = rng.normal(0, 0.3, (positions, vocab)) * rng.choice([0.1, 1.0, 10.0], (positions, 1))
    return reference, (reference + noise).astype(np.float32), rng.integers(0, vocab, positions)


def test_kl_divergences_match_torch():
    reference, engine, _ = random_logits(0)
    ref, eng = torch.from_numpy(reference).double(), torch.from_numpy(engine).double()
    by_kl_div = torch.nn.functional.kl_div(eng.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1)
    by_distributions = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ref),
                                                         torch.distributions.Categorical(logits=eng))
    ours = kl_divergences(reference, engine)
    np.testing.assert_allclose(ours, by_kl_div.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours, by_distributions.numpy(), rtol=1e-9, atol=1e-12)
    assert ours.min() > 0 and ours.max() > 1e4 * ours.min()  # positions near and far: the spread a p99 is about
    # KL(P||Q) is not symmetric: the reference is the first argument
    assert not np.allclose(ours, kl_divergences(engine, reference), rtol=1e-3)


def test_next_token_stats_match_torch():
    reference, engine, targets = random_logits(1)
    ref, eng, tgt = torch.from_numpy(reference).double(), torch.from_numpy(engine).double(), torch.from_numpy(targets)
    kl = torch.nn.functional.kl_div(eng.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    stats = next_token_stats(reference, engine, targets)
    assert stats.positions == len(targets)
    assert stats.kl_mean == pytest.approx(kl.mean().item(), rel=1e-9)
    assert stats.kl_p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-9)  # linear interpolation
    assert stats.kl_p999 == pytest.approx(torch.quantile(kl, 0.999).item(), rel=1e-9)
    assert stats.kl_max == pytest.approx(kl.max().item(), rel=1e-9)
    assert stats.top1_agreement == pytest.approx((ref.argmax(-1) == eng.argmax(-1)).double().mean().item())
    assert 0.3 < stats.top1_agreement < 1  # the noise flips some argmaxes, not all
    ppl_ref = torch.nn.functional.cross_entropy(ref, tgt).exp().item()
    ppl_eng = torch.nn.functional.cross_entropy(eng, tgt).exp().item()
    assert (stats.ppl_reference, stats.ppl_engine) == pytest.approx((ppl_ref, ppl_eng), rel=1e-9)
    assert stats.ppl_ratio == pytest.approx(ppl_eng / ppl_ref, rel=1e-9) and stats.ppl_ratio != pytest.approx(1)


def test_equal_logits_give_zero_kl_full_agreement_and_ratio_one():
    reference, _, targets = random_logits(2)
    stats = next_token_stats(reference, reference.copy(), targets)
    assert stats.kl_max < 1e-12 and stats.top1_agreement == 1.0 and stats.ppl_ratio == pytest.approx(1, abs=1e-12)


def test_next_token_stats_refuse_mismatched_inputs():
    reference, engine, targets = random_logits(3)
    with pytest.raises(MoetrtError, match="two equal"):
        next_token_stats(reference, engine[:, :-1], targets)
    with pytest.raises(MoetrtError, match="one target per position"):
        next_token_stats(reference, engine, targets[:-1])


def test_engine_without_tokenizer_scores_enough_random_positions():
    engine = SimpleNamespace(max_context=100, tokenizer=None, config=SimpleNamespace(vocab_size=77))
    sequences, described = fidelity_sequences(engine, TINY_R1, task=None, seed=0)
    assert all(len(s.tokens) == 100 and s.first_target == 50 for s in sequences)
    assert sum(len(s.tokens) - s.first_target for s in sequences) >= RANDOM_POSITIONS
    assert "random token ids" in described
    again, _ = fidelity_sequences(engine, TINY_R1, task=None, seed=0)
    assert again == sequences  # a fixed set


def report_with(stats: NextTokenStats, scheme: str | None) -> VerifyReport:
    """A report whose every non-KL check fails: logits far off, a greedy divergence, task answers differing."""
    return VerifyReport("float32", 2, max_abs_logit_diff=1.0, logit_tolerance=1e-4, greedy_rows_agreeing=1,
                        greedy_tokens_compared=3, greedy_failures=["prompt 1: diverged"], next_token=stats,
                        prompt_set="test", quantization=scheme,
                        kl_thresholds=QUANTIZED_THRESHOLDS[scheme] if scheme else None, task="arithmetic",
                        engine_accuracy=0.9, reference_accuracy=1.0, answers_differing=3)


@pytest.mark.parametrize("scheme", sorted(QUANTIZED_THRESHOLDS))
def test_quantized_report_passes_on_its_schemes_kl_thresholds_only(scheme):
    limits = QUANTIZED_THRESHOLDS[scheme]
    within = NextTokenStats(100, limits.kl_mean * 0.9, limits.kl_p99 * 0.9, 4.0, 5.0, 0.9, 1.0, 1.1)
    assert report_with(within, scheme).passed  # logits, greedy and task are information for a quantized engine
    assert not report_with(within, None).passed  # an unquantized engine still needs them
    assert not report_with(dataclasses.replace(within, kl_mean=limits.kl_mean * 1.1), scheme).passed
    assert not report_with(dataclasses.replace(within, kl_p99=limits.kl_p99 * 1.1), scheme).passed
    described = report_with(within, scheme).describe()
    assert f"PASS needs {limits.describe()}" in described and described.endswith("PASS")
    # the failing logit and greedy lines above a PASS read as failures unless they say they do not count
    assert described.count("information only: quantization moves logits by design, the KL above decides") == 3
    assert "logits, greedy tokens, task answers kept" in report_with(within, None).describe()
    fields = report_with(within, scheme).to_dict()
    assert fields["kl_thresholds"] == dataclasses.asdict(limits) and fields["quantization"] == scheme
    stat_keys = {"kl_mean", "kl_p99", "kl_p999", "kl_max", "top1_agreement", "ppl_reference", "ppl_engine", "ppl_ratio"}
    assert stat_keys <= set(fields)


def test_half_precision_logits_may_move_twice_as_far_as_the_reference_in_their_dtype_logit_by_logit():
    stats = NextTokenStats(100, 1e-8, 1e-7, 4.0, 5.0, 1.0, 1.0, 1.0)
    report = VerifyReport("float16", 8, max_abs_logit_diff=2.24, logit_tolerance=0.354, greedy_rows_agreeing=8,
                          greedy_tokens_compared=200, greedy_failures=[], next_token=stats, prompt_set="test")
    assert not report.passed  # no dtype reference: the fixed tolerance
    report.dtype_reference_diff, report.dtype_logit_share = 2.34, 0.77  # tiny-r1's float16 engine
    assert report.passed
    assert ("each position within 0.354 + 2x the float16 reference's own |Δ| there, up to 2.34: at most 0.77 of that used; "
            "checked") in report.describe()
    fields = report.to_dict()
    assert fields["dtype_logit_share"] == 0.77 and fields["passed"]
    report.dtype_logit_share = 8.5  # its lm_head scaled by 1.1: a global maximum of 2x 2.34 would have passed it
    assert not report.passed
    report.dtype_reference_diff = report.dtype_logit_share = None
    report.dtype_reference_note = "the float16 reference's logits are not finite"
    assert "tolerance 0.354 for float16; the float16 reference's logits are not finite; checked" in report.describe()


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_nan_on_the_prompt_set_fails_and_the_json_stays_json(scheme):
    """An engine whose logits are NaN on the prompt set (its random prompts fine) has NaN KL and perplexity; a NaN
    compares false rather than failing, and json.dumps would write NaN, which is not JSON."""
    nan = float("nan")
    stats = NextTokenStats(100, nan, nan, nan, nan, 0.0, 1.0, nan)
    report = VerifyReport("float32", 2, max_abs_logit_diff=1e-5, logit_tolerance=1e-4, greedy_rows_agreeing=2,
                          greedy_tokens_compared=20, greedy_failures=[], next_token=stats, prompt_set="test",
                          quantization=scheme, kl_thresholds=QUANTIZED_THRESHOLDS[scheme] if scheme else None)
    assert not report.passed and report.describe().endswith("FAIL")
    fields = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert fields["kl_mean"] is None and fields["ppl_ratio"] is None and fields["passed"] is False


def test_a_dtype_reference_that_overflows_leaves_the_fixed_tolerance(monkeypatch):
    """A float16 reference whose logits are inf or NaN (a residual stream past 65504) must not make every
    difference pass: the check falls back to the fixed tolerance, and the report says why."""
    import moetrt.export.reference_session as reference_session
    import moetrt.runtime.generate as generate
    from moetrt.export.verify import EngineOutputs, _dtype_reference_check

    float32_logits = [np.zeros((3, 5), np.float32), np.zeros((2, 5), np.float32)]
    engine = [np.full((3, 5), 0.5, np.float32), np.full((2, 5), 0.5, np.float32)]
    outputs = EngineOutputs(next_token=[], greedy=[[1, 2, 3, 4], [5, 6, 7]], greedy_logits=engine)
    monkeypatch.setattr(reference_session, "load_reference_session", lambda *args, **kwargs: object())
    for value, want in ((0.25, (0.25, 0.5 / (0.1 + 2 * 0.25), "")),
                        (np.inf, (None, None, "the float16 reference's logits are not finite")),
                        (np.nan, (None, None, "the float16 reference's logits are not finite"))):
        monkeypatch.setattr(generate, "continuation_logits", lambda session, prompts, continuations, value=value:
                            [np.full((len(c), 5), value, np.float32) for c in continuations])
        got = _dtype_reference_check(TINY_R1, "float16", outputs, float32_logits, tolerance=0.1, group=1)
        assert got[2] == want[2] and (got[:2] == want[:2] or got[:2] == pytest.approx(want[:2]))


def test_random_prompts_keep_their_draws_and_shorten_to_fit_a_short_context():
    from moetrt.export.verify import _random_prompts

    default = _random_prompts(1000, 50, seed=0)
    rng = np.random.default_rng(0)  # the draws verify made before prompts could be shortened: reports stay comparable
    assert default == [rng.integers(0, 1000, int(rng.integers(4, 40))).tolist() for _ in range(50)]
    assert {len(p) for p in default} <= set(range(4, 40)) and max(map(len, default)) == 39
    assert max(map(len, _random_prompts(1000, 50, seed=0, longest=24))) == 24  # a 48-position engine's half
    assert {len(p) for p in _random_prompts(1000, 20, seed=0, longest=2)} == {2}
    assert {len(p) for p in _random_prompts(1000, 5, seed=0, longest=0)} == {1}


def test_thresholds_are_ordered_by_precision():
    assert QUANTIZED_THRESHOLDS["int8"].kl_mean < QUANTIZED_THRESHOLDS["int4"].kl_mean
    assert QUANTIZED_THRESHOLDS["int8"].kl_p99 < QUANTIZED_THRESHOLDS["int4"].kl_p99


def test_float32_engine_shows_no_kl_on_the_fixed_texts(chat_engine_dir, tmp_path):
    from tests.chat_checkpoint import make_chat_checkpoint

    checkpoint = make_chat_checkpoint(tmp_path / "ckpt")  # seeded: the weights chat_engine_dir was built from
    report = verify_engine(chat_engine_dir, checkpoint, prompts=2, new_tokens=4)
    stats = report.next_token
    assert report.passed and report.quantization is None and report.kl_thresholds is None
    assert "fixed texts" in report.prompt_set and stats.positions >= 1000
    assert stats.kl_max < 1e-6 and stats.top1_agreement == 1.0 and stats.ppl_ratio == pytest.approx(1, abs=1e-5)


@pytest.fixture(scope="module")
def tiny_r1_int4(tiny_r1_quantized):
    return tiny_r1_quantized("int4", "onnxruntime")  # what auto picks for tiny-r1's small experts


def test_quantized_engine_is_judged_on_its_schemes_kl_thresholds(tiny_r1_int4):
    report = verify_engine(tiny_r1_int4, TINY_R1, prompts=1, new_tokens=8, task_problems=0)
    fields = json.loads(json.dumps(report.to_dict()))  # what `moetrt verify --json` prints after its checks
    limits = QUANTIZED_THRESHOLDS["int4"]
    assert fields["quantization"] == "int4" and fields["kl_thresholds"] == dataclasses.asdict(limits)
    assert fields["prompt_set"].startswith("arithmetic: 32 held-out problems") and fields["positions"] > 2000
    # quantization shows (this is not the float32 graph) and stays within int4's bounds with room to spare
    assert 1e-5 < fields["kl_mean"] < limits.kl_mean / 10 and fields["kl_p99"] < limits.kl_p99 / 10
    assert fields["top1_agreement"] > 0.99 and fields["ppl_ratio"] == pytest.approx(1, abs=0.05)
    assert fields["passed"] and fields["max_abs_logit_diff"] > fields["logit_tolerance"]  # logits: information


def test_verify_refuses_a_negative_task_problem_count_before_loading_anything(tmp_path):
    with pytest.raises(MoetrtError, match="--task-problems must be at least 0"):
        verify_engine(tmp_path / "no-engine", TINY_R1, task_problems=-1)


def test_verify_help_states_the_thresholds():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "verify", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "400"}, timeout=60)  # wide: one line per sentence
    assert result.returncode == 0, result.stderr
    for name, limits in QUANTIZED_THRESHOLDS.items():
        assert f"{name}: {limits.describe()}" in result.stdout


def test_kl_split_refuses_a_checkpoint_the_engine_was_not_built_from(tiny_r1_int4, tmp_path):
    """bench/moonlight.py --kl-source: another model's checkpoint is refused in one line before any scoring (it
    crashed in the reference with an IndexError)."""
    from moetrt.bench.moonlight import kl_sources
    from tests.checkpoints import make_checkpoint

    other = make_checkpoint(tmp_path / "other", "v2-group-limited")
    with pytest.raises(MoetrtError, match="is not the checkpoint .* was built from"):
        kl_sources(tiny_r1_int4, other, 1)


@pytest.mark.parametrize("args, message", [
    (["--also", "int8"], "go with --kl-source"),
    (["--kl-source", "ENGINE", "--sequences", "0"], "--sequences must be at least 1"),
])
def test_kl_split_refuses_bad_arguments(args, message, capsys):
    from moetrt.bench.moonlight import main

    with pytest.raises(SystemExit) as stop:
        main(["/nonexistent", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_verify_refuses_a_reference_flag_without_a_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "verify", str(tmp_path), "--stream-reference"],
                            capture_output=True, text=True, env={**os.environ, "MOETRT_QUIET": "1"}, timeout=120)
    assert result.returncode != 0 and "give the checkpoint" in result.stderr, result.stderr
