"""Structured output (runtime/structured.py): response_format checks, the grammar mask on real tokenizers, and JSON
from the tiny chat engine that parses and validates whenever it ends on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime import structured
from moetrt.runtime.requests import RequestError

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

ROOT = Path(__file__).resolve().parents[2]
TINY_R1_TOKENIZER = ROOT / "models" / "tiny-r1" / "tokenizer.json"
EOS = 1  # tiny-r1's and the chat checkpoint's <｜end▁of▁sentence｜>

WEATHER = {
    "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
}
RECORD = {
    "$defs": {"item": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                       "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                      "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
    "type": "object", "additionalProperties": False, "required": ["id", "ok", "items", "note"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                   "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"$ref": "#/$defs/item"}},
                   "note": {"anyOf": [{"type": "null"}, {"enum": ["rush", "gift"]}]}},
}


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tiny_r1_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TINY_R1_TOKENIZER))


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tests.chat_checkpoint import build_tokenizer

    return build_tokenizer()


# -- response_format objects ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [
    None,
    {"type": "text"},
    {"type": "json_object"},
    json_schema_format(WEATHER),
    json_schema_format(RECORD),
    {"type": "json_schema", "json_schema": {"name": "free-form_1", "schema": {}, "strict": False,
                                            "description": "anything"}},
])
def test_check_response_format_accepts_openai_objects(fmt):
    structured.check_response_format(fmt)


@pytest.mark.parametrize("fmt, words", [
    ("json_object", "must be an object"),
    ({"type": "json"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": "json_object", "schema": {}}, "'schema'"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, ".name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, ".name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, ".strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "mode": 1}}, "'mode'"),
    (json_schema_format({"type": "strin"}), "Invalid type"),
    (json_schema_format({"$ref": "#/$defs/missing"}), "does not exist"),
    (json_schema_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (json_schema_format({"type": "string", "pattern": "(unclosed"}), "unclosed group"),
    (json_schema_format({"type": "integer", "minimum": 5, "maximum": 2}), "Unsatisfiable"),
    (json_schema_format({"type": "number", "maximum": float("nan")}), "not JSON"),
])
def test_check_response_format_refuses_bad_or_unsupported_objects(fmt, words):
    with pytest.raises(RequestError, match="response_format") as caught:
        structured.check_response_format(fmt)
    assert caught.value.param == "response_format"
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_constraint_for_plain_text_is_none(tiny_r1_tokenizer):
    assert structured.constraint_for(None, tiny_r1_tokenizer, (EOS,)) is None
    assert structured.constraint_for({"type": "text"}, tiny_r1_tokenizer, (EOS,)) is None


def test_constraint_for_refuses_an_engine_without_tokenizer():
    with pytest.raises(RequestError, match="tokenizer") as caught:
        structured.constraint_for({"type": "json_object"}, None, (EOS,))
    assert caught.value.param == "response_format"


# -- the mask on real tokenizers -----------------------------------------------------------------------------------

def is_json_prefix(text: str) -> bool:
    """Whether some text completes `text` into one JSON value (RFC 8259), by a character-level pushdown check
    independent of the grammar library."""
    stack: list[str] = []  # "{" / "[" containers; "k" an object key is expected or being read
    state = "value"  # value, string, after_value, key, colon, number, literal
    literal = number = ""
    escape = 0  # 0 none, 1 after "\", 2-5 reading \uXXXX hex digits
    in_key = False
    i = 0
    while i < len(text):
        c = text[i]
        if state == "string":
            if escape == 1:
                if c == "u":
                    escape = 2
                elif c in '"\\/bfnrt':
                    escape = 0
                else:
                    return False
            elif escape >= 2:
                if c not in "0123456789abcdefABCDEF":
                    return False
                escape = 0 if escape == 5 else escape + 1
            elif c == "\\":
                escape = 1
            elif c == '"':
                state = "colon" if in_key else "after_value"
            elif ord(c) < 0x20:
                return False
            i += 1
            continue
        if state == "number":
            if c in "0123456789+-.eE":
                number += c
                i += 1
                continue
            if not _complete_number(number):
                return False
            state = "after_value"
            continue
        if state == "literal":
            literal += c
            if not any(word.startswith(literal) for word in ("true", "false", "null")):
                return False
            if literal in ("true", "false", "null"):
                state = "after_value"
            i += 1
            continue
        if c in " \t\n\r":
            i += 1
            continue
        if state == "value":
            if c == "{":
                stack.append("{")
                state = "key"
            elif c == "[":
                stack.append("[")
                state = "value_or_close"
            elif c == '"':
                state, in_key = "string", False
            elif c in "-0123456789":
                state, number = "number", c
            elif c in "tfn":
                state, literal = "literal", c
            else:
                return False
        elif state == "value_or_close":
            if c == "]":
                stack.pop()
                state = "after_value"
            else:
                state = "value"
                continue
        elif state in ("key", "key_only"):
            if c == '"':
                state, in_key = "string", True
            elif c == "}" and state == "key":
                stack.pop()
                state = "after_value"
            else:
                return False
        elif state == "colon":
            if c != ":":
                return False
            state = "value"
        elif state == "after_value":
            if not stack:
                return False  # text after a complete top-level value
            if c == ",":
                state = "key_only" if stack[-1] == "{" else "value"
            elif c == "}" and stack[-1] == "{" or c == "]" and stack[-1] == "[":
                stack.pop()
            else:
                return False
        i += 1
    return state != "number" or _number_prefix(number)


def _complete_number(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _number_prefix(text: str) -> bool:
    return any(_complete_number(text + tail) for tail in ("", "0", "1", "e1", "0e1"))


def test_json_prefix_check_itself():
    for good in ('', '{', '{"a', '{"a": [1, tr', '{"a": -', '{"a": 1.', '{"a": "\\u00', '[]', '{"a": null}'):
        assert is_json_prefix(good), good
    for bad in ('}', '{a', '{"a" 1', '{"a": tx', '{"a": 01', '[1,]', '{"a": 1}}', '"\x07', '{"a": "\\x'):
        assert not is_json_prefix(bad), bad


def _walk_and_check_every_allowed_token(constraint, tokenizer, vocab: int, seed: int, steps: int,
                                        schema: dict | None = None) -> list[int]:
    """Follow a seeded random path through the mask; at each step every allowed token (EOS aside) must keep the
    text a JSON prefix, and EOS may be allowed only when the text is a complete JSON value (valid against
    `schema`, when given)."""
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())]
    rng = np.random.default_rng(seed)
    closing = np.array([4.0 * any(c in t for c in '"}]') for t in texts] + [0.0] * (vocab - len(texts)))
    output: list[int] = []
    for _ in range(steps):
        logits = rng.normal(size=vocab).astype(np.float32)
        masked = constraint.mask(logits)
        allowed = np.flatnonzero(np.isfinite(masked))
        assert allowed.size, f"nothing allowed after {tokenizer.decode(output)!r}"
        assert allowed.max() < tokenizer.get_vocab_size()  # never the model's padding ids
        text = tokenizer.decode(output, skip_special_tokens=False)
        for token in allowed:
            if token == EOS:
                jsonschema.validate(json.loads(text), schema or {"type": "object"})
            else:
                assert is_json_prefix(text + texts[token]), (text, texts[token])
        assert np.array_equal(masked[allowed], logits[allowed])  # allowed logits pass unchanged
        token = int(np.argmax(np.where(np.isfinite(masked), masked + closing, -np.inf)))
        if token == EOS:
            break
        constraint.accept(token)
        output.append(token)
    return output


@pytest.mark.parametrize("schema", [None, WEATHER, RECORD], ids=["json_object", "weather", "record"])
def test_every_token_the_mask_allows_keeps_the_text_a_json_prefix(schema, tiny_r1_tokenizer):
    fmt = {"type": "json_object"} if schema is None else json_schema_format(schema)
    vocab = 264  # tiny-r1's model vocab: its 262 tokens + padding
    for seed in range(2):
        constraint = structured.constraint_for(fmt, tiny_r1_tokenizer, (EOS,))
        _walk_and_check_every_allowed_token(constraint, tiny_r1_tokenizer, vocab, seed, steps=60, schema=schema)


def test_mask_on_a_character_tokenizer_keeps_json_prefixes_and_bans_chat_markers(chat_tokenizer):
    """The chat checkpoint's tokenizer (one token per character, a Fuse decoder llguidance cannot read itself)."""
    constraint = structured.constraint_for({"type": "json_object"}, chat_tokenizer, (EOS,))
    vocab = 104
    first = constraint.mask(np.zeros(vocab, dtype=np.float32))
    assert np.flatnonzero(np.isfinite(first)).tolist() == [chat_tokenizer.token_to_id("{")]
    _walk_and_check_every_allowed_token(constraint, chat_tokenizer, vocab, seed=0, steps=40)
    markers = [chat_tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<｜User｜>", "<｜Assistant｜>")]
    constraint = structured.constraint_for(json_schema_format({"type": "object", "properties": {
        "a": {"type": "string"}}}), chat_tokenizer, (EOS,))
    for char in '{"a": "':
        assert np.isfinite(constraint.mask(np.zeros(vocab, np.float32))[chat_tokenizer.token_to_id(char)])
        constraint.accept(chat_tokenizer.token_to_id(char))
    inside_string = constraint.mask(np.zeros(vocab, dtype=np.float32))
    assert np.isfinite(inside_string[chat_tokenizer.token_to_id("x")])
    assert not np.isfinite(inside_string[markers]).any()


def test_properties_come_in_the_schema_order(chat_tokenizer):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
              "required": ["b", "a"], "additionalProperties": False}
    constraint = structured.constraint_for(json_schema_format(schema), chat_tokenizer, (EOS,))
    for char in '{"':
        constraint.accept(chat_tokenizer.token_to_id(char))
    allowed = np.flatnonzero(np.isfinite(constraint.mask(np.zeros(104, np.float32))))
    assert allowed.tolist() == [chat_tokenizer.token_to_id("b")]


def test_constraint_finishes_on_a_complete_document_and_then_allows_only_eos(tiny_r1_tokenizer):
    constraint = structured.constraint_for(json_schema_format({"type": "object", "properties": {
        "n": {"enum": [7]}}, "required": ["n"], "additionalProperties": False}), tiny_r1_tokenizer, (EOS,))
    for token in tiny_r1_tokenizer.encode('{"n": 7', add_special_tokens=False).ids:
        constraint.accept(token)
        assert not constraint.finished
    assert not np.isfinite(constraint.mask(np.zeros(264, np.float32))[EOS])
    constraint.accept(tiny_r1_tokenizer.token_to_id("}"))
    assert constraint.finished
    assert np.flatnonzero(np.isfinite(constraint.mask(np.zeros(264, np.float32)))).tolist() == [EOS]


def test_accepting_a_token_the_mask_refused_is_an_error(tiny_r1_tokenizer):
    constraint = structured.constraint_for({"type": "json_object"}, tiny_r1_tokenizer, (EOS,))
    with pytest.raises(MoetrtError, match="mask was not applied"):
        constraint.accept(tiny_r1_tokenizer.token_to_id("a"))
    with pytest.raises(MoetrtError, match="end of sequence"):
        structured.constraint_for({"type": "json_object"}, tiny_r1_tokenizer, (EOS,)).accept(EOS)


def test_tokenizer_side_is_built_once_and_grammars_once_per_schema(tiny_r1_tokenizer):
    from moetrt.tasks.chat import ChatTokenizer

    chat = ChatTokenizer(tiny_r1_tokenizer, None, {}, (EOS,))
    first = structured.constraint_for(json_schema_format(WEATHER), chat, (EOS,))
    hits = structured.grammar_info.cache_info().hits
    second = structured.constraint_for(json_schema_format(json.loads(json.dumps(WEATHER))), chat,
                                       (5, EOS))  # an equal schema; a request's own stop id
    assert structured.grammar_info.cache_info().hits == hits + 1
    assert first._info is second._info
    assert first._matcher is not second._matcher  # each request its own state
    second.accept(tiny_r1_tokenizer.token_to_id("{"))
    assert np.isfinite(first.mask(np.zeros(264, np.float32))[tiny_r1_tokenizer.token_to_id("{")])


def test_structured_output_loads_no_torch():
    code = ("import sys; from moetrt.runtime import structured; from tokenizers import Tokenizer; "
            f"structured.constraint_for({{'type': 'json_object'}}, Tokenizer.from_file({str(TINY_R1_TOKENIZER)!r}),"
            " (1,)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- the tiny chat engine ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    from moetrt.runtime.engine import Engine

    return Engine.load(chat_engine_dir)


QUESTIONS = ["Weather in Oslo?", "Give me the record.", "JSON please", "x"]


@pytest.mark.parametrize("schema", [WEATHER, RECORD], ids=["weather", "record"])
def test_greedy_chat_with_json_schema_gives_json_that_validates_whenever_it_stops(engine, schema):
    """The chat template opens `<think>`: the thinking runs free, the answer after `</think>` is constrained."""
    stopped = 0
    for question in QUESTIONS:
        result = engine.chat([{"role": "user", "content": question}], greedy=True, max_new_tokens=160,
                             response_format=json_schema_format(schema))
        if result.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(result.text), schema)
    assert stopped >= 1  # greedy is deterministic: these prompts do end (EOS is boosted in the chat checkpoint)


def test_greedy_generate_with_json_object_gives_an_object(engine):
    """A raw prompt that closes the thinking itself: the constraint applies from the first token after it."""
    prompt = engine.chat_prompt([{"role": "user", "content": "an object"}]) + \
        [engine.tokenizer.token_id("</think>")]
    stopped = 0
    for seed in range(3):
        result = engine.generate(prompt, do_sample=True, temperature=0.8, seed=seed, max_new_tokens=120,
                                 response_format={"type": "json_object"})
        if result.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(result.text), dict)
    assert stopped >= 1


def test_engine_refuses_an_invalid_schema_before_generating(engine):
    with pytest.raises(RequestError) as caught:
        engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=4,
                     response_format=json_schema_format({"type": "array", "uniqueItems": True}))
    assert caught.value.param == "response_format"


def test_constrained_and_free_requests_share_a_continuous_batch(engine):
    """Inside the scheduler's batch each constrained row gets its own grammar state: every request's tokens equal
    the same request run alone, and the constrained ones that stop hold valid JSON."""
    from moetrt.runtime.scheduler import Scheduler

    formats = [json_schema_format(WEATHER), None, {"type": "json_object"}, json_schema_format(RECORD), None,
               json_schema_format(WEATHER)]
    requests = [(engine.chat_prompt([{"role": "user", "content": question}]),
                 dict(greedy=True, max_new_tokens=200, response_format=fmt))
                for question, fmt in zip(QUESTIONS + QUESTIONS[:2], formats)]
    with Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=4) as batched:
        tickets = [batched.submit(prompt, engine.options(**options)) for prompt, options in requests]
        outputs = [[event for event in ticket.events()] for ticket in tickets]
    stopped = 0
    for (prompt, options), events in zip(requests, outputs):
        alone = engine.generate(prompt, **options)
        assert [t for event in events for t in event.token_ids] == alone.token_ids
        if options["response_format"] is not None and alone.finish_reason == "stop":
            stopped += 1
            text = "".join(event.text for event in events)
            schema = options["response_format"].get("json_schema", {}).get("schema", {"type": "object"})
            jsonschema.validate(json.loads(text), schema)
    assert stopped >= 2
