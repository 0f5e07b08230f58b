"""bench/mtp_chain.py: the chained MTP drafts' acceptance, teacher-forced in torch, on the embedded tiny-r1."""

import pytest

from moetrt.bench.mtp_chain import REPO, measure


def test_tiny_r1s_first_draft_is_the_one_its_module_was_trained_for():
    result = measure(REPO / "models" / "tiny-r1", links=2, prompts=3, new_tokens=48)
    first, second = result["acceptance"]
    print(result)
    # the module's own draft: what the --mtp engine accepts 99.7% of (tests/runtime, bench/NOTES.md); an
    # off-by-one in the alignment of drafts and tokens would score about 0
    assert first > 0.95 and result["scored"][0] >= 3 * 40
    # a second link is scored once per right first draft that has a token two places on
    assert 0 < result["scored"][1] <= first * result["scored"][0]
    assert result["tokens_per_step"]["1"] == pytest.approx(1 + first)
    assert result["tokens_per_step"]["2"] == pytest.approx(1 + first + first * second)
