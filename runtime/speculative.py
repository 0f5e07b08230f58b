"""Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module, in the same graph call.

An engine built with `--mtp` runs, in every call, the main model and then the MTP module over the same positions
(export/model.py `speculative_step`): at position i the module reads the main model's hidden state h_i and the
token that follows, t_{i+1}, and proposes t_{i+2}. Where t_{i+1} is not known when the call is made (the last
position), the module reads the main model's greedy pick there. So one call per step both verifies the previous
draft and proposes the next (the one-token case of DeepSeek-V3 report section 2.2's MTP as used for speculative
decoding by vLLM, SGLang and TensorRT-LLM):

- a step feeds each row its last token t and its draft d (when it has one), at positions p and p + 1;
- the row's next token comes from the logits at p: greedy rows accept d when it is their pick, sampled rows by
  sampling.py's `select_with_draft` (speculative sampling for a deterministic draft, so the output distribution is
  plain sampling's); an accepted d earns a second token from the logits at p + 1;
- a rejected d's cache column is masked in every layer (rolled back; `LatentCache.trim` gives trailing columns
  back, `compact` the holes when room runs out); the MTP layer's own mask drops a row whose guessed token was not
  the one that followed (a sampled or processed token), and that row's draft is not used.

The loop over a batch is generate.py's (`stream_speculative`), the scheduler's its own (`Scheduler._draft_step`);
both are built from `draft_step`, `settle` and `DraftPolicy` here. Drafts only ever cost speed: every emitted token is the main model's (`RowState.choose_draft`), so greedy output
equals plain decoding's token for token, batched or not, whatever the MTP module predicts.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Callable
from typing import Protocol

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.session import LatentCache, Session

NO_DRAFT = -1


class DraftingRow(Protocol):
    """What `settle` needs of a sequence: generate.py's RowState (its choose and choose_draft)."""

    def choose(self, logits: np.ndarray, greedy_pick: int | None = None) -> int: ...

    def choose_draft(self, logits: np.ndarray, draft: int, greedy_pick: int | None = None) -> tuple[int, bool]: ...


def check_session(session: Session) -> None:
    """Raise MoetrtError unless the session's engine carries the MTP module (built with --mtp)."""
    if not getattr(session, "mtp_layers", 0) or not hasattr(session, "run_speculative"):
        raise MoetrtError("--speculative mtp needs an engine built with the multi-token-prediction module: rebuild "
                          "it with `moetrt build-engine CHECKPOINT -o ENGINE --mtp` (the checkpoint must have "
                          "num_nextn_predict_layers >= 1), or decode without --speculative")


@dataclasses.dataclass
class StepCounts:
    """Drafts proposed and accepted over a run (the acceptance rate is accepted / proposed), decode steps, and
    rows summed over steps (a row's tokens per step are its tokens over its steps)."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    row_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class DraftHistory:
    """The last `window` verified drafts (1 accepted, 0 rejected) and the totals since it began. A sequence's
    DraftPolicy keeps one of its own; an engine's, across its sequences, is what a new sequence follows until its
    own drafts are judged, so that once the engine has seen that drafts do not pay (random weights, a domain the
    module does not predict) each new request does not pay to learn it again. `history_for(session)` gives the
    session's."""

    def __init__(self, window: int = 32):
        self.outcomes: collections.deque[int] = collections.deque(maxlen=window)
        self.proposed = 0  # drafts verified since the engine loaded (what `eval` and `generate --json` report)
        self.accepted = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.outcomes.extend([1] * accepted + [0] * (proposed - accepted))
        self.proposed += proposed
        self.accepted += accepted

    def holds(self, min_acceptance: float) -> bool:
        """Whether some outcomes are known and at least `min_acceptance` of them were accepted."""
        seen = len(self.outcomes)
        return bool(seen) and sum(self.outcomes) >= min_acceptance * seen

    def pays(self, min_acceptance: float, judge_after: int) -> bool:
        """Whether drafting pays by these outcomes: yes until `judge_after` are known, then while they hold
        `min_acceptance`."""
        return len(self.outcomes) < judge_after or self.holds(min_acceptance)


_HISTORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def history_for(session: Session) -> DraftHistory:
    """The DraftHistory of `session` (one per loaded engine, created on first use, gone with the session)."""
    history = _HISTORIES.get(session)
    if history is None:
        history = _HISTORIES[session] = DraftHistory()
    return history


class DraftPolicy:
    """Whether a sequence's next step should propose drafts. A draft costs a wider step and the module's own layer;
    it pays only while enough are accepted. Over the sequence's last `window` verified drafts, drafting
    goes on while the acceptance rate is at least `min_acceptance` (judged once `judge_after` drafts were
    verified; before that, yes while its own drafts hold the rate or the engine's recent ones in `history` do,
    and without a history); below it the sequence
    asks for drafts on one step in `probe_every` (its drafts measure the rate again), so a model whose drafts miss
    (random weights, an unlike domain) decodes at close to plain speed. The break-even acceptance rate is the cost
    of a drafting step over a plain one, minus 1: `moetrt bench speculative` measured about 70% for ds-mini on a
    2-core CPU (verifying two tokens reads the routed experts of both) and far lower for tiny-r1, whose steps cost
    little next to their fixed costs; 50% sits between. bench/NOTES.md has the figures."""

    def __init__(self, min_acceptance: float = 0.5, window: int = 32, probe_every: int = 64, judge_after: int = 4,
                 history: DraftHistory | None = None):
        self.min_acceptance, self.probe_every, self.judge_after = min_acceptance, probe_every, judge_after
        self.history = history
        self._own = DraftHistory(window)
        self._idle = 0

    def propose(self) -> bool:
        """Whether the next step should draft: while this sequence's verified drafts hold the rate (its first, the
        prefill's, is verified on the first step), and until `judge_after` of them were verified also while the
        history says drafts pay (always without a history); otherwise once in `probe_every` calls. So a sequence
        whose own first drafts hit keeps drafting whatever the engine's recent ones did."""
        if self._own.holds(self.min_acceptance):
            return True
        if len(self._own.outcomes) < self.judge_after and (
                self.history is None or self.history.pays(self.min_acceptance, self.judge_after)):
            return True
        self._idle += 1
        if self._idle >= self.probe_every:
            self._idle = 0
            return True
        return False

    def record(self, proposed: int, accepted: int) -> None:
        """A step verified `proposed` drafts and accepted `accepted` of them (recorded in the history too)."""
        self._own.record(proposed, accepted)
        if self.history is not None and proposed:
            self.history.record(proposed, accepted)


def draft_step(session: Session, cache: LatentCache, tokens: np.ndarray, positions: np.ndarray,
               active: np.ndarray, drafts: np.ndarray, propose: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """One speculative call: each active row feeds its token `tokens[r]` at RoPE position `positions[r]` and, when
    `drafts[r]` >= 0, its draft at the next position. All `[B]` (int64; `active` bool). `propose`: run the MTP
    module (else it is skipped, and no row gets a draft for the next step).

    Returns the logits `[B, S, vocab]` at the S (1 or 2) fed columns, the MTP module's proposals `[B, S]` (`[B, 0]`
    without `propose`; the draft for the token after next at each column, valid only where the column's following
    token was the greedy pick), and the cache column of the first fed token. Inactive rows and missing drafts ride
    along masked."""
    width = len(tokens)
    drafted = active & (drafts >= 0)
    steps = 2 if drafted.any() else 1
    ids = np.zeros((width, steps), dtype=np.int64)
    ids[:, 0] = tokens
    valid = np.zeros((width, steps), dtype=np.int64)
    valid[:, 0] = active
    if steps == 2:
        ids[:, 1] = np.where(drafted, drafts, 0)
        valid[:, 1] = drafted
    position_ids = positions[:, None] + np.arange(steps, dtype=np.int64)[None]
    mask = cache.attention_mask(steps, valid)
    logit_positions = np.broadcast_to(np.arange(steps, dtype=np.int64), (width, steps))
    start = cache.length
    modelled = steps if propose else 0  # positions the MTP module runs on
    logits, proposals = session.run_speculative(  # type: ignore[attr-defined]
        ids, position_ids, mask, logit_positions, cache.past(), cache.reserve(steps),
        np.full((width, modelled), NO_DRAFT, dtype=np.int64),
        cache.draft_attention_mask(modelled, valid[:, :modelled]),  # type: ignore[attr-defined]
        logit_positions[:, :modelled])
    cache.advance(steps)
    return logits, proposals, start


def settle(row: DraftingRow, cache: LatentCache, slot: int, start: int, logits: np.ndarray, draft: int,
           proposals: np.ndarray, emit: Callable[[int], bool], greedy: bool) -> tuple[int | None, int, int]:
    """Verify one row's step (`draft_step`'s logits `[S, vocab]` and proposals `[S]` of this row, which fed `draft`
    at column start + 1 when >= 0) and emit its one or two tokens through `emit` (which advances the row and says
    whether it is over). Masks the columns that did not hold (see the module docstring).

    Returns (the token to feed next, None when the row is over; its next draft or NO_DRAFT; drafts accepted)."""
    pick = int(np.argmax(logits[0]))
    token, accepted = row.choose_draft(logits[0], draft, pick if greedy else None)
    if draft >= 0 and not accepted:
        cache.invalidate(slot, start + 1)  # roll back the rejected draft's rows
    if token != pick:  # the MTP row at `start` read the greedy pick, not this token
        cache.invalidate(slot, start, draft_only=True)
    if emit(token):
        return None, NO_DRAFT, int(accepted)
    if not accepted:
        return token, (int(proposals[0]) if len(proposals) and token == pick else NO_DRAFT), 0
    bonus_pick = int(np.argmax(logits[1]))
    bonus = row.choose(logits[1], bonus_pick if greedy else None)
    if bonus != bonus_pick:
        cache.invalidate(slot, start + 1, draft_only=True)
    if emit(bonus):
        return None, NO_DRAFT, 1
    return bonus, (int(proposals[1]) if len(proposals) and bonus == bonus_pick else NO_DRAFT), 1


def first_draft(cache: LatentCache, slot: int, logits: np.ndarray, token: int, draft: int) -> int:
    """After a prefill: the first token `token` was chosen from `logits` `[vocab]`; the MTP row at the prompt's last
    column (cache column length - 1 of a prefill cache, where `slot` sits) read the greedy pick. Returns the draft to
    feed with the token, or NO_DRAFT (and masks that MTP row) when the token was not the pick."""
    if token == int(np.argmax(logits)):
        return draft
    cache.invalidate(slot, cache.length - 1, draft_only=True)
    return NO_DRAFT
