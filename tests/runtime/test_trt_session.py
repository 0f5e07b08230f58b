"""The TensorRT session: its pure pieces everywhere; engines themselves only where TensorRT and a GPU are present.

No TensorRT is faked: the engine tests skip, saying which of TensorRT or a GPU is missing.
"""

import numpy as np
import pytest
import torch

import moetrt
from moetrt.export.backends import get_backend
from moetrt.export.engine import build_engine
from moetrt.settings import BuildProfile, TrtOptions
from moetrt.runtime.trt.session import bfloat16_to_float32, decode_buckets, pad_mask
from tests.checkpoints import make_checkpoint
from tests.greedy import assert_greedy_agrees, greedy_with_logits

UNAVAILABLE = get_backend("trt").unavailable_reason()


def test_decode_buckets_double_up_to_the_context():
    assert decode_buckets(1000) == [64, 128, 256, 512, 1000]
    assert decode_buckets(64) == [64] and decode_buckets(10) == [10]


def test_padded_mask_keeps_the_past_masks_the_padding_and_ends_with_the_new_token():
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 0]])  # past of 3, then the new token's column
    padded = pad_mask(mask, 6)
    assert padded.tolist() == [[1, 1, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0, 0]]


def test_bfloat16_bits_convert_exactly():
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-20, float("inf")], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_to_float32(bits), values.float().numpy())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "v3-qlora-grouped-yarn")


@pytest.mark.gpu
@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"needs TensorRT and a CUDA GPU: {UNAVAILABLE}")
@pytest.mark.parametrize("form", ["aot", "jit", "portable"])
def test_trt_engine_scores_and_decodes_like_the_reference(checkpoint, tmp_path, form):
    engine_dir = build_engine(checkpoint, tmp_path / form, backend="trt",
                              profile=BuildProfile(max_batch=4, max_seq=32, max_context=128),
                              trt=TrtOptions(plugin="aot" if form == "portable" else form, portable=form == "portable"))
    engine = moetrt.Engine.load(engine_dir)
    assert engine.session.backend == "trt"
    assert engine.manifest.section.python_at_runtime == (form == "jit")
    reference = moetrt.load_reference(checkpoint)
    ids = np.random.default_rng(0).integers(0, 96, (3, 21))
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).numpy()
    assert np.abs(engine.logits(ids) - want).max() <= 1e-3
    prompts = [[5, 9, 11, 40, 7], [17, 4, 60]]
    from moetrt.export.reference_session import ReferenceSession

    want_tokens, want_logits = greedy_with_logits(ReferenceSession(reference), prompts, 80, stop_ids=engine.eos_ids)
    results = engine.generate(prompts, max_new_tokens=80, greedy=True)  # 80 steps cross the 64-row bucket
    for row, result in enumerate(results):
        assert assert_greedy_agrees(want_tokens[row], want_logits[row], result.token_ids, f"row {row}") > 8
