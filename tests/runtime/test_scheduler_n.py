"""Parallel sampling (OpenAI's `n`): one prefill whose cache seeds n sequences in n slots; choice i is the
single request with seed + i, events name their choice in `row`, and cancelling frees every slot."""

import threading

import pytest

from moetrt.runtime import scheduler as scheduler_module
from moetrt.runtime.engine import Engine
from moetrt.runtime.requests import RequestError
from moetrt.runtime.scheduler import Scheduler
from tests.runtime.faulty_session import FailsOnThirdCall
from tests.runtime.test_scheduler import assert_same_as_single, collect

SAMPLED = dict(max_new_tokens=30, temperature=0.9, top_p=0.9)


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


def scheduler(engine, **kwargs):
    return Scheduler(engine.session, engine.tokenizer, **{"max_context": engine.max_context, **kwargs})


def by_choice(events, n):
    """collect() of each choice's events, from one ticket's interleaved events."""
    events = list(events)
    assert sorted({event.row for event in events}) == list(range(n))
    assert sum(event.finish_reason is not None for event in events) == n
    return [collect(event for event in events if event.row == i) for i in range(n)]


def count_prefilled_tokens(monkeypatch):
    prefilled = []
    real = scheduler_module.prefill_part

    def prefill_part(session, cache, prompt, start, stop, chunk):
        prefilled.append(stop - start)
        return real(session, cache, prompt, start, stop, chunk)

    monkeypatch.setattr(scheduler_module, "prefill_part", prefill_part)
    return prefilled


def test_seeded_choices_equal_single_requests_with_seed_plus_index_from_one_prefill(engine, monkeypatch):
    prompt = engine.chat_prompt([{"role": "user", "content": "3*4+5=" * 8}])  # over 32 tokens: several calls
    prefilled = count_prefilled_tokens(monkeypatch)
    with scheduler(engine, max_batch=4) as batched:
        choices = by_choice(batched.submit(prompt, engine.options(**SAMPLED, seed=11), n=3).events(), 3)
    assert sum(prefilled) == len(prompt)  # the prompt was prefilled once for the three
    for i, got in enumerate(choices):
        assert_same_as_single(engine, prompt, dict(SAMPLED, seed=11 + i), got)
    assert len({tuple(tokens) for tokens, *_ in choices}) > 1
    assert batched.metrics.prompt_tokens == len(prompt) and batched.metrics.generated_tokens == sum(
        len(tokens) for tokens, *_ in choices)


def test_greedy_choices_are_identical_and_share_the_batch_with_other_requests(engine):
    prompts = [engine.chat_prompt([{"role": "user", "content": text}]) for text in ("7*8", "1+1=" * 10)]
    greedy = dict(max_new_tokens=25, greedy=True)
    with scheduler(engine, max_batch=6) as batched:
        tickets = [batched.submit(prompts[0], engine.options(**greedy), n=4),
                   batched.submit(prompts[1], engine.options(**greedy), n=2)]
        results = [by_choice(ticket.events(), ticket.n) for ticket in tickets]
    for prompt, choices in zip(prompts, results):
        for got in choices:
            assert_same_as_single(engine, prompt, greedy, got)
    assert batched.metrics.requests["length"] + batched.metrics.requests["stop"] == 6


def test_cancelling_a_request_frees_all_its_slots(engine):
    """max_batch 3: a request with n=3 fills the batch; the one queued behind it runs once it is cancelled."""
    prompt = engine.chat_prompt([{"role": "user", "content": "2+2"}])
    short = engine.chat_prompt([{"role": "user", "content": "9-3"}])
    with scheduler(engine, max_batch=3) as batched:
        running = batched.submit(prompt, engine.options(max_new_tokens=300, greedy=True), n=3)
        waiting = batched.submit(short, engine.options(max_new_tokens=10, greedy=True))
        next(running.events())
        assert all(not choice.over for choice in running.choices)
        running.cancel()
        got = collect(waiting.events())
    assert_same_as_single(engine, short, dict(max_new_tokens=10, greedy=True), got)
    assert all(choice.over and choice.slot is None for choice in running.choices)
    assert batched.metrics.requests["cancelled"] == 3


@pytest.mark.parametrize("n", [0, 5, -1, 2.0, True])
def test_n_outside_one_to_max_batch_is_refused_naming_n(engine, n):
    batched = scheduler(engine, max_batch=4)
    with pytest.raises(RequestError, match=r"n must be an integer in \[1, 4\].*--max-batch") as refused:
        batched.submit([3, 4], engine.options(max_new_tokens=4), n=n)
    assert refused.value.param == "n"
    batched.close()


def test_a_failing_step_fails_all_choices_with_one_error_and_the_loop_goes_on(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "6/3"}])
    greedy = dict(max_new_tokens=10, greedy=True)
    errors, events = [], []

    def sink(item):
        (errors if isinstance(item, BaseException) else events).append(item)

    with Scheduler(FailsOnThirdCall(engine.session), engine.tokenizer, max_context=engine.max_context) as batched:
        batched.submit(prompt, engine.options(**greedy), sink, n=3)
        while not errors:
            threading.Event().wait(0.01)
        after = batched.submit(prompt, engine.options(**greedy), n=2)
        results = by_choice(after.events(), 2)
    assert [str(error) for error in errors] == ["device lost"]
    assert [event.row for event in events] == [0, 1, 2, 0, 1, 2]  # first tokens and one step's, no more
    for got in results:
        assert_same_as_single(engine, prompt, greedy, got)
    assert batched.metrics.requests["failed"] == 3
