"""Token selection from logits (numpy): greedy, temperature, top-k, top-p, seeded; the logits processors a request
may ask for (repetition, presence and frequency penalties, logit bias) and the log-probabilities it may report."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moetrt.errors import MoetrtError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`temperature=0` (or `do_sample=False`) is greedy. As other OpenAI-compatible servers take them: `top_k` 0
    or -1 and `top_p=1` disable those filters, `top_p=0` keeps the smallest nucleus, the most likely token
    (greedy), and `seed` None or -1 draws a fresh seed. Raises MoetrtError for values out of range, NaN or infinite."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise MoetrtError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise MoetrtError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise MoetrtError(f"top_k must be -1 or 0 (no top-k) or at least 1, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise MoetrtError(f"top_p must lie in [0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise MoetrtError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and self.seed < -1:
            raise MoetrtError(f"seed must be -1 (random) or >= 0, got {self.seed}")
        # one spelling per meaning from here on
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed == -1:
            object.__setattr__(self, "seed", None)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_p == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency_penalties(logits: np.ndarray, generated: np.ndarray, presence: float,
                                       frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties (the API reference's "Frequency and presence penalties"):
    `logits[j] - c[j] * frequency - (c[j] > 0) * presence`, where `c[j]` counts token j in `generated` (the ids
    generated so far, not the prompt's). Logits `[vocab]`; returns a float32 copy, or `logits` itself when
    nothing applies. Positive values push repeated tokens down, negative ones pull them up."""
    if (presence == 0.0 and frequency == 0.0) or not len(generated):
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    logits = logits.astype(np.float32)  # a copy; float16 logits would round the penalty
    logits[ids] -= counts * np.float32(frequency) + np.float32(presence)
    return logits


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """OpenAI's `logit_bias`: each (token id, bias) pair adds `bias` to that token's logit before sampling, so
    -100 as good as bans a token and +100 as good as forces it. Logits `[vocab]`; returns a float32 copy, or
    `logits` itself without pairs."""
    if not bias:
        return logits
    ids, values = zip(*bias)
    logits = logits.astype(np.float32)
    logits[list(ids)] += np.asarray(values, dtype=np.float32)
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities `[vocab]` of logits `[vocab]` (any float dtype)."""
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The `k` most likely (token id, logprob) pairs of log-probabilities `[vocab]`, most likely first (ties: the
    lower id first); [] for k 0."""
    if k <= 0:
        return []
    k = min(k, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.lexsort((best, -logprobs[best]))]
    return [(int(i), float(logprobs[i])) for i in best]


def filtered_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution one sampling step draws from (fp64, sums to 1) for logits `[vocab]`."""
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep = order[: int(np.searchsorted(cumulative, params.top_p, side="left")) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return probs


def select_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray) -> int:
    """One token for one row: logits `[vocab]` (already through any other processors), `seen` the ids generated
    or prompted so far for the repetition penalty."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    probs = filtered_probabilities(logits, params)
    return int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right").clip(0, len(probs) - 1))


def select_with_draft(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                      draft: int) -> tuple[int, bool]:
    """Verify a draft token: returns (token, whether it is the draft accepted). Logits `[vocab]` already through
    any other processors (select_token's `seen` penalty included).

    Greedy: the argmax, accepted when it equals the draft. Sampling: speculative sampling's rule (Leviathan et al.
    2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023) for a draft
    proposed deterministically, q = one-hot at `draft` (the MTP module's greedy pick): accept it with probability
    p(draft), else draw from p with the draft's mass removed and renormalised. The token is then distributed as p
    exactly, as plain sampling's is; the random stream differs (one or two draws per token), so a seeded request's
    tokens differ from plain sampling's.
    """
    if params.greedy:
        token = int(np.argmax(logits))
        return token, token == draft
    probs = filtered_probabilities(logits, params)
    if rng.random() < probs[draft]:
        return draft, True
    residual = probs.copy()
    residual[draft] = 0.0
    total = residual.sum()
    if total <= 0.0:  # p(draft) was 1 up to rounding: nothing else can be drawn
        return draft, True
    cumulative = np.cumsum(residual)
    token = int(np.searchsorted(cumulative, rng.random() * total, side="right").clip(0, len(residual) - 1))
    while residual[token] == 0.0:  # a boundary draw landing on a zero-mass token: take the next with mass
        token = (token + 1) % len(residual)
    return token, False
