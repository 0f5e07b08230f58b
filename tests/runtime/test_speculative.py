"""Speculative decoding with tiny-r1's MTP module (runtime/speculative.py): greedy output equals plain decoding at
batch 1, batched, through the scheduler (continuous batching, n > 1, chunked prefill) and through `moetrt serve`
with a real HTTP client; sampled output keeps plain sampling's distribution; the drafts are real (tiny-r1's
trained module gets most of its scratchpad right); the CLI's flags and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from moetrt.errors import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import _start_rows, stream_speculative
from moetrt.runtime.scheduler import Scheduler
from moetrt.runtime.speculative import DraftHistory, DraftPolicy, StepCounts
from moetrt.tasks import arithmetic
from tests.greedy import assert_greedy_agrees


@pytest.fixture(scope="module")
def mtp(tiny_r1_mtp_dir):
    return Engine.load(tiny_r1_mtp_dir)


@pytest.fixture(scope="module")
def plain(tiny_r1_quantized):
    return Engine.load(tiny_r1_quantized("none"))


def questions(count: int, seed: int = 3) -> list[str]:
    return [problem.question for problem in arithmetic.draw_problems(count, seed=seed, split="eval")]


def chat(engine: Engine, question: str) -> list[int]:
    return engine.chat_prompt([{"role": "user", "content": question}])


def assert_same_greedy(plain: Engine, prompts: list[list[int]], got: list[list[int]], label: str) -> None:
    """Each continuation equals the plain engine's, or diverges only at a near-tie of its logits (tests/greedy.py)."""
    from moetrt.runtime.generate import continuation_logits

    want = [result.token_ids for result in plain.generate(prompts, greedy=True, max_new_tokens=120)]
    logits = continuation_logits(plain.session, prompts, want)
    for index, (w, g, l) in enumerate(zip(want, got, logits)):
        assert_greedy_agrees(w, l, g, f"{label} prompt {index}")


def test_speculative_greedy_equals_plain_decoding_one_prompt_at_a_time(mtp, plain):
    prompts = [chat(mtp, q) for q in questions(6)]
    got = [mtp.generate(p, greedy=True, max_new_tokens=120, speculative="mtp").token_ids for p in prompts]
    assert_same_greedy(plain, prompts, got, "batch 1")
    # and on the --mtp engine itself, where plain decoding skips the module
    same_engine = [mtp.generate(p, greedy=True, max_new_tokens=120).token_ids for p in prompts]
    assert_same_greedy(plain, prompts, same_engine, "plain decoding on the --mtp engine")


def test_speculative_greedy_equals_plain_decoding_batched(mtp, plain):
    prompts = [chat(mtp, q) for q in questions(8, seed=4)]
    prompts[3] = prompts[3][:-3]  # uneven lengths: left padding, rows that finish at different steps
    got = [r.token_ids for r in mtp.generate(prompts, greedy=True, max_new_tokens=120, speculative="mtp")]
    assert_same_greedy(plain, prompts, got, "batch 8")


def test_the_trained_mtp_module_drafts_most_scratchpad_tokens(mtp):
    """tiny-r1's scratchpad is predictable and its MTP module was trained on it: most drafts are accepted (a module
    wired wrong, or reading the wrong hidden state, would be right about 1 time in 264). Prints the rate."""
    prompts = [chat(mtp, q) for q in questions(8, seed=5)]
    options = mtp.options(greedy=True, max_new_tokens=120, speculative="mtp")
    rows = _start_rows(mtp.session, prompts, options, mtp.tokenizer, mtp.max_context, None)
    counts = StepCounts()
    tokens = sum(len(e.token_ids) for e in stream_speculative(mtp.session, rows, options, counts))
    print(f"acceptance {counts.acceptance:.1%} of {counts.proposed} drafts; {tokens} tokens in {counts.steps} steps")
    assert counts.proposed > 100
    assert counts.acceptance > 0.6


def test_scheduler_speculative_equals_plain_with_joins_choices_and_chunked_prefill(mtp):
    prompts = [chat(mtp, q) for q in questions(10, seed=6)]
    results = {}
    for speculative in (None, "mtp"):
        with Scheduler(mtp.session, mtp.tokenizer, max_context=mtp.max_context, max_batch=4, prefill_budget=16,
                       speculative=speculative) as scheduler:
            options = mtp.options(greedy=True, max_new_tokens=100)
            tickets = [scheduler.submit(p, options, n=2 if i == 4 else 1) for i, p in enumerate(prompts)]
            results[speculative] = []
            for ticket in tickets:
                choices: list[list[int]] = [[] for _ in range(ticket.n)]
                for event in ticket.events():
                    choices[event.row].extend(event.token_ids)
                results[speculative].append(choices)
            if speculative:
                assert scheduler.metrics.draft_tokens > 0
                assert scheduler.metrics.accepted_tokens > 0.5 * scheduler.metrics.draft_tokens
    assert results["mtp"] == results[None]


def test_sampling_with_drafts_keeps_the_token_distribution(mtp):
    """Sampled continuations with and without MTP drafts come from one distribution: a chi-square test of
    homogeneity on the tokens at the steps drafts verify (temperature 1.5 spreads tiny-r1's choices)."""
    prompt = chat(mtp, "What is 37 + 48?")[:-4]  # cut inside the template: an open, uncertain continuation
    samples = {}
    for speculative in (None, "mtp"):
        outputs = mtp.generate([prompt] * 400, temperature=1.5, seed=11, max_new_tokens=3, speculative=speculative,
                               stop_token_ids=[])
        samples[speculative] = [r.token_ids for r in outputs if len(r.token_ids) == 3]
    for step in (1, 2):
        plain_tokens = [t[step] for t in samples[None]]
        drafted_tokens = [t[step] for t in samples["mtp"]]
        vocab = sorted(set(plain_tokens) | set(drafted_tokens))
        counts = np.array([[tokens.count(v) for v in vocab] for tokens in (plain_tokens, drafted_tokens)])
        common = counts.sum(0) >= 10  # pool rare tokens, so every expected count is large enough
        table = np.column_stack([counts[:, common], counts[:, ~common].sum(1)]) if (~common).any() else counts
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            continue
        p_value = chi2_contingency(table)[1]
        print(f"step {step}: {table.shape[1]} token classes, p = {p_value:.3f}")
        assert p_value > 1e-3


def test_a_low_acceptance_rate_stops_drafting_but_not_decoding():
    policy = DraftPolicy(min_acceptance=0.5, window=8, probe_every=4)
    assert policy.propose()
    policy.record(8, 0)
    proposals = [policy.propose() for _ in range(8)]
    assert proposals.count(True) == 2  # one probe in 4 steps
    policy.record(8, 8)
    assert all(policy.propose() for _ in range(4))


def test_a_new_sequence_follows_the_engines_recent_drafts_until_its_own_are_judged():
    """Once the engine's drafts stopped paying, a new sequence starts without drafting (probing as usual) instead
    of paying judge_after drafts to learn it again; its own accepted drafts then decide, and reach the history."""
    history = DraftHistory(window=8)
    first = DraftPolicy(window=8, probe_every=4, history=history)
    assert first.propose()  # nothing known yet
    first.record(1, 0)
    assert first.propose()  # 1 of judge_after=4 judged: the engine's 1 outcome says nothing yet either
    first.record(3, 0)
    assert list(history.outcomes) == [0] * 4
    second = DraftPolicy(window=8, probe_every=4, history=history)
    assert [second.propose() for _ in range(8)].count(True) == 2  # probes only
    alone = DraftPolicy(window=8, probe_every=4)
    assert alone.propose()  # without a history: drafts until judged
    second.record(4, 4)  # its own four drafts held: its own rate decides now
    assert all(second.propose() for _ in range(4))
    assert list(history.outcomes) == [0] * 4 + [1] * 4 and history.pays(0.5, 4)
    assert DraftPolicy(history=history).propose()
    # after a burst of misses, a sequence whose first verified draft (the prefill's) hits drafts on at once
    burst = DraftHistory(window=8)
    burst.record(8, 0)
    predictable, unpredictable = (DraftPolicy(window=8, probe_every=64, history=burst) for _ in range(2))
    predictable.record(1, 1)
    unpredictable.record(1, 0)
    assert all(predictable.propose() for _ in range(3)) and not any(unpredictable.propose() for _ in range(3))


def test_speculative_needs_an_mtp_engine(plain):
    with pytest.raises(MoetrtError, match="--mtp"):
        plain.generate("What is 1 + 1?", greedy=True, max_new_tokens=4, speculative="mtp")
    with pytest.raises(MoetrtError, match="--mtp"):
        Scheduler(plain.session, plain.tokenizer, max_context=plain.max_context, speculative="mtp")
    with pytest.raises(MoetrtError, match="not supported yet"):
        plain.generate("What is 1 + 1?", max_new_tokens=4, speculative="mtp", draft_tokens=2)
    with pytest.raises(MoetrtError, match="speculative must be"):
        plain.generate("What is 1 + 1?", max_new_tokens=4, speculative="eagle")


def test_eval_with_speculation_reports_the_drafts_it_verified(tiny_r1_mtp_dir):
    from moetrt.runtime.evaluate import evaluate_engine
    from moetrt.tasks.evaluate import format_report

    drafted = evaluate_engine(tiny_r1_mtp_dir, n=6, batch_size=3, speculative="mtp")
    plain = evaluate_engine(tiny_r1_mtp_dir, n=6, batch_size=3)
    assert [r.predicted for r in drafted.results] == [r.predicted for r in plain.results] and plain.drafts is None
    verified, accepted = drafted.drafts
    assert verified >= 6 * 10 and accepted >= 0.9 * verified  # every row drafts its scratchpad
    assert f"drafts     {accepted}/{verified} MTP drafts accepted" in format_report(drafted, "engine")
    assert drafted.to_dict()["drafts_accepted"] == accepted and "drafts_verified" not in plain.to_dict()


def moetrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_with_speculation_prints_the_plain_answer(tiny_r1_mtp_dir, tiny_r1_quantized):
    question = "What is 4827 + 593?"
    drafted = moetrt("generate", str(tiny_r1_mtp_dir), question, "--greedy", "--json", "--speculative", "mtp")
    assert drafted.returncode == 0, drafted.stderr
    plain = moetrt("generate", str(tiny_r1_quantized("none")), question, "--greedy", "--json")
    assert json.loads(drafted.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert json.loads(drafted.stdout)["text"].strip().endswith(str(4827 + 593))
    report = json.loads(drafted.stdout)  # the drafts verified and accepted (tiny-r1's scratchpad: nearly all)
    assert 0.9 * report["drafts_verified"] <= report["drafts_accepted"] <= report["drafts_verified"]
    assert report["drafts_verified"] >= len(report["token_ids"]) // 3 and "drafts_verified" not in plain.stdout

    refused = moetrt("generate", str(tiny_r1_quantized("none")), question, "--speculative", "mtp")
    assert refused.returncode == 1 and "rebuild it with" in refused.stderr and "--mtp" in refused.stderr
    assert "Traceback" not in refused.stderr
    chained = moetrt("generate", str(tiny_r1_mtp_dir), question, "--speculative", "mtp", "--draft-tokens", "3")
    assert chained.returncode == 1 and "not supported yet" in chained.stderr


def test_served_greedy_completions_with_speculation_equal_the_engines(tiny_r1_mtp_dir, tmp_path_factory, plain):
    import httpx

    from tests.runtime.test_server import serving

    with serving(tiny_r1_mtp_dir, tmp_path_factory, 4, 16, "--speculative", "mtp") as server:
        client = server.client()
        for question in questions(3, seed=7):
            reply = client.chat.completions.create(model=server.model, temperature=0, max_tokens=120,
                                                   messages=[{"role": "user", "content": question}])
            want = plain.chat([{"role": "user", "content": question}], greedy=True, max_new_tokens=120)
            assert reply.choices[0].message.content == want.text
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        drafted = [line for line in metrics.splitlines()
                   if line.startswith("moetrt_spec_decode_accepted_tokens_total ")]
        assert drafted and float(drafted[0].split()[1]) > 0
