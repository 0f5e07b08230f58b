"""Streaming text: UTF-8-safe increments, the R1 reasoning split and stop strings."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moetrt.runtime.text import IncrementalDetokenizer, ReasoningSplitter, StopMatcher


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE without merges: one token per byte, so multi-byte characters span several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_increments_never_split_a_character(byte_tokenizer):
    text = "héllo wörld — 数学 🙂 done"
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) > len(text)  # some characters take several tokens
    detok = IncrementalDetokenizer(byte_tokenizer.decode)
    pieces = [detok.push(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert any(piece == "" for piece in pieces)  # waited for the rest of a character


def feed_all(splitter, pieces):
    reasoning, content = "", ""
    for i, piece in enumerate(pieces):
        r, c = splitter.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def test_output_starting_inside_thinking_splits_at_the_close_tag():
    pieces = ["First, 12", "+30=42.\n</th", "ink>\n\n", "The answer ", "is 42."]
    assert feed_all(ReasoningSplitter(in_reasoning=True), pieces) == ("First, 12+30=42.\n", "The answer is 42.")


def test_output_that_opens_think_itself():
    pieces = ["  <thi", "nk>\nhmm", "</think>", "\n\nyes"]
    assert feed_all(ReasoningSplitter(in_reasoning=False), pieces) == ("\nhmm", "yes")


def test_output_without_thinking_is_all_answer():
    assert feed_all(ReasoningSplitter(in_reasoning=False), ["<b>bold", "</b> text"]) == ("", "<b>bold</b> text")


def test_unclosed_thinking_stays_reasoning():
    assert feed_all(ReasoningSplitter(in_reasoning=True), ["still </thi", "nking"]) == ("still </thinking", "")


def test_stop_string_across_increments():
    matcher = StopMatcher(("###", "\nEND"))
    out, stopped = matcher.feed("answer: 4")
    assert (out, stopped) == ("answer: 4", False)
    out, stopped = matcher.feed("2 #")
    assert (out, stopped) == ("2 ", False)
    out, stopped = matcher.feed("## tail")
    assert (out, stopped) == ("", True)
