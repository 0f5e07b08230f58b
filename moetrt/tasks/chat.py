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
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template instead of tokenizer_config.json
NO_TEMPLATE = ("this engine's tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
               f"{TEMPLATE_FILE}), so it cannot render a conversation: send a raw prompt (generate --raw, "
               "/v1/completions) or token ids")
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

    def __init__(self, tokenizer, template: str | None, special_tokens: dict[str, str], eos_ids: tuple[int, ...]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.eos_ids = eos_ids
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self._template = None if template is None else env.from_string(template)

    @classmethod
    def load(cls, directory: str | Path) -> ChatTokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` and the chat template (+ eos ids from
        generation_config/config.json). Without a template the tokenizer still encodes; only `render` refuses."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise MoetrtError(f"{directory} has no tokenizer.json: text prompts need the checkpoint's tokenizer files")
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise MoetrtError(f"cannot read {directory / 'tokenizer.json'} ({error})") from None
        special = {field: _token_text(config.get(field)) for field in SPECIAL_TOKEN_FIELDS}
        special = {field: text for field, text in special.items() if text is not None}
        return cls(tokenizer, _chat_template(directory, config), special, _eos_ids(directory, tokenizer, special))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), as the model saw it in training; `tools` (OpenAI's
        tool objects) reach the template as `tools`, None when there are none, as transformers passes them. Raises
        MoetrtError when the tokenizer has no chat template."""
        if self._template is None:
            raise MoetrtError(NO_TEMPLATE)
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing added (the template already writes the BOS token)."""
        # encode_batch releases the GIL while it tokenizes (encode does not), so a server's other threads, its
        # event loop among them, keep running during a huge prompt; same ids.
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw-text prompt with the special tokens transformers' tokenizer adds to it: the BOS that
        add_bos_token asks for. transformers 5 takes them from tokenizer.json's post-processor (it drops
        tokenizer_config.json's add_bos_token/add_eos_token when a tokenizer.json is there), and so does this.
        A rendered chat prompt takes `encode` instead: its template writes the BOS."""
        return self.tokenizer.encode_batch([text], add_special_tokens=True)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of a one-turn generation prompt (for an R1 template it ends with `<think>\\n`)."""
        return self.encode(self.render([{"role": "user", "content": user_text}]))


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or transformers' list of named templates: the "default"
    one), else chat_template.jinja; None when there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    path = directory / TEMPLATE_FILE
    return path.read_text() if path.is_file() else None


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
