"""Chunked prefill: prompts joining a running batch are prefilled a budget of tokens per decode step, and every
request still gets exactly the tokens it gets alone, whatever the budget."""

import sys
import threading

import pytest

from moetrt import MoetrtError
from moetrt.runtime import scheduler as scheduler_module
from moetrt.runtime.engine import Engine
from moetrt.runtime.scheduler import DEFAULT_PREFILL_BUDGET, Scheduler
from moetrt.runtime.server.limits import ServerLimits
from tests.runtime.test_scheduler import assert_same_as_single, collect


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


def record_calls(monkeypatch, batched):
    """A list the scheduler's graph calls are appended to, in order: ("decode",) per decode step and
    ("prefill", prompt, tokens, whether rows were seated) per prefill part."""
    calls = []
    real_part, real_decode = scheduler_module.prefill_part, scheduler_module.decode_one_token

    def prefill_part(session, cache, prompt, start, stop, chunk):
        calls.append(("prefill", tuple(prompt), stop - start, bool(batched._occupied())))
        return real_part(session, cache, prompt, start, stop, chunk)

    def decode_one_token(*args):
        calls.append(("decode",))
        return real_decode(*args)

    monkeypatch.setattr(scheduler_module, "prefill_part", prefill_part)
    monkeypatch.setattr(scheduler_module, "decode_one_token", decode_one_token)
    return calls


def prefill_between_steps(calls):
    """Prompt tokens prefilled while rows were seated, per interval between consecutive decode steps."""
    totals, current = [], 0
    for call in calls:
        if call[0] == "decode":
            totals.append(current)
            current = 0
        elif call[3]:
            current += call[2]
    return totals


def steps_during_prefill(calls, prompt):
    """Decode steps that ran between the first and the last prefill part of `prompt`."""
    parts = [i for i, call in enumerate(calls) if call[0] == "prefill" and call[1] == tuple(prompt)]
    return sum(call[0] == "decode" for call in calls[parts[0] : parts[-1]])


@pytest.mark.parametrize("budget", [1, 7, 64, None])
def test_prompts_joining_a_running_batch_give_single_request_tokens_for_any_budget(engine, monkeypatch, budget):
    """A request decodes; three longer prompts (over the engine's 32 tokens per call) join after its third token,
    one of them sampled with a seed. Each request's tokens equal its single run; while rows decode, each step
    is accompanied by at most `budget` prompt tokens, so the first joiner's prefill (101 tokens, done before
    the first request's 200 end) spans decode steps; with no budget (None) every prompt is prefilled whole
    before a step, as before chunking."""
    first = (engine.chat_prompt([{"role": "user", "content": "1+2"}]), dict(max_new_tokens=200, greedy=True))
    joiners = [(engine.chat_prompt([{"role": "user", "content": text}]), options) for text, options in (
        ("abc xyz=" * 12, dict(max_new_tokens=40, greedy=True)),
        ("5*6-7 " * 15, dict(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3)),
        ("12+34=" * 6, dict(max_new_tokens=30, greedy=True)),
    )]
    joined, events = threading.Event(), []

    def hold_after_three(event):  # on the scheduler's thread: holds the batch until the joiners are queued
        events.append(event)
        if len(events) == 3:
            assert joined.wait(30)

    batched = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=4,
                        prefill_budget=budget)
    calls = record_calls(monkeypatch, batched)
    with batched:
        batched.submit(first[0], engine.options(**first[1]), sink=hold_after_three)
        while len(events) < 3:
            threading.Event().wait(0.01)
        tickets = [batched.submit(prompt, engine.options(**options)) for prompt, options in joiners]
        joined.set()
        got = [collect(ticket.events()) for ticket in tickets]
        while not events[-1].finish_reason:
            threading.Event().wait(0.01)
    assert_same_as_single(engine, *first, collect(events))
    for request, result in zip(joiners, got):
        assert_same_as_single(engine, *request, result)

    joiner = joiners[0][0]
    assert len(events) == 200 and len(joiner) == 101
    if budget is None:
        assert all(steps_during_prefill(calls, prompt) == 0 for prompt, _ in joiners)
    else:
        assert max(prefill_between_steps(calls)) <= budget
        assert steps_during_prefill(calls, joiner) == -(-len(joiner) // budget) - 1  # one part per step


def test_a_long_prompt_alone_is_prefilled_whole_before_the_first_step(engine, monkeypatch):
    prompt = engine.chat_prompt([{"role": "user", "content": "9*9=" * 20}])
    batched = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, prefill_budget=1)
    calls = record_calls(monkeypatch, batched)
    with batched:
        got = collect(batched.submit(prompt, engine.options(max_new_tokens=5, greedy=True)).events())
    assert_same_as_single(engine, prompt, dict(max_new_tokens=5, greedy=True), got)
    assert calls.index(("decode",)) == 1  # one part of the whole prompt (in calls of 32 inside), then steps
    assert calls[0][2] == len(prompt) > 32


def test_prefill_budget_must_be_positive_and_the_serve_flag_must_not_be_negative(engine):
    with pytest.raises(MoetrtError, match="prefill budget must be at least 1"):
        Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, prefill_budget=0)
    with pytest.raises(MoetrtError, match="--max-prefill-tokens must be at least 0"):
        ServerLimits(max_prefill_tokens=-1)


@pytest.mark.parametrize("flag, budget", [([], DEFAULT_PREFILL_BUDGET), (["--max-prefill-tokens", "48"], 48),
                                          (["--max-prefill-tokens", "0"], None)])
def test_serve_passes_max_prefill_tokens_to_the_scheduler(chat_engine_dir, monkeypatch, capsys, flag, budget):
    """`moetrt serve --max-prefill-tokens N` becomes the scheduler's budget (0: whole prompts, no flag: the
    default); the scheduler is stubbed to stop the server before it listens."""
    from moetrt import cli
    from moetrt.runtime.server import launch

    received = {}

    def scheduler_stub(*args, **kwargs):
        received.update(kwargs)
        raise MoetrtError("stopped by the test")

    monkeypatch.setattr(launch, "Scheduler", scheduler_stub)
    monkeypatch.setattr(sys, "argv", ["moetrt", "serve", str(chat_engine_dir), "--port", "0", *flag])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1 and "error: stopped by the test" in capsys.readouterr().err
    assert received["prefill_budget"] == budget
