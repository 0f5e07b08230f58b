"""DeepSeek's tool calls read from scripted model outputs (runtime/tool_parsers.py): V3/R1's fenced form and
V3.1's, whole and streamed token by token (deltas in OpenAI's shape that join to the whole result), text that lags
its tokens, and malformed outputs, which come back as plain text and never as an empty tool_calls.

The outputs are tokenized with tiny-r1's byte-level tokenizer; it has no tool-call tokens, so
test_chat_rendering.py's `r1_tokenizer` adds DeepSeek's (as added tokens, special=false, as R1's tokenizer.json
has them)."""

import json
import re
from pathlib import Path

import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime.requests import RequestError
from moetrt.runtime.text import IncrementalDetokenizer
from moetrt.runtime.tool_parsers import TOOL_PARSERS, tool_parser
from moetrt.tasks.chat import ChatTokenizer
from tests.runtime.test_chat_rendering import r1_tokenizer

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"
BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def v3_call(name: str, arguments: str) -> str:
    """One call as DeepSeek-V3 and R1 write it."""
    return f"{CALL}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def v31_call(name: str, arguments: str) -> str:
    """One call as DeepSeek-V3.1 writes it."""
    return f"{CALL}{name}{SEP}{arguments}{CALL_END}"


WEATHER, TIME, NAN = '{"city": "Paris", "unit": "°C"}', "{}", '{"x": NaN}'
PRETTY = '{\n  "query": "a ``` fence, ｜ and <think>",\n  "limit": [1, 2.5, null, true]\n}'
WELL_FORMED = {
    "v3 two calls after text": (f"Let me check.{BEGIN}{v3_call('get_weather', WEATHER)}\n"
                                f"{v3_call('get_time', TIME)}{END}",
                                "Let me check.", [("get_weather", WEATHER), ("get_time", TIME)]),
    "v3 one call, no text": (f"{BEGIN}{v3_call('search', PRETTY)}{END}", "", [("search", PRETTY)]),
    "v3.1 two calls": (f"{BEGIN}{v31_call('get_weather', WEATHER)}{v31_call('get-time_2', TIME)}{END}",
                       "", [("get_weather", WEATHER), ("get-time_2", TIME)]),
    "section left open after a call": (f"ok {BEGIN}{v3_call('get_time', TIME)}", "ok ", [("get_time", TIME)]),
    "text after the section": (f"{BEGIN}{v31_call('f', TIME)}{END}\nDone.", "\nDone.", [("f", TIME)]),
    "no calls at all": ("Just an answer with { braces } and ``` fences.", "Just an answer with { braces } and "
                        "``` fences.", []),
}
MALFORMED = {
    "call never closed": f"{BEGIN}{CALL}function{SEP}get_weather\n```json\n{WEATHER}\n```",
    "bad JSON": f"{BEGIN}{v3_call('get_weather', '{city: Paris}')}{END}",
    "NaN is not JSON": f"{BEGIN}{v31_call('f', NAN)}{END}",
    "arguments not an object": f"{BEGIN}{v31_call('f', '[1, 2]')}{END}",
    "missing separator": f"{BEGIN}{CALL}get_weather {WEATHER}{CALL_END}{END}",
    "name with a space": f"{BEGIN}{v31_call('get weather', WEATHER)}{END}",
    "empty section": f"Hmm.{BEGIN}{END}",
    "section with nothing after it": f"Hmm.{BEGIN}",
    "text where a call should start": f"{BEGIN}get_weather {WEATHER}{END}",
    "call cut by the section's end": f"{BEGIN}{CALL}function{SEP}f\n```json\n{{}}\n```{END}",
}


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return r1_tokenizer()


def streamed(tokenizer, ids: list[int], lag: int = 0) -> tuple[list[tuple[str, list[dict]]], object]:
    """Feed `ids` one token at a time with the text the runtime's detokenizer gives (`lag` steps late, as a held
    stop-string prefix would make it; the last step brings what is left); returns each step's (text, tool-call
    deltas), finish()'s included, and finish()'s result."""
    parser = tool_parser("deepseek_v3", tokenizer)
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    texts = [detokenizer.push(token) for token in ids]
    if lag:
        late = "".join(texts[len(texts) - lag :])
        texts = [""] * lag + texts[: len(texts) - lag]
        texts[-1] += late
    steps = []
    for token, text in zip(ids, texts):
        delta = parser.feed([token], text)
        steps.append((delta.text, delta.tool_calls))
    result = parser.finish()
    steps.append((result.text, result.tool_calls))
    return steps, result


def joined_calls(deltas: list[dict]) -> list[dict]:
    """OpenAI's client-side reassembly of streamed tool-call deltas into whole calls."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
        call["id"] = delta.get("id", call["id"])
        call["type"] = delta.get("type", call["type"])
        call["function"]["name"] += delta["function"].get("name", "")
        call["function"]["arguments"] += delta["function"].get("arguments", "")
    return [calls[index] for index in sorted(calls)]


@pytest.mark.parametrize("case", sorted(WELL_FORMED))
def test_well_formed_calls_parse_whole_and_as_streamed_deltas(tokenizer, case):
    output, content, calls = WELL_FORMED[case]
    ids = tokenizer.encode(output) + list(tokenizer.eos_ids)
    whole = tool_parser("deepseek_v3", tokenizer).tool_calls_in(ids)
    assert whole.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.complete] == calls
    assert all(c["type"] == "function" and CALL_ID.fullmatch(c["id"]) for c in whole.complete)
    assert len({c["id"] for c in whole.complete}) == len(calls)
    assert all(json.loads(c["function"]["arguments"]) == json.loads(a) for c, (_, a) in zip(whole.complete, calls))

    steps, result = streamed(tokenizer, ids[:-1])
    deltas = [d for _, step in steps for d in step]
    assert "".join(text for text, _ in steps) == content == result.content
    assert joined_calls(deltas) == result.complete
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.complete] == calls
    firsts = [d for d in deltas if "id" in d]
    # a call's first delta: index, id, type and name with empty arguments; later ones: argument fragments only
    assert [d["index"] for d in firsts] == list(range(len(calls)))
    assert all(d["type"] == "function" and d["function"]["arguments"] == "" and d["function"]["name"] for d in firsts)
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
               for d in deltas if "id" not in d)
    assert result.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert result.finish_reason("length") == "length"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_call_comes_back_as_plain_text_never_as_empty_tool_calls(tokenizer, case):
    output = MALFORMED[case]
    ids = tokenizer.encode(output)
    whole = tool_parser("deepseek_v3", tokenizer).tool_calls_in(ids)
    assert whole.complete == [] and whole.content == output
    steps, result = streamed(tokenizer, ids)
    assert all(not calls for _, calls in steps)
    assert "".join(text for text, _ in steps) == output == result.content and result.complete == []
    assert result.finish_reason("stop") == "stop"


def test_calls_before_a_malformed_one_stand_and_the_rest_is_plain_text(tokenizer):
    bad = f"\n{v3_call('get_time', '{oops')}{END}"
    output = f"Two things.{BEGIN}{v3_call('get_weather', WEATHER)}{bad}"
    steps, result = streamed(tokenizer, tokenizer.encode(output))
    assert [c["function"]["name"] for c in result.complete] == ["get_weather"]
    assert result.content == "Two things." + bad == "".join(text for text, _ in steps)
    assert joined_calls([d for _, step in steps for d in step]) == result.complete


@pytest.mark.parametrize("lag", [1, 3])
def test_text_that_lags_its_tokens_parses_the_same(tokenizer, lag):
    """A stop-string prefix held back, or a character split across tokens, delays the text behind the tokens."""
    output, content, calls = WELL_FORMED["v3 two calls after text"]
    steps, result = streamed(tokenizer, tokenizer.encode(output), lag=lag)
    assert result.content == content == "".join(text for text, _ in steps)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.complete] == calls


def test_a_whole_output_with_reasoning_is_read_from_its_answer_text(tokenizer):
    answer = f"{BEGIN}{v31_call('f', TIME)}{END}"
    ids = tokenizer.encode(f"<think>\nI could write {BEGIN} here</think>{answer}") + list(tokenizer.eos_ids)
    result = tool_parser("deepseek_v3", tokenizer).tool_calls_in(ids, answer)
    assert [c["function"]["name"] for c in result.complete] == ["f"] and result.content == ""


def test_markers_spelled_without_their_tokens_call_nothing(tokenizer):
    """Ordinary tokens that spell a marker's text (no tool-call token id) are text, not structure."""
    output = f"{BEGIN}{v31_call('f', TIME)}{END}"
    spelled = ChatTokenizer.load(TINY_R1).encode(output)  # tiny-r1's own tokenizer: bytes, no tool-call tokens
    assert not set(spelled) & {tokenizer.token_id(m) for m in (BEGIN, END, CALL, CALL_END, SEP)}
    result = tool_parser("deepseek_v3", tokenizer).tool_calls_in(spelled, output)
    assert result.complete == [] and result.content == output


def test_a_tokenizer_without_tool_call_tokens_is_refused_naming_tools():
    with pytest.raises(RequestError, match="tool▁calls▁begin") as error:
        tool_parser("deepseek_v3", ChatTokenizer.load(TINY_R1))
    assert error.value.param == "tools"


def test_the_registry_names_deepseek_v3_and_refuses_others(tokenizer):
    assert "deepseek_v3" in TOOL_PARSERS
    with pytest.raises(MoetrtError, match="unknown tool parser 'hermes'.*deepseek_v3"):
        tool_parser("hermes", tokenizer)


def special_r1_tokenizer() -> ChatTokenizer:
    """`r1_tokenizer` with the tool-call tokens marked special, as some checkpoints' tokenizer.json marks them."""
    from tokenizers import AddedToken, Tokenizer

    base = ChatTokenizer.load(TINY_R1)
    inner = Tokenizer.from_str(base.tokenizer.to_str())
    inner.add_special_tokens([AddedToken(m, normalized=False, special=True) for m in (BEGIN, END, CALL, CALL_END, SEP)])
    return ChatTokenizer(inner, None, base.special_tokens, base.eos_ids)


@pytest.mark.parametrize("make", [r1_tokenizer, special_r1_tokenizer], ids=["added", "special"])
def test_the_runtimes_rows_keep_the_markers_text_and_the_parser_reads_their_events(make):
    """Through generate.py's RowState, as the server streams a choice: R1 thinks, closes `</think>`, then calls;
    a stop string whose beginning each call's fence spells holds text back. The detokenizer does not skip special
    tokens, so the markers' text reaches the parser with their ids; events that carry thinking are not fed."""
    from moetrt.runtime.generate import RowState
    from moetrt.runtime.requests import GenerationOptions

    tokenizer = make()
    answer = f"Checking.{BEGIN}{v3_call('get_weather', WEATHER)}\n{v3_call('get_time', TIME)}{END}"
    ids = tokenizer.encode(f"I need the weather {BEGIN} tool.</think>{answer}") + list(tokenizer.eos_ids)
    options = GenerationOptions(max_new_tokens=len(ids), stop=("\n```json\n{never",), stop_token_ids=tokenizer.eos_ids)
    row = RowState(tokenizer.encode("<｜User｜>weather?<｜Assistant｜><think>\n"), options, tokenizer, in_reasoning=True)
    parser = tool_parser("deepseek_v3", tokenizer)
    texts, deltas = [], []
    for token in ids:
        event = row.advance(token)
        if event.reasoning:
            continue
        delta = parser.feed(event.token_ids, event.text)
        texts.append(delta.text)
        deltas += delta.tool_calls
    assert event.finish_reason == "stop"
    result = parser.finish()
    assert "".join(texts) + result.text == "Checking." == result.content
    assert joined_calls(deltas + result.tool_calls) == result.complete
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.complete] == [
        ("get_weather", WEATHER), ("get_time", TIME)]
