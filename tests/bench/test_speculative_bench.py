"""The speculative-decoding benchmark's report: ratios per round, acceptance, tokens per row-step, the break-even
acceptance from the always-draft rate, and a greedy mismatch reported rather than hidden."""

from moetrt.bench import speculative


def model(mismatches=()):
    return {"model": "ds-mini", "new_tokens": 64, "mismatches": list(mismatches),
            "rates": {"plain": {"1": [50.0, 40.0], "8": [150.0, 150.0]},
                      "mtp": {"1": [49.0, 42.0], "8": [147.0, 150.0]},
                      "mtp always": {"1": [40.0, 32.0], "8": [100.0, 100.0]}},
            "counts": {"plain": {"1": [0, 0, 128, 128], "8": [0, 0, 512, 512]},
                       "mtp": {"1": [10, 5, 100, 105], "8": [40, 0, 500, 500]},
                       "mtp always": {"1": [128, 0, 128, 128], "8": [512, 0, 512, 512]}}}


def test_the_report_gives_ratios_acceptance_and_the_break_even_rate():
    text = speculative.render({"threads": 2, "repeats": 2, "models": [model()]})
    row = next(line for line in text.splitlines() if line.startswith("| ds-mini | 1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:4] == ["45.0", "45.5"]  # medians of the rounds
    assert cells[4] == "1.02 (0.98-1.05)"  # per-round ratios 0.98 and 1.05
    assert cells[5] == "50.0%" and cells[6] == "1.05"
    assert cells[8] == "25.0%"  # plain 45 over always-draft 36, minus one
    assert "equal plain decoding's in every run" in text


def test_a_greedy_mismatch_is_reported():
    text = speculative.render({"threads": 2, "repeats": 2, "models": [model(["ds-mini batch 1 mtp group 0"])]})
    assert "differ from plain ones in ds-mini batch 1 mtp group 0" in text
    assert "in every run" not in text
