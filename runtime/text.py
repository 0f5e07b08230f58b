"""Text in and out: chat prompts whose message text cannot become control tokens (`ChatEncoder`); streaming
text, incremental detokenisation that never splits a UTF-8 character, and stop strings, holding back only the few
characters that might still change meaning. (R1's `<think>` split: runtime/reasoning.py.)"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from moetrt.runtime import tool_prompts
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

    Tool definitions (`tools`, rendered by the template as text: DeepSeek-style templates write them with
    `tojson`) are protected the same way, dict keys (a schema's property names) included. When the template ignores
    `tools` (DeepSeek's published ones do) and writes DeepSeek's tool calls, the tools are described in the system
    turn by moetrt's preamble (runtime/tool_prompts.py) and the conversation rendered by the template: the
    preamble's format markers are template text and become control tokens, the tool definitions in it stay
    protected.

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
        self._tool_form: str | None = None  # tool_prompts.call_form's answer, once found

    def encode(self, messages: list[dict[str, Any]], allow_special_tokens: bool = False,
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids, ending with the template's generation prompt. `allow_special_tokens`: encode the
        rendered text as it comes, so that messages may write control tokens (the behaviour before protection).
        `tools`: OpenAI's tool objects for the template's `tools`; when the template renders the same prompt
        without them (DeepSeek's published templates take no tools), moetrt's preamble describes them in the system
        turn (`tool_prompts.with_tool_preamble`); RequestError (param "tools") when neither can show them: the
        tokenizer lacks DeepSeek's tool-call tokens or the template writes no tool call (`tool_prompts.call_form`)."""
        form = None  # the call form the preamble shows; None: the template renders the tools itself
        rendered = self._render(messages, tools)
        if tools and rendered == self._render(messages, None):
            form = self._tool_form = self._tool_form or tool_prompts.call_form(self.tokenizer)
            rendered = self._render(messages, tools, form)
        strings = _strings(messages) + _strings(tools, skip=None)
        # plain substring tests: much faster than the regex over DeepSeek's ~800 added tokens; no token holds "\0"
        joined = "\0".join(strings)
        if allow_special_tokens or not any(text in joined for text in self.added):
            return self.tokenizer.encode(rendered)
        taken = set(rendered).union(*map(set, strings))
        free = (chr(code) for code in _PRIVATE_USE if chr(code) not in taken)
        ids = self._encode_marked(messages, tools, form, rendered, next(free), next(free))
        return ids if ids is not None else self._encode_escaped(messages, tools, form, free)

    def _encode_marked(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, form: str | None,
                       rendered: str, opening: str, closing: str) -> list[int] | None:
        """Each added token's text in the messages and tools between `opening` and `closing`; None when the
        template's output is not `rendered` once the marks are taken out."""
        def mark(s: str) -> str:
            return self._pattern.sub(lambda match: opening + match[0] + closing, s)

        marked = self._render(_map_strings(messages, mark), _map_strings(tools, mark, skip=None), form)
        if _without(marked, opening + closing) != rendered:
            return None
        # re.split with one group: the text between spans at even indices, the spans' token text at odd ones
        parts = re.split(f"{opening}({self._pattern.pattern}){closing}", marked)
        return self._encode_parts([_without(part, opening + closing) for part in parts])

    def _encode_escaped(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, form: str | None,
                        free: Iterator[str]) -> list[int]:
        """Each added token's text in the messages and tools replaced by a placeholder character from `free`."""
        strings = _strings(messages) + _strings(tools, skip=None)
        found = dict.fromkeys(match[0] for s in strings for match in self._pattern.finditer(s))
        placeholder = {text: next(free) for text in found}

        def escape(s: str) -> str:
            return self._pattern.sub(lambda m: placeholder[m[0]], s)

        escaped = self._render(_map_strings(messages, escape), _map_strings(tools, escape, skip=None), form)
        text_of = {char: text for text, char in placeholder.items()}
        parts = re.split(f"([{''.join(text_of)}])", escaped)
        return self._encode_parts([text_of[part] if index % 2 else part for index, part in enumerate(parts)])

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                form: str | None = None) -> str:
        """The template's text for `messages` and `tools`; with a call `form`, the tools described by moetrt's
        preamble in the system turn instead (the template does not read them)."""
        if form is not None and tools:
            messages, tools = tool_prompts.with_tool_preamble(messages, tools, form), None
        with template_errors():
            return self.tokenizer.render(messages, tools=tools)

    def _encode_parts(self, parts: list[str]) -> list[int]:
        """Even parts: template and message text, encoded as usual; odd parts: text encoded with no added token."""
        ids: list[int] = []
        for index, part in enumerate(parts):
            if part and index % 2:
                ids += self._plain_tokenizer().encode_batch([part], add_special_tokens=False)[0].ids  # GIL released
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


def _strings(value: Any, skip: str | None = "role") -> list[str]:
    """Every string in a conversation's messages (or tools), dict keys and nested fields (tool calls, schemas)
    included, but for the values under the key `skip` (the messages' roles; None for tools)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        keys = [key for key in value if isinstance(key, str)]
        return keys + [s for key, item in value.items() if key != skip for s in _strings(item, skip)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item, skip)]
    return []


def _map_strings(value: Any, change: Callable[[str], str], skip: str | None = "role") -> Any:
    """`value` with `change` applied to the strings `_strings(value, skip)` lists."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {change(key) if isinstance(key, str) else key: item if key == skip else _map_strings(item, change, skip)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, change, skip) for item in value]
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
