"""`moetrt verify ENGINE CHECKPOINT`: does compilation (or quantization) leave the model's answers unchanged?

Runs the engine and the fp32 torch reference on the same inputs and reports:
- the next-token distributions on a fixed prompt set (`fidelity_sequences`): mean and 99th-percentile
  KL(P_reference || P_engine), top-1 agreement and the perplexity ratio, the quantities llama.cpp's
  `llama-perplexity --kl-divergence` prints (`next_token_stats`);
- max |Δlogit| over whole random sequences and greedy continuations (equal, or diverging only where the
  reference's top-2 margin is a near-tie);
- for a checkpoint trained on a moetrt task (config.json `moetrt_task`), the task accuracy of both.

PASS/FAIL: an unquantized engine must keep its logits within TOLERANCES, its greedy continuations and (for a
task checkpoint) every task answer, with finite next-token statistics. A float16 or bfloat16 engine's logits may
also move, position by position, as far as HALF_REFERENCE_FACTOR times the reference computed in the engine's dtype
moves from the float32 one at that position. A quantized engine (manifest `quantization` set) changes logits by design;
it passes when its KL figures are within its scheme's QUANTIZED_THRESHOLDS, and the other checks are
reported as information.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.progress import note, stage

if TYPE_CHECKING:
    from moetrt.export.reference_session import ReferenceSession
    from moetrt.runtime.engine import Engine

# torch, the reference and the engine are imported where they run: the CLI reads QUANTIZED_THRESHOLDS for
# `moetrt verify --help` at start-up, which must stay cheap.

# (atol, rtol against the reference's largest |logit|, near-tie margin) per engine dtype.
TOLERANCES = {"float32": (1e-4, 1e-5, 1e-3), "float16": (2e-2, 1e-2, 5e-2), "bfloat16": (1e-1, 5e-2, 2e-1)}

# A half-precision engine is held to its dtype's own rounding as well: at each position, its logits may move from
# the float32 reference's by the fixed tolerance plus HALF_REFERENCE_FACTOR times the largest |Δ| of the reference
# computed in the engine's dtype there (FlashAttention's tests hold a kernel's error to twice a PyTorch
# implementation's at the same precision, Dao-AILab/flash-attention tests/test_flash_attn.py; they compare one
# maximum, this compares position by position so that a few ill-conditioned positions do not lend their allowance to
# the rest: with one maximum over all positions, tiny-r1's float16 engine with its lm_head scaled by 1.1 passed;
# logit by logit, the faithful engine used 1.07 of its allowance where a reference logit happened to land close to
# float32's). The fixed tolerance alone fails faithful engines on random-token prompts: tiny-r1's float16 engine is
# 2.24 from float32 where the torch reference in float16 is 2.34 from it (transformers in float16: 2.26), against a
# tolerance of 0.35; position by position it uses at most 0.77 of its allowance, the scaled lm_head 8.5x.
HALF_REFERENCE_FACTOR = 2.0
HALF_DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class KLThresholds:
    """Upper bounds (nats) on the mean and the 99th percentile of per-position KL(P_reference || P_engine)."""

    kl_mean: float
    kl_p99: float

    def describe(self) -> str:
        return f"mean KL <= {self.kl_mean:g}, p99 KL <= {self.kl_p99:g}"


# Starting points: llama.cpp's published LLaMA-3-8B figures (tools/perplexity/README.md, Wikitext-2, against
# FP16): Q8_0 mean KLD 0.00136 (LLaMA-2-7B: 0.00037), Q4_0 mean KLD 0.0719; its 99.0% KLD runs at 9-13x
# the mean (Q4_K_M: mean 0.0313, p99 0.413). Our int8/int4 are Q8_0/Q4_0's block rules at group size 32.
# The bounds sit a few times above those figures, so an engine as faithful as llama.cpp's passes and a broken
# one (a wrong scale, a swapped block) fails by orders of magnitude. Measured on tiny-r1's task set (group 32):
# int8 mean 1.2e-5, p99 2.6e-4; int4 mean 2.9e-3, p99 9.5e-3 (tests/export/test_verify_kl.py pins int4).
QUANTIZED_THRESHOLDS: dict[str, KLThresholds] = {
    "int8": KLThresholds(kl_mean=0.005, kl_p99=0.05),
    "int4": KLThresholds(kl_mean=0.1, kl_p99=1.0),
}


def thresholds_help() -> str:
    """One line per scheme, for `moetrt verify --help` and the report."""
    return "; ".join(f"{name}: {limits.describe()}" for name, limits in QUANTIZED_THRESHOLDS.items())


# ---- next-token statistics (llama.cpp's --kl-divergence quantities)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits `[..., vocab]` along the last axis."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


STATS_ROWS = 32  # positions per step of _position_stats


def kl_divergences(reference_logits: np.ndarray, engine_logits: np.ndarray) -> np.ndarray:
    """KL(P_reference || P_engine) in nats, float64 `[N]`, of logits `[N, vocab]`: sum_v p_ref (ln p_ref - ln
    p_eng), llama.cpp's per-token KLD (natural log). Zero for equal distributions, never negative except by
    rounding (~1e-16)."""
    return _kl(log_softmax(reference_logits), log_softmax(engine_logits))


def _kl(reference_log_probs: np.ndarray, engine_log_probs: np.ndarray) -> np.ndarray:
    return (np.exp(reference_log_probs) * (reference_log_probs - engine_log_probs)).sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class NextTokenStats:
    """The engine's next-token distributions against the reference's over `positions` scored positions.

    llama.cpp's `llama-perplexity --kl-divergence` names: kl_mean "Mean KLD", kl_p99 "99.0% KLD", kl_p999
    "99.9% KLD" (numpy's linear-interpolation percentiles), kl_max "Maximum KLD", top1_agreement "Same top p"
    (a fraction here, not a percentage), ppl_reference "Mean PPL(base)", ppl_engine "Mean PPL(Q)", ppl_ratio
    "Mean PPL(Q)/PPL(base)" (= exp of the mean per-token log-ratio, its "Mean ln(PPL(Q)/PPL(base))")."""

    positions: int
    kl_mean: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1_agreement: float
    ppl_reference: float
    ppl_engine: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_engine / self.ppl_reference


def next_token_stats(reference_logits: np.ndarray, engine_logits: np.ndarray, targets: np.ndarray) -> NextTokenStats:
    """Statistics of logits `[N, vocab]` (any float dtype) predicting `targets` int `[N]` (the token that
    actually follows each position, for the perplexities). Raises MoetrtError for no positions or shapes that
    disagree."""
    if reference_logits.shape != engine_logits.shape or reference_logits.ndim != 2:
        raise MoetrtError(f"logits must be two equal [positions, vocab] arrays, got {reference_logits.shape} and "
                          f"{engine_logits.shape}")
    if len(targets) != len(reference_logits) or len(targets) == 0:
        raise MoetrtError(f"need one target per position and at least one position, got {len(targets)} targets "
                          f"for {len(reference_logits)} positions")
    return _aggregate([_position_stats(reference_logits, engine_logits, targets)])


def _position_stats(reference_logits: np.ndarray, engine_logits: np.ndarray,
                    targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per position: (KL divergence, reference NLL of the target, engine NLL of the target, same top-1). Computed
    STATS_ROWS positions at a time: the float64 log-probabilities of a 160k vocabulary take 1.3 MB a position,
    several arrays of them at once."""
    parts = []
    for start in range(0, len(targets), STATS_ROWS):
        rows = slice(start, start + STATS_ROWS)
        ref, eng = log_softmax(reference_logits[rows]), log_softmax(engine_logits[rows])
        picked = np.arange(len(ref)), targets[rows]
        parts.append((_kl(ref, eng), -ref[picked], -eng[picked],
                      reference_logits[rows].argmax(-1) == engine_logits[rows].argmax(-1)))
    return tuple(np.concatenate(column) for column in zip(*parts))


def _aggregate(parts: list[tuple[np.ndarray, ...]]) -> NextTokenStats:
    kl, nll_reference, nll_engine, same_top = (np.concatenate(column) for column in zip(*parts))
    return NextTokenStats(
        positions=len(kl), kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)),
        kl_p999=float(np.percentile(kl, 99.9)), kl_max=float(kl.max()), top1_agreement=float(same_top.mean()),
        ppl_reference=math.exp(nll_reference.mean()), ppl_engine=math.exp(nll_engine.mean()),
    )


# ---- the fixed prompt set

# For a checkpoint with a tokenizer and no moetrt task: prose, code, numbers and lists, written for moetrt.
FIXED_TEXTS = (
    "The river had frozen early that year, and the ferry stayed tied to the jetty until March. People crossed on "
    "foot instead, keeping to the line of poles the harbour master had set into the ice, and the children raced "
    "each other to the far bank before school.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    yield total / window\n"
    "    for old, new in zip(values, values[window:]):\n        total += new - old\n        yield total / window\n",
    "Inventory, 14 May: 32 boxes of nails (3 cm), 7 rolls of copper wire, 120 m of hose, 4 ladders, 2 wheelbarrows "
    "with flat tyres. Ordered: 10 bags of cement at 8.40 each, total 84.00; delivery expected Thursday before noon.",
    "A mixture-of-experts layer sends each token to a few of its many feed-forward networks. A small router "
    "scores the experts, the best k are run, and their outputs are added with the router's weights, so the model "
    "holds far more parameters than any one token uses.",
    "Q: Why does bread go stale?\nA: Mostly not because it dries out. The starch in the crumb slowly crystallises "
    "again after baking, which makes it firm; warming the loaf melts those crystals for a while.",
    "1. Preheat the oven to 200 degrees.\n2. Slice the onions thinly and soften them in butter for twenty "
    "minutes.\n3. Add the stock, simmer, then season.\n4. Toast the bread, cover it with cheese and grill until "
    "brown.",
    "She counted the steps out loud: one hundred and twelve to the first landing, eighty-seven to the second, and "
    "then a narrow spiral that nobody had ever bothered to count, because by then everyone was out of breath.",
    "SELECT city, COUNT(*) AS orders, ROUND(AVG(total), 2) AS mean_total FROM orders WHERE placed >= "
    "'2024-01-01' GROUP BY city HAVING COUNT(*) > 50 ORDER BY orders DESC LIMIT 10;",
    "Light from the Sun takes a little over eight minutes to reach the Earth, about one and a quarter seconds to "
    "cross from the Moon, and more than four years to arrive from the nearest star beyond the solar system.",
    "Dear Ms. Okafor, thank you for your letter of 3 June. The replacement parts were sent this morning by "
    "courier; the tracking number is 7741-2290-18. Please let us know if anything arrives damaged. Kind regards, "
    "the service team.",
)
TASK_PROBLEMS = 32  # held-out problems for a task checkpoint: ~2,300 scored positions on tiny-r1
TEXT_CHUNK = 128  # tokens per chunk of the fixed texts (or of random ids); the engine's max_context if shorter
RANDOM_POSITIONS = 2048  # scored positions of random ids, for an engine without tokenizer
SCORING_BATCH = 8  # reference rows per scoring call
LOGITS_BUDGET = 256 << 20  # bytes of one side's float32 logits per scoring group


@dataclasses.dataclass(frozen=True)
class ScoredSequence:
    """Token ids; the positions predicting tokens[first_target:] are scored (the rest is context)."""

    tokens: list[int]
    first_target: int


def fidelity_sequences(engine: Engine, checkpoint_dir: str | Path, task: str | None, seed: int = 0
                       ) -> tuple[list[ScoredSequence], str]:
    """The fixed prompt set and a line describing it.

    - A task checkpoint: TASK_PROBLEMS held-out problems of the task (seed `seed`), each as training wrote it,
      chat prompt + the task's worked completion + EOS; the prompt is context, the completion and EOS scored.
    - Otherwise, with a tokenizer: FIXED_TEXTS tokenized with the engine's tokenizer, joined, cut into chunks of
      TEXT_CHUNK tokens; the second half of each chunk is scored (llama-perplexity's rule: every scored token
      sees at least half a chunk of context).
    - Without a tokenizer: random token ids (seed `seed`), chunked and scored the same way.
    Sequences are cut to the engine's max_context."""
    limit = engine.max_context
    if task:
        from moetrt.tasks import get_task
        from moetrt.tasks.chat import ChatTokenizer

        tokenizer, module = ChatTokenizer.load(checkpoint_dir), get_task(task)
        sequences = []
        for problem in module.draw_problems(TASK_PROBLEMS, seed, "eval"):
            prompt = tokenizer.prompt_ids(problem.question)
            tokens = prompt + tokenizer.encode(module.completion(problem)) + list(tokenizer.eos_ids[:1])
            sequences.append(ScoredSequence(tokens[:limit], min(len(prompt), limit - 1)))
        return sequences, f"{task}: {len(sequences)} held-out problems (seed {seed}), completions scored"
    chunk = max(2, min(TEXT_CHUNK, limit))
    if engine.tokenizer is not None:
        stream = [t for text in FIXED_TEXTS for t in engine.tokenizer.encode_prompt(text)]
        what = f"{len(FIXED_TEXTS)} fixed texts"
    else:
        count = math.ceil(RANDOM_POSITIONS / (chunk - chunk // 2)) * chunk
        stream = np.random.default_rng(seed).integers(0, engine.config.vocab_size, count).tolist()
        what = f"random token ids (seed {seed}; no tokenizer)"
    sequences = [ScoredSequence(stream[i : i + chunk], chunk // 2) for i in range(0, len(stream) - chunk + 1, chunk)]
    if not sequences:  # texts shorter than one chunk: one sequence, its second half scored
        sequences = [ScoredSequence(stream, max(1, len(stream) // 2))]
    return sequences, f"{what} in chunks of {chunk} tokens, second halves scored"


def _scoring_group(engine: Engine, longest: int) -> int:
    """Rows per reference scoring call: SCORING_BATCH, fewer where one side's float32 logits of `longest`-token rows
    would pass LOGITS_BUDGET, and no more than the engine's max batch."""
    return max(1, min(SCORING_BATCH, engine.manifest.profile.max_batch,
                      LOGITS_BUDGET // (longest * engine.config.vocab_size * 4)))


def compare_next_tokens(engine_logits: list[np.ndarray], reference: ReferenceSession,
                        sequences: list[ScoredSequence], group: int, advance=lambda: None) -> NextTokenStats:
    """NextTokenStats of the engine against the reference over the scored positions of `sequences`.

    `engine_logits[i]`: the engine's logits at sequence i's scored positions (`engine_outputs`). The reference
    scores the sequences in groups of `group` (`_scoring_group`), each as one left-padded batch
    (continuation_logits); the per-position statistics are kept and the reference's logits dropped, so its memory
    does not grow with the prompt set. `advance()` is called after each group (progress)."""
    from moetrt.runtime.generate import continuation_logits

    parts = []
    for start in range(0, len(sequences), group):
        rows = sequences[start : start + group]
        prompts = [row.tokens[: row.first_target] for row in rows]
        reference_logits = continuation_logits(reference, prompts, [row.tokens[row.first_target :] for row in rows])
        for row, want, got in zip(rows, reference_logits, engine_logits[start : start + group]):
            parts.append(_position_stats(want, got, np.array(row.tokens[row.first_target :])))
        advance()
    return _aggregate(parts)


@dataclasses.dataclass
class EngineOutputs:
    """What verify compares of the engine, all computed before the reference runs, so that the engine can be
    released first and the two never hold memory at once (a streamed reference of a model larger than memory
    then costs only its own layer at a time). All float32 logits:

    - `next_token[i]`: `[len(tokens) - first_target, vocab]` at fidelity sequence i's scored positions;
    - `greedy[i]`: random prompt i followed by the engine's greedy continuation;
    - `greedy_logits[i]`: `[len(greedy[i]) - 1, vocab]`, the engine's logits at every position of `greedy[i]`
      but the last (each predicts the next token).

    Held in memory: (scored positions + greedy positions) x vocab x 4 bytes (a 160k vocabulary: 0.66 MB a
    position)."""

    next_token: list[np.ndarray]
    greedy: list[list[int]]
    greedy_logits: list[np.ndarray]


def engine_outputs(engine: Engine, sequences: list[ScoredSequence], prompts: list[list[int]], new_tokens: int,
                   advance=lambda: None) -> EngineOutputs:
    """EngineOutputs of `engine` (one sequence per call, unpadded); `advance()` after the fidelity sequences and
    after the greedy decoding."""
    next_token = [engine.logits(np.array([row.tokens], dtype=np.int64))[0, row.first_target - 1 : -1].copy()
                  for row in sequences]  # (a copy: a view would keep every position's logits)
    advance()
    runs = engine.generate(prompts, max_new_tokens=new_tokens, greedy=True)
    greedy = [prompt + list(run.token_ids) for prompt, run in zip(prompts, runs)]
    greedy_logits = [engine.logits(np.array([sequence[:-1]], dtype=np.int64))[0] for sequence in greedy]
    advance()
    return EngineOutputs(next_token, greedy, greedy_logits)


# ---- the report


@dataclasses.dataclass
class VerifyReport:
    """What `moetrt verify` found; `passed` applies the module docstring's PASS/FAIL rule."""

    dtype: str
    prompts: int
    max_abs_logit_diff: float
    logit_tolerance: float
    greedy_rows_agreeing: int
    greedy_tokens_compared: int
    greedy_failures: list[str]
    next_token: NextTokenStats
    prompt_set: str
    quantization: str | None = None  # the scheme's name ("int8", "int4"), None for an unquantized engine
    kl_thresholds: KLThresholds | None = None  # the scheme's QUANTIZED_THRESHOLDS entry
    task: str | None = None  # set when the task accuracy was compared
    engine_accuracy: float | None = None
    reference_accuracy: float | None = None
    answers_differing: int | None = None
    checkpoint: str = ""  # whether the checkpoint is the one the engine was built from (`_checkpoint_match`)
    checkpoint_matches: bool | None = None  # None: the engine does not record it
    # A half-precision engine's (None when not measured: float32, quantized, or `dtype_reference_note`), over the
    # greedy sequences' positions: the largest |Δ| of the reference computed in the engine's dtype from the float32
    # one, and the largest share of its allowance the engine uses at a position, max |engine - float32| /
    # (logit_tolerance + HALF_REFERENCE_FACTOR * max |dtype reference - float32|), maxima over the position's logits
    # (at most 1 passes).
    dtype_reference_diff: float | None = None
    dtype_logit_share: float | None = None
    dtype_reference_note: str = ""  # why a half-precision engine's dtype reference was not run

    @property
    def finite(self) -> bool:
        """Whether the next-token statistics on the prompt set are finite (an engine returning NaN or inf logits
        there has NaN KL and perplexity, and comparisons with NaN are false, not failures)."""
        stats = self.next_token
        return all(math.isfinite(v) for v in (stats.kl_mean, stats.kl_p99, stats.ppl_engine, stats.top1_agreement))

    @property
    def logits_within(self) -> bool:
        """The unquantized logit check: every logit within the dtype's tolerance, or for a half-precision engine
        whose dtype reference ran, every position within its allowance."""
        if self.dtype_logit_share is not None:
            return self.dtype_logit_share <= 1.0
        return self.max_abs_logit_diff <= self.logit_tolerance

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        if self.kl_thresholds is not None:
            stats, limits = self.next_token, self.kl_thresholds
            return stats.kl_mean <= limits.kl_mean and stats.kl_p99 <= limits.kl_p99
        same_task = self.task is None or self.answers_differing == 0
        return self.logits_within and not self.greedy_failures and same_task

    def to_dict(self) -> dict:
        """Flat JSON: the next-token statistics and the thresholds as top-level `kl_*`, `top1_agreement`,
        `ppl_*` and `kl_thresholds` keys."""
        fields = dataclasses.asdict(self)
        fields.update(fields.pop("next_token"), ppl_ratio=self.next_token.ppl_ratio)
        # NaN and inf are not JSON: null (the report's text shows them)
        fields = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in fields.items()}
        return {**fields, "passed": self.passed}

    def describe(self) -> str:
        stats = self.next_token
        judged = ("checked" if self.kl_thresholds is None else
                  "information only: quantization moves logits by design, the KL above decides")
        criteria = ((self.kl_thresholds.describe() if self.kl_thresholds else "logits, greedy tokens, task answers kept")
                    + ", finite next-token statistics")
        lines = [
            *([f"checkpoint  {self.checkpoint}"] if self.checkpoint else []),
            f"scheme      {self.quantization or 'none'} ({self.dtype}): PASS needs {criteria}",
            f"KL          mean {stats.kl_mean:.3g}, p99 {stats.kl_p99:.3g}, p99.9 {stats.kl_p999:.3g}, max "
            f"{stats.kl_max:.3g} nats over {stats.positions} positions ({self.prompt_set})",
            f"top-1       {stats.top1_agreement:.2%} agree; PPL ratio {stats.ppl_ratio:.6f} (engine "
            f"{stats.ppl_engine:.4g}, reference {stats.ppl_reference:.4g})",
            f"logits      max |Δ| {self.max_abs_logit_diff:.3g} over {self.prompts} random-token "
            f"prompt{'' if self.prompts == 1 else 's'} ({self._logit_rule()}; {judged})",
            f"greedy      {self.greedy_rows_agreeing}/{self.prompts} continuations agree "
            f"({self.greedy_tokens_compared} tokens compared; near-ties allowed; {judged})",
            *(f"            {failure}" for failure in self.greedy_failures),
        ]
        if self.task:
            lines.append(
                f"{self.task:<11} engine {self.engine_accuracy:.1%}, reference {self.reference_accuracy:.1%}, "
                f"{self.answers_differing} answer{'' if self.answers_differing == 1 else 's'} differ"
                f"{'s' if self.answers_differing == 1 else ''} ({judged})"
            )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    def _logit_rule(self) -> str:
        if self.dtype_logit_share is not None:
            return (f"each position within {self.logit_tolerance:.3g} + {HALF_REFERENCE_FACTOR:g}x the {self.dtype} "
                    f"reference's own |Δ| there, up to {self.dtype_reference_diff:.3g}: at most "
                    f"{self.dtype_logit_share:.2f} of that used")
        note = f"; {self.dtype_reference_note}" if self.dtype_reference_note else ""
        return f"tolerance {self.logit_tolerance:.3g} for {self.dtype}{note}"


RANDOM_PROMPT_TOKENS = (4, 39)  # the random-token prompts' shortest and longest length


def _random_prompts(vocab: int, count: int, seed: int, longest: int = RANDOM_PROMPT_TOKENS[1]) -> list[list[int]]:
    """`count` prompts of random token ids, RANDOM_PROMPT_TOKENS long (at most `longest`, at least 1)."""
    rng = np.random.default_rng(seed)
    high = max(1, min(RANDOM_PROMPT_TOKENS[1], longest))
    low = min(RANDOM_PROMPT_TOKENS[0], high)
    return [rng.integers(0, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(count)]


def _greedy_agreement(engine_tokens, reference_logits, margin: float) -> tuple[int, str | None]:
    """Tokens compared, and a failure message if the engine's greedy tokens leave the reference's where the
    reference is not near a tie.

    reference_logits `[steps, vocab]`: the reference's logits for each engine token, given the engine's tokens
    before it (teacher-forced)."""
    for step, got in enumerate(engine_tokens):
        want = int(np.argmax(reference_logits[step]))
        if want != got:
            top2 = np.sort(reference_logits[step])[-2:]
            if top2[1] - top2[0] >= margin:
                return step, f"diverged at step {step} ({got} vs {want}), reference margin {top2[1] - top2[0]:.3g}"
            return step, None
    return len(engine_tokens), None


def verify_engine(
    engine_dir: str | Path, checkpoint_dir: str | Path, prompts: int = 8, new_tokens: int = 32, seed: int = 0,
    task: str | None = "auto", task_problems: int = 200, expert_parallel=None, stream_reference: bool | None = None,
) -> VerifyReport:
    """Compare an engine with the fp32 torch reference of `checkpoint_dir` (see the module docstring).

    `task` "auto" reads config.json's moetrt_task (None: no task); `task_problems` 0 skips the task accuracy
    (the prompt set stays the task's). `expert_parallel`: Engine.load's (the engine's experts split over the MPI
    job's ranks; the reference runs on rank 0 only). `stream_reference`: load_reference_session's `stream` (True:
    layer by layer from the mapped shards; False: loaded whole; None: streamed when it would not fit). The engine
    runs first (`engine_outputs`) and is released before the reference is loaded, so that peak memory is the
    larger of the two plus the engine's logits, not their sum; the task accuracy and expert parallelism keep it
    (they run it again). Raises MoetrtError for bad counts, a checkpoint of another config, or a quantization
    scheme without QUANTIZED_THRESHOLDS."""
    from moetrt.config import load_config
    from moetrt.export.reference_session import load_reference_session
    from moetrt.runtime.engine import Engine

    if prompts < 1:
        raise MoetrtError(f"--prompts must be at least 1, got {prompts}")
    if task_problems < 0:
        raise MoetrtError(f"--task-problems must be at least 0 (0 skips the task accuracy), got {task_problems}")
    engine = Engine.load(engine_dir, expert_parallel=expert_parallel)
    quantization = engine.manifest.quantization
    scheme = quantization.scheme if quantization else None
    if scheme is not None and scheme not in QUANTIZED_THRESHOLDS:
        raise MoetrtError(f"no KL thresholds for quantization {scheme!r} (known: {', '.join(QUANTIZED_THRESHOLDS)});"
                          " add them to moetrt.export.verify.QUANTIZED_THRESHOLDS")
    if load_config(checkpoint_dir) != engine.config:
        raise MoetrtError(f"{checkpoint_dir} is not the checkpoint this engine was built from (configs differ)")
    matches, checkpoint_line = _checkpoint_match(engine.manifest.checkpoint, Path(checkpoint_dir))
    if matches is False:  # said now, before the long comparison; the comparison below still decides
        note(f"verify: checkpoint {checkpoint_dir}: {checkpoint_line}")
    task = _detect_task(checkpoint_dir) if task == "auto" else task
    atol, rtol, margin = TOLERANCES[engine.manifest.dtype]
    dtype = engine.manifest.dtype

    sequences, prompt_set = fidelity_sequences(engine, checkpoint_dir, task, seed)
    # an engine with a short context gets shorter prompts and continuations (half the context for each at most)
    context = engine.max_context or RANDOM_PROMPT_TOKENS[1] + new_tokens
    token_prompts = _random_prompts(engine.config.vocab_size, prompts, seed, longest=context // 2)
    room = context - max(map(len, token_prompts))
    if room < new_tokens:
        note(f"verify: greedy continuations of {room} tokens, not {new_tokens}: the engine's context is {context}")
        new_tokens = room
    next_group = _scoring_group(engine, max(len(s.tokens) for s in sequences))
    greedy_group = _scoring_group(engine, max(map(len, token_prompts)) + new_tokens)
    # units of work: the engine's two parts, then each reference scoring group (next-token, then greedy)
    groups = 2 + math.ceil(len(sequences) / next_group) + math.ceil(prompts / greedy_group)
    with stage("verifying against the reference", total=groups) as advance:
        outputs = engine_outputs(engine, sequences, token_prompts, new_tokens, advance)
        if not (task and task_problems) and expert_parallel is None:
            del engine  # its weights leave memory before the reference's arrive (EngineOutputs)
            gc.collect()
        reference = load_reference_session(checkpoint_dir, dtype="float32", stream=stream_reference)
        stats = compare_next_tokens(outputs.next_token, reference, sequences, next_group, advance)
        float32_logits: list[np.ndarray] | None = [] if dtype in HALF_DTYPES and scheme is None else None
        max_diff, scale, agreeing, compared, failures = _greedy_against(
            reference, outputs, [len(prompt) for prompt in token_prompts], greedy_group, margin, advance,
            keep=float32_logits)
    report = VerifyReport(
        dtype, prompts, max_diff, atol + rtol * scale, agreeing, compared, failures, stats,
        prompt_set, scheme, QUANTIZED_THRESHOLDS.get(scheme) if scheme else None,
    )
    report.checkpoint, report.checkpoint_matches = checkpoint_line, matches
    if task and task_problems:
        _compare_task(report, task, engine, reference, checkpoint_dir, task_problems, seed)
    if float32_logits is not None:
        del reference  # out of memory before the reference in the engine's dtype comes in
        gc.collect()
        report.dtype_reference_diff, report.dtype_logit_share, report.dtype_reference_note = _dtype_reference_check(
            checkpoint_dir, dtype, outputs, float32_logits, report.logit_tolerance, greedy_group)
    return report


def _dtype_reference_check(checkpoint_dir, dtype: str, outputs: EngineOutputs, float32_logits: list[np.ndarray],
                           tolerance: float, group: int) -> tuple[float | None, float | None, str]:
    """The reference computed in `dtype` (float16, bfloat16) on the engine's greedy sequences (`outputs.greedy`),
    against the float32 reference's logits there (`float32_logits`, `[len(sequence) - 1, vocab]` each, as
    _greedy_against kept them) and the engine's (`outputs.greedy_logits`): (the reference's largest |Δ| from
    float32, the largest share of its allowance the engine uses at a position (VerifyReport.dtype_logit_share),
    ""); or (None, None, why) when the reference in `dtype` would not fit in memory (only the float32 one streams)
    or its logits are not finite (a float16 residual stream beyond even routed_scaling_factor x 65504, which the
    build's overflow check refuses for the engine), so that the fixed tolerance alone applies."""
    from moetrt.config import load_config
    from moetrt.export.info import count_parameters
    from moetrt.export.reference_session import STREAM_ABOVE_AVAILABLE, load_reference_session
    from moetrt.hardware import available_memory
    from moetrt.runtime.generate import continuation_logits

    needed = count_parameters(load_config(checkpoint_dir)).total * 2
    if needed > STREAM_ABOVE_AVAILABLE * available_memory():
        return None, None, (f"the {dtype} reference was not run: its weights, {needed / 1e9:.1f} GB, exceed half the "
                            f"{available_memory() / 1e9:.1f} GB available")
    sequences = outputs.greedy
    worst, share = 0.0, 0.0
    with stage(f"scoring with the {dtype} reference", total=math.ceil(len(sequences) / group)) as advance:
        reference = load_reference_session(checkpoint_dir, dtype=dtype, stream=False)
        for start in range(0, len(sequences), group):
            rows = sequences[start : start + group]
            wanted = continuation_logits(reference, [row[:1] for row in rows], [row[1:] for row in rows])
            for offset, want in enumerate(wanted):
                float32 = float32_logits[start + offset]
                own = np.abs(want - float32).max(axis=-1)  # per position; NaN if any logit is NaN
                diff = float(own.max())
                if not math.isfinite(diff):  # (Python's max would drop a NaN)
                    return None, None, f"the {dtype} reference's logits are not finite"
                worst = max(worst, diff)
                engine = np.abs(outputs.greedy_logits[start + offset] - float32).max(axis=-1)
                used_max = float((engine / (tolerance + HALF_REFERENCE_FACTOR * own)).max())
                share = max(share, used_max if math.isfinite(used_max) else math.inf)
            advance()
    return worst, share, ""


def _greedy_against(reference: ReferenceSession, outputs: EngineOutputs, prompt_lengths: list[int], group: int,
                    margin: float, advance=lambda: None,
                    keep: list[np.ndarray] | None = None) -> tuple[float, float, int, int, list[str]]:
    """max |engine - reference| logit and the reference's max |logit| (at least 1, the relative tolerance's
    scale), then the greedy check: rows agreeing, tokens compared, a message per row that diverged where the
    reference's top-2 margin is at least `margin`.

    The engine decoded each prompt greedily (`outputs.greedy`); the reference scores each prompt + continuation in
    one teacher-forced call. Up to the first token where the engine's pick differs from the reference's argmax
    both had the same prefix, so that token is where a free-running reference would have left the engine's path:
    the verdict of decoding the reference, from one forward pass instead of one per token (a streamed reference
    reads the whole checkpoint once per pass). The logits are compared at every position of prompt +
    continuation, both sides given the same tokens. Rows are scored in groups of `group`; `advance()` is called
    after each. `keep`: a list the reference's logits per sequence are appended to (`_dtype_reference_check`)."""
    from moetrt.runtime.generate import continuation_logits

    sequences = outputs.greedy
    max_diff, scale = 0.0, 1.0
    agreeing, compared, failures = 0, 0, []
    for start in range(0, len(sequences), group):
        rows = sequences[start : start + group]
        # position t's logits predict token t + 1: every token after the first is scored
        wanted = continuation_logits(reference, [row[:1] for row in rows], [row[1:] for row in rows])
        for offset, (sequence, want) in enumerate(zip(rows, wanted)):
            got = outputs.greedy_logits[start + offset]
            if keep is not None:
                keep.append(want)
            diff = float(np.abs(got - want).max())
            max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)  # a NaN fails (max would drop it)
            scale = max(scale, float(np.abs(want).max()))
            length = prompt_lengths[start + offset]
            steps, failure = _greedy_agreement(sequence[length:], want[length - 1 :], margin)
            compared += steps
            agreeing += failure is None
            if failure:
                failures.append(f"prompt {start + offset}: {failure}")
        advance()
    return max_diff, scale, agreeing, compared, failures


def _checkpoint_match(recorded, checkpoint_dir: Path) -> tuple[bool | None, str]:
    """Whether `checkpoint_dir` holds the tensors the engine was built from, by the fingerprint its manifest
    records (export/checkpoint.py checkpoint_fingerprint; engines built before moetrt recorded it: None), and a
    line saying so. Informational: the comparison decides PASS/FAIL (a checkpoint converted to another dtype, or
    one whose tensors were edited, differs and may still be faithful)."""
    from moetrt.export.checkpoint import checkpoint_fingerprint

    if recorded is None:
        return None, "not checked: the engine does not record the checkpoint it was built from (built before moetrt did)"
    found = checkpoint_fingerprint(checkpoint_dir)
    how = "every byte" if found.whole else "samples of every tensor"
    if found == recorded:
        return True, f"the one the engine was built from ({found.tensors} tensors, {how} hashed)"
    if (found.tensors, found.weight_bytes) != (recorded.tensors, recorded.weight_bytes):
        what = (f"{found.tensors} tensors of {found.weight_bytes} bytes here, {recorded.tensors} of "
                f"{recorded.weight_bytes} in the one it was built from")
    else:
        what = f"as many tensors and bytes, other names, dtypes, shapes or values ({how} hashed)"
    return False, (f"NOT the one the engine was built from: {what}; compared anyway (to verify the engine, pass "
                   "the checkpoint it was built from)")


def _detect_task(checkpoint_dir) -> str | None:
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return config.get("moetrt_task")


def _compare_task(report, task, engine: Engine, reference: ReferenceSession, checkpoint_dir, problems, seed) -> None:
    from moetrt.runtime.evaluate import engine_continuer, evaluate_session
    from moetrt.tasks.chat import ChatTokenizer
    from moetrt.tasks.evaluate import evaluate

    tokenizer = ChatTokenizer.load(checkpoint_dir)
    ours = evaluate(task, tokenizer, engine_continuer(engine), problems, seed, 64)
    theirs = evaluate_session(reference, tokenizer, task, problems, seed, 64)
    report.task = task
    report.engine_accuracy, report.reference_accuracy = ours.accuracy, theirs.accuracy
    report.answers_differing = sum(a.predicted != b.predicted for a, b in zip(ours.results, theirs.results))
