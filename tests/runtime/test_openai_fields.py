"""Every field of OpenAI's chat and completions APIs either changes the output as OpenAI defines it or gets a 400
naming it, checked with the official `openai` client against a real `moetrt serve` on loopback: penalties,
logit_bias, logprobs (the engine's own log-softmax), n with a seed, echo, reasoning fields, reasoning_effort,
response_format, tools rendered through the chat template, tool turns."""

import dataclasses
import json
import shutil

import jsonschema
import numpy as np
import openai
import pytest
from tokenizers import AddedToken, Tokenizer

from moetrt.formats import artifact_records, read_manifest, write_manifest
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import StreamEvent
from moetrt.runtime.sampling import log_softmax
from moetrt.runtime.server.protocol import Reply, TokenSpeller
from moetrt.runtime.tool_parsers import MARKERS, tool_parser
from moetrt.tasks.chat import ChatTokenizer
from tests.chat_checkpoint import CHAT_TEMPLATE
from tests.runtime.test_server import read_chat_stream, serving, user

# The serving fixture's R1-style template, plus what DeepSeek's templates do with tools: the tool definitions
# before the conversation, an assistant turn's tool calls, and tool results, in plain text (the fixture's
# character-level vocabulary has no tool-call tokens).
TOOLS_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ bos_token }}", "{{ bos_token }}{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}").replace(
    "{% else %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] }}",
    "{% elif m['role'] == 'tool' %}<｜User｜>Result {{ m['tool_call_id'] }}: {{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ (m['content'] or '').split('</think>')[-1] }}"
    "{% for call in m['tool_calls'] or [] %}Call {{ call['function']['name'] }}"
    "{{ call['function']['arguments'] }}{% endfor %}")
assert TOOLS_TEMPLATE.count("tools") == 2 and "tool_calls" in TOOLS_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
# The fixture model's greedy continuation of "RRRR" never meets EOS and repeats one token.
REPETITIVE = "RRRR"


@pytest.fixture(scope="module")
def tools_engine_dir(chat_engine_dir, tmp_path_factory):
    """The serving tests' engine with TOOLS_TEMPLATE as its chat template and DeepSeek's tool-call tokens in its
    tokenizer (ids past the model's vocabulary: the model never writes them, but the server can parse them), the
    manifest re-recorded."""
    directory = tmp_path_factory.mktemp("tools-engine") / "tiny-chat-tools"
    shutil.copytree(chat_engine_dir, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(marker, normalized=False, special=True) for marker in MARKERS])
    tokenizer.save(str(directory / "tokenizer.json"))
    manifest = read_manifest(directory)
    write_manifest(directory, dataclasses.replace(manifest, artifacts=artifact_records(directory)))
    return directory


@pytest.fixture(scope="module")
def server(tools_engine_dir, tmp_path_factory):
    with serving(tools_engine_dir, tmp_path_factory, max_batch=16, max_queue=16) as running:
        yield running


@pytest.fixture(scope="module")
def engine(tools_engine_dir):
    return Engine.load(tools_engine_dir)


def completion_ids(engine, result) -> list[int]:
    """A completion's token ids as its text shows them (the stop token is no text)."""
    return result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids


# -- fields this server refuses -----------------------------------------------------------------------------

REFUSED = [
    # (what, endpoint, extra body fields, param named)
    ("an unknown field", "chat", {"frobnicate": 1}, "frobnicate"),
    ("OpenAI's deprecated functions", "chat", {"functions": [WEATHER["function"]]}, "functions"),
    ("an unknown stream option", "chat", {"stream_options": {"include_usage": True, "verbose": True}},
     "stream_options"),
    ("an unknown message field", "chat", {"messages": [{"role": "user", "content": "hi", "mood": "glad"}]},
     "messages"),
    ("an image part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages"),
    ("an unknown completions field", "completions", {"min_tokens": 3}, "min_tokens"),
    ("chat's logprobs on completions", "completions", {"top_logprobs": 2}, "top_logprobs"),
    ("a suffix", "completions", {"suffix": "!"}, "suffix"),
    ("best_of above n", "completions", {"best_of": 3}, "best_of"),
    ("echo with logprobs", "completions", {"echo": True, "logprobs": 1}, "echo"),
    ("completion logprobs over 5", "completions", {"logprobs": 6}, "logprobs"),
    ("top_logprobs without logprobs", "chat", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs over 20", "chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("tool_choice required", "chat", {"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ("a named tool_choice", "chat", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                          "function": {"name": "get_weather"}}},
     "tool_choice"),
    ("tool_choice without tools", "chat", {"tool_choice": "auto"}, "tool_choice"),
    ("parallel_tool_calls false", "chat", {"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ("store true", "chat", {"store": True}, "store"),
    ("an unknown reasoning_effort", "chat", {"reasoning_effort": "extreme"}, "reasoning_effort"),
    ("presence_penalty over 2", "chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty under -2", "completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("a logit_bias under -100", "chat", {"logit_bias": {"5": -101}}, "logit_bias"),
    ("a logit_bias key that is no id", "chat", {"logit_bias": {"R": 5}}, "logit_bias"),
    ("a logit_bias id out of the vocabulary", "completions", {"logit_bias": {"104": 5}}, "logit_bias"),
    ("n = 0", "chat", {"n": 0}, "n"),
    ("n over the batch", "chat", {"n": 17}, "n"),
    ("an unknown response_format", "chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("a tool message without its call id", "chat", {"messages": [{"role": "tool", "content": "sunny"}]},
     "messages"),
    ("a null content outside a tool-call turn", "chat", {"messages": [{"role": "user", "content": None}]},
     "messages"),
]


@pytest.mark.parametrize("what, endpoint, fields, param", REFUSED, ids=[r[0] for r in REFUSED])
def test_fields_the_server_does_not_implement_get_a_400_naming_them(server, what, endpoint, fields, param):
    client = server.client()
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    base = {"messages": user("hi")} if endpoint == "chat" else {"prompt": "1+1="}
    body = {**base, **fields}
    known = {name: body.pop(name) for name in list(body) if name in ("messages", "prompt")}
    with pytest.raises(openai.BadRequestError) as raised:
        create(model=server.model, max_tokens=4, **known, extra_body=body)
    assert raised.value.status_code == 400 and raised.value.param == param, raised.value
    assert what and raised.value.message
    assert create(model=server.model, max_tokens=2, **base).usage.completion_tokens >= 1


def test_harmless_openai_fields_are_accepted(server):
    client = server.client()
    reply = client.chat.completions.create(
        model=server.model, messages=user("hi"), max_tokens=3, user="someone", metadata={"team": "a"}, store=False,
        response_format={"type": "text"}, tools=[WEATHER], tool_choice="none", parallel_tool_calls=True)
    assert reply.choices[0].finish_reason in ("stop", "length")
    completion = client.completions.create(model=server.model, prompt="1+1=", max_tokens=3, n=2, best_of=2,
                                           suffix=None)
    assert [choice.index for choice in completion.choices] == [0, 1]


# -- sampling fields ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_a_penalty_changes_a_repetitive_greedy_output_as_the_engine_applies_it(server, engine, penalty):
    client = server.client()
    request = dict(model=server.model, prompt=REPETITIVE, temperature=0, max_tokens=16)
    plain = client.completions.create(**request).choices[0].text
    penalised = client.completions.create(**request, **{penalty: 2.0}).choices[0].text
    want = engine.generate(REPETITIVE, max_new_tokens=16, greedy=True, **{penalty: 2.0})
    assert penalised == engine.tokenizer.decode(completion_ids(engine, want))
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))  # repeated tokens were pushed down


def test_logit_bias_minus_100_bans_the_greedy_token(server, engine):
    client = server.client()
    request = dict(model=server.model, prompt=REPETITIVE, temperature=0, max_tokens=8)
    greedy = engine.generate(REPETITIVE, max_new_tokens=8, greedy=True).token_ids
    banned = greedy[0]
    got = client.completions.create(**request, logit_bias={str(banned): -100}, logprobs=0).choices[0]
    want = engine.generate(REPETITIVE, max_new_tokens=8, greedy=True, logit_bias={banned: -100})
    assert banned not in want.token_ids
    assert got.text == engine.tokenizer.decode(completion_ids(engine, want))
    assert engine.tokenizer.decode([banned]) not in got.logprobs.tokens


def test_chat_logprobs_are_the_engines_log_softmax_in_openai_shape(server, engine):
    client = server.client()
    request = dict(model=server.model, messages=user("What is 4+28?"), temperature=0, max_tokens=12, logprobs=True,
                   top_logprobs=3)
    whole = client.chat.completions.create(**request)
    entries = whole.choices[0].logprobs.content
    ids = [engine.tokenizer.token_id(entry.token) for entry in entries]
    want = engine.chat(user("What is 4+28?"), max_new_tokens=12, greedy=True, logprobs=3)
    assert ids == want.token_ids and len(entries) == whole.usage.completion_tokens
    # the engine's own log-softmax: one scoring pass over the prompt and the reply
    prompt = engine.chat_prompt(user("What is 4+28?"))
    logits = engine.logits(np.array([prompt + ids[:-1]]))[0, len(prompt) - 1:]
    for step, (entry, token) in enumerate(zip(entries, ids)):
        expected = log_softmax(logits[step])
        assert entry.logprob == pytest.approx(expected[token], abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert [top.logprob for top in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                     reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        best = np.argsort(-expected)[:3]
        assert [engine.tokenizer.token_id(t.token) for t in entry.top_logprobs] == best.tolist()
    streamed = [entry for chunk in client.chat.completions.create(**request, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs_in_openai_legacy_shape(server, engine):
    got = server.client().completions.create(model=server.model, prompt=REPETITIVE, temperature=0, max_tokens=6,
                                             logprobs=2).choices[0]
    want = engine.generate(REPETITIVE, max_new_tokens=6, greedy=True, logprobs=2)
    logprobs = got.logprobs
    assert [engine.tokenizer.token_id(t) for t in logprobs.tokens] == want.token_ids
    assert logprobs.token_logprobs == pytest.approx([entry.logprob for entry in want.logprobs], abs=1e-6)
    assert "".join(logprobs.tokens) == got.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, top, entry in zip(logprobs.tokens, logprobs.top_logprobs, want.logprobs):
        # the top 2 and the sampled token (OpenAI's "up to logprobs + 1")
        assert set(top) == {engine.tokenizer.decode([t]) for t, _ in entry.top} | {token}


def test_n_choices_with_a_seed_equal_single_requests_with_seed_plus_i(server):
    client = server.client()
    request = dict(model=server.model, messages=user("What is 100-7?"), temperature=1.0, max_tokens=12)
    whole = client.chat.completions.create(**request, n=3, seed=11)
    singles = [client.chat.completions.create(**request, seed=11 + i) for i in range(3)]
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    for choice, single in zip(whole.choices, singles):
        assert (choice.message.content, choice.message.reasoning_content, choice.finish_reason) == (
            single.choices[0].message.content, single.choices[0].message.reasoning_content,
            single.choices[0].finish_reason)
    assert len({choice.message.reasoning_content for choice in whole.choices}) > 1  # seeds differ, so do samples
    assert whole.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    assert whole.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chunks = list(client.chat.completions.create(**request, n=3, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    for choice in whole.choices:
        mine = [c.model_copy(update={"choices": [x for x in c.choices if x.index == choice.index]}) for c in chunks]
        reasoning, content, finish, _ = read_chat_stream(mine)
        assert (reasoning, content, finish) == (choice.message.reasoning_content or "", choice.message.content,
                                                choice.finish_reason)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_echo_starts_each_choice_with_the_prompt(server):
    client = server.client()
    request = dict(model=server.model, prompt="12+7=", temperature=0, max_tokens=5)
    plain = client.completions.create(**request).choices[0].text
    echoed = client.completions.create(**request, echo=True)
    assert echoed.choices[0].text == "12+7=" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, echo=True, stream=True))
    assert streamed == echoed.choices[0].text


# -- reasoning ----------------------------------------------------------------------------------------------


def test_reasoning_comes_back_as_reasoning_content_and_reasoning(server):
    client = server.client()
    request = dict(model=server.model, messages=user("What is 100-7?"), temperature=0, max_tokens=24)
    message = client.chat.completions.create(**request).choices[0].message
    assert message.reasoning_content and message.reasoning == message.reasoning_content
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning_content
    assert read_chat_stream(chunks)[0] == message.reasoning_content


def test_reasoning_effort_sets_the_thinking_budget(server, engine):
    client = server.client()
    request = dict(model=server.model, messages=user("What is 100-7?"), temperature=0, max_tokens=40)
    unbounded = client.chat.completions.create(**request)
    assert unbounded.usage.completion_tokens_details.reasoning_tokens > 0
    none = client.chat.completions.create(**request, reasoning_effort="none")
    assert none.usage.completion_tokens_details.reasoning_tokens == 0
    want = engine.chat(user("What is 100-7?"), max_new_tokens=40, greedy=True, max_reasoning_tokens=0)
    assert none.choices[0].message.content == want.text
    high = client.chat.completions.create(**request, reasoning_effort="high")  # no budget
    assert high.choices[0].message.reasoning_content == unbounded.choices[0].message.reasoning_content


# -- structured output --------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}},
    {"type": "json_object"},
], ids=["json_schema", "json_object"])
def test_response_format_answers_are_json_that_validates(server, response_format):
    client = server.client()
    stopped = 0
    for seed in range(4):
        reply = client.chat.completions.create(model=server.model, messages=user("Yes or no?"), seed=seed,
                                               max_tokens=200, response_format=response_format)
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            value = json.loads(choice.message.content)
            jsonschema.validate(value, SCHEMA if response_format["type"] == "json_schema" else {"type": "object"})
    assert stopped  # the constraint ends the answer once the JSON is complete


# -- tools --------------------------------------------------------------------------------------------------


def test_tools_are_rendered_through_the_chat_template(server, engine):
    client = server.client()
    without = client.chat.completions.create(model=server.model, messages=user("Weather in Paris?"), max_tokens=2)
    with_tools = client.chat.completions.create(model=server.model, messages=user("Weather in Paris?"),
                                                max_tokens=2, tools=[WEATHER])
    rendered = engine.chat_prompt(user("Weather in Paris?"), tools=[WEATHER])
    assert with_tools.usage.prompt_tokens == len(rendered) > without.usage.prompt_tokens
    none = client.chat.completions.create(model=server.model, messages=user("Weather in Paris?"), max_tokens=2,
                                          tools=[WEATHER], tool_choice="none")
    assert none.usage.prompt_tokens == without.usage.prompt_tokens  # "none": the model is not shown the tools


def test_tool_turns_and_null_content_assistant_turns_are_accepted(server, engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = server.client().chat.completions.create(model=server.model, messages=messages, tools=[WEATHER],
                                                     temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens == len(engine.chat_prompt(messages, tools=[WEATHER]))
    text = engine.tokenizer.decode(engine.chat_prompt(messages, tools=[WEATHER]))
    assert 'Call get_weather{"city": "Paris"}' in text and "Result call_1: sunny" in text


def scripted_events(tokenizer, text: str, finish: str = "stop") -> list[StreamEvent]:
    """One answer event per token of `text` (its tool-call markers as their tokens), ending with EOS."""
    ids = tokenizer.encode(text) + [tokenizer.eos_ids[0]]
    return [StreamEvent(0, [token], text=tokenizer.decode([token]) if i < len(ids) - 1 else "",
                        finish_reason=finish if i == len(ids) - 1 else None) for i, token in enumerate(ids)]


def replay(tokenizer, events: list[StreamEvent]) -> tuple[list[dict], dict]:
    """The streamed choices and the whole response of a chat reply with tools made of `events`."""
    reply = Reply("m", chat=True, prompt_tokens=3, tool_parser=lambda: tool_parser("deepseek_v3", tokenizer))
    streamed = [choice for choice in map(reply.add, events) if choice is not None]
    return streamed, reply.whole()["choices"][0]


CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n'
        '```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


def test_tool_call_tokens_in_the_answer_become_tool_calls_streamed_and_whole(tools_engine_dir):
    tokenizer = ChatTokenizer.load(tools_engine_dir)
    streamed, whole = replay(tokenizer, scripted_events(tokenizer, "Let me check." + CALL))
    (call,) = whole["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert whole["message"]["content"] == "Let me check." and whole["finish_reason"] == "tool_calls"
    deltas = [d for choice in streamed for d in choice["delta"].get("tool_calls", [])]
    assert deltas[0] == {"index": 0, "id": call["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert "".join(choice["delta"].get("content", "") for choice in streamed) == "Let me check."
    assert streamed[-1]["finish_reason"] == "tool_calls"


def test_a_malformed_tool_call_comes_back_as_plain_content_never_as_empty_tool_calls(tools_engine_dir):
    tokenizer = ChatTokenizer.load(tools_engine_dir)
    broken = CALL.replace('{"city": "Paris"}', '{"city": Paris')
    streamed, whole = replay(tokenizer, scripted_events(tokenizer, "Let me check." + broken))
    assert "tool_calls" not in whole["message"] and whole["finish_reason"] == "stop"
    assert whole["message"]["content"] == "Let me check." + broken
    assert "".join(choice["delta"].get("content", "") for choice in streamed) == whole["message"]["content"]
    assert not any("tool_calls" in choice["delta"] for choice in streamed)


def test_logprob_bytes_of_byte_level_tokens_join_into_the_characters_they_split():
    """tiny-r1's tokenizer is byte-level BPE, as DeepSeek's is: a token may hold part of a character."""
    tokenizer = ChatTokenizer.load("models/tiny-r1")
    speller = TokenSpeller(tokenizer)
    text = "é你 ok"
    spelled = [speller(token) for token in tokenizer.encode(text)]
    assert b"".join(bytes(raw) for _, raw in spelled) == text.encode()
    assert any(piece == "\ufffd" for piece, _ in spelled)  # half a character reads as U+FFFD, its bytes stay exact
    assert [piece for piece, _ in spelled][-3:] == [" ", "o", "k"]  # whole characters read as themselves


# -- null optional fields -----------------------------------------------------------------------------------


def null_optional_fields(request_model) -> dict:
    """Every optional field of a request body as null (OpenAI's schema makes them nullable)."""
    return {field.alias or name: None for name, field in request_model.model_fields.items()
            if not field.is_required()}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_null_optional_fields_mean_their_defaults(server, path):
    from moetrt.runtime.server.protocol import ChatCompletionRequest, CompletionRequest

    chat = path.endswith("chat/completions")
    nulls = null_optional_fields(ChatCompletionRequest if chat else CompletionRequest)
    assert {"n", "stream", "logprobs", "stop_in_reasoning"} <= set(nulls)
    base = {"model": server.model, **({"messages": [{"role": "user", "content": "hi", "name": None}]} if chat
                                      else {"prompt": "1+1="})}
    response = server.post(path, {**base, **nulls})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"  # stream null: not streamed
    choices = response.json()["choices"]
    assert len(choices) == 1 and choices[0]["logprobs"] is None  # n null: 1; logprobs null: none
    with_options = server.post(path, {**base, "max_tokens": 2, "stream": True,
                                      "stream_options": {"include_usage": None}})
    assert with_options.status_code == 200, with_options.text
    for refused in ({"model": None}, {"frobnicate": None}):  # a required field or an unknown one stays refused
        answer = server.post(path, {**base, **refused})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(refused)), answer.text
