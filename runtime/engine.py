"""The Python API: `Engine.load(engine_dir)`, then `logits`, `generate`, `stream` and `chat`.

Sampling defaults come from the engine's `generation_config.json` (DeepSeek recommends sampling for R1:
temperature 0.6, top-p 0.95); keyword arguments override them per call.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Iterator
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
from moetrt.runtime.reasoning import chat_opens_thinking
from moetrt.runtime.requests import DEFAULT_PREFILL_CHUNK, RequestError, check_context, fit_new_tokens
from moetrt.runtime.sampling import SamplingParams

Prompt = str | list[int]
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "seed")


def open_session(manifest: EngineManifest, threads: int | None = None):
    """The session for an engine, from the backend that built it (runtime/backends.py); `threads` CPU threads
    (None: the backend's choice)."""
    if threads is not None and not (_is_integer(threads) and threads >= 1):
        raise MoetrtError(f"threads must be a positive integer, got {threads!r}; leave it out for the backend's "
                          "default")
    return get_backend(manifest.backend).open_session(manifest, threads)


def _is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _generation_defaults(directory: Path) -> dict[str, Any]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    defaults = {name: data[name] for name in SAMPLING_FIELDS if data.get(name) is not None}
    if data.get("max_new_tokens"):
        defaults["max_new_tokens"] = int(data["max_new_tokens"])
    return defaults


class Engine:
    def __init__(self, manifest: EngineManifest, session, tokenizer=None):
        self.manifest = manifest
        self.config = manifest.model_config
        self.session = session
        self.tokenizer = tokenizer
        self.max_context = manifest.profile.max_context
        self.max_seq = manifest.profile.seq
        self.defaults = _generation_defaults(manifest.directory)
        self.eos_ids: tuple[int, ...] = tokenizer.eos_ids if tokenizer is not None else self.config.eos_token_ids

    @classmethod
    def load(cls, engine_dir: str | Path, threads: int | None = None, integrity: bool = False) -> Engine:
        """Load an engine directory: cheap manifest checks (hashes too with `integrity`), session, tokenizer."""
        manifest = load_manifest(engine_dir, integrity=integrity)
        tokenizer = None
        if manifest.tokenizer:
            from moetrt.tasks.chat import ChatTokenizer

            tokenizer = ChatTokenizer.load(manifest.directory)
        return cls(manifest, open_session(manifest, threads), tokenizer)

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
        token ids (taken as given) -> a list of ints; generation validates them."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MoetrtError("this engine has no tokenizer: pass token ids (a list of ints) instead of text")
            return self.tokenizer.encode_prompt(prompt)
        bad = next((t for t in prompt if not _is_integer(t)), None)
        if bad is not None:
            raise RequestError(f"token ids must be integers, got {bad!r}: pass a list of ints", param="prompt")
        return [int(t) for t in prompt]

    def options(self, **overrides: Any) -> GenerationOptions:
        """Generation options: keyword overrides over generation_config.json over the runtime's defaults (greedy,
        DEFAULT_MAX_NEW_TOKENS new tokens, prefill in chunks of min(max_seq, DEFAULT_PREFILL_CHUNK)).

        Keywords: max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed, greedy,
        stop (str or list), stop_token_ids, stop_in_reasoning, max_reasoning_tokens, prefill_chunk.
        """
        merged = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if merged.pop("greedy", False):
            merged["do_sample"] = False
        unknown = set(merged) - set(SAMPLING_FIELDS) - {
            "max_new_tokens", "stop", "stop_token_ids", "stop_in_reasoning", "max_reasoning_tokens", "prefill_chunk"}
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
        batched = isinstance(prompt, list) and prompt and not _is_integer(prompt[0])
        prompts = [self.encode(p) for p in prompt] if batched else [self.encode(prompt)]
        results = self._run(prompts, self._options_for(prompts, options))
        return results if batched else results[0]

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[StreamEvent]:
        """Yield text increments (split into reasoning and answer) as one prompt generates. Raises RequestError
        at once (not at the first event) for a request `validate_request` refuses."""
        ids = self.encode(prompt)
        return generate_stream(self.session, [ids], self._options_for([ids], options), self.tokenizer, self.max_context)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise MoetrtError("this engine has no tokenizer, so no chat template: use generate with token ids")
        return self.tokenizer.encode(self.tokenizer.render(messages))

    def opens_thinking(self, messages: list[dict[str, str]]) -> bool:
        """Whether the chat template's generation prompt for `messages` leaves the reply inside `<think>` (R1's
        does); what the conversation says plays no part."""
        return self.tokenizer is not None and chat_opens_thinking(self.tokenizer, messages)

    def chat(self, messages: list[dict[str, str]], **options: Any) -> GenerationResult:
        """Render `messages` with the chat template and generate; the reply starts inside `<think>` when the
        template's generation prompt opens it (`opens_thinking`)."""
        prompt = self.chat_prompt(messages)
        opts = self._options_for([prompt], options)
        return self._run([prompt], opts, in_reasoning=self.opens_thinking(messages))[0]

    def chat_stream(self, messages: list[dict[str, str]], **options: Any) -> Iterator[StreamEvent]:
        """`chat`'s events as they come (see `stream`)."""
        prompt = self.chat_prompt(messages)
        opts = self._options_for([prompt], options)
        return generate_stream(self.session, [prompt], opts, self.tokenizer, self.max_context,
                               in_reasoning=self.opens_thinking(messages))

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
