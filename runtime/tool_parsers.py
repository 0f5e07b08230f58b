"""Tool calls in a model's answer turned into OpenAI's `tool_calls`: parsers registered by name (vLLM's names) that
read the model's tool-call tokens, whole or as OpenAI's streamed deltas.

DeepSeek-V3's and R1's format (their 0324/0528 updates too), as their chat templates write earlier calls back:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and DeepSeek-V3.1's, where the name takes the type's place and no fence wraps the arguments:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

Use (the server's app.py does this for each choice of a request with `tools`):

    parser = tool_parser("deepseek_v3", engine.tokenizer)   # RequestError (param "tools") without the tokens
    for event in events:                                     # answer events only: not the thinking's
        delta = parser.feed(event.token_ids, event.text)     # delta.text, delta.tool_calls (OpenAI deltas)
    result = parser.finish()                                 # the last delta, and result.content, result.complete

or `parser.tool_calls_in(token_ids, text)` for a whole output. The markers are defined in runtime/tool_prompts.py,
which shows this format to a model whose chat template ignores `tools`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.runtime.requests import RequestError
from moetrt.runtime.text import _partial_suffix
from moetrt.runtime.tool_prompts import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, MARKERS, SEP

# OpenAI's rule for function names (its API refuses tools named otherwise, so no requested tool has such a name).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# After the separator in V3/R1's form: the name, then the arguments in a json code fence.
_FENCED = re.compile(r"\s*(\S+?)[ \t]*\n```(?:json)?[ \t]*\n(.*?)\s*```\s*", re.DOTALL)


def new_call_id() -> str:
    """A tool call's id in OpenAI's style: `call_` and 24 hex digits."""
    return f"call_{secrets.token_hex(12)}"


@dataclasses.dataclass
class ToolParseDelta:
    """What one step of a stream shows: `text`, answer text outside tool calls, and `tool_calls`, OpenAI's streamed
    tool-call deltas. A call's first delta is `{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}`, later ones `{"index", "function": {"arguments": fragment}}`; a call's fragments joined are
    its arguments, a JSON object as text."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ToolParseResult(ToolParseDelta):
    """`finish()`'s answer: the stream's last delta (`text`, `tool_calls`: what was held back until the end) and
    the whole output: `content`, all answer text outside tool calls (every delta's text joined), and `complete`,
    the calls in OpenAI's message shape `[{"id", "type": "function", "function": {"name", "arguments"}}]` (empty
    when the output called nothing; never a list to send as an empty `tool_calls`)."""

    content: str = ""
    complete: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason for a choice that ended with `reason`: "tool_calls" when it stopped after calls."""
        return "tool_calls" if self.complete and reason == "stop" else reason


class DeepSeekToolParser:
    """DeepSeek's tool calls (the module docstring shows both forms) in one choice's answer, fed as it streams.

    Structure comes from the tokenizer's tool-call tokens: a marker's text in the answer counts only when the token
    itself was fed (its id in `token_ids`, at or before the text that spells it), so a model that writes the
    marker's characters as ordinary text calls nothing. The detokenizer keeps these tokens' text (generate.py's
    decode does not skip special tokens), and `text` may lag its tokens (a character split across tokens, a
    possible stop string held back): the parser waits for the text.

    Each call is checked when its `<｜tool▁call▁end｜>` arrives (a name matching OpenAI's `[A-Za-z0-9_-]{1,64}`,
    arguments that parse as one JSON object) and only then streamed, its first delta then one with all its
    arguments, so every delta sent belongs to a valid call and the deltas joined equal the whole result. The first
    call that fails (no separator, bad JSON, a call never closed, text where a call should start, an empty
    section) and everything after it come back as plain text, markers included, exactly as the model wrote them;
    calls before it stand. Without any valid call the whole output is plain text: tool_calls is never empty.

    `tokenizer`: a ChatTokenizer (`token_id`, `decode`, `eos_ids`). Raises RequestError (param "tools") when it
    lacks DeepSeek's tool-call tokens: the model could never call a tool. One parser per choice, used once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {marker: tokenizer.token_id(marker) for marker in MARKERS}
        missing = [marker for marker, token in ids.items() if token is None]
        if missing:
            raise RequestError(f"this engine's tokenizer has no {missing[0]} token, so its model cannot write "
                               "DeepSeek's tool calls: leave out tools, or serve a DeepSeek-V3/R1 checkpoint",
                               param="tools")
        self._marker_of = {token: marker for marker, token in ids.items()}
        self._fed: collections.Counter[str] = collections.Counter()  # marker tokens fed and not yet matched to text
        self._buffer = ""  # text fed and not yet shown
        self._raw = ""  # the text of the section or call being read, shown as is if it turns out malformed
        self._state = self._text
        self._section_calls = 0
        self._content: list[str] = []
        self._complete: list[dict[str, Any]] = []

    def feed(self, token_ids: Sequence[int], text: str) -> ToolParseDelta:
        """Take one step of the answer: its new token ids and the text they completed (StreamEvent's `token_ids`
        and `text`; the thinking's events are not fed). Returns what the stream can show now."""
        self._fed.update(self._marker_of[t] for t in token_ids if t in self._marker_of)
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> ToolParseResult:
        """End the answer: the last delta (a call left open and held text come back as plain text) and the whole
        result (see ToolParseResult)."""
        delta = self._drain(final=True)
        return ToolParseResult(delta.text, delta.tool_calls, "".join(self._content), list(self._complete))

    def tool_calls_in(self, token_ids: Sequence[int], text: str | None = None) -> ToolParseResult:
        """Parse a whole answer (a fresh parser does it; this one is left as it is). `text`: the answer's text
        (GenerationResult.text) — needed when the output reasons, since `token_ids` then hold the thinking too;
        None decodes `token_ids`, leaving out the end-of-sequence tokens."""
        if text is None:
            eos = set(self.tokenizer.eos_ids)
            text = self.tokenizer.decode([t for t in token_ids if t not in eos])
        parser = type(self)(self.tokenizer)
        parser.feed(token_ids, text)
        return parser.finish()

    # -- the reader: one state method per place in the output; each consumes what it can and says whether to go on

    def _drain(self, final: bool) -> ToolParseDelta:
        delta = ToolParseDelta()
        while self._state(delta, final):
            pass
        self._content.append(delta.text)
        return delta

    def _text(self, delta: ToolParseDelta, final: bool) -> bool:
        """Answer text, up to a section's `<｜tool▁calls▁begin｜>`."""
        at = self._find(CALLS_BEGIN)
        if at < 0:
            # the token came but its text has not yet: hold back what may be its beginning
            hold = 0 if final or not self._fed[CALLS_BEGIN] else _partial_suffix(self._buffer, CALLS_BEGIN)
            delta.text += self._buffer[: len(self._buffer) - hold]
            self._buffer = self._buffer[len(self._buffer) - hold :]
            return False
        delta.text += self._buffer[:at]
        self._buffer = self._buffer[at:]
        self._raw, self._section_calls = self._take(CALLS_BEGIN), 0
        self._state = self._section
        return True

    def _section(self, delta: ToolParseDelta, final: bool) -> bool:
        """Between calls: whitespace, then a call's begin or the section's end."""
        rest = self._buffer.lstrip()
        self._raw += self._buffer[: len(self._buffer) - len(rest)]
        self._buffer = rest
        for marker in (CALL_BEGIN, CALLS_END):
            if rest.startswith(marker) and self._fed[marker]:
                self._raw += self._take(marker)
                if marker == CALL_BEGIN:
                    self._state = self._call
                elif self._section_calls:
                    self._raw, self._state = "", self._text
                else:
                    self._fail(delta)  # an empty section: no call to show
                return True
        if not final and any(m.startswith(rest) and len(rest) < len(m) for m in (CALL_BEGIN, CALLS_END)):
            return False
        if final and not rest and self._section_calls:
            self._raw, self._state = "", self._text  # calls made, the section's end never written: they stand
            return False
        self._fail(delta)
        return True

    def _call(self, delta: ToolParseDelta, final: bool) -> bool:
        """Inside a call, up to its `<｜tool▁call▁end｜>`: checked, then streamed."""
        found = [(self._find(m), m) for m in (CALL_END, CALL_BEGIN, CALLS_END, CALLS_BEGIN)]
        found = [(at, m) for at, m in found if at >= 0]
        if not found:
            if final:
                self._fail(delta)  # never closed
            return final
        at, marker = min(found)
        call = self._parse_call(self._buffer[:at]) if marker == CALL_END else None
        if call is None:
            self._fail(delta)
            return True
        self._buffer = self._buffer[at:]
        self._take(CALL_END)
        name, arguments = call
        index, call_id = len(self._complete), new_call_id()
        self._complete.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        delta.tool_calls += [{"index": index, "id": call_id, "type": "function",
                              "function": {"name": name, "arguments": ""}},
                             {"index": index, "function": {"arguments": arguments}}]
        self._raw, self._section_calls, self._state = "", self._section_calls + 1, self._section
        return True

    def _failed(self, delta: ToolParseDelta, final: bool) -> bool:
        """After a malformed call: everything is plain text."""
        delta.text += self._buffer
        self._buffer = ""
        return False

    def _fail(self, delta: ToolParseDelta) -> None:
        delta.text += self._raw + self._buffer
        self._raw = self._buffer = ""
        self._state = self._failed

    def _parse_call(self, body: str) -> tuple[str, str] | None:
        """(name, arguments) of a call's text between its begin and end markers; None when malformed."""
        at = body.find(SEP)
        if at < 0 or not self._fed[SEP]:
            return None
        self._fed[SEP] -= 1
        head, rest = body[:at].strip(), body[at + len(SEP) :]
        fenced = _FENCED.fullmatch(rest)
        if head == "function" and fenced:  # V3/R1: the type, then the name and the fenced arguments
            name, arguments = fenced[1], fenced[2].strip()
        else:  # V3.1: the name, then the arguments
            name, arguments = head, rest.strip()
        return (name, arguments) if _NAME.fullmatch(name) and _is_json_object(arguments) else None

    def _find(self, marker: str) -> int:
        """Where `marker`'s text starts in the buffer, when its token was fed; else -1."""
        return self._buffer.find(marker) if self._fed[marker] else -1

    def _take(self, marker: str) -> str:
        """Consume `marker` from the buffer's start (its token with it)."""
        self._fed[marker] -= 1
        self._buffer = self._buffer[len(marker) :]
        return marker


def _is_json_object(text: str) -> bool:
    """Whether `text` is one JSON object (strict JSON: no NaN or Infinity, which Python's json would take)."""
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        return isinstance(json.loads(text, parse_constant=refuse), dict)
    except ValueError:
        return False


# name -> parser class (vLLM's --tool-call-parser names)
TOOL_PARSERS: dict[str, type[DeepSeekToolParser]] = {"deepseek_v3": DeepSeekToolParser}
DEFAULT_TOOL_PARSER = "deepseek_v3"


def tool_parser(name: str, tokenizer) -> DeepSeekToolParser:
    """A new parser `name` (TOOL_PARSERS) for one choice over `tokenizer`. Raises MoetrtError for an unknown name,
    RequestError (param "tools") for a tokenizer without the parser's tokens."""
    if name not in TOOL_PARSERS:
        raise MoetrtError(f"unknown tool parser {name!r}: choose one of {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name](tokenizer)
