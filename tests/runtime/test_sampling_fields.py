"""OpenAI's sampling fields in the runtime: presence and frequency penalties as OpenAI defines them, logit_bias,
logprobs with top alternatives (the log-softmax of the model's raw logits), the response-format constraint hook in
RowState, their validation, and outputs that do not ask for them unchanged."""

import sys
import types

import numpy as np
import pytest

import moetrt.runtime
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import RowState, continuation_logits
from moetrt.runtime.requests import GenerationOptions, RequestError
from moetrt.runtime.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency_penalties,
    filtered_probabilities,
    log_softmax,
    top_logprobs,
)

GREEDY = SamplingParams(do_sample=False)


def _numpy_log_softmax(logits):
    """Written out apart from sampling.py: x - logsumexp(x) in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))


# -- penalties and bias on logits ------------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_subtract_openais_terms():
    logits = np.random.default_rng(0).normal(size=12).astype(np.float32)
    generated = np.array([3, 3, 5, 3, 11])
    got = apply_presence_frequency_penalties(logits, generated, presence=0.5, frequency=0.25)
    want = logits.astype(np.float64).copy()
    for token, count in ((3, 3), (5, 1), (11, 1)):  # logit[j] -= c[j] * frequency + (c[j] > 0) * presence
        want[token] -= count * 0.25 + 0.5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.dtype == np.float32 and got is not logits


def test_penalties_change_the_sampled_distribution_exactly_as_defined():
    logits = np.array([2.0, 1.0, 0.5, 0.0], dtype=np.float32)
    generated = np.array([0, 0, 1])
    params = SamplingParams(temperature=0.7)
    got = filtered_probabilities(apply_presence_frequency_penalties(logits, generated, 1.0, -0.5), params)
    penalised = np.array([2.0 - (2 * -0.5 + 1.0), 1.0 - (-0.5 + 1.0), 0.5, 0.0]) / 0.7
    want = np.exp(penalised - penalised.max())
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-6)


def test_negative_penalties_pull_repeated_tokens_up_and_zero_leaves_logits_alone():
    logits = np.zeros(5, dtype=np.float32)
    raised = apply_presence_frequency_penalties(logits, np.array([2, 2]), presence=-1.0, frequency=-2.0)
    assert raised.tolist() == [0.0, 0.0, 5.0, 0.0, 0.0]
    assert apply_presence_frequency_penalties(logits, np.array([2]), 0.0, 0.0) is logits
    assert apply_presence_frequency_penalties(logits, np.array([], np.int64), 1.0, 1.0) is logits


def test_logit_bias_adds_to_the_named_tokens_only():
    logits = np.arange(6, dtype=np.float16)
    got = apply_logit_bias(logits, ((1, 100.0), (4, -100.0)))
    assert got.dtype == np.float32
    assert got.tolist() == [0.0, 101.0, 2.0, 3.0, -96.0, 5.0]
    assert apply_logit_bias(logits, ()) is logits


def test_penalties_count_generated_tokens_not_the_prompt():
    logits = np.array([0.0, 3.0, 2.0, 0.0], dtype=np.float32)
    options = GenerationOptions(sampling=GREEDY, presence_penalty=2.0, max_new_tokens=8)
    row = RowState([1, 1, 1], options)
    first = row.choose(logits)
    assert first == 1  # the prompt's three 1s are no penalty
    row.advance(first)
    assert row.choose(logits) == 2  # now 1 was generated: 3 - 2 < 2


def test_repetition_penalty_and_bias_compose_without_double_counting():
    logits = np.array([4.0, 1.5, 0.0], dtype=np.float32)
    sampling = SamplingParams(do_sample=False, repetition_penalty=2.0)
    # 0 is in the prompt: 4 / 2 = 2, once (a second pass would make it 1 and let 2's 1.8 win)
    assert RowState([0], GenerationOptions(sampling=sampling, logit_bias={2: 1.8})).choose(logits) == 0
    assert RowState([0], GenerationOptions(sampling=sampling, logit_bias={2: 2.5})).choose(logits) == 2


# -- log-probabilities -----------------------------------------------------------------------------------------------


def test_log_softmax_and_top_alternatives():
    logits = np.array([1.0, 3.0, 3.0, -2.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(log_softmax(logits), _numpy_log_softmax(logits), rtol=0, atol=1e-12)
    top = top_logprobs(log_softmax(logits), 3)
    assert [token for token, _ in top] == [1, 2, 0]  # a tie puts the lower id first
    assert [value for _, value in top] == sorted((value for _, value in top), reverse=True)
    assert top_logprobs(log_softmax(logits), 0) == []
    assert len(top_logprobs(log_softmax(logits), 20)) == 5


def test_logprobs_describe_the_raw_logits_not_the_sampler():
    logits = np.array([0.0, 1.0, 2.0, -1.0], dtype=np.float32)
    options = GenerationOptions(sampling=SamplingParams(temperature=0.3, top_k=2, seed=1), logprobs=2,
                                presence_penalty=1.0, logit_bias={3: 100})
    row = RowState([0], options, seed=1)
    token = row.choose(logits)
    assert token == 3  # the bias forced it
    event = row.advance(token)
    (logprob,) = event.logprobs
    raw = _numpy_log_softmax(logits)
    assert logprob.token_id == 3 and logprob.logprob == pytest.approx(raw[3], abs=1e-12)
    assert [t for t, _ in logprob.top] == [2, 1]
    np.testing.assert_allclose([v for _, v in logprob.top], raw[[2, 1]], rtol=0, atol=1e-12)


# -- validation ------------------------------------------------------------------------------------------------------

REFUSED = [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(logit_bias={5: 100.5}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"),
    (dict(logit_bias={"five": 1}), "logit_bias"),
    (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(logit_bias=[(5, 1), (5, 2)]), "logit_bias"),
    (dict(logit_bias=5), "logit_bias"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(response_format="json"), "response_format"),
]


@pytest.mark.parametrize("values, param", REFUSED, ids=[repr(v) for v, _ in REFUSED])
def test_out_of_range_fields_are_refused_naming_the_openai_field(values, param):
    with pytest.raises(RequestError) as raised:
        GenerationOptions(**values)
    assert raised.value.param == param
    assert "\n" not in str(raised.value)


def test_logit_bias_takes_json_string_ids_and_pairs():
    assert GenerationOptions(logit_bias={"7": -100, 3: 2}).logit_bias == ((3, 2.0), (7, -100.0))
    assert GenerationOptions(logit_bias=[[7, 1.5]]).logit_bias == ((7, 1.5),)
    assert GenerationOptions(presence_penalty=-2, frequency_penalty=2).presence_penalty == -2.0


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.chat_prompt([{"role": "user", "content": "2+2"}])


def test_the_engine_refuses_bias_for_ids_outside_its_vocabulary_and_bad_types(engine, prompt):
    vocab = engine.session.vocab_size
    with pytest.raises(RequestError) as raised:
        engine.generate(prompt, max_new_tokens=2, logit_bias={vocab: 1.0})
    assert raised.value.param == "logit_bias" and f"[0, {vocab})" in str(raised.value)
    with pytest.raises(RequestError) as raised:
        engine.options(presence_penalty="1")
    assert raised.value.param == "presence_penalty"
    options = engine.options(presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"3": 1}, logprobs=4)
    assert (options.presence_penalty, options.frequency_penalty, options.logit_bias, options.logprobs) == \
        (0.5, -0.5, ((3, 1.0),), 4)


# -- on the real tiny engine -----------------------------------------------------------------------------------------


def _stop_ids(engine):
    return set(engine.eos_ids)


def test_logit_bias_minus_100_bans_a_token_in_greedy_generation(engine, prompt):
    plain = engine.generate(prompt, max_new_tokens=24, greedy=True)
    banned = next(t for t in plain.token_ids if t not in _stop_ids(engine))
    biased = engine.generate(prompt, max_new_tokens=24, greedy=True, logit_bias={banned: -100})
    assert banned not in biased.token_ids
    assert biased.token_ids != plain.token_ids


def test_logit_bias_plus_100_forces_a_token(engine, prompt):
    plain = engine.generate(prompt, max_new_tokens=12, greedy=True)
    forced = next(t for t in range(2, engine.session.vocab_size) if t not in plain.token_ids)
    biased = engine.generate(prompt, max_new_tokens=12, greedy=True, logit_bias={forced: 100})
    assert biased.token_ids == [forced] * 12
    sampled = engine.generate(prompt, max_new_tokens=12, temperature=1.0, seed=3, logit_bias={forced: 100})
    assert sampled.token_ids == [forced] * 12


def test_frequency_penalty_ends_repetition_in_greedy_generation(engine, prompt):
    repeat = next(t for t in range(2, engine.session.vocab_size) if t not in _stop_ids(engine))
    # +5 makes `repeat` the greedy choice at every step; a frequency penalty of 2 takes 2 per earlier use off it
    forced = engine.generate(prompt, max_new_tokens=10, greedy=True, logit_bias={repeat: 5})
    penalised = engine.generate(prompt, max_new_tokens=10, greedy=True, logit_bias={repeat: 5},
                                frequency_penalty=2.0)
    assert forced.token_ids.count(repeat) > penalised.token_ids.count(repeat)


@pytest.mark.parametrize("sampling", [dict(greedy=True), dict(temperature=1.5, seed=11)], ids=["greedy", "sampled"])
def test_logprobs_equal_the_log_softmax_of_the_sessions_logits(engine, prompt, sampling):
    k = 5
    result = engine.generate(prompt, max_new_tokens=16, logprobs=k, stop_token_ids=[], **sampling)
    assert len(result.logprobs) == len(result.token_ids)
    want = _numpy_log_softmax(continuation_logits(engine.session, [prompt], [result.token_ids])[0])
    for step, (token, logprob) in enumerate(zip(result.token_ids, result.logprobs)):
        assert logprob.token_id == token
        assert logprob.logprob == pytest.approx(want[step, token], abs=1e-4)
        assert len(logprob.top) == k
        values = [value for _, value in logprob.top]
        assert values == sorted(values, reverse=True)
        for alternative, value in logprob.top:
            assert value == pytest.approx(want[step, alternative], abs=1e-4)
        unreported = np.delete(want[step], [t for t, _ in logprob.top])
        assert values[-1] >= unreported.max() - 1e-4  # they are the k most likely


def test_stream_events_carry_one_logprob_per_token(engine, prompt):
    events = list(engine.stream(prompt, max_new_tokens=6, greedy=True, logprobs=0))
    assert all(len(e.logprobs) == len(e.token_ids) == 1 and e.logprobs[0].top == [] for e in events)
    assert all(e.logprobs is None for e in engine.stream(prompt, max_new_tokens=3, greedy=True))


@pytest.mark.parametrize("sampling", [dict(greedy=True), dict(temperature=0.9, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_outputs_without_the_new_fields_are_unchanged(engine, prompt, sampling):
    plain = engine.generate(prompt, max_new_tokens=20, **sampling)
    assert plain.logprobs is None
    neutral = engine.generate(prompt, max_new_tokens=20, presence_penalty=0.0, frequency_penalty=0.0,
                              logit_bias={}, **sampling)
    with_logprobs = engine.generate(prompt, max_new_tokens=20, logprobs=3, **sampling)
    # a zero bias takes the processed path (no greedy fast path) and must pick the same tokens
    zero_bias = engine.generate(prompt, max_new_tokens=20, logit_bias={5: 0.0}, **sampling)
    assert neutral == plain
    for other in (with_logprobs, zero_bias):
        assert other.token_ids == plain.token_ids
        assert (other.text, other.reasoning, other.finish_reason) == (plain.text, plain.reasoning,
                                                                      plain.finish_reason)


# -- the response-format constraint hook -----------------------------------------------------------------------------


class DigitsConstraint:
    """A stand-in for structured.py's Constraint: allows only `digits`, and is finished after `length` of them."""

    def __init__(self, digits, length):
        self.digits, self.length = list(digits), length
        self.accepted = []

    def mask(self, logits):
        masked = np.full_like(logits, -np.inf)
        masked[self.digits] = logits[self.digits]
        return masked

    def accept(self, token_id):
        assert token_id in self.digits, f"accepted {token_id}, which the mask forbade"
        self.accepted.append(token_id)

    @property
    def finished(self):
        return len(self.accepted) >= self.length


@pytest.fixture
def fake_structured(monkeypatch):
    """Installs a stand-in for moetrt.runtime.structured; yields the constraints it hands out."""
    made = []
    module = types.ModuleType("moetrt.runtime.structured")

    def constraint_for(response_format, tokenizer, eos_ids):
        made.append(DigitsConstraint(response_format["digits"], response_format["length"]))
        made[-1].eos_ids = eos_ids
        return made[-1]

    module.constraint_for = constraint_for
    monkeypatch.setitem(sys.modules, "moetrt.runtime.structured", module)
    monkeypatch.setattr(moetrt.runtime, "structured", module, raising=False)
    return made


def test_the_constraint_masks_from_the_first_token_and_only_eos_follows_when_finished(fake_structured):
    logits = np.array([0.0, 1.0, 9.0, 2.0, 3.0, 8.0], dtype=np.float32)  # 2 and 5 forbidden, 1 is EOS
    options = GenerationOptions(sampling=GREEDY, stop_token_ids=(1,), max_new_tokens=10,
                                response_format={"digits": [0, 3, 4], "length": 2})
    row = RowState([0], options)
    (constraint,) = fake_structured
    assert constraint.eos_ids == (1,)
    tokens = []
    while row.finish_reason is None:
        tokens.append(row.choose(logits))
        row.advance(tokens[-1])
    assert tokens == [4, 4, 1] and row.finish_reason == "stop"
    assert constraint.accepted == [4, 4]  # EOS after the finish is not fed to the constraint


def test_the_constraint_leaves_the_thinking_free_and_shapes_the_answer(engine, prompt, fake_structured):
    digits = [engine.tokenizer.token_id(d) for d in "0123456789"]
    messages = [{"role": "user", "content": "2+2"}]
    free = engine.chat(messages, max_new_tokens=30, max_reasoning_tokens=6, greedy=True)
    result = engine.chat(messages, max_new_tokens=30, max_reasoning_tokens=6, greedy=True,
                         response_format={"digits": digits, "length": 4})
    (constraint,) = fake_structured
    end = engine.tokenizer.token_id("</think>")
    cut = result.token_ids.index(end) + 1
    assert result.token_ids[:cut] == free.token_ids[: free.token_ids.index(end) + 1]  # the thinking is unmasked
    answer = result.token_ids[cut:]
    assert constraint.accepted == answer[:4] and all(t in digits for t in answer[:4])
    assert len(answer) == 5 and answer[4] in engine.eos_ids and result.finish_reason == "stop"
    assert result.text.isdigit() and len(result.text) == 4
    assert free.text != result.text


def test_a_constrained_row_cannot_end_inside_its_thinking(engine, fake_structured):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    free = engine.chat(messages, greedy=True, max_new_tokens=160)
    assert free.finish_reason == "stop" and free.text == ""  # unconstrained, it ends inside the thinking
    digits = [engine.tokenizer.token_id(d) for d in "0123456789"]
    result = engine.chat(messages, greedy=True, max_new_tokens=160, response_format={"digits": digits, "length": 3})
    end = engine.tokenizer.token_id("</think>")
    assert end in result.token_ids
    assert not set(result.token_ids[: result.token_ids.index(end)]) & set(engine.eos_ids)
    assert result.finish_reason == "stop" and result.text.isdigit() and len(result.text) == 3


def test_the_scheduler_serves_the_fields_per_request_as_generate_does(engine, prompt):
    from moetrt.runtime.scheduler import Scheduler

    other = engine.chat_prompt([{"role": "user", "content": "a longer question, asked alongside"}])
    fields = dict(max_new_tokens=12, greedy=True, stop_token_ids=[])
    banned = engine.generate(prompt, **fields).token_ids[0]
    asks = [(prompt, dict(logprobs=3, logit_bias={banned: -100}, frequency_penalty=1.5)), (other, {}),
            (other, dict(logprobs=0, presence_penalty=-1.0))]
    with Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context) as scheduler:
        tickets = [scheduler.submit(ids, engine.options(**fields, **extra)) for ids, extra in asks]
        served = [list(ticket.events()) for ticket in tickets]
    for (ids, extra), events in zip(asks, served):
        alone = engine.generate(ids, **fields, **extra)
        assert [t for e in events for t in e.token_ids] == alone.token_ids
        if "logprobs" not in extra:
            assert all(e.logprobs is None for e in events)
            continue
        got = [lp for e in events for lp in e.logprobs]
        assert [lp.token_id for lp in got] == alone.token_ids
        np.testing.assert_allclose([lp.logprob for lp in got], [lp.logprob for lp in alone.logprobs], atol=1e-4)
        assert [len(lp.top) for lp in got] == [extra["logprobs"]] * len(got)
    assert banned not in [t for e in served[0] for t in e.token_ids]
