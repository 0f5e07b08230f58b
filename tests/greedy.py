"""The near-tie rule for comparing greedy continuations of two implementations."""

from __future__ import annotations

import numpy as np

from moetrt.runtime.generate import GenerationOptions, continuation_logits, generate

TIE_MARGIN = 1e-3


def greedy_with_logits(session, prompts, max_new_tokens, stop_ids=()) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy continuations through the runtime's loop and the logits `[steps, vocab]` each step chose from."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
    tokens = [result.token_ids for result in generate(session, prompts, options)]
    return tokens, continuation_logits(session, prompts, tokens)


def assert_greedy_agrees(reference_tokens, reference_logits, actual_tokens, label: str = "") -> int:
    """Tokens must agree until the end, or until a step where the reference's top-2 margin is < 1e-3.

    reference_logits: `[steps, vocab]`, the reference's logits at each generated step.
    Returns the number of steps compared.
    """
    reference_tokens, actual_tokens = list(reference_tokens), list(actual_tokens)
    logits = np.asarray(reference_logits, dtype=np.float64)
    for step, (want, got) in enumerate(zip(reference_tokens, actual_tokens)):
        if want != got:
            top2 = np.sort(logits[step])[-2:]
            margin = top2[1] - top2[0]
            assert margin < TIE_MARGIN, (
                f"{label}: greedy diverged at step {step} ({got} instead of {want}) where the reference's "
                f"top-2 margin is {margin:.2e}, not a near-tie"
            )
            return step
    assert len(reference_tokens) == len(actual_tokens), f"{label}: {len(actual_tokens)} tokens, want {len(reference_tokens)}"
    return len(reference_tokens)
