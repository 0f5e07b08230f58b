"""The one request validator: each refusal's message, where option values are checked, the defaults' single
homes, and that the Python API, the CLI, the scheduler and the server refuse the same request the same way."""

import subprocess
import sys

import pytest

from moetrt import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import GenerationOptions
from moetrt.runtime.requests import (
    CONTEXT_LENGTH_EXCEEDED,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    RequestError,
    check_context,
    validate_request,
)
from moetrt.runtime.sampling import SamplingParams
from moetrt.runtime.scheduler import Scheduler

VOCAB = 104
CONTEXT = 64

REFUSALS = [
    # (what, prompt, options, has_tokenizer, message, param, code)
    ("empty prompt", [], {}, True, "the prompt is empty: pass at least one token", "prompt", None),
    ("id past the vocabulary", [3, VOCAB], {}, True,
     "token ids must lie in [0, 104), got 104: pass ids from this engine's vocabulary", "prompt", None),
    ("negative id", [-1, 3], {}, True,
     "token ids must lie in [0, 104), got -1: pass ids from this engine's vocabulary", "prompt", None),
    ("stop strings without a tokenizer", [3], {"stop": ("x",)}, False,
     "stop strings need an engine with a tokenizer; pass stop_token_ids instead", "stop", None),
    ("new tokens over the context", [3] * 10, {"max_new_tokens": 60}, True,
     "a prompt of 10 tokens plus 60 new tokens (70) exceeds the engine's context of 64 tokens; ask for at most "
     "54 new tokens, shorten the prompt, or rebuild the engine with a larger --max-context",
     "prompt", CONTEXT_LENGTH_EXCEEDED),
    ("prompt fills the context", [3] * 64, {"max_new_tokens": 1}, True,
     "a prompt of 64 tokens plus 1 new token (65) exceeds the engine's context of 64 tokens; shorten the prompt, "
     "or rebuild the engine with a larger --max-context", "prompt", CONTEXT_LENGTH_EXCEEDED),
]


@pytest.mark.parametrize("what, prompt, options, has_tokenizer, message, param, code", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_validator_refusals(what, prompt, options, has_tokenizer, message, param, code):
    with pytest.raises(RequestError) as raised:
        validate_request(prompt, GenerationOptions(**options), vocab_size=VOCAB, max_context=CONTEXT,
                         has_tokenizer=has_tokenizer)
    assert (str(raised.value), raised.value.param, raised.value.code) == (message, param, code)
    assert isinstance(raised.value, MoetrtError)  # the CLI prints it as one line


def test_validator_accepts_a_request_that_fits_and_any_length_without_a_context():
    validate_request([0, 3, VOCAB - 1], GenerationOptions(max_new_tokens=61), vocab_size=VOCAB, max_context=CONTEXT,
                     has_tokenizer=False)
    validate_request([3] * 1000, GenerationOptions(max_new_tokens=1000), vocab_size=VOCAB, max_context=None,
                     has_tokenizer=True)


def test_scoring_a_prompt_over_the_context_names_no_new_tokens():
    with pytest.raises(RequestError, match=r"^a prompt of 200 tokens exceeds the engine's context of 128 tokens; "
                       r"shorten the prompt, or rebuild the engine with a larger --max-context$"):
        check_context(200, 0, 128)
    check_context(128, 0, 128)


OPTION_REFUSALS = [
    # Option values are checked once, where they are held: GenerationOptions and SamplingParams.
    (lambda: GenerationOptions(max_new_tokens=0), "max_new_tokens must be at least 1, got 0"),
    (lambda: GenerationOptions(prefill_chunk=0), "prefill_chunk must be at least 1, got 0"),
    (lambda: GenerationOptions(max_reasoning_tokens=-1), "max_reasoning_tokens must be >= 0"),
    (lambda: SamplingParams(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (lambda: SamplingParams(top_k=-2), "top_k must be -1 or 0 (no top-k) or at least 1, got -2"),
    (lambda: SamplingParams(top_p=1.5), "top_p must lie in [0, 1], got 1.5"),
    (lambda: SamplingParams(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
]


@pytest.mark.parametrize("make, message", OPTION_REFUSALS, ids=[r[1].split()[0] for r in OPTION_REFUSALS])
def test_option_values_are_refused_where_they_are_held(make, message):
    with pytest.raises(MoetrtError) as raised:
        make()
    assert str(raised.value) == message


def test_each_default_has_one_home():
    options = GenerationOptions()
    assert (options.max_new_tokens, options.prefill_chunk) == (DEFAULT_MAX_NEW_TOKENS, DEFAULT_PREFILL_CHUNK)


# -- the same refusal everywhere ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


@pytest.fixture(scope="module")
def client(engine, chat_engine_dir):
    from fastapi.testclient import TestClient

    from moetrt.runtime.server import create_app

    scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=2)
    with TestClient(create_app(engine, scheduler, model_name="tiny-chat")) as running:
        yield running


def refusal(call) -> RequestError:
    with pytest.raises(RequestError) as raised:
        call()
    return raised.value


def test_the_engine_reads_the_runtime_defaults(engine):
    options = engine.options()  # the chat engine's generation_config.json sets no max_new_tokens
    assert options.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert options.prefill_chunk == min(engine.max_seq, DEFAULT_PREFILL_CHUNK)


def test_api_cli_scheduler_and_server_refuse_an_over_long_completion_alike(engine, chat_engine_dir, client):
    prompt, new_tokens = "1+1=", engine.max_context
    error = refusal(lambda: engine.generate(prompt, max_new_tokens=new_tokens))
    message = str(error)
    assert error.code == CONTEXT_LENGTH_EXCEEDED
    assert message.startswith(f"a prompt of 4 tokens plus {new_tokens} new tokens ({new_tokens + 4}) exceeds the "
                              f"engine's context of {engine.max_context} tokens")
    assert str(refusal(lambda: engine.stream(prompt, max_new_tokens=new_tokens))) == message  # before any event

    scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context)
    submitted = refusal(lambda: scheduler.submit(engine.encode(prompt), engine.options(max_new_tokens=new_tokens)))
    assert str(submitted) == message
    scheduler.close()

    cli = subprocess.run([sys.executable, "-m", "moetrt.cli", "generate", str(chat_engine_dir), prompt, "--raw",
                          "--max-new-tokens", str(new_tokens)], capture_output=True, text=True)
    assert (cli.returncode, cli.stdout, cli.stderr) == (1, "", f"error: {message}\n")

    response = client.post("/v1/completions", json={"model": "tiny-chat", "prompt": prompt, "max_tokens": new_tokens})
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": "prompt",
                                         "code": CONTEXT_LENGTH_EXCEEDED}}


def test_api_and_server_refuse_an_over_long_chat_alike(engine, client):
    messages = [{"role": "user", "content": "7" * (engine.max_context + 10)}]
    message = str(refusal(lambda: engine.chat(messages, max_new_tokens=4)))
    response = client.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": messages, "max_tokens": 4})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": "messages",
                                        "code": CONTEXT_LENGTH_EXCEEDED}


def test_the_server_refuses_bad_token_ids_and_empty_prompts_with_the_validators_messages(client):
    for prompt, message in (([1, 99999], "token ids must lie in [0, 104), got 99999: pass ids from this engine's "
                             "vocabulary"), ("", "the prompt is empty: pass at least one token")):
        response = client.post("/v1/completions", json={"model": "tiny-chat", "prompt": prompt, "max_tokens": 4})
        assert response.status_code == 400
        assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": "prompt",
                                            "code": None}


def test_without_max_tokens_the_server_generates_at_most_what_the_context_leaves(engine, client):
    prompt = "1" * (engine.max_context - 3)  # one token per character
    response = client.post("/v1/completions", json={"model": "tiny-chat", "prompt": prompt, "temperature": 0})
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 3
