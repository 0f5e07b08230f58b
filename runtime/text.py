"""Streaming text: incremental detokenisation that never splits a UTF-8 character, and stop strings, holding
back only the few characters that might still change meaning. (R1's `<think>` split: runtime/reasoning.py.)"""

from __future__ import annotations


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
