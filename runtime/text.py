"""Streaming text: incremental detokenisation that never splits a UTF-8 character, R1's `<think>` split and
stop strings, all holding back only the few characters that might still change meaning."""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


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


class ReasoningSplitter:
    """Routes text into `reasoning` (inside `<think>...</think>`) and `content` (the answer).

    R1's generation prompt ends with `<think>\\n`, so its output starts inside the thinking (`in_reasoning`);
    an output that opens `<think>` itself is handled too. The answer's leading whitespace is dropped.
    """

    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning
        self.seen_output = in_reasoning  # whether an opening <think> can still come
        self.closed = False
        self._pending = ""
        self._answer_started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Returns (reasoning delta, content delta) for the new text."""
        self._pending += text
        reasoning, content = "", ""
        while self._pending:
            if not self.seen_output:
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_START):
                    self._pending = stripped[len(THINK_START) :]
                    self.in_reasoning = self.seen_output = True
                    continue
                if not final and (not stripped or THINK_START.startswith(stripped)):
                    break  # could still become "<think>"
                self.seen_output = True
            if self.in_reasoning:
                end = self._pending.find(THINK_END)
                if end >= 0:
                    reasoning += self._pending[:end]
                    self._pending = self._pending[end + len(THINK_END) :]
                    self.in_reasoning, self.closed = False, True
                    continue
                hold = 0 if final else _partial_suffix(self._pending, THINK_END)
                reasoning += self._pending[: len(self._pending) - hold]
                self._pending = self._pending[len(self._pending) - hold :]
                break
            piece = self._pending
            self._pending = ""
            if not self._answer_started:
                piece = piece.lstrip()
                self._answer_started = bool(piece)
            content += piece
        return reasoning, content


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
