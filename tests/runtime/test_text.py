"""Streaming text: UTF-8-safe increments and stop strings (the reasoning split: test_reasoning.py)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moetrt.runtime.text import IncrementalDetokenizer, StopMatcher


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


def test_stop_string_across_increments():
    matcher = StopMatcher(("###", "\nEND"))
    out, stopped = matcher.feed("answer: 4")
    assert (out, stopped) == ("answer: 4", False)
    out, stopped = matcher.feed("2 #")
    assert (out, stopped) == ("2 ", False)
    out, stopped = matcher.feed("## tail")
    assert (out, stopped) == ("", True)
