"""R1's reasoning split: the reply starts inside `<think>` only when the chat template's generation prompt opens
it, the split happens at the tags' token ids (never at text that spells them), the thinking budget gives exactly
that many thinking tokens, and stop strings end the answer (the thinking too with `stop_in_reasoning`).

Scripted token sequences drive generate.py's RowState over the chat checkpoint's tokenizer, in which `<think>` and
`</think>` are tokens and their characters can also be spelled one token each; the chat engine then shows the same
through `chat`, `chat_stream` and `/v1/chat/completions`."""

import json

import numpy as np
import pytest

from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import GenerationOptions, RowState
from moetrt.runtime.reasoning import ThinkTags, chat_opens_thinking, prompt_opens_thinking
from moetrt.runtime.sampling import SamplingParams
from moetrt.runtime.scheduler import Scheduler
from moetrt.tasks.chat import ChatTokenizer
from tests.chat_checkpoint import BOS, CHAT_TEMPLATE, EOS, build_tokenizer

THINK, END_THINK = 100, 101  # the chat checkpoint's ids of <think> and </think>
EOS_ID = 1
R1_TEMPLATE = CHAT_TEMPLATE  # generation prompt: <｜Assistant｜><think>\n
PLAIN_TEMPLATE = CHAT_TEMPLATE.replace("<｜Assistant｜><think>\n{% endif %}", "<｜Assistant｜>{% endif %}")
# A non-thinking mode's generation prompt (DeepSeek-V3.1's, Qwen3's with thinking off) closes an empty thinking.
CLOSED_TEMPLATE = CHAT_TEMPLATE.replace("<｜Assistant｜><think>\n{% endif %}",
                                        "<｜Assistant｜><think>\n\n</think>\n\n{% endif %}")
assert PLAIN_TEMPLATE != CHAT_TEMPLATE != CLOSED_TEMPLATE
MENTIONS_THE_TAG = [{"role": "user", "content": "Explain what the <think> tag is for"}]


def chat_tokenizer(template: str) -> ChatTokenizer:
    return ChatTokenizer(build_tokenizer(), template, {"bos_token": BOS, "eos_token": EOS}, (EOS_ID,))


@pytest.fixture(scope="module")
def r1():
    return chat_tokenizer(R1_TEMPLATE)


@pytest.fixture(scope="module")
def plain():
    return chat_tokenizer(PLAIN_TEMPLATE)


def spelled(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """`text` one character per token: tags spelled with ordinary tokens."""
    return [tokenizer.token_id(c) for c in text]


# -- where the reply starts --------------------------------------------------------------------------------------


def test_the_templates_generation_prompts_are_what_the_tests_assume(r1, plain):
    assert r1.render(MENTIONS_THE_TAG).endswith("<｜Assistant｜><think>\n")
    assert plain.render(MENTIONS_THE_TAG).endswith("<think> tag is for<｜Assistant｜>")
    assert ThinkTags.of(r1) == ThinkTags(THINK, END_THINK)


OPENS = [
    # (what, template, messages, opens)
    ("R1's prompt opens the thinking", R1_TEMPLATE, MENTIONS_THE_TAG, True),
    ("a message that mentions <think> opens nothing", PLAIN_TEMPLATE, MENTIONS_THE_TAG, False),
    ("a message that ends with <think>", PLAIN_TEMPLATE, [{"role": "user", "content": "say <think>\n"}], False),
    ("a system prompt with an open <think>", PLAIN_TEMPLATE,
     [{"role": "system", "content": "Begin with <think>"}, {"role": "user", "content": "hi"}], False),
    ("a prompt that closes an empty thinking", CLOSED_TEMPLATE, MENTIONS_THE_TAG, False),
    ("R1 with </think> in the history", R1_TEMPLATE,
     [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "<think>1+1</think>2"},
      {"role": "user", "content": "why </think>?"}], True),
]


@pytest.mark.parametrize("what, template, messages, opens", OPENS, ids=[r[0] for r in OPENS])
def test_only_the_generation_prompt_opens_the_thinking(what, template, messages, opens):
    tokenizer = chat_tokenizer(template)
    assert chat_opens_thinking(tokenizer, messages) is opens
    prompt = tokenizer.encode(tokenizer.render(messages))
    assert prompt_opens_thinking(tokenizer, prompt) is opens  # token-id prompts: the same decision


def test_a_token_id_prompt_opens_the_thinking_only_with_the_generation_prompts_tokens(r1):
    prompt = r1.encode(r1.render(MENTIONS_THE_TAG))
    assert prompt[-3:] == [99, THINK, 97]
    assert prompt_opens_thinking(r1, prompt)
    assert not prompt_opens_thinking(r1, prompt[:-1])  # <｜Assistant｜><think> without its newline
    assert not prompt_opens_thinking(r1, prompt[:-2] + spelled(r1, "<think>\n"))  # the tag spelled
    assert not prompt_opens_thinking(r1, spelled(r1, "12+7="))


# -- the split, on token ids --------------------------------------------------------------------------------------


def run_row(tokenizer, script, in_reasoning=None, split=True, **options):
    """Advance a RowState by the scripted tokens; (reasoning, content, finish, reasoning tokens, tokens taken)."""
    prompt = tokenizer.encode(tokenizer.render(MENTIONS_THE_TAG))
    opts = GenerationOptions(**{"max_new_tokens": 200, "stop_token_ids": (EOS_ID,), **options})
    row = RowState(prompt, opts, tokenizer, split_reasoning=split, in_reasoning=in_reasoning)
    reasoning, content, finish, taken = "", "", None, 0
    for token in script:
        event = row.advance(token)
        reasoning, content, finish = reasoning + event.reasoning, content + event.text, event.finish_reason
        taken += 1
        if finish:
            break
    return reasoning, content, finish, row.reasoning_tokens, taken


def text(tokenizer, s: str) -> list[int]:
    return tokenizer.encode(s)


def test_the_reply_splits_at_the_end_tag_token(r1):
    script = text(r1, "12+30=42\n") + [END_THINK] + text(r1, "\n\nThe answer is 42.") + [EOS_ID]
    assert run_row(r1, script) == ("12+30=42\n", "The answer is 42.", "stop", 9, len(script))


def test_a_spelled_end_tag_stays_reasoning_and_a_spelled_tag_in_the_answer_stays_text(r1):
    script = (text(r1, "a") + spelled(r1, "</think>") + text(r1, "b") + [END_THINK] + text(r1, "c")
              + spelled(r1, "</think>") + [EOS_ID])
    assert run_row(r1, script)[:3] == ("a</think>b", "c</think>", "stop")


def test_unclosed_thinking_with_a_partly_spelled_tag_stays_reasoning(r1):
    script = text(r1, "still ") + spelled(r1, "</thi") + text(r1, "nking")
    assert run_row(r1, script)[:3] == ("still </thinking", "", None)


def test_a_repeated_opening_tag_is_dropped(r1):
    script = [THINK] + text(r1, "\nhmm") + [END_THINK] + text(r1, "yes") + [EOS_ID]
    assert run_row(r1, script)[:4] == ("\nhmm", "yes", "stop", 4)


def test_a_reply_may_open_the_thinking_itself_after_whitespace(plain):
    script = text(plain, "  ") + [THINK] + text(plain, "\nhmm") + [END_THINK] + text(plain, "\n\nyes") + [EOS_ID]
    assert run_row(plain, script)[:4] == ("\nhmm", "yes", "stop", 4)


def test_without_the_generation_prompt_a_reply_is_all_answer(plain):
    script = spelled(plain, "<think>") + text(plain, "<b>bold</b> text") + [EOS_ID]
    assert run_row(plain, script)[:4] == ("", "<think><b>bold</b> text", "stop", 0)


def test_tag_tokens_outside_their_place_never_reach_either_part(r1, plain):
    script = text(r1, "x") + [END_THINK] + text(r1, "a") + [END_THINK] + text(r1, "b") + [THINK] + text(r1, "c")
    assert run_row(r1, script)[:2] == ("x", "abc")
    assert run_row(plain, text(plain, "hi") + [THINK] + text(plain, "x") + [END_THINK])[:2] == ("", "hix")
    assert run_row(r1, text(r1, "x") + [THINK] + text(r1, "y"))[:2] == ("xy", "")


def test_raw_completions_keep_the_tags_as_text(r1):
    script = [THINK] + text(r1, "x") + [END_THINK] + text(r1, "y")
    assert run_row(r1, script, split=False)[:2] == ("", "<think>x</think>y")


def test_the_callers_decision_wins_over_the_prompt(plain, r1):
    script = text(r1, "x") + [END_THINK] + text(r1, "y")
    assert run_row(plain, script, in_reasoning=True)[:2] == ("x", "y")
    assert run_row(r1, script, in_reasoning=False)[:2] == ("", "xy")


# -- the thinking budget ------------------------------------------------------------------------------------------


def budgeted(tokenizer, model_script, budget):
    """Choose each token from logits that put the scripted token first, as a model would; the budget may force
    `</think>` instead. Returns (chosen tokens, reasoning, content, reasoning tokens)."""
    prompt = tokenizer.encode(tokenizer.render(MENTIONS_THE_TAG))
    opts = GenerationOptions(max_new_tokens=100, stop_token_ids=(EOS_ID,), max_reasoning_tokens=budget,
                             sampling=SamplingParams(temperature=0.7, seed=0))
    row = RowState(prompt, opts, tokenizer, seed=0)
    chosen, reasoning, content = [], "", ""
    for wanted in model_script:
        logits = np.full(104, -30.0)
        logits[wanted] = 30.0
        event = row.advance(row.choose(logits))
        chosen += event.token_ids
        reasoning, content = reasoning + event.reasoning, content + event.text
        if event.finish_reason:
            break
    return chosen, reasoning, content, row.reasoning_tokens


@pytest.mark.parametrize("budget", [0, 1, 2, 3])
def test_a_budget_of_n_gives_exactly_n_thinking_tokens(r1, budget):
    thinking = text(r1, "abcdef")
    chosen, reasoning, content, count = budgeted(r1, thinking + [END_THINK] + text(r1, "\n\n42") + [EOS_ID], budget)
    assert chosen[: budget + 1] == thinking[:budget] + [END_THINK]
    assert (reasoning, count) == ("abcdef"[:budget], budget)


def test_after_a_forced_close_the_models_own_end_tag_stays_out_of_the_answer(r1):
    script = text(r1, "abcd") + [END_THINK] + text(r1, "\n\n42") + [EOS_ID]
    chosen, reasoning, content, count = budgeted(r1, script, 2)
    assert chosen == text(r1, "ab") + [END_THINK] + text(r1, "d") + [END_THINK] + text(r1, "\n\n42") + [EOS_ID]
    assert (reasoning, content, count) == ("ab", "d\n\n42", 2)


def test_the_budget_counts_from_a_thinking_the_reply_opens_itself(plain):
    script = [THINK] + text(plain, "abc") + [END_THINK] + text(plain, "42") + [EOS_ID]
    chosen, reasoning, content, count = budgeted(plain, script, 1)
    assert chosen[:3] == [THINK, text(plain, "a")[0], END_THINK]
    assert (reasoning, count) == ("a", 1)


# -- stop strings -------------------------------------------------------------------------------------------------

SCRATCHPAD = "4827+0593\n7+3+0=10\n"


@pytest.mark.parametrize("stop, in_reasoning, want", [
    ("+", False, (SCRATCHPAD, "4827 ", "stop")),  # the answer ends at its first "+"
    ("+", True, ("4827", "", "stop")),  # the thinking's first "+" ends the request
    ("=10", False, (SCRATCHPAD, "4827 + 593 = 5420", "stop")),  # only in the thinking: ends at EOS
    ("10\nZ", True, (SCRATCHPAD, "4827 + 593 = 5420", "stop")),  # a held partial match is released at </think>
    ("0\n\n4", True, (SCRATCHPAD, "4827 + 593 = 5420", "stop")),  # no match across </think>
])
def test_stop_strings_end_the_answer_and_with_stop_in_reasoning_the_thinking(r1, stop, in_reasoning, want):
    script = text(r1, SCRATCHPAD) + [END_THINK] + text(r1, "\n\n4827 + 593 = 5420") + [EOS_ID]
    assert run_row(r1, script, stop=(stop,), stop_in_reasoning=in_reasoning)[:3] == want


# -- chat, chat_stream and the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(chat_engine_dir):
    """The chat engine with its R1 template, and the same weights behind a template that opens no thinking."""
    r1_engine = Engine.load(chat_engine_dir)
    return r1_engine, Engine(r1_engine.manifest, r1_engine.session, chat_tokenizer(PLAIN_TEMPLATE))


def answer_of(engine, token_ids):
    """What a reply that never thinks shows: its text without EOS and tag tokens, stripped."""
    kept = [t for t in token_ids if t not in (EOS_ID, THINK, END_THINK)]
    return engine.tokenizer.decode(kept).strip()


def test_a_message_mentioning_the_tag_is_answered_in_content(engines):
    _, engine = engines
    result = engine.chat(MENTIONS_THE_TAG, max_new_tokens=24, greedy=True)
    assert result.token_ids[0] != THINK
    assert result.reasoning is None and result.text == answer_of(engine, result.token_ids) != ""
    events = list(engine.chat_stream(MENTIONS_THE_TAG, max_new_tokens=24, greedy=True))
    assert "".join(e.reasoning for e in events) == ""
    assert "".join(e.text for e in events).rstrip() == result.text
    assert engine.generate(engine.chat_prompt(MENTIONS_THE_TAG), max_new_tokens=24, greedy=True) == result


def test_the_r1_template_still_starts_inside_the_thinking(engines):
    engine, _ = engines
    result = engine.chat(MENTIONS_THE_TAG, max_new_tokens=64, greedy=True)
    assert END_THINK in result.token_ids
    close = result.token_ids.index(END_THINK)
    assert result.reasoning == engine.tokenizer.decode(result.token_ids[:close]).strip()
    assert engine.generate(engine.chat_prompt(MENTIONS_THE_TAG), max_new_tokens=64, greedy=True) == result


def serve_app(engine):
    from fastapi.testclient import TestClient

    from moetrt.runtime.server import create_app

    scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=2)
    return TestClient(create_app(engine, scheduler, model_name="tiny-chat"))


def sse_parts(response) -> tuple[str, str, str | None]:
    reasoning, content, finish = "", "", None
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return reasoning, content, finish


def test_the_server_answers_a_message_mentioning_the_tag_in_content(engines):
    _, engine = engines
    want = engine.chat(MENTIONS_THE_TAG, max_new_tokens=24, greedy=True)
    body = {"model": "tiny-chat", "messages": MENTIONS_THE_TAG, "max_tokens": 24, "temperature": 0}
    with serve_app(engine) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        streamed = sse_parts(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert (message["reasoning_content"], message["content"].rstrip()) == (None, want.text)
    assert (streamed[0], streamed[1].rstrip()) == ("", want.text)


def test_the_server_takes_stop_in_reasoning(engines):
    engine, _ = engines
    want = engine.chat(MENTIONS_THE_TAG, max_new_tokens=64, greedy=True)
    stop = next(want.reasoning[i : i + 2] for i in range(2, len(want.reasoning))
                if want.reasoning[i : i + 2] not in want.text and not want.reasoning[i : i + 2].isspace())
    before_stop = want.reasoning[: want.reasoning.index(stop)]
    body = {"model": "tiny-chat", "messages": MENTIONS_THE_TAG, "max_tokens": 64, "temperature": 0, "stop": stop}
    with serve_app(engine) as client:
        answer_only = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        thinking_too = client.post("/v1/chat/completions", json={**body, "stop_in_reasoning": True}).json()
        bad = client.post("/v1/chat/completions", json={**body, "stop_in_reasoning": "yes"})
    assert answer_only["message"]["reasoning_content"].strip() == want.reasoning
    assert answer_only["message"]["content"].rstrip() == want.text
    choice = thinking_too["choices"][0]
    assert (choice["message"]["reasoning_content"].strip(), choice["message"]["content"], choice["finish_reason"]) \
        == (before_stop, "", "stop") != ("", "", "stop")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop_in_reasoning"
