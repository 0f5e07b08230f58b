"""The Python API: `Engine.load(engine_dir)`, then `logits`, `generate`, `stream` and `chat`.

Sampling defaults come from the engine's `generation_config.json` (DeepSeek recommends sampling for R1:
temperature 0.6, top-p 0.95); keyword arguments override them per call. Chat prompts are encoded so that the
messages' text cannot write the template's control tokens (runtime/text.py `ChatEncoder`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.generate import (
    GenerationOptions,
    GenerationResult,
    StreamEvent,
    generate,
    generate_stream,
)
from moetrt.formats import EngineManifest
from moetrt.runtime.backends import get_backend
from moetrt.runtime.manifest import load_manifest
from moetrt.runtime.parallel.options import ExpertParallelOptions
from moetrt.runtime.reasoning import chat_opens_thinking
from moetrt.runtime.requests import (
    DEFAULT_PREFILL_CHUNK,
    RequestError,
    check_context,
    check_messages,
    check_option_types,
    check_text,
    check_tools,
    fit_new_tokens,
    is_integer,
)
from moetrt.runtime.sampling import SamplingParams
from moetrt.runtime.text import ChatEncoder, template_errors

Prompt = str | list[int]
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "seed")


def open_session(manifest: EngineManifest, threads: int | None = None,
                 expert_parallel: ExpertParallelOptions | bool | None = None):
    """The session for an engine, from the backend that built it (runtime/backends.py); `threads` CPU threads
    (None: the backend's choice; under expert parallelism this host's cores divided among its ranks).

    With `expert_parallel` (True for the defaults) the process joins the MPI job it was launched in
    (runtime/parallel): rank 0 gets a session whose calls every rank runs; on any other rank this call serves
    rank 0's calls until rank 0 ends and then ends the process (it never returns)."""
    if threads is not None and not (is_integer(threads) and threads >= 1):
        raise MoetrtError(f"threads must be a positive integer, got {threads!r}; leave it out for the backend's "
                          "default")
    backend = get_backend(manifest.backend)
    if not expert_parallel:
        return backend.open_session(manifest, threads)
    from moetrt.runtime.parallel.job import join
    from moetrt.runtime.parallel.mirror import MirroredSession, follow

    group = join(expert_parallel if isinstance(expert_parallel, ExpertParallelOptions) else ExpertParallelOptions())
    if group.mirrored:
        raise MoetrtError("this MPI job already runs an expert-parallel engine: load one per job (keep the Engine "
                          "and reuse it)")
    session = backend.open_session(manifest, threads or group.default_threads, expert_group=group)
    if group.rank != 0:
        follow(session, group)
    return MirroredSession(session, group)


def _generation_defaults(directory: Path) -> dict[str, Any]:
    """The sampling defaults and max_new_tokens in an engine's `generation_config.json` (transformers'
    GenerationConfig keys; {} without the file). Raises MoetrtError, naming the file, the field and the fix, for a
    file that is no JSON object, values of the wrong type or out of range, or an eos_token_id that is no token id
    or list of them (the tokenizer reads that one)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return _checked_generation_defaults(path)
    except MoetrtError as error:
        raise MoetrtError(f"{path}: {error}; correct the checkpoint's generation_config.json and rebuild the "
                          "engine") from None


def _checked_generation_defaults(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MoetrtError(f"cannot read it ({error})") from None
    if not isinstance(data, dict):
        raise MoetrtError(f"it must hold a JSON object of generation settings, got {type(data).__name__}")
    defaults = {name: data[name] for name in SAMPLING_FIELDS if data.get(name) is not None}
    if data.get("max_new_tokens"):
        defaults["max_new_tokens"] = data["max_new_tokens"]
    check_option_types(defaults)
    SamplingParams(**{name: defaults[name] for name in SAMPLING_FIELDS if name in defaults})
    GenerationOptions(max_new_tokens=defaults.get("max_new_tokens", 1))
    eos = data.get("eos_token_id")
    if eos is not None and not (is_integer(eos) or (isinstance(eos, list) and eos and all(map(is_integer, eos)))):
        raise MoetrtError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
    return defaults


def _load_tokenizer(directory: Path):
    """The engine's ChatTokenizer; MoetrtError for a chat template that does not compile."""
    from jinja2 import TemplateError

    from moetrt.tasks.chat import ChatTokenizer

    try:
        return ChatTokenizer.load(directory)
    except TemplateError as error:
        line = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise MoetrtError(f"the chat template in {directory} does not compile{line}: "
                          f"{str(error.message or error).rstrip('.')}; correct chat_template in the checkpoint's "
                          "tokenizer_config.json (or chat_template.jinja) and rebuild the engine") from None


def _template_messages(messages: Any, tools: Any) -> list[dict[str, Any]]:
    """`messages` checked (`check_messages`, `check_tools`) as the template should see them: an assistant turn
    with tool_calls and an empty content gets `content: None`, as OpenAI means it (clients send either), since
    DeepSeek-R1's template writes a turn's tool calls only when its content is None."""
    check_messages(messages)
    check_tools(tools)
    return [{**message, "content": None} if message.get("tool_calls") and message.get("content") == "" else message
            for message in messages]


class Engine:
    """An engine directory ready to run: its manifest, the backend's session, the tokenizer (None when the engine
    has none: token ids only) and the generation defaults. `defaults`: generation_config.json's, read here unless
    given."""

    def __init__(self, manifest: EngineManifest, session, tokenizer=None, defaults: dict[str, Any] | None = None):
        self.manifest = manifest
        self.config = manifest.model_config
        self.session = session
        self.tokenizer = tokenizer
        self.max_context = manifest.profile.max_context
        self.max_seq = manifest.profile.seq
        self.defaults = _generation_defaults(manifest.directory) if defaults is None else defaults
        self.eos_ids: tuple[int, ...] = tokenizer.eos_ids if tokenizer is not None else self.config.eos_token_ids
        self._chat_encoder = ChatEncoder(tokenizer) if tokenizer is not None else None

    @classmethod
    def load(cls, engine_dir: str | Path, threads: int | None = None, integrity: bool = False,
             expert_parallel: ExpertParallelOptions | bool | None = None) -> Engine:
        """Load an engine directory: cheap manifest checks (hashes too with `integrity`), generation_config.json,
        tokenizer and chat template, session. Raises MoetrtError for any of them malformed.

        `expert_parallel` (True, or ExpertParallelOptions): run under `mpiexec -n N`, the routed experts split
        over the N processes (`open_session`); only rank 0 returns, the other ranks serve its calls and end with
        it."""
        manifest = load_manifest(engine_dir, integrity=integrity)
        defaults = _generation_defaults(manifest.directory)
        tokenizer = _load_tokenizer(manifest.directory) if manifest.tokenizer else None
        return cls(manifest, open_session(manifest, threads, expert_parallel), tokenizer, defaults)

    # -- scoring ---------------------------------------------------------------------------------------

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 `[B, S]` -> float32 `[B, S, vocab]` (no padding; run in chunks of the engine's max_seq)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise MoetrtError(f"input_ids must be [batch, seq] with seq >= 1, got shape {list(ids.shape)}")
        batch, seq = ids.shape
        check_context(seq, 0, self.max_context)
        cache = self.session.new_cache(batch, seq)
        chunks = []
        for start in range(0, seq, self.max_seq):
            end = min(start + self.max_seq, seq)
            positions = np.broadcast_to(np.arange(start, end), (batch, end - start))
            mask = cache.attention_mask(end - start, np.ones((batch, end - start), np.int64))
            logits, _ = self.session.run(ids[:, start:end], positions, mask, np.ascontiguousarray(positions - start),
                                         cache.past(), cache.reserve(end - start))
            cache.advance(end - start)
            chunks.append(logits.astype(np.float32, copy=False))
        return np.concatenate(chunks, axis=1)

    # -- generation ------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Text (through the tokenizer, with the special tokens transformers' tokenizer adds: DeepSeek's BOS) or
        token ids (taken as given) -> a list of ints; generation validates them. Raises RequestError for text that
        is not UTF-8 (a command-line argument in another encoding) and for anything but text or ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MoetrtError("this engine has no tokenizer: pass token ids (a list of ints) instead of text")
            check_text(prompt, "the prompt", param="prompt")
            return self.tokenizer.encode_prompt(prompt)
        if not isinstance(prompt, (Sequence, np.ndarray)):
            raise RequestError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}",
                               param="prompt")
        bad = next((t for t in prompt if not is_integer(t)), None)
        if bad is not None:
            raise RequestError(f"token ids must be integers, got {bad!r}: pass a list of ints", param="prompt")
        return [int(t) for t in prompt]

    def options(self, **overrides: Any) -> GenerationOptions:
        """Generation options: keyword overrides over generation_config.json over the runtime's defaults (greedy,
        DEFAULT_MAX_NEW_TOKENS new tokens, prefill in chunks of min(max_seq, DEFAULT_PREFILL_CHUNK)).

        Keywords: max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed, greedy,
        stop (str or list), stop_token_ids, stop_in_reasoning, max_reasoning_tokens, prefill_chunk, and OpenAI's
        presence_penalty, frequency_penalty, logit_bias ({token id: bias}), logprobs (k alternatives, 0-20) and
        response_format, and speculative ("mtp": draft with the engine's MTP module, built with --mtp) with
        draft_tokens (GenerationOptions says what each means). Raises RequestError for a value of the wrong
        type (a string temperature), MoetrtError for one out of range.
        """
        check_option_types(overrides)
        merged = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if merged.pop("greedy", False):
            merged["do_sample"] = False
        unknown = set(merged) - set(SAMPLING_FIELDS) - {
            "max_new_tokens", "stop", "stop_token_ids", "stop_in_reasoning", "max_reasoning_tokens", "prefill_chunk",
            "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format", "speculative",
            "draft_tokens"}
        if unknown:
            raise MoetrtError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        sampling = SamplingParams(**{k: merged.pop(k) for k in SAMPLING_FIELDS if k in merged})
        stop = merged.pop("stop", ())
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        stop_ids = tuple(merged.pop("stop_token_ids", ())) + tuple(self.eos_ids)
        merged.setdefault("prefill_chunk", min(self.max_seq, DEFAULT_PREFILL_CHUNK))
        return GenerationOptions(sampling=sampling, stop=stop, stop_token_ids=stop_ids, **merged)

    def generate(self, prompt: Prompt | list[Prompt], **options: Any) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or token ids, numpy's integers too) or a list of prompts (batched); no chat
        template. The output is split into reasoning and answer where it thinks: from the start when the prompt
        ends with a generation prompt that opens `<think>` (R1's), else from a `<think>` the model writes first."""
        batched = isinstance(prompt, list) and prompt and not is_integer(prompt[0])
        prompts = [self.encode(p) for p in prompt] if batched else [self.encode(prompt)]
        results = self._run(prompts, self._options_for(prompts, options))
        return results if batched else results[0]

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[StreamEvent]:
        """Yield text increments (split into reasoning and answer) as one prompt generates. Raises RequestError
        at once (not at the first event) for a request `validate_request` refuses."""
        ids = self.encode(prompt)
        return generate_stream(self.session, [ids], self._options_for([ids], options), self.tokenizer, self.max_context)

    def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                    allow_special_tokens: bool = False) -> list[int]:
        """The token ids of `messages` (OpenAI's shape: [{"role", "content"}], assistant turns with `content: None`
        and `tool_calls` [{"id", "type": "function", "function": {"name", "arguments": str}}], `tool` turns with
        `tool_call_id` and `content`) rendered with the chat template, ending with its generation prompt. `tools`:
        OpenAI's tool objects [{"type": "function", "function": {"name", "description", "parameters"}}], passed
        to the template as `tools`, or, when it ignores them (DeepSeek's published templates do), described in the
        system turn by moetrt's preamble (runtime/tool_prompts.py); parse the reply's calls with
        runtime/tool_parsers.py. Text in the messages
        or tools that spells a control token (`<｜Assistant｜>`, `<｜end▁of▁sentence｜>`, a tool-call marker...) is
        encoded as plain text, so it cannot forge a turn or a call; with `allow_special_tokens` message text
        becomes the token, as the rendered text reads. Raises RequestError for messages or tools of the wrong
        shape (`check_messages`, `check_tools`), for tools neither the template nor the preamble can show (no
        tool-call tokens, a template that writes no tool calls), and for what the template refuses; MoetrtError
        without a template."""
        if self._chat_encoder is None:
            raise MoetrtError("this engine has no tokenizer, so no chat template: use generate with token ids")
        messages = _template_messages(messages, tools)
        return self._chat_encoder.encode(messages, allow_special_tokens=allow_special_tokens, tools=tools)

    def opens_thinking(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> bool:
        """Whether the chat template's generation prompt for `messages` (and `tools`) leaves the reply inside
        `<think>` (R1's does); what the conversation says plays no part."""
        if self.tokenizer is None:
            return False
        messages = _template_messages(messages, tools)
        with template_errors():
            return chat_opens_thinking(self.tokenizer, messages, tools)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             allow_special_tokens: bool = False, **options: Any) -> GenerationResult:
        """Render `messages` (and `tools`) with the chat template (see `chat_prompt`) and generate; the reply starts
        inside `<think>` when the template's generation prompt opens it (`opens_thinking`). Tool calls stay in
        the reply's text: `tool_parsers.tool_parser(name, engine.tokenizer).tool_calls_in(result.token_ids,
        result.text)` reads them."""
        prompt = self.chat_prompt(messages, tools=tools, allow_special_tokens=allow_special_tokens)
        opts = self._options_for([prompt], options)
        return self._run([prompt], opts, in_reasoning=self.opens_thinking(messages, tools=tools))[0]

    def chat_stream(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                    allow_special_tokens: bool = False, **options: Any) -> Iterator[StreamEvent]:
        """`chat`'s events as they come (see `stream`)."""
        prompt = self.chat_prompt(messages, tools=tools, allow_special_tokens=allow_special_tokens)
        opts = self._options_for([prompt], options)
        return generate_stream(self.session, [prompt], opts, self.tokenizer, self.max_context,
                               in_reasoning=self.opens_thinking(messages, tools=tools))

    def _options_for(self, prompts: list[list[int]], overrides: dict[str, Any]) -> GenerationOptions:
        """`options(**overrides)` for these prompts: when the caller names no max_new_tokens, the default
        (generation_config.json's, else DEFAULT_MAX_NEW_TOKENS) is capped by the room the longest prompt leaves in
        the context, as the server caps it."""
        options = self.options(**overrides)
        if overrides.get("max_new_tokens") is not None:
            return options
        longest = max((len(p) for p in prompts), default=0)
        return dataclasses.replace(options, max_new_tokens=fit_new_tokens(longest, self.max_context,
                                                                          options.max_new_tokens))

    def _run(self, prompts: list[list[int]], options: GenerationOptions,
             in_reasoning: bool | None = None) -> list[GenerationResult]:
        return generate(self.session, prompts, options, self.tokenizer, self.max_context, in_reasoning)
