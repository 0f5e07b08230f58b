"""Verifying MTP drafts: sampling.py's `select_with_draft` draws from the distribution plain sampling draws from
(chi-square tests against `filtered_probabilities`, acceptance at rate p(draft)), greedy verification, RowState's
`choose_draft` with logprobs, and the host cache's MTP-layer mask (`LatentKVCache(draft_mask=True)`) moving with
its columns through every slot operation."""

import random
import zlib

import numpy as np
import pytest
from scipy.stats import binomtest, chisquare

from moetrt.runtime.generate import RowState
from moetrt.runtime.kv_cache import LatentKVCache
from moetrt.runtime.requests import GenerationOptions
from moetrt.runtime.sampling import SamplingParams, filtered_probabilities, log_softmax, select_with_draft

VOCAB = 8
DRAWS = 20_000
P_MIN = 1e-3
LOGITS = np.random.default_rng(0).normal(0.0, 1.5, VOCAB).astype(np.float32)

CASES = {
    "plain": SamplingParams(temperature=1.0),
    "cool-top-k": SamplingParams(temperature=0.7, top_k=3),
    "hot-top-p": SamplingParams(temperature=1.4, top_p=0.8),
    "top-k-and-p": SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
}


def drafts_of(params: SamplingParams) -> dict[str, int]:
    """The draft tokens worth verifying under `params`: the likeliest, the least likely one sampling can still
    draw, and one the filters removed (none for unfiltered sampling)."""
    probs = filtered_probabilities(LOGITS, params)
    allowed = np.flatnonzero(probs > 0)
    drafts = {"likely": int(np.argmax(probs)), "unlikely": int(allowed[np.argmin(probs[allowed])])}
    if (probs == 0).any():
        drafts["filtered-out"] = int(np.flatnonzero(probs == 0)[0])
    return drafts


PAIRS = [pytest.param(case, kind, draft, id=f"{case}-{kind}")
         for case, params in CASES.items() for kind, draft in drafts_of(params).items()]


def sample_counts(params: SamplingParams, draft: int, seed: int) -> tuple[np.ndarray, int]:
    """Token counts `[VOCAB]` over DRAWS verified drafts, and how many were accepted."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(VOCAB, dtype=np.int64)
    accepted = 0
    for _ in range(DRAWS):
        token, taken = select_with_draft(LOGITS, params, rng, draft)
        assert taken == (token == draft)  # a rejection never draws the draft again
        counts[token] += 1
        accepted += taken
    return counts, accepted


def assert_distributed_as(counts: np.ndarray, probs: np.ndarray) -> None:
    """Tokens of zero probability never drawn; the rest fit `probs` by a chi-square test."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew filtered-out tokens: {counts}"
    if support.sum() > 1:
        result = chisquare(counts[support], counts.sum() * probs[support])
        assert result.pvalue > P_MIN, (counts, counts.sum() * probs)


def test_the_cases_filter_differently():
    supports = {name: int((filtered_probabilities(LOGITS, params) > 0).sum()) for name, params in CASES.items()}
    assert supports["plain"] == VOCAB and 1 < supports["cool-top-k"] == 3 and 1 < supports["hot-top-p"] < VOCAB
    assert sum(len(drafts_of(params)) for params in CASES.values()) == len(PAIRS) == 11


@pytest.mark.parametrize("case,kind,draft", PAIRS)
def test_verified_drafts_are_distributed_as_plain_sampling(case, kind, draft):
    params = CASES[case]
    probs = filtered_probabilities(LOGITS, params)
    counts, accepted = sample_counts(params, draft, seed=zlib.crc32(f"{case}-{kind}".encode()))
    assert_distributed_as(counts, probs)
    if probs[draft] == 0:
        assert accepted == 0
    else:
        assert binomtest(accepted, DRAWS, probs[draft]).pvalue > P_MIN, (accepted / DRAWS, probs[draft])


def test_the_chi_square_check_tells_a_wrong_rule_apart():
    """Power check: accepting the draft with p(draft) but redrawing from p itself (not from p without the draft)
    over-weights the draft, and the same check over as many draws rejects it."""
    params = CASES["plain"]
    probs = filtered_probabilities(LOGITS, params)
    draft = int(np.argmax(probs))
    rng = np.random.default_rng(5)
    counts = np.zeros(VOCAB, dtype=np.int64)
    for _ in range(DRAWS):
        token = draft if rng.random() < probs[draft] else int(rng.choice(VOCAB, p=probs))
        counts[token] += 1
    with pytest.raises(AssertionError):
        assert_distributed_as(counts, probs)


def test_a_single_allowed_token_is_always_the_outcome():
    params = SamplingParams(temperature=0.8, top_k=1)
    best = int(np.argmax(LOGITS))
    rng = np.random.default_rng(6)
    for _ in range(200):
        assert select_with_draft(LOGITS, params, rng, best) == (best, True)
        assert select_with_draft(LOGITS, params, rng, (best + 1) % VOCAB) == (best, False)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(do_sample=False),
                                    SamplingParams(temperature=1.0, top_p=0.0)], ids=["t0", "no-sample", "top-p-0"])
def test_greedy_accepts_exactly_the_argmax(params):
    rng = np.random.default_rng(7)
    for _ in range(50):
        logits = rng.normal(0.0, 2.0, VOCAB).astype(np.float32)
        best = int(np.argmax(logits))
        for draft in range(VOCAB):
            assert select_with_draft(logits, params, rng, draft) == (best, draft == best)


def test_greedy_rows_accept_a_draft_equal_to_their_pick():
    row = RowState([0], GenerationOptions(max_new_tokens=100))
    rng = np.random.default_rng(8)
    for _ in range(30):
        logits = rng.normal(0.0, 2.0, VOCAB).astype(np.float32)
        best = int(np.argmax(logits))
        for draft in (best, (best + 3) % VOCAB, -1):
            assert row.choose_draft(logits, draft, best) == (best, draft == best)
            assert row.choose_draft(logits, draft) == (best, draft == best)
        row.advance(best)


@pytest.mark.parametrize("extra", [{}, {"logit_bias": {3: 1.5}, "presence_penalty": 0.5}], ids=["raw", "processed"])
def test_choose_draft_reports_the_logprob_of_the_token_it_chose(extra):
    """Sampled rows with logprobs: whether the draft is accepted or another token drawn, the event carries the
    chosen token's log-probability under the raw logits, and `advance` takes the token."""
    options = GenerationOptions(sampling=SamplingParams(temperature=1.0, seed=3), logprobs=2, max_new_tokens=1000,
                                **extra)
    row = RowState([0], options, seed=3)
    rng = np.random.default_rng(9)
    outcomes = set()
    for _ in range(200):
        logits = rng.normal(0.0, 1.0, VOCAB).astype(np.float32)
        token, accepted = row.choose_draft(logits, int(rng.integers(VOCAB)))
        event = row.advance(token)
        (logprob,) = event.logprobs
        assert event.token_ids == [token] and logprob.token_id == token
        assert logprob.logprob == pytest.approx(log_softmax(logits)[token], abs=1e-12)
        outcomes.add(accepted)
    assert outcomes == {True, False}


# -- the MTP layer's mask in the host cache --------------------------------------------------------------------------

LAYERS, D, CONTEXT = 3, 2, 40  # the last layer plays the MTP module's


class Rows:
    """Gives every row a cache call writes a unique id (its value in every layer), and remembers the MTP-layer
    mask bit each id should have: the invariant checked is that a column's draft bit follows its row."""

    def __init__(self):
        self.next_id = 1
        self.draft_bit: dict[int, int] = {0: 0}  # id 0: zeroed rows

    def fresh(self, steps: int, slots: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + steps * slots, dtype=np.float32).reshape(steps, slots)
        self.next_id += steps * slots
        return ids

    def step(self, cache: LatentKVCache, valid: np.ndarray, draft_valid: np.ndarray | None) -> np.ndarray:
        """One graph call: the main mask from `valid`, the MTP layer's from `draft_valid` (None: a plain call,
        the module skipped). Returns the MTP mask the call would pass."""
        slots, steps = valid.shape
        cache.attention_mask(steps, valid)
        draft = (cache.draft_attention_mask(steps, draft_valid) if draft_valid is not None
                 else cache.draft_attention_mask(0))
        ids = self.fresh(steps, slots)
        for view in cache.reserve(steps):
            view[...] = ids[..., None]
        bits = draft_valid if draft_valid is not None else np.zeros_like(valid)
        self.draft_bit.update({int(i): int(b) for i, b in zip(ids.T.ravel(), bits.ravel())})
        cache.advance(steps)
        return draft

    def ids(self, cache: LatentKVCache) -> np.ndarray:
        """The row id of each (slot, column) below length `[slots, length]`, the same in every layer."""
        rows = [layer[: cache.length, :, 0].T for layer in cache.layers]
        assert all(np.array_equal(rows[0], other) for other in rows[1:])
        return rows[0].astype(np.int64)

    def check(self, cache: LatentKVCache) -> None:
        """Every column the main mask shows has its row's draft bit; no column the main mask hides has one."""
        length = cache.length
        mask, draft = cache.mask[:, :length], cache.draft_mask[:, :length]
        ids = self.ids(cache)
        want = np.vectorize(self.draft_bit.__getitem__)(ids) if ids.size else ids
        assert np.array_equal(np.where(mask == 1, draft, 0), np.where(mask == 1, want, 0)), (mask, draft, want)
        assert not (draft & (1 - mask)).any(), "an MTP row of a masked column is visible"

    def forget_slot(self, cache: LatentKVCache, slot: int) -> None:
        for i in self.ids(cache)[slot]:
            self.draft_bit[int(i)] = 0


def prefilled(rows: Rows, count: int, rng, draft_mask: bool = True) -> LatentKVCache:
    """A batch-1 cache of `count` prompt rows, their MTP rows valid at random (or no MTP mask at all)."""
    cache = LatentKVCache(LAYERS, D, 1, count, draft_mask=draft_mask)
    valid = np.ones((1, count), np.int64)
    if draft_mask:
        rows.step(cache, valid, (rng.random((1, count)) < 0.7).astype(np.int64))
    else:
        cache.attention_mask(count, valid)
        ids = rows.fresh(count, 1)
        for view in cache.reserve(count):
            view[...] = ids[..., None]
        rows.draft_bit.update({int(i): 0 for i in ids.ravel()})
        cache.advance(count)
    return cache


def test_any_sequence_of_operations_keeps_each_rows_draft_bit():
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    cache = LatentKVCache(LAYERS, D, 0, CONTEXT, draft_mask=True)
    rows = Rows()
    operations = ["step", "step", "step", "invalidate", "invalidate", "trim", "place", "place", "resize",
                  "extend_to", "free", "compact", "reset"]
    seen = set()
    for _ in range(800):
        operation, slots, length = rng.choice(operations), cache.slots, cache.length
        if operation == "step" and slots and length < CONTEXT:
            steps = rng.randint(1, min(3, CONTEXT - length))
            valid = (np_rng.random((slots, steps)) < 0.7).astype(np.int64)
            speculative = rng.random() < 0.7
            draft_valid = valid * (np_rng.random(valid.shape) < 0.8) if speculative else None
            sent = rows.step(cache, valid, draft_valid)
            if speculative:
                assert np.array_equal(sent, cache.draft_mask[:, : cache.length])
        elif operation == "invalidate" and slots and length:
            slot, column, draft_only = rng.randrange(slots), rng.randrange(length), rng.random() < 0.5
            before = cache.mask.copy()
            cache.invalidate(slot, column, draft_only=draft_only)
            rows.draft_bit[int(rows.ids(cache)[slot, column])] = 0
            if draft_only:
                assert np.array_equal(cache.mask, before)
            else:
                assert cache.mask[slot, column] == 0
        elif operation == "trim":
            used = cache.mask[:, :length].any(axis=0)
            cache.trim()
            assert cache.length == (int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0)
        elif operation == "place" and slots:
            slot, count = rng.randrange(slots), rng.randint(1, 12)
            if max(length, count) < CONTEXT:
                rows.forget_slot(cache, slot)
                cache.place(slot, prefilled(rows, count, np_rng, draft_mask=rng.random() < 0.8))
        elif operation == "resize":
            cache.resize(rng.randint(0, 5))
        elif operation == "extend_to":
            cache.extend_to(rng.randint(0, min(CONTEXT, length + 6)))
        elif operation == "free" and slots:
            slot = rng.randrange(slots)
            rows.forget_slot(cache, slot)
            cache.free(slot)
        elif operation == "compact" or length > CONTEXT - 4:
            cache.compact(sorted(rng.sample(range(slots), rng.randint(0, slots))))
        elif operation == "reset":
            cache.reset()
        else:
            continue
        seen.add(operation)
        rows.check(cache)
    assert seen == set(operations)


def test_compact_keeps_each_slots_draft_bits_with_its_columns():
    cache = LatentKVCache(LAYERS, D, 2, CONTEXT, draft_mask=True)
    rows = Rows()
    valid = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                      [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
    draft = np.array([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
                      [0, 0, 0, 1, 1, 0, 1, 0, 1, 1]])
    rows.step(cache, valid, draft)
    cache.invalidate(1, 4, draft_only=True)
    rows.draft_bit[int(rows.ids(cache)[1, 4])] = 0
    cache.invalidate(1, 7)
    cache.compact([0, 1])
    assert cache.length == 6
    assert cache.mask[:, :6].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # slot 0 keeps columns 0-2, slot 1 columns 2, 3, 4, 6, 8, 9: their draft bits move with them
    assert cache.draft_mask[:, :6].tolist() == [[0, 0, 0, 1, 0, 1], [0, 1, 0, 1, 1, 1]]
    rows.check(cache)


def test_place_copies_the_prefilled_caches_draft_bits():
    rng = np.random.default_rng(2)
    rows = Rows()
    cache = LatentKVCache(LAYERS, D, 2, CONTEXT, draft_mask=True)
    rows.step(cache, np.ones((2, 4), np.int64), np.ones((2, 4), np.int64))
    prompt = LatentKVCache(LAYERS, D, 1, 6, draft_mask=True)
    rows.step(prompt, np.ones((1, 6), np.int64), np.array([[1, 1, 0, 1, 1, 0]]))
    cache.place(1, prompt)
    assert cache.mask[:, :6].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert cache.draft_mask[:, :6].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0]]
    cache.place(0, prefilled(rows, 3, rng, draft_mask=False))  # a plain prefill: no valid MTP rows
    assert cache.draft_mask[0, :6].tolist() == [0] * 6 and cache.mask[0, :6].tolist() == [0, 0, 0, 1, 1, 1]
    rows.check(cache)


def test_a_plain_call_leaves_the_mtp_rows_invalid_and_a_speculative_one_marks_them():
    cache = LatentKVCache(LAYERS, D, 2, CONTEXT, draft_mask=True)
    rows = Rows()
    sent = rows.step(cache, np.ones((2, 3), np.int64), None)
    assert sent.shape == (2, 0) and cache.draft_mask[:, :3].tolist() == [[0, 0, 0]] * 2
    sent = rows.step(cache, np.array([[1, 1], [1, 0]]), np.array([[1, 0], [1, 0]]))
    assert sent.tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]
    rows.check(cache)


def test_invalidate_masks_the_mtp_row_alone_or_the_whole_column():
    cache = LatentKVCache(LAYERS, D, 1, CONTEXT, draft_mask=True)
    Rows().step(cache, np.ones((1, 4), np.int64), np.ones((1, 4), np.int64))
    cache.invalidate(0, 1, draft_only=True)
    cache.invalidate(0, 3)
    assert cache.mask[0, :4].tolist() == [1, 1, 1, 0] and cache.draft_mask[0, :4].tolist() == [1, 0, 1, 0]
    cache.trim()
    assert cache.length == 3
    cache.invalidate(0, 2)
    cache.invalidate(0, 0)
    cache.trim()  # trailing columns only: column 1 is still used
    assert cache.length == 2 and cache.draft_mask[0, :2].tolist() == [0, 0]


def test_resize_free_and_reset_move_the_draft_mask_with_the_mask():
    cache = LatentKVCache(LAYERS, D, 2, CONTEXT, draft_mask=True)
    rows = Rows()
    rows.step(cache, np.ones((2, 3), np.int64), np.array([[1, 0, 1], [0, 1, 1]]))
    cache.resize(3)
    assert cache.draft_mask[:, :3].tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    cache.resize(1)
    assert cache.draft_mask.shape == cache.mask.shape == (1, CONTEXT)
    assert cache.draft_mask[0, :3].tolist() == [1, 0, 1]
    cache.extend_to(5)
    assert cache.draft_mask[0, :5].tolist() == [1, 0, 1, 0, 0]
    cache.free(0)
    assert not cache.draft_mask.any()
    rows.step(cache, np.ones((1, 2), np.int64), np.ones((1, 2), np.int64))
    cache.reset()
    assert cache.length == 0 and not cache.draft_mask.any()
