"""The streaming build and the streamed reference: memory that does not grow with the model, and the same numbers.

A DeepSeek-V3-layout FP8 checkpoint (bench/moonlight.py's writer, a smaller config) is built in a child process
whose peak RSS growth over its own start (after the imports) is measured; the bound is half the model's float32
weights, which the whole-model load (the old path, and still `load_reference`) breaks in the same kind of child, so
the test fails if the build ever holds the model again. The engine is then checked against the eager reference, and
the streamed reference (layer by layer from the shards) against the eager one, exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moetrt.bench.moonlight import MOONLIGHT, write_moonlight

# 8 MoE layers of 48 experts (768 -> 384): about 360M parameters, 1.45 GB in float32, 380 MB as FP8 blocks.
CONFIG = {**MOONLIGHT, "hidden_size": 768, "intermediate_size": 1536, "moe_intermediate_size": 384,
          "num_hidden_layers": 9, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 48,
          "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 256, "qk_rope_head_dim": 32,
          "qk_nope_head_dim": 64, "v_head_dim": 64, "vocab_size": 4096, "bos_token_id": 4000,
          "eos_token_id": 4001, "max_position_embeddings": 256}

CHILD = textwrap.dedent("""
    import json, sys
    import onnx, onnx_ir, onnxruntime, onnxscript, torch.onnx  # what the build imports on its way: not its memory
    import moetrt
    from moetrt.export.engine import build_engine
    from moetrt.export.checkpoint import load_reference

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    mode, checkpoint, out = sys.argv[1:4]
    start = rss()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    if mode == "build":
        build_engine(checkpoint, out, backend="ort")
    else:
        model = load_reference(checkpoint)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"start": start, "peak": peak}))
""")


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return write_moonlight(tmp_path_factory.mktemp("fp8") / "ckpt", config=CONFIG, shard_bytes=64 << 20)


def _child(mode: str, checkpoint, out) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(checkpoint), str(out)], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "MOETRT_QUIET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fp32_bytes(checkpoint) -> int:
    from moetrt.config import load_config
    from moetrt.export.info import count_parameters

    return count_parameters(load_config(checkpoint)).total * 4


def test_streaming_build_memory_stays_below_what_a_whole_model_load_takes(fp8_checkpoint, tmp_path):
    bound = _fp32_bytes(fp8_checkpoint) // 2
    built = _child("build", fp8_checkpoint, tmp_path / "engine")
    loaded = _child("load", fp8_checkpoint, tmp_path / "unused")
    growth, whole = built["peak"] - built["start"], loaded["peak"] - loaded["start"]
    print(f"float32 weights {2 * bound / 1e6:.0f} MB; build peak growth {growth / 1e6:.0f} MB, whole-model load "
          f"{whole / 1e6:.0f} MB; bound {bound / 1e6:.0f} MB")
    assert whole > bound, "the bound would not catch a whole-model load: make the checkpoint larger"
    assert growth < bound

    import moetrt
    from moetrt.config import load_config
    from moetrt.export.checkpoint import load_reference
    from moetrt.export.info import engine_weight_bytes
    from moetrt.runtime.manifest import load_manifest

    manifest = load_manifest(tmp_path / "engine")  # `info`'s estimate of an engine's weights against a real one
    on_disk = sum(record.bytes for record in manifest.artifacts.values())
    estimate = engine_weight_bytes(load_config(fp8_checkpoint), "float32", None)
    assert 0.97 < on_disk / estimate < 1.1, (on_disk, estimate)

    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 24))
    with torch.no_grad():
        want = load_reference(fp8_checkpoint)(torch.from_numpy(ids)).numpy()
    got = moetrt.Engine.load(tmp_path / "engine").logits(ids)
    np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_streamed_reference_equals_the_loaded_one(fp8_checkpoint):
    from moetrt.export.checkpoint import CheckpointWeights, load_reference
    from moetrt.export.reference_session import load_reference_session

    ids = torch.from_numpy(np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 20)))
    want = load_reference(fp8_checkpoint)(ids)
    with CheckpointWeights(fp8_checkpoint) as weights:
        from moetrt.export.streaming_reference import streamed_model

        model = streamed_model(weights)
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
        head, rows = model.step(ids[:, :12])  # the latent cache path: prefix, then the rest against its rows
        rest, _ = model.step(ids[:, 12:], past_latents=rows)
        torch.testing.assert_close(rest, want[:, 12:], atol=1e-4, rtol=1e-4)
    with load_reference_session(fp8_checkpoint, stream=True) as session:
        assert session.model.model.layers.__class__.__name__ == "StreamedLayers"


# int8 runs in `make test-slow` (CI time)
@pytest.mark.parametrize("bits", [pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_rounded_streamed_reference_equals_the_quantized_model(fp8_checkpoint, bits):
    """The streamed reference with a scheme's rounding (what `bench/moonlight.py --kl-source` compares an engine
    with) computes what the quantized torch model (the weights the build writes) computes, and differs from the
    float32 reference."""
    from moetrt.export.checkpoint import CheckpointWeights, load_reference
    from moetrt.export.streaming_reference import streamed_model
    from moetrt.quantization import scheme_for

    scheme = scheme_for(bits)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, CONFIG["vocab_size"], (2, 16)))
    want = load_reference(fp8_checkpoint, quantize=scheme)(ids)
    with CheckpointWeights(fp8_checkpoint) as weights:
        plain = streamed_model(weights)(ids)
        rounded = streamed_model(weights, rounded=scheme)(ids)
    torch.testing.assert_close(rounded, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 100 * (rounded - want).abs().max()


# none runs in `make test-slow` (CI time)
@pytest.mark.parametrize("quantize", [pytest.param("none", marks=pytest.mark.slow), "int8"])
def test_a_tied_head_streams_from_the_embedding(tmp_path, quantize):
    """No lm_head.weight in the checkpoint: the streamed head (and the embedding it shares) read the embedding's
    tensor, as the loaded model ties them."""
    import moetrt
    from moetrt.export.checkpoint import load_reference
    from moetrt.quantization import scheme_for
    from tests.checkpoints import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "tied", "v3-plain-ungrouped-tied")
    scheme = scheme_for(quantize, 16)
    moetrt.build_engine(checkpoint, tmp_path / "engine", backend="ort", quantize=quantize, group_size=16)
    ids = np.random.default_rng(2).integers(0, 64, (1, 12))
    with torch.no_grad():
        want = load_reference(checkpoint, quantize=scheme)(torch.from_numpy(ids)).numpy()
    got = moetrt.Engine.load(tmp_path / "engine").logits(ids)
    assert np.isfinite(got).all()
    if scheme is None:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    else:  # MatMulNBits quantizes its activations to int8 (export/ort/build.py), which can flip a routing choice
        assert np.abs(got - want).mean() < 0.02 * np.abs(want).max()
