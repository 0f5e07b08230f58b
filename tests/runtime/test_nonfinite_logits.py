"""NaN logits are an error, never a token: the Python API raises one line, the CLI exits 1 with it, and the
scheduler and server fail only the request that got them while the others complete."""

import asyncio
import json
import sys

import httpx
import numpy as np
import pytest

from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import NonFiniteLogits, finite_rows, require_finite
from moetrt.runtime.scheduler import Scheduler

POISONED_AT = 40  # rows fed a token at this position get NaN logits
DOOMED = 40  # prompt tokens: the first token comes from finite prefill logits, the first decode step gets NaN
GREEDY_30 = dict(max_new_tokens=30, greedy=True)
MESSAGE = ("the engine returned NaN or inf float32 logits, so no token can be sampled: its arithmetic overflowed or "
           "its weights are not finite; rebuild it in float32 (build-engine --dtype float32) and compare it with its "
           "checkpoint (moetrt verify ENGINE CHECKPOINT)")


class PoisonedSession:
    """A real session whose logits are NaN for every row fed a token at position `at`, as an engine whose float16
    arithmetic overflows returns them; everything else is the real session's."""

    def __init__(self, session, at: int = POISONED_AT):
        self.session, self.at = session, at

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, input_ids, position_ids, *rest):
        logits, rows = self.session.run(input_ids, position_ids, *rest)
        poisoned = (np.asarray(position_ids) == self.at).any(axis=-1)
        if poisoned.any():
            logits = logits.copy()
            logits[poisoned] = np.nan
        return logits, rows


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


@pytest.fixture
def poisoned(engine):
    return Engine(engine.manifest, PoisonedSession(engine.session), engine.tokenizer)


def prompt(length: int) -> list[int]:
    return [(7 * i) % 50 + 3 for i in range(length)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_finite_rows_finds_nan_and_inf_in_either_dtype(dtype):
    logits = np.zeros((4, 96), dtype)
    logits[1, 5], logits[2, 95], logits[3, 0] = np.nan, np.inf, -np.inf
    assert finite_rows(logits).tolist() == [True, False, False, False]
    assert finite_rows(np.full((1, 3), np.finfo(dtype).max, dtype)).tolist() == [True]
    with pytest.raises(NonFiniteLogits) as raised:
        require_finite(logits, np.array([True, False, True, False]))
    assert raised.value.rows == [2]
    assert require_finite(logits, np.array([True, False, False, False])) is logits


def test_generate_raises_one_line_instead_of_sampling_nan(poisoned):
    for length in (DOOMED, POISONED_AT + 1):  # NaN at the first decode step, then in the prefill
        with pytest.raises(NonFiniteLogits) as raised:
            poisoned.generate(prompt(length), max_new_tokens=5, greedy=True)
        assert str(raised.value) == MESSAGE and raised.value.rows == [0]
    with pytest.raises(NonFiniteLogits) as raised:  # a batch: the row that got NaN is named
        poisoned.generate([prompt(5), prompt(DOOMED)], max_new_tokens=5, greedy=True)
    assert raised.value.rows == [1]
    with pytest.raises(NonFiniteLogits):
        list(poisoned.stream(prompt(DOOMED), max_new_tokens=5, greedy=True))
    healthy = poisoned.generate(prompt(5), max_new_tokens=30, greedy=True)  # never reaches position 40
    assert healthy.token_ids == poisoned.generate(prompt(5), max_new_tokens=30, greedy=True).token_ids


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "streamed"])
def test_cli_generate_exits_1_with_one_line(chat_engine_dir, monkeypatch, capsys, json_output):
    from moetrt import cli

    from moetrt.runtime import engine as engine_module

    real_open = engine_module.open_session
    monkeypatch.setattr(engine_module, "open_session", lambda *a: PoisonedSession(real_open(*a)))
    monkeypatch.delenv("MOETRT_VERBOSE", raising=False)
    text = "1+1=" * 12  # a character per token: the prefill reaches position 40
    monkeypatch.setattr(sys, "argv", ["moetrt", "generate", str(chat_engine_dir), text, "--raw", "--greedy",
                                      *(["--json"] if json_output else [])])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"error: {MESSAGE}\n"


def test_scheduler_fails_the_poisoned_request_and_the_other_completes(engine):
    healthy, doomed = prompt(5), prompt(DOOMED)  # the healthy one never reaches position 40 in 30 new tokens
    options = engine.options(max_new_tokens=30, greedy=True)
    with Scheduler(PoisonedSession(engine.session), engine.tokenizer, max_context=engine.max_context) as running:
        tickets = [running.submit(doomed, options), running.submit(healthy, options)]
        events = list(tickets[1].events())
        with pytest.raises(NonFiniteLogits) as raised:
            list(tickets[0].events())
    assert str(raised.value) == MESSAGE
    assert [t for event in events for t in event.token_ids] == engine.generate(healthy, **GREEDY_30).token_ids
    assert 'moetrt_requests_total{outcome="failed"} 1' in running.metrics.render()


def test_server_fails_the_poisoned_request_with_an_error_and_serves_the_concurrent_one(engine):
    from moetrt.runtime.server import create_app

    scheduler = Scheduler(PoisonedSession(engine.session), engine.tokenizer, max_context=engine.max_context)
    app = create_app(engine, scheduler, model_name="tiny-chat")
    healthy = engine.generate(prompt(5), **GREEDY_30)

    async def requests():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            def body(ids, stream=False):
                return {"model": "tiny-chat", "prompt": ids, "max_tokens": 30, "temperature": 0, "stream": stream}
            return await asyncio.gather(client.post("/v1/completions", json=body(prompt(DOOMED))),
                                        client.post("/v1/completions", json=body(prompt(DOOMED), stream=True)),
                                        client.post("/v1/completions", json=body(prompt(5))))

    scheduler.start()  # the ASGI transport sends no lifespan events
    try:
        failed, streamed, served = asyncio.run(requests())
    finally:
        scheduler.close()
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": f"generation failed: {MESSAGE}", "type": "server_error",
                                      "param": None, "code": None}
    assert streamed.status_code == 200  # the status line went out before the NaN: the error comes as an event
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["message"] == f"generation failed: {MESSAGE}"
    assert served.status_code == 200 and healthy.finish_reason == "length"
    assert served.json()["choices"][0]["text"] == engine.tokenizer.decode(healthy.token_ids)  # raw: tags kept
    assert served.json()["usage"]["completion_tokens"] == healthy.completion_tokens == 30
