"""A tiny random chat checkpoint for serving tests: a DeepSeek-V3 config from tests/checkpoints.py plus a
character-level tokenizer, an R1-style chat template (the generation prompt opens `<think>`) and a
generation_config.json that samples by default, as DeepSeek-R1's does.

Every token decodes to visible text (one printable character, a newline or a chat marker), so random
outputs still exercise streaming, the reasoning split and stop strings. The output-head rows of EOS and
`</think>` are scaled up so that greedy outputs sometimes close the thinking and end early: outputs have
reasoning, answers and different lengths.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tests.checkpoints import build_model

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"
VOCAB_SIZE = 104  # 2 + 96 + 4 = 102, rounded up to a multiple of 8

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
BOOSTED_TOKENS = (EOS, "</think>")
BOOST = 3.0
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def build_tokenizer():
    """One token per character; chat markers are added tokens; decoding concatenates."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1}
    for symbol in CHARACTERS:
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS, EOS)])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in CHAT_TOKENS])
    return tokenizer


def make_chat_checkpoint(directory: Path, name: str = "v3-qlora-grouped-yarn", seed: int = 0) -> Path:
    """A tiny random checkpoint with tokenizer files, chat template and generation_config.json."""
    import torch

    directory = Path(directory)
    tokenizer = build_tokenizer()
    # 1024 positions: the serving tests' engines are built with that context (conftest.py CHAT_ENGINE_PROFILE).
    model = build_model(name, seed, vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=1, max_position_embeddings=1024)
    with torch.no_grad():
        model.lm_head.weight[[tokenizer.token_to_id(t) for t in BOOSTED_TOKENS]] *= BOOST
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    (directory / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory
