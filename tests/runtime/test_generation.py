"""Generation through the ONNX Runtime engine against the torch reference, and the sampler's statistics."""

import subprocess
import sys

import numpy as np
import pytest

from moetrt import MoetrtError
from moetrt.export.engine import build_engine
from moetrt.settings import BuildProfile
from moetrt.export.reference_session import load_reference_session
from moetrt.runtime.engine import Engine
from tests.checkpoints import make_checkpoint
from tests.greedy import assert_greedy_agrees, greedy_with_logits

PROMPTS = [
    [5, 9, 11, 40, 7],
    list(range(3, 60)),  # longer than the 16-token prefill chunk below
    [17, 4],
    [33, 2, 90, 14, 6, 71, 8, 3, 3, 12, 9],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "v3-qlora-grouped-yarn")
    engine_dir = build_engine(checkpoint, tmp_path_factory.mktemp("e") / "engine", backend="ort",
                              profile=BuildProfile(max_seq=16, max_context=128))
    return Engine.load(engine_dir), load_reference_session(checkpoint)


@pytest.mark.parametrize("rows", [[1], [0, 1, 2, 3]], ids=["batch1-long-prompt", "batch4-mixed-lengths"])
def test_greedy_generation_equals_reference_token_for_token(built, rows):
    engine, reference = built
    prompts = [PROMPTS[i] for i in rows]
    got = engine.generate(prompts, max_new_tokens=40, greedy=True, stop_token_ids=[])
    want_tokens, want_logits = greedy_with_logits(reference, prompts, 40, stop_ids=engine.eos_ids)
    for row, result in enumerate(got):
        assert result.finish_reason in ("stop", "length")
        assert assert_greedy_agrees(want_tokens[row], want_logits[row], result.token_ids, f"row {row}") > 0


def test_chunked_prefill_matches_one_shot(built):
    engine, _ = built
    one_shot = engine.generate(PROMPTS[1], max_new_tokens=12, greedy=True, prefill_chunk=64)
    chunked = engine.generate(PROMPTS[1], max_new_tokens=12, greedy=True, prefill_chunk=7)
    assert one_shot.token_ids == chunked.token_ids


def test_seeded_sampling_is_reproducible(built):
    engine, _ = built
    kwargs = dict(max_new_tokens=24, temperature=1.3, top_p=0.95, do_sample=True)
    first = engine.generate(PROMPTS[0], seed=7, **kwargs).token_ids
    assert engine.generate(PROMPTS[0], seed=7, **kwargs).token_ids == first
    assert any(engine.generate(PROMPTS[0], seed=s, **kwargs).token_ids != first for s in range(8, 12))


def _expected_distribution(logits, temperature, top_p):
    """Written out independently of runtime/sampling.py: softmax(logits / T), then the top-p nucleus."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0:  # no nucleus; a float cumsum may end just below 1.0 and must not cut it
        return p
    order = np.argsort(-p)
    cut = np.argmax(np.cumsum(p[order]) >= top_p) + 1
    nucleus = np.zeros_like(p)
    nucleus[order[:cut]] = p[order[:cut]]
    return nucleus / nucleus.sum()


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.5, 0.8)])
def test_one_step_frequencies_match_the_softmax(built, temperature, top_p):
    """4000 independent first-token draws (one seed per row) against the distribution the logits define.

    Tolerance: Pearson's chi-square over tokens with expected count >= 5 (the rest pooled) must not
    exceed the 0.999 quantile of its chi-square distribution, and no token outside the nucleus may appear.
    """
    from scipy.stats import chi2

    engine, _ = built
    prompt = PROMPTS[3]
    expected = _expected_distribution(engine.logits(np.array([prompt]))[0, -1], temperature, top_p)
    draws = 4000
    counts = np.zeros_like(expected)
    for start in range(0, draws, 500):
        results = engine.generate([prompt] * 500, max_new_tokens=1, do_sample=True, temperature=temperature,
                                  top_p=top_p, seed=1000 + start, stop_token_ids=[])
        for result in results:
            counts[result.token_ids[0]] += 1
    assert counts[expected == 0].sum() == 0
    big = expected * draws >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum()) * draws
    keep = wanted > 0
    statistic = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()
    dof = keep.sum() - 1
    assert dof >= 3
    assert statistic <= chi2.ppf(0.999, dof), (statistic, dof)


def test_length_and_context_errors(built):
    engine, _ = built
    with pytest.raises(MoetrtError, match="exceeds the engine's context of 128"):
        engine.generate([7] * 100, max_new_tokens=40)
    with pytest.raises(MoetrtError, match="no tokenizer: pass token ids"):
        engine.generate("hello")
    with pytest.raises(MoetrtError, match="top_p must lie in"):
        engine.generate([1, 2], top_p=1.5)
    with pytest.raises(MoetrtError, match="unknown generation option"):
        engine.generate([1, 2], beam_width=4)


def test_runtime_imports_no_torch():
    code = (
        "import sys\n"
        "import moetrt.runtime, moetrt.runtime.engine, moetrt.runtime.ort.session\n"
        "from moetrt import Engine\n"
        "assert 'torch' not in sys.modules, 'import moetrt.runtime pulled in torch'\n"
        "sys.argv = ['moetrt', 'generate', '--help']\n"
        "from moetrt.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None)\n"
        "assert 'torch' not in sys.modules, 'moetrt generate --help pulled in torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
