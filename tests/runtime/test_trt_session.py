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
from moetrt.formats import ATTENTION_MASK, HOST_INPUTS, LOGITS, new_latent, past_latent
from moetrt.runtime.trt.bindings import ALIGNMENT, StagingLayout, align_up, misaligned, step_bindings
from moetrt.runtime.trt.device_cache import SlotLayout, layer_views
from moetrt.runtime.trt.session import bfloat16_to_float32, capture_inputs, decode_buckets, pad_mask
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


def cuda_malloc_bases(sizes, start=0x7F3A_0000_0000):
    """Addresses as cudaMalloc hands them out: 256-byte aligned, one after the other."""
    bases, at = [], start
    for size in sizes:
        bases.append(at)
        at += align_up(max(size, 1)) + ALIGNMENT
    return bases


def step_addresses(num_layers, latent_dim, itemsize, slots, max_context, length, seq):
    """Every address the session binds for a step of `seq` tokens on a cache of `length` rows, and the addresses of
    the cache views the new rows are copied to (the cache's reserve())."""
    layout = SlotLayout(slots, latent_dim * itemsize)
    layers = cuda_malloc_bases([max_context * layout.pitch] * num_layers)
    past = layer_views(layers, layout, max_context, 0, length, itemsize)
    staging = StagingLayout(num_layers, seq, slots, latent_dim, itemsize)
    inputs = dict(zip(HOST_INPUTS, cuda_malloc_bases([8 * seq * slots] * len(HOST_INPUTS), 0x7F3B_0000_0000)))
    bound = step_bindings(inputs, [(past_latent(i), rows) for i, rows in enumerate(past)],
                          [(new_latent(i), rows) for i, rows in enumerate(staging.views(0x7F3C_0000_0000))],
                          (LOGITS, 0x7F3D_0000_0000))
    reserved = layer_views(layers, layout, max_context, length, seq, itemsize)
    return bound, {new_latent(i): rows.pointer for i, rows in enumerate(reserved)}


# (layers, latent values per row, bytes per value): DeepSeek-V3 in bf16, tiny-r1-like fp32 and an odd fp16 latent.
SHAPES = {"deepseek-v3-bf16": (61, 576, 2), "tiny-fp32": (2, 64, 4), "odd-fp16": (3, 40, 2)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("slots, length, seq", [(1, 1, 1), (3, 37, 1), (7, 129, 1), (5, 0, 33), (2, 11, 7),
                                                (1, 4095, 1)])
def test_every_address_a_step_binds_is_256_byte_aligned(shape, slots, length, seq):
    num_layers, latent_dim, itemsize = shape
    bound, _ = step_addresses(num_layers, latent_dim, itemsize, slots, 4096 + 64, length, seq)
    assert len(bound) == len(HOST_INPUTS) + 2 * num_layers + 1
    assert misaligned(bound) == []


def test_binding_the_caches_new_rows_in_place_would_be_misaligned_at_deepseek_v3():
    """Why new rows go through staging: at 1,152-byte bf16 rows, length x slots odd puts them off 256."""
    _, in_place = step_addresses(61, 576, 2, 3, 4160, 37, 1)
    assert len(misaligned(in_place)) == 61
    _, tiny = step_addresses(2, 64, 4, 3, 4160, 37, 1)  # 256-byte fp32 rows hid it
    assert misaligned(tiny) == []


def test_staging_layers_start_aligned_and_hold_their_rows():
    layout = StagingLayout(4, 1, 3, 576, 2)
    views = layout.views(0x1000)
    assert layout.layer_bytes == 3 * 576 * 2 and layout.pitch == 3584 and layout.nbytes == 4 * 3584
    assert [v.pointer % ALIGNMENT for v in views] == [0] * 4
    assert all(v.nbytes == layout.layer_bytes and v.shape == (1, 3, 576) for v in views)


def test_capture_warm_up_attends_to_the_new_token():
    """An all-zero mask would softmax over nothing (NaN through the network) during the warm-up run."""
    inputs = capture_inputs(3, 64)
    assert inputs[ATTENTION_MASK].shape == (3, 65) and (inputs[ATTENTION_MASK][:, -1] == 1).all()
    assert inputs[ATTENTION_MASK][:, :-1].sum() == 0
    assert {name: array.shape for name, array in inputs.items() if name != ATTENTION_MASK} == {
        name: (3, 1) for name in HOST_INPUTS if name != ATTENTION_MASK}
    assert all(array.dtype == np.int64 and array.flags.c_contiguous for array in inputs.values())


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


class RecordingRuntime:
    """Records the cudart calls cuda_memory makes, answering like cuda-python would for a capture that TensorRT's
    enqueue invalidated. It checks the order of moetrt's own calls only; the real effect (no stale error after a
    failed capture) is tests/runtime/test_cuda_memory.py's, on a GPU."""

    class cudaError_t:  # noqa: N801 - cuda-python's name
        cudaSuccess = 0
        cudaErrorStreamCaptureInvalidated = 901

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "cudaStreamEndCapture":
                return self.cudaError_t.cudaErrorStreamCaptureInvalidated, 0
            if name == "cudaGetErrorString":
                return 0, b"operation failed due to a previous error during capture"
            return (self.cudaError_t.cudaSuccess,)
        return call


@pytest.mark.parametrize("work_result", [False, True], ids=["enqueue-failed", "capture-invalidated"])
def test_a_failed_capture_clears_the_error_before_the_session_falls_back(monkeypatch, work_result):
    from moetrt.runtime.trt import cuda_memory as cuda

    runtime = RecordingRuntime()
    monkeypatch.setattr(cuda, "_runtime", lambda: runtime)
    with pytest.raises(cuda.CudaError):
        cuda.capture(7, lambda: work_result)
    assert runtime.calls[0] == "cudaStreamBeginCapture" and "cudaStreamEndCapture" in runtime.calls
    assert runtime.calls[-1] == "cudaGetLastError"
