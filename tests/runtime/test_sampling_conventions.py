"""The sampling conventions other OpenAI-compatible servers accept (top_k -1 or 0 is no top-k, top_p 0 the
smallest nucleus, seed -1 a random seed) in the API, the CLI and the server; NaN or infinite values and
non-positive thread counts refused with one line; numpy integers as token ids."""

import subprocess
import sys

import numpy as np
import pytest

from moetrt import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.requests import RequestError
from moetrt.runtime.sampling import SamplingParams, filtered_probabilities, select_token
from moetrt.runtime.scheduler import Scheduler

REFUSED = [
    # (values, message)
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(top_p=float("nan")), "top_p must be a finite number, got nan"),
    (dict(top_p=float("-inf")), "top_p must be a finite number, got -inf"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number, got inf"),
    (dict(top_p=-0.1), "top_p must lie in [0, 1], got -0.1"),
    (dict(top_k=-2), "top_k must be -1 or 0 (no top-k) or at least 1, got -2"),
    (dict(seed=-2), "seed must be -1 (random) or >= 0, got -2"),
]


@pytest.mark.parametrize("values, message", REFUSED, ids=[m for _, m in REFUSED])
def test_out_of_range_nan_and_infinite_values_are_refused(values, message):
    with pytest.raises(MoetrtError) as raised:
        SamplingParams(**values)
    assert str(raised.value) == message


def test_top_k_minus_one_and_zero_mean_no_top_k():
    logits = np.random.default_rng(0).normal(size=50)
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)
    everything = filtered_probabilities(logits, SamplingParams(top_k=0))
    assert np.count_nonzero(everything) == 50
    assert np.array_equal(filtered_probabilities(logits, SamplingParams(top_k=-1)), everything)


def test_top_p_zero_keeps_only_the_most_likely_token():
    logits = np.array([1.0, 3.0, 3.0, 0.5])  # a tie: the first of the two, as argmax
    assert filtered_probabilities(logits, SamplingParams(top_p=0.0)).tolist() == [0.0, 1.0, 0.0, 0.0]
    params = SamplingParams(top_p=0.0, temperature=1.5, do_sample=True)
    assert params.greedy
    noisy = np.random.default_rng(1).normal(size=(20, 64))
    for seed, row in enumerate(noisy):
        assert select_token(row, params, np.random.default_rng(seed), np.array([], np.int64)) == int(row.argmax())


def test_seed_minus_one_draws_a_random_seed():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=0).seed == 0


# -- the Python API ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.chat_prompt([{"role": "user", "content": "3*1"}])


def test_the_engine_takes_the_conventions(engine, prompt):
    greedy = engine.generate(prompt, max_new_tokens=16, greedy=True)
    assert engine.generate(prompt, max_new_tokens=16, top_p=0, temperature=1.0, seed=3) == greedy
    sampled = dict(max_new_tokens=16, temperature=1.0, do_sample=True, seed=5)
    assert engine.generate(prompt, top_k=-1, **sampled) == engine.generate(prompt, top_k=0, **sampled)
    assert engine.options(seed=-1).sampling.seed is None
    assert len(engine.generate(prompt, max_new_tokens=4, seed=-1, stop_token_ids=[]).token_ids) == 4


def test_nan_temperature_is_refused_before_any_token(engine, prompt):
    with pytest.raises(MoetrtError, match=r"^temperature must be a finite number, got nan$"):
        engine.generate(prompt, temperature=float("nan"), do_sample=True)
    with pytest.raises(MoetrtError, match=r"^top_p must be a finite number, got inf$"):
        engine.chat([{"role": "user", "content": "hi"}], top_p=float("inf"))


def test_numpy_integers_are_token_ids(engine, prompt):
    want = engine.generate(prompt, max_new_tokens=8, greedy=True)
    as_numpy = [np.int64(t) for t in prompt]
    assert engine.encode(as_numpy) == prompt and all(type(t) is int for t in engine.encode(as_numpy))
    assert engine.generate(as_numpy, max_new_tokens=8, greedy=True) == want
    assert engine.generate([np.int32(t) for t in prompt], max_new_tokens=8, greedy=True) == want
    assert engine.generate(np.array(prompt), max_new_tokens=8, greedy=True) == want
    assert engine.generate([np.array(prompt), prompt], max_new_tokens=8, greedy=True) == [want, want]
    with pytest.raises(RequestError, match=r"^token ids must be integers, got 1\.5: pass a list of ints$"):
        engine.generate([0, 1.5])


@pytest.mark.parametrize("threads", [0, -2, 1.5])
def test_non_positive_thread_counts_are_refused(chat_engine_dir, threads):
    with pytest.raises(MoetrtError) as raised:
        Engine.load(chat_engine_dir, threads=threads)
    assert str(raised.value) == (f"threads must be a positive integer, got {threads}; leave it out for the backend's "
                                 "default")


# -- the CLI -------------------------------------------------------------------------------------------------------


def generate_cli(engine_dir, *args):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", "generate", str(engine_dir), "3*1", "--json",
                           "-n", "12", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (("--temperature", "nan"), "temperature must be a finite number, got nan"),
    (("--top-p", "inf"), "top_p must be a finite number, got inf"),
    (("--top-k", "-2"), "top_k must be -1 or 0 (no top-k) or at least 1, got -2"),
    (("--seed", "-2"), "seed must be -1 (random) or >= 0, got -2"),
    (("--threads", "0"), "threads must be a positive integer, got 0; leave it out for the backend's default"),
    (("--threads", "-1"), "threads must be a positive integer, got -1; leave it out for the backend's default"),
])
def test_the_cli_refuses_with_one_line(chat_engine_dir, args, message):
    result = generate_cli(chat_engine_dir, *args)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


def test_the_cli_takes_the_conventions(chat_engine_dir):
    greedy = generate_cli(chat_engine_dir, "--greedy")
    assert greedy.returncode == 0, greedy.stderr
    assert generate_cli(chat_engine_dir, "--top-p", "0").stdout == greedy.stdout  # the config samples at 0.6
    for args in (("--seed", "-1"), ("--top-k", "-1", "--seed", "4"), ("--top-k", "0", "--threads", "1")):
        result = generate_cli(chat_engine_dir, *args)
        assert result.returncode == 0, (args, result.stderr)


# -- the server ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from moetrt.runtime.server import create_app

    scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=2)
    with TestClient(create_app(engine, scheduler, model_name="tiny-chat")) as running:
        yield running


def chat_body(**fields) -> dict:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "3*1"}], "max_tokens": 12, **fields}


def test_the_server_takes_the_conventions(client):
    greedy = client.post("/v1/chat/completions", json=chat_body(temperature=0)).json()["choices"][0]["message"]
    nucleus = client.post("/v1/chat/completions", json=chat_body(top_p=0)).json()["choices"][0]["message"]
    assert nucleus == greedy
    for fields in ({"top_k": -1}, {"top_k": 0}, {"seed": -1}, {"seed": -1, "top_k": -1, "temperature": 1.0}):
        assert client.post("/v1/chat/completions", json=chat_body(**fields)).status_code == 200, fields


@pytest.mark.parametrize("field, value, message", [
    ("temperature", "NaN", "temperature: Input should be a finite number"),
    ("top_p", "Infinity", "top_p: Input should be a finite number"),
    ("repetition_penalty", "Infinity", "repetition_penalty: Input should be a finite number"),
    ("top_k", "-2", "top_k: Input should be greater than or equal to -1"),
    ("seed", "-2", "seed: Input should be greater than or equal to -1"),
])
def test_the_server_refuses_nan_infinite_and_out_of_range_fields(client, field, value, message):
    body = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (
        field.encode(), value.encode())
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": field,
                                        "code": None}
