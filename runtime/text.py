"""Text in and out: chat prompts whose message text cannot become control tokens (`ChatEncoder`); streaming
text, incremental detokenisation that never splits a UTF-8 character, and stop strings, holding back only the few
characters that might still change meaning. (R1's `<think>` split: runtime/reasoning.py.)"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from moetrt.runtime.requests import RequestError

# Unicode's Supplementary Private Use Area-A: characters that no tokenizer or template gives a meaning.
_PRIVATE_USE = range(0xF0000, 0xFFFFE)


@contextlib.contextmanager
def template_errors() -> Iterator[None]:
    """Turn what a chat template raises while rendering a conversation into RequestError (param "messages"): its
    own `raise_exception("...")` (jinja2's TemplateError), an undefined field, or a Python error from an operation
    the messages do not support. Wrap only the rendering in it."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as error:
        raise RequestError(f"the chat template refused the conversation: {error.message or error}",
                           param="messages") from None
    except (TypeError, ValueError, LookupError, AttributeError) as error:
        raise RequestError(f"the chat template cannot render these messages ({type(error).__name__}: {error}); "
                           "check the messages' fields against what the template expects", param="messages") from None


class ChatEncoder:
    """Token ids of a conversation rendered with the chat template, where only the template writes control tokens:
    text inside the messages that spells one of the tokenizer's added tokens (DeepSeek-R1's `<｜User｜>`,
    `<｜Assistant｜>`, `<｜end▁of▁sentence｜>`, `<think>`, the tool-call markers) is encoded as that text's ordinary
    tokens, so a message cannot forge a turn. transformers' `split_special_tokens` does this for tokens marked
    special only; R1's turn markers are added tokens with special=false, so every added token is covered here.

    A conversation whose strings spell no added token is encoded exactly as `encode(render(messages))`. Otherwise
    each occurrence is wrapped in two private-use marks and the template rendered again. When the marks change
    nothing but themselves (a template may still look for `</think>` in a message: R1's drops an earlier reply's
    reasoning), the wrapped spans are encoded as plain text. When the template's output depends on them, each
    occurrence is replaced by a private-use placeholder instead, so the template sees no added token in the
    messages, and the placeholders are encoded as the plain text they stand for. Text pieces are encoded
    separately at those spans, as the added token would have split them.

    `tokenizer`: a ChatTokenizer (moetrt/tasks/chat.py: `render`, `encode`, and `tokenizer`, the `tokenizers`
    Tokenizer). Raises RequestError for what the template refuses (`template_errors`).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = {token.content for token in tokenizer.tokenizer.get_added_tokens_decoder().values()
                 if token.content.strip()}  # whitespace-only tokens (some code models have them) control nothing
        self.added = sorted(added, key=len, reverse=True)  # the longest first: the regex takes the longest match
        self._pattern = re.compile("|".join(map(re.escape, self.added))) if self.added else None
        self._plain = None

    def encode(self, messages: list[dict[str, Any]], allow_special_tokens: bool = False) -> list[int]:
        """The prompt's token ids, ending with the template's generation prompt. `allow_special_tokens`: encode the
        rendered text as it comes, so that messages may write control tokens (the behaviour before protection)."""
        rendered = self._render(messages)
        strings = _strings(messages)
        # plain substring tests: much faster than the regex over DeepSeek's ~800 added tokens
        if allow_special_tokens or not any(text in s for s in strings for text in self.added):
            return self.tokenizer.encode(rendered)
        taken = set(rendered).union(*map(set, strings))
        free = (chr(code) for code in _PRIVATE_USE if chr(code) not in taken)
        ids = self._encode_marked(messages, rendered, next(free), next(free))
        return ids if ids is not None else self._encode_escaped(messages, free)

    def _encode_marked(self, messages: list[dict[str, Any]], rendered: str, opening: str,
                       closing: str) -> list[int] | None:
        """Each added token's text in the messages between `opening` and `closing`; None when the template's output
        is not `rendered` once the marks are taken out."""
        marked = self._render(_map_strings(messages, lambda s: self._pattern.sub(
            lambda match: opening + match[0] + closing, s)))
        if _without(marked, opening + closing) != rendered:
            return None
        # re.split with one group: the text between spans at even indices, the spans' token text at odd ones
        parts = re.split(f"{opening}({self._pattern.pattern}){closing}", marked)
        return self._encode_parts([_without(part, opening + closing) for part in parts])

    def _encode_escaped(self, messages: list[dict[str, Any]], free: Iterator[str]) -> list[int]:
        """Each added token's text in the messages replaced by a placeholder character taken from `free`."""
        found = dict.fromkeys(match[0] for s in _strings(messages) for match in self._pattern.finditer(s))
        placeholder = {text: next(free) for text in found}
        escaped = self._render(_map_strings(messages, lambda s: self._pattern.sub(lambda m: placeholder[m[0]], s)))
        text_of = {char: text for text, char in placeholder.items()}
        parts = re.split(f"([{''.join(text_of)}])", escaped)
        return self._encode_parts([text_of[part] if index % 2 else part for index, part in enumerate(parts)])

    def _render(self, messages: list[dict[str, Any]]) -> str:
        with template_errors():
            return self.tokenizer.render(messages)

    def _encode_parts(self, parts: list[str]) -> list[int]:
        """Even parts: template and message text, encoded as usual; odd parts: text encoded with no added token."""
        ids: list[int] = []
        for index, part in enumerate(parts):
            if part and index % 2:
                ids += self._plain_tokenizer().encode(part, add_special_tokens=False).ids
            elif part:
                ids += self.tokenizer.encode(part)
        return ids

    def _plain_tokenizer(self):
        """A copy of the tokenizer that matches no added token: all of them marked special, and `tokenizers`'
        `encode_special_tokens` on, which splits special tokens' text into ordinary tokens."""
        if self._plain is None:
            from tokenizers import Tokenizer

            spec = json.loads(self.tokenizer.tokenizer.to_str())
            for token in spec.get("added_tokens", []):
                token["special"] = True
            self._plain = Tokenizer.from_str(json.dumps(spec))
            self._plain.encode_special_tokens = True
        return self._plain


def _without(text: str, chars: str) -> str:
    return text.translate({ord(c): None for c in chars})


def _strings(value: Any) -> list[str]:
    """Every string in a conversation, nested fields (tool calls) included, but for the messages' roles."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for key, item in value.items() if key != "role" for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to the strings `_strings` lists."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {key: item if key == "role" else _map_strings(item, change) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, change) for item in value]
    return value


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Byte-level BPE can end a step mid-character (it
    decodes to U+FFFD); such a tail waits for the next token."""

    def __init__(self, decode, prompt_tail: list[int] | None = None):
        self._decode = decode
        self.ids: list[int] = list(prompt_tail or [])
        # Decoding from a few tokens back keeps leading-space handling right without re-decoding everything.
        self._prefix = 0
        self._read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            delta = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class StopMatcher:
    """Finds the first stop string in streamed text, holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self._held += text
        hits = [(self._held.find(s), s) for s in self.stops if s in self._held]
        if hits:
            start = min(hits)[0]
            out, self._held = self._held[:start], ""
            return out, True
        hold = 0 if final else max(_partial_suffix(self._held, s) for s in self.stops)
        out, self._held = self._held[: len(self._held) - hold], self._held[len(self._held) - hold :]
        return out, False
