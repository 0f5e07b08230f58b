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


@pytest.mark.parametrize("args, message", [
    (["--prompts", "0"], "--prompts must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--links", "0"], "--links must be at least 1"),
])
def test_counts_that_would_score_nothing_are_refused(args, message, capsys):
    from moetrt.bench.mtp_chain import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err
