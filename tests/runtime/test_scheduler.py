"""Continuous batching without HTTP: batched results equal single requests token for token, requests join a
running batch and leave it, the cache is re-packed and compacted, and cancellation frees slots."""

import random
import threading

import pytest

from moetrt import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.scheduler import QueueFull, Scheduler
from tests.runtime.faulty_session import FailsOnThirdCall
from tests.runtime.reference_cache import ReferenceCacheSession


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


def scheduler(engine, **kwargs):
    return Scheduler(engine.session, engine.tokenizer, **{"max_context": engine.max_context, **kwargs})


def collect(events):
    """(token ids, reasoning, text, finish_reason) of a request's events."""
    tokens, reasoning, text, finish = [], [], [], None
    for event in events:
        tokens += event.token_ids
        reasoning.append(event.reasoning)
        text.append(event.text)
        finish = event.finish_reason or finish
    return tokens, "".join(reasoning), "".join(text), finish


def assert_same_as_single(engine, prompt, options, got):
    want = engine.generate(prompt, **options)
    tokens, reasoning, text, finish = got
    assert tokens == want.token_ids
    assert finish == want.finish_reason
    assert text.rstrip() == want.text and reasoning.strip() == (want.reasoning or "")


def chat_prompt(engine, rng, longest=100):
    text = "".join(rng.choice("0123456789+-*= abcxyz") for _ in range(rng.randint(1, longest)))
    return engine.chat_prompt([{"role": "user", "content": text}])


def test_batched_requests_equal_single_requests_token_for_token(engine):
    rng = random.Random(0)
    requests = []
    for i in range(24):
        options = dict(max_new_tokens=rng.randint(1, 60), greedy=True)
        if i % 4 == 1:
            options = dict(max_new_tokens=40, temperature=0.9, top_p=0.9, seed=i)  # per-request seeded sampling
        if i == 6:
            options["max_reasoning_tokens"] = 5
        requests.append((chat_prompt(engine, rng), options))
    stopped = next(i for i, (prompt, options) in enumerate(requests) if "seed" not in options
                   and len(engine.generate(prompt, **options).reasoning) >= 6)
    reasoning = engine.generate(requests[stopped][0], **requests[stopped][1]).reasoning
    requests[stopped][1].update(stop=[reasoning[len(reasoning) // 2 :][:2]], stop_in_reasoning=True)  # one it meets

    with scheduler(engine, max_batch=5) as batched:
        tickets = [batched.submit(prompt, engine.options(**options)) for prompt, options in requests]
        results = [collect(ticket.events()) for ticket in tickets]
    for (prompt, options), got in zip(requests, results):
        assert_same_as_single(engine, prompt, options, got)
    assert results[stopped][3] == "stop"
    metrics = batched.metrics
    assert metrics.decode_rows > 3 * metrics.decode_steps  # mostly more than three requests per step
    assert metrics.cache_resizes >= 2 and metrics.requests["length"] + metrics.requests["stop"] == 24


def test_a_request_joins_a_running_batch_and_full_context_compacts_the_cache(engine):
    """A long request runs; a longer prompt joins after 3 tokens (the common column jumps past the first
    request's columns), so the batch runs out of its 256 columns before the first request ends and is
    compacted."""
    rng = random.Random(1)
    first = (engine.chat_prompt([{"role": "user", "content": "1+2"}]), dict(max_new_tokens=240, greedy=True))
    joiner = (engine.chat_prompt([{"role": "user", "content": "12+34=" * 20}]), dict(max_new_tokens=100, greedy=True))
    third = (chat_prompt(engine, rng, longest=40), dict(max_new_tokens=60, greedy=True))
    joined = threading.Event()
    events, tickets = [], []

    def hold_after_three(event):  # runs on the scheduler's thread: holds the batch until the joiner arrives
        events.append(event)
        if len(events) == 3:
            assert joined.wait(30)

    with scheduler(engine, max_batch=4, max_context=256) as batched:
        tickets.append(batched.submit(first[0], engine.options(**first[1]), sink=hold_after_three))
        while len(events) < 3:
            threading.Event().wait(0.01)
        tickets += [batched.submit(p, engine.options(**o)) for p, o in (joiner, third)]
        joined.set()
        got = [collect(ticket.events()) for ticket in tickets[1:]]
        while not events[-1].finish_reason:
            threading.Event().wait(0.01)
    assert_same_as_single(engine, *first, collect(events))
    for request, result in zip((joiner, third), got):
        assert_same_as_single(engine, *request, result)
    assert batched.metrics.cache_compactions >= 1


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(engine):
    rng = random.Random(2)
    long_request, short, never = (chat_prompt(engine, rng) for _ in range(3))
    with scheduler(engine, max_batch=1) as batched:
        running = batched.submit(long_request, engine.options(max_new_tokens=200, greedy=True))
        waiting = batched.submit(short, engine.options(max_new_tokens=20, greedy=True))
        dropped = batched.submit(never, engine.options(max_new_tokens=20, greedy=True))
        dropped.cancel()
        next(running.events())
        running.cancel()
        got = collect(waiting.events())
    assert_same_as_single(engine, short, dict(max_new_tokens=20, greedy=True), got)
    assert batched.metrics.requests["cancelled"] == 2 and batched.metrics.requests["length"] == 1


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "7*8"}])
    options = dict(max_new_tokens=10, greedy=True)
    with Scheduler(FailsOnThirdCall(engine.session), engine.tokenizer, max_context=engine.max_context) as batched:
        with pytest.raises(RuntimeError, match="device lost"):
            collect(batched.submit(prompt, engine.options(**options)).events())
        after_failure = batched.submit(prompt, engine.options(**options))
        assert_same_as_single(engine, prompt, options, collect(after_failure.events()))
    assert batched.metrics.requests["failed"] == 1


def test_submit_checks_requests_and_bounds_the_queue(engine):
    batched = scheduler(engine, max_batch=1, max_queue=1)  # not started: requests stay queued
    queued = batched.submit([3, 4], engine.options(max_new_tokens=4))  # the next step would admit it
    batched.submit([3, 4], engine.options(max_new_tokens=4))  # this one would wait for a slot
    with pytest.raises(QueueFull, match="0 requests are running and 2 waiting"):
        batched.submit([3, 4], engine.options(max_new_tokens=4))
    with pytest.raises(MoetrtError, match=f"exceeds the engine's context of {engine.max_context}"):
        batched.submit([3] * (engine.max_context - 56), engine.options(max_new_tokens=57))
    with pytest.raises(MoetrtError, match="at least one token"):
        batched.submit([], engine.options(max_new_tokens=4))
    with pytest.raises(MoetrtError, match=r"token ids must lie in \[0, 104\)"):
        batched.submit([3, 104], engine.options(max_new_tokens=4))
    batched.close()
    with pytest.raises(MoetrtError, match="shutting down"):
        list(queued.events())


def test_the_scheduler_runs_over_another_latent_cache_and_gives_the_host_cache_tokens(engine):
    """The scheduler touches its caches only through runtime/session.py's LatentCache: over a session whose caches
    are tests/runtime/reference_cache.py's (the protocol over plain numpy, nothing shared with LatentKVCache) the
    same requests give the same tokens, with the same re-packs and compactions."""
    rng = random.Random(3)
    requests = []
    for i in range(10):
        options = dict(max_new_tokens=rng.randint(1, 60), greedy=True)
        if i % 3 == 1:
            options = dict(max_new_tokens=rng.randint(1, 60), temperature=0.9, top_p=0.9, seed=i)
        requests.append((chat_prompt(engine, rng, longest=60), options))
    results, counts = [], []
    for session in (engine.session, ReferenceCacheSession(engine.session)):
        batched = Scheduler(session, engine.tokenizer, max_context=engine.max_context, max_batch=3)
        # All queued before the loop starts, so both runs admit them in the same steps.
        tickets = [batched.submit(prompt, engine.options(**options)) for prompt, options in requests]
        with batched:
            results.append([collect(ticket.events()) for ticket in tickets])
        counts.append((batched.metrics.cache_resizes, batched.metrics.cache_compactions))
    assert results[0] == results[1]
    assert counts[0] == counts[1] and counts[0][0] >= 2 and counts[0][1] >= 1, counts
