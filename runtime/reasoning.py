"""R1's reasoning format: where the thinking starts (the chat template's generation prompt, never text in the
conversation), where it ends (the `</think>` token id, never text that spells it), and the splitter that routes a
row's output into reasoning and answer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

THINK_START, THINK_END = "<think>", "</think>"
# A conversation for templates rendered without one: the generation prompt a token-id prompt may end with.
ONE_TURN = [{"role": "user", "content": "?"}]


@dataclasses.dataclass(frozen=True)
class ThinkTags:
    """The token ids of `<think>` and `</think>`."""

    start: int
    end: int

    @classmethod
    def of(cls, tokenizer) -> ThinkTags | None:
        """The tokenizer's tag ids (`token_id(text)`); None unless both tags are tokens, and then nothing splits."""
        start, end = tokenizer.token_id(THINK_START), tokenizer.token_id(THINK_END)
        return None if start is None or end is None else cls(start, end)


def leaves_thinking_open(text: str) -> bool:
    """Whether `text` (a generation prompt) opens `<think>` without closing it."""
    return text.rfind(THINK_START) > text.rfind(THINK_END)


def chat_opens_thinking(tokenizer, messages: list[dict[str, str]], tools: list[dict] | None = None) -> bool:
    """Whether the chat template's generation prompt for `messages` (and `tools`) (what `add_generation_prompt`
    appends) leaves the reply inside `<think>`, as R1's `<｜Assistant｜><think>\\n` does."""
    prompted = tokenizer.render(messages, tools=tools)
    plain = tokenizer.render(messages, add_generation_prompt=False, tools=tools)
    return leaves_thinking_open(prompted[len(os.path.commonprefix([prompted, plain])) :])


def prompt_opens_thinking(tokenizer, prompt: Sequence[int]) -> bool:
    """For a token-id prompt, which has no conversation to render: whether it ends with the tokens of the
    template's generation prompt (that of a one-turn conversation) and that prompt leaves the reply inside
    `<think>`. Spelling the prompt's text with other tokens does not count."""
    try:
        if not chat_opens_thinking(tokenizer, ONE_TURN):
            return False
        prompted = tokenizer.encode(tokenizer.render(ONE_TURN))
        plain = tokenizer.encode(tokenizer.render(ONE_TURN, add_generation_prompt=False))
    except Exception:  # no template, or one that refuses a bare user turn: no generation prompt to look for
        return False
    opening = prompted[len(os.path.commonprefix([prompted, plain])) :]
    return 0 < len(opening) <= len(prompt) and [int(t) for t in prompt[-len(opening) :]] == opening


class ReasoningSplitter:
    """Routes a row's output tokens into `reasoning` (inside `<think>...</think>`) and `content` (the answer).

    `in_reasoning`: the generation prompt opened the thinking (R1's ends with `<think>\\n`). The tags are token
    ids: a `<think>` before any visible output opens the thinking (or, when the prompt opened it, is a repeat and
    dropped), the first `</think>` inside closes it, and any other tag token is dropped, so neither part ever
    holds a tag. The answer's leading whitespace is dropped.
    """

    def __init__(self, tags: ThinkTags, in_reasoning: bool):
        self.tags = tags
        self.in_reasoning = in_reasoning
        self.thought = in_reasoning  # whether the output has a thinking part (possibly empty)
        self._may_open = True  # no visible output yet: a <think> may still open (or repeat) the thinking
        self._answer_started = False

    def feed(self, token: int, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for one generated token and the text it completed."""
        if token not in (self.tags.start, self.tags.end):
            return self._route(text)
        # The tag's text ends the increment; what comes before it completes earlier tokens' characters.
        tag = THINK_START if token == self.tags.start else THINK_END
        cut = text.rfind(tag)
        before, after = (text[:cut], text[cut + len(tag) :]) if cut >= 0 else (text, "")
        reasoning, content = self._route(before)
        if token == self.tags.start and self._may_open:
            self.in_reasoning = self.thought = True
        elif token == self.tags.end and self.in_reasoning:
            self.in_reasoning = False
        self._may_open = False
        more_reasoning, more_content = self._route(after)
        return reasoning + more_reasoning, content + more_content

    def _route(self, text: str) -> tuple[str, str]:
        if text.strip():
            self._may_open = False
        if self.in_reasoning:
            return text, ""
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        return "", text
