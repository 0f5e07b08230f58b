"""Prompts and lengths on the embedded model's engine, built with no limits given: its context is the model's
(512), raw text gets transformers' BOS while token ids and chat prompts do not get another, a request that names
no length generates what the context leaves, `-n 0` is refused, the server advertises the engine's context, and an
engine whose tokenizer has no chat template generates from ids and text while only chat refuses."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt import MoetrtError
from moetrt.formats import artifact_records, read_manifest, write_manifest
from moetrt.runtime.engine import Engine
from moetrt.runtime.requests import DEFAULT_MAX_NEW_TOKENS, RequestError
from moetrt.runtime.scheduler import Scheduler
from moetrt.tasks.chat import NO_TEMPLATE

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"
QUESTION = "What is 4827 + 593?"
BOS = 0


def moetrt_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from moetrt.export.engine import build_engine

    return build_engine(TINY_R1, tmp_path_factory.mktemp("engines") / "tiny-r1", backend="ort")


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.load(engine_dir)


@pytest.fixture(scope="module")
def templateless_dir(engine_dir, tmp_path_factory):
    """The engine as a build from a checkpoint whose tokenizer_config.json has no chat_template writes it."""
    copy = tmp_path_factory.mktemp("templateless") / "engine"
    copy.mkdir()
    for file in engine_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(copy, dataclasses.replace(read_manifest(copy), artifacts=artifact_records(copy)))
    return copy


def client_for(engine):
    from fastapi.testclient import TestClient

    from moetrt.runtime.server import create_app

    scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=2)
    return TestClient(create_app(engine, scheduler, model_name="tiny-r1"))


def transformers_ids(text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_R1)(text)["input_ids"]


# -- the context ----------------------------------------------------------------------------------------------


def test_an_engine_built_without_limits_has_the_models_context(engine):
    assert engine.config.max_position_embeddings == 512
    assert (engine.max_context, engine.max_seq) == (512, 512)


def test_the_server_advertises_the_engines_context(engine):
    with client_for(engine) as client:
        models = client.get("/v1/models").json()["data"]
    assert [m["max_model_len"] for m in models] == [512]


# -- prompts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [QUESTION, "4827+593=", f"<｜begin▁of▁sentence｜>{QUESTION}"])
def test_raw_text_prompts_get_the_bos_as_transformers_gives_it(engine, text):
    ids = transformers_ids(text)
    assert ids[0] == BOS
    assert engine.encode(text) == ids
    assert engine.generate(text, max_new_tokens=1).prompt_tokens == len(ids)


def test_token_id_prompts_are_taken_as_given(engine):
    assert engine.encode([54, 58, 52]) == [54, 58, 52]
    assert engine.generate([54, 58, 52], max_new_tokens=1).prompt_tokens == 3


def test_chat_prompts_keep_the_templates_single_bos(engine):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": QUESTION}]
    ids = engine.chat_prompt(messages)
    assert ids == AutoTokenizer.from_pretrained(TINY_R1).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids.count(BOS) == 1 and engine.chat(messages, max_new_tokens=1).prompt_tokens == len(ids) == 24


def test_cli_raw_and_completions_count_the_bos(engine, engine_dir):
    want = len(transformers_ids(QUESTION))
    cli = moetrt_cli("generate", engine_dir, QUESTION, "--raw", "--greedy", "-n", "2", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["usage"]["prompt_tokens"] == want
    with client_for(engine) as client:
        response = client.post("/v1/completions", json={"model": "tiny-r1", "prompt": QUESTION, "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == want
        by_ids = client.post("/v1/completions", json={"model": "tiny-r1", "prompt": [54, 58], "max_tokens": 2})
        assert by_ids.json()["usage"]["prompt_tokens"] == 2


# -- lengths --------------------------------------------------------------------------------------------------


def test_without_a_length_the_default_is_capped_by_the_context_left(engine):
    """The issue's input: `generate E "What is 4827 + 593?"` on a 512-position engine asked for 24 + 512 tokens."""
    messages = [{"role": "user", "content": QUESTION}]
    reply = engine.chat(messages, greedy=True)
    assert reply.finish_reason == "stop" and reply.text.startswith("4827 + 593 = ")
    long_prompt = [54] * 500
    for result in (engine.generate(long_prompt, greedy=True, stop_token_ids=[]),
                   engine.generate([long_prompt, [54] * 10], greedy=True)[0]):
        assert result.completion_tokens <= 12
    events = list(engine.stream(long_prompt, greedy=True))
    assert events[-1].finish_reason in ("stop", "length")
    assert engine.options().max_new_tokens == DEFAULT_MAX_NEW_TOKENS  # no prompt, nothing to cap


def test_an_explicit_length_is_kept_and_checked(engine):
    with pytest.raises(RequestError, match="exceeds the engine's context of 512 tokens"):
        engine.generate([54] * 500, max_new_tokens=13)
    with pytest.raises(RequestError, match="a prompt of 512 tokens plus 1 new token"):
        engine.generate([54] * 512)  # a full context leaves no room: refused, not given 0 tokens


def test_the_cli_generates_without_a_length_on_a_512_context(engine_dir):
    result = moetrt_cli("generate", engine_dir, QUESTION, "--greedy", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] == 24


def test_zero_new_tokens_is_refused_everywhere(engine, engine_dir):
    message = "max_new_tokens must be at least 1, got 0"
    with pytest.raises(MoetrtError, match=message):
        engine.generate(QUESTION, max_new_tokens=0)
    cli = moetrt_cli("generate", engine_dir, QUESTION, "-n", "0")
    assert (cli.returncode, cli.stdout, cli.stderr) == (1, "", f"error: {message}\n")
    with client_for(engine) as client:
        completion = {"model": "tiny-r1", "prompt": QUESTION, "max_tokens": 0}
        assert client.post("/v1/completions", json=completion).status_code == 400
        chat = {"model": "tiny-r1", "messages": [{"role": "user", "content": QUESTION}], "max_completion_tokens": 0}
        assert client.post("/v1/chat/completions", json=chat).status_code == 400


# -- no chat template -----------------------------------------------------------------------------------------


def test_an_engine_without_a_chat_template_generates_and_only_chat_refuses(engine, templateless_dir):
    plain = Engine.load(templateless_dir)
    ids = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    assert plain.generate(ids, greedy=True, max_new_tokens=8).token_ids == \
        engine.generate(ids, greedy=True, max_new_tokens=8).token_ids
    assert plain.generate(QUESTION, max_new_tokens=2).prompt_tokens == len(transformers_ids(QUESTION))
    with pytest.raises(MoetrtError) as refused:
        plain.chat([{"role": "user", "content": QUESTION}])
    assert str(refused.value) == NO_TEMPLATE


def test_cli_and_server_without_a_chat_template(templateless_dir):
    chat = moetrt_cli("generate", templateless_dir, QUESTION)
    assert (chat.returncode, chat.stderr) == (1, f"error: {NO_TEMPLATE}\n")
    raw = moetrt_cli("generate", templateless_dir, QUESTION, "--raw", "-n", "2", "--json")
    assert raw.returncode == 0, raw.stderr
    with client_for(Engine.load(templateless_dir)) as client:
        refused = client.post("/v1/chat/completions", json={"model": "tiny-r1", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": QUESTION}]})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == NO_TEMPLATE
        served = client.post("/v1/completions", json={"model": "tiny-r1", "prompt": QUESTION, "max_tokens": 2})
        assert served.status_code == 200, served.text
