"""A checkpoint's tokenizer and chat template (`tokenizer.json`, `tokenizer_config.json`), torch-free.

The template is rendered with jinja2 the way transformers' `apply_chat_template` renders it (sandboxed,
`trim_blocks`, `lstrip_blocks`), so a prompt is byte-for-byte what the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError

SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")
THINK_END = "</think>"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoetrtError(f"cannot read {path} ({error})") from None
    if not isinstance(data, dict):
        raise MoetrtError(f"{path} must hold a JSON object")
    return data


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class ChatTokenizer:
    """Renders conversations with the checkpoint's chat template and encodes/decodes token ids."""

    def __init__(self, tokenizer, template: str, special_tokens: dict[str, str], eos_ids: tuple[int, ...]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.eos_ids = eos_ids
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self._template = env.from_string(template)

    @classmethod
    def load(cls, directory: str | Path) -> ChatTokenizer:
        """Read `tokenizer.json` and `tokenizer_config.json` (+ eos ids from generation_config/config.json)."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (directory / name).is_file():
                raise MoetrtError(f"{directory} has no {name}: a chat checkpoint needs its tokenizer files")
        config = _read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        if not isinstance(template, str):
            raise MoetrtError(f"{directory / 'tokenizer_config.json'} has no chat_template string")
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise MoetrtError(f"cannot read {directory / 'tokenizer.json'} ({error})") from None
        special = {field: _token_text(config.get(field)) for field in SPECIAL_TOKEN_FIELDS}
        special = {field: text for field, text in special.items() if text is not None}
        return cls(tokenizer, template, special, _eos_ids(directory, tokenizer, special))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), as the model saw it in training."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing added (the template already writes the BOS token)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of a one-turn generation prompt (for an R1 template it ends with `<think>\\n`)."""
        return self.encode(self.render([{"role": "user", "content": user_text}]))


def _eos_ids(directory: Path, tokenizer, special: dict[str, str]) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            value = _read_json(path).get("eos_token_id")
            if value is not None:
                return (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    eos = special.get("eos_token")
    eos_id = tokenizer.token_to_id(eos) if eos else None
    if eos_id is None:
        raise MoetrtError(f"{directory}: no eos_token_id in generation_config.json or config.json, no eos_token")
    return (eos_id,)
