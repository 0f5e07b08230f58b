"""The checkpoint tokenizer: raw-text prompts get the special tokens transformers' tokenizer gives them (the BOS
where tokenizer_config.json asks for it), chat prompts the template's single BOS, and a tokenizer without a
chat template still encodes while only rendering refuses."""

import json
import shutil
from pathlib import Path

import pytest

from moetrt import MoetrtError
from moetrt.tasks.chat import NO_TEMPLATE, ChatTokenizer

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"
BOS = "<｜begin▁of▁sentence｜>"
TEXTS = ["What is 4827 + 593?", "What is 75 - 38? Think step by step.", "4827+593=", "", " ", f"{BOS}1+1",
         "<｜User｜>What is 2+2?<｜Assistant｜><think>\n"]


def transformers_ids(directory: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


def tokenizer_variant(tmp_path: Path, edit_config=None, post_processor="keep") -> Path:
    """tiny-r1's tokenizer files with tokenizer_config.json edited and, optionally, no post-processor."""
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(TINY_R1 / name, tmp_path / name)
    if edit_config:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        edit_config(config)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if post_processor != "keep":
        tokenizer = json.loads((tmp_path / "tokenizer.json").read_text())
        tokenizer["post_processor"] = post_processor
        (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return tmp_path


@pytest.mark.parametrize("text", TEXTS)
def test_raw_text_gets_the_bos_as_transformers_gives_it(text):
    ids = ChatTokenizer.load(TINY_R1).encode_prompt(text)
    assert ids == transformers_ids(TINY_R1, text)
    assert ids[0] == 0  # tiny-r1's add_bos_token: true


def test_the_issue_prompt_counts_the_bos():
    """23 prompt tokens where transformers gives 24, before: the raw prompt lacked the BOS."""
    text = "What is 4827 + 593? Let's add."
    ids = ChatTokenizer.load(TINY_R1).encode_prompt(text)
    assert len(ids) == len(transformers_ids(TINY_R1, text)) == len(ChatTokenizer.load(TINY_R1).encode(text)) + 1


# transformers 5 takes the special tokens from tokenizer.json's post-processor and drops tokenizer_config.json's
# add_bos_token/add_eos_token when a tokenizer.json is there; these pin that moetrt gives what it gives.
VARIANTS = {
    "add_bos_token false": (lambda c: c.update(add_bos_token=False), "keep"),
    "add_eos_token true": (lambda c: c.update(add_eos_token=True), "keep"),
    "flags, no post-processor": (lambda c: c.update(add_bos_token=True, add_eos_token=True), None),
    "no flags": (lambda c: [c.pop("add_bos_token"), c.pop("add_eos_token")], "keep"),
    "no flags, no post-processor": (lambda c: [c.pop("add_bos_token"), c.pop("add_eos_token")], None),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_special_token_flags_follow_transformers(name, tmp_path):
    directory = tokenizer_variant(tmp_path, *VARIANTS[name])
    tokenizer = ChatTokenizer.load(directory)
    for text in TEXTS[:3]:
        assert tokenizer.encode_prompt(text) == transformers_ids(directory, text), name


def test_chat_prompts_hold_the_templates_single_bos():
    from transformers import AutoTokenizer

    tokenizer = ChatTokenizer.load(TINY_R1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4827 + 593?"}]
    ids = tokenizer.encode(tokenizer.render(messages))
    want = AutoTokenizer.from_pretrained(TINY_R1).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True)["input_ids"]
    assert ids == want and ids.count(0) == 1 and ids[0] == 0


def test_a_tokenizer_without_a_chat_template_encodes_and_only_rendering_refuses(tmp_path):
    directory = tokenizer_variant(tmp_path, lambda c: c.pop("chat_template"))
    tokenizer = ChatTokenizer.load(directory)
    assert tokenizer.encode_prompt("1+1=") == transformers_ids(directory, "1+1=")
    with pytest.raises(MoetrtError) as refused:
        tokenizer.render([{"role": "user", "content": "hi"}])
    assert str(refused.value) == NO_TEMPLATE and "\n" not in NO_TEMPLATE


def test_the_template_may_live_in_chat_template_jinja(tmp_path):
    """transformers 5 saves the template beside tokenizer_config.json."""
    template = json.loads((TINY_R1 / "tokenizer_config.json").read_text())["chat_template"]
    directory = tokenizer_variant(tmp_path, lambda c: c.pop("chat_template"))
    (directory / "chat_template.jinja").write_text(template)
    messages = [{"role": "user", "content": "hi"}]
    assert ChatTokenizer.load(directory).render(messages) == ChatTokenizer.load(TINY_R1).render(messages)


def test_tokenizer_config_json_is_optional(tmp_path):
    shutil.copyfile(TINY_R1 / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copyfile(TINY_R1 / "generation_config.json", tmp_path / "generation_config.json")
    tokenizer = ChatTokenizer.load(tmp_path)
    assert tokenizer.encode_prompt("1+1=") == transformers_ids(tmp_path, "1+1=")
    assert tokenizer.eos_ids == (1,)
