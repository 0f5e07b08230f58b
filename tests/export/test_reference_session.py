"""The torch reference as a runtime Session: the runtime's loop over it, and the scoring call verify reads its
margins from."""

import numpy as np
import pytest
import torch

from moetrt.export.reference_session import ReferenceSession, load_reference_session
from moetrt.runtime.generate import GenerationOptions, continuation_logits, generate
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 9, 11, 40, 7, 3, 22, 8], [17, 4, 60], [33, 2, 90, 14, 6]]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return load_reference_session(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "v3-qlora-grouped-yarn"))


def test_run_writes_the_new_latent_rows_into_the_cache(session):
    ids = np.array([[5, 9, 11, 40]], dtype=np.int64)
    cache = session.new_cache(1, 8)
    mask = cache.attention_mask(4, np.ones((1, 4), np.int64))
    positions = np.arange(4)[None]
    logits, rows = session.run(ids, positions, mask, np.array([[1, 3]]), cache.past(), cache.reserve(4))
    with torch.no_grad():
        want_logits, want_rows = session.model.step(torch.from_numpy(ids))
    assert logits.dtype == np.float32 and logits.shape == (1, 2, session.vocab_size)
    assert np.allclose(logits, want_logits[:, [1, 3]].numpy(), atol=1e-5)
    assert all(np.shares_memory(row, layer) for row, layer in zip(rows, cache.layers))
    assert all(np.allclose(row, want.numpy(), atol=1e-6) for row, want in zip(rows, want_rows))


class RecordingSession:
    """Passes calls through and keeps the last-position logits of each call that returns any."""

    def __init__(self, session):
        self.session, self.steps = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args):
        logits, rows = self.session.run(*args)
        if logits.shape[1]:
            self.steps.append(logits[:, -1].copy())
        return logits, rows


def test_scoring_gives_the_logits_each_greedy_step_chose_from(session):
    recorder = RecordingSession(session)
    results = generate(recorder, PROMPTS, GenerationOptions(max_new_tokens=10, stop_token_ids=(1,)))
    tokens = [result.token_ids for result in results]
    scored = continuation_logits(session, PROMPTS, tokens)
    for row, (row_tokens, row_logits) in enumerate(zip(tokens, scored)):
        assert row_logits.shape == (len(row_tokens), session.vocab_size)
        looped = np.stack([step[row] for step in recorder.steps[: len(row_tokens)]])
        assert np.abs(row_logits - looped).max() <= 1e-4
