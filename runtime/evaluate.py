"""`moetrt eval`: any Session (an engine's, or the torch reference's from export/reference_session.py) behind the
torch-free evaluation core, through the one generation loop (same problems, same scoring)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import GenerationOptions, generate
from moetrt.runtime.session import Session
from moetrt.tasks.chat import ChatTokenizer
from moetrt.tasks.evaluate import ContinueBatch, EvalReport, check_options, evaluate


def continuer(session: Session, options: GenerationOptions, max_context: int | None = None) -> ContinueBatch:
    """Batched continuation through `generate` with `options` (greedy, stopping a row at its stop ids); each
    call sets max_new_tokens."""

    def continue_batch(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        call = dataclasses.replace(options, max_new_tokens=max_new_tokens)
        return [result.token_ids for result in generate(session, prompts, call, max_context=max_context)]

    return continue_batch


def engine_continuer(engine: Engine, speculative: str | None = None) -> ContinueBatch:
    """Greedy continuation with the engine's own options (its EOS ids, prefill chunk and context), decoding
    speculatively with `speculative` ("mtp")."""
    return continuer(engine.session, engine.options(greedy=True, speculative=speculative), engine.max_context)


def evaluate_session(
    session: Session, tokenizer: ChatTokenizer, task: str = "arithmetic", n: int = 500, seed: int = 0,
    batch_size: int = 64,
) -> EvalReport:
    """Held-out accuracy of a session, greedy, each row stopping at the tokenizer's EOS ids."""
    check_options(task, n, batch_size)
    options = GenerationOptions(stop_token_ids=tuple(tokenizer.eos_ids))
    return evaluate(task, tokenizer, continuer(session, options), n, seed, batch_size)


def evaluate_engine(
    engine_dir: str | Path, task: str = "arithmetic", n: int = 500, seed: int = 0, batch_size: int = 64,
    expert_parallel=None, speculative: str | None = None,
) -> EvalReport:
    """Held-out accuracy of an engine directory (`expert_parallel`: Engine.load's; `speculative` "mtp" drafts
    with the engine's MTP module, same greedy answers, and the report counts the drafts verified and accepted)."""
    check_options(task, n, batch_size)
    engine = Engine.load(engine_dir, expert_parallel=expert_parallel)
    if engine.tokenizer is None:
        raise MoetrtError(f"{engine_dir} has no tokenizer; task evaluation needs one")
    report = evaluate(task, engine.tokenizer, engine_continuer(engine, speculative), n, seed, batch_size)
    if speculative:
        from moetrt.runtime.speculative import history_for

        history = history_for(engine.session)
        report = dataclasses.replace(report, drafts=(history.proposed, history.accepted))
    return report
