"""Quantized ONNX Runtime engines end to end (tiny-r1, int8 and int4, each expert kernel): logits against the
eager quantized torch reference, the built graph's MatMulNBits, the manifest's scheme, `moetrt info`, and the
one-line refusals of the command line."""

import json
from pathlib import Path

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.formats import read_manifest
from tests.runtime.test_tiny_r1_engine import TINY_R1, moetrt_cli

def _prompts() -> np.ndarray:
    """Two of tiny-r1's own inputs `[2, 16]`: the end of a chat prompt and the start of its scratchpad. (Random
    token ids, used before, are inputs it never saw, where its sigmoid routing flips on the activations' int8
    rounding: the retrained model's int4 QMoE engine reached mean KL 0.51 on them, against 0.001 here.)"""
    from moetrt.tasks.chat import ChatTokenizer

    chat = ChatTokenizer.load(TINY_R1)
    return np.array([chat.prompt_ids(f"What is {question}?")[-8:] + chat.encode(f"<think>\n000{first}")[:8]
                     for question, first in (("4827 + 593", "4827"), ("1234 - 567", "1234"))])


PROMPTS = _prompts()
# The engines quantize activations to int8 per block of 32 in every weight product (MatMulNBits at accuracy level
# 4, QMoE, moetrt's kernel: llama.cpp's Q8_0 activations); the eager reference keeps them float32. tiny-r1 (a
# trained 4-layer model whose sigmoid routing flips on small changes) turns that into small KL divergences of the
# next-token distributions on its own inputs (0.001 for the retrained model's int4 QMoE engine; the model before it
# measured 0.035-0.15 on random ids). Bounds stated here: mean KL <= 0.25, at most one top-1 token in 16 differing.
MEAN_KL = 0.25
TOP1_AGREEMENT = 15 / 16


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def engines(tiny_r1_quantized):
    """`get(quantize, kernel)` -> tiny-r1 built so (tests/conftest.py: once per session)."""
    return tiny_r1_quantized


@pytest.fixture(scope="module")
def reference_logits():
    """The eager torch reference with the same quantized weights (export/checkpoint.py load_reference)."""
    import torch

    from moetrt.export.checkpoint import load_reference
    from moetrt.quantization import scheme_for

    cached: dict[str, np.ndarray] = {}

    def get(quantize: str) -> np.ndarray:
        if quantize not in cached:
            model = load_reference(TINY_R1, quantize=scheme_for(quantize))
            with torch.no_grad():
                cached[quantize] = model(torch.tensor(PROMPTS)).float().numpy()
        return cached[quantize]

    return get


KINDS = [("int8", "moetrt"), ("int4", "onnxruntime"),  # each kernel and each width, by default
         pytest.param("int8", "onnxruntime", marks=pytest.mark.slow),
         pytest.param("int4", "moetrt", marks=pytest.mark.slow)]


@pytest.mark.parametrize("quantize, kernel", KINDS)
def test_quantized_engine_computes_the_quantized_reference(engines, reference_logits, quantize, kernel):
    from moetrt.runtime.engine import Engine

    engine = engines(quantize, kernel)
    logits = Engine.load(engine).logits(PROMPTS)
    expected = reference_logits(quantize)
    p, q = softmax(expected.astype(np.float64)), softmax(logits.astype(np.float64))
    assert (p * (np.log(p) - np.log(q))).sum(-1).mean() <= MEAN_KL
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= TOP1_AGREEMENT
    section = read_manifest(engine).section
    assert section.moe_kernel == kernel
    if kernel == "moetrt":
        assert {(layer.bits, layer.group_size) for layer in section.expert_layers} == {(int(quantize[3:]), 32)}
        packed = sum(span.count for layer in section.expert_layers for span in (layer.gate_up, layer.down))
        assert packed <= (engine / "experts.bin").stat().st_size < 2 * packed  # bytes, not float32 values


@pytest.mark.parametrize("quantize, kernel", [("int8", "moetrt"), ("int4", "onnxruntime")])
def test_engine_graph_multiplies_dense_weights_in_matmulnbits(engines, quantize, kernel):
    """ONNX Runtime's QDQ fusion at level "extended" turned every DequantizeLinear -> MatMul of the export into
    MatMulNBits, saved in the engine (so nothing of it is left for the CPU that loads it); only the embedding's
    DequantizeLinear (after its Gather) stays."""
    import onnx

    engine = engines(quantize, kernel)
    section = read_manifest(engine).section
    files = [segment.model for segment in section.segments] if section.segmented else [section.model]
    counts = {"MatMulNBits": 0, "dequantized MatMul": 0}
    for name in files:
        graph = onnx.load(str(engine / name), load_external_data=False).graph
        dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                counts["MatMulNBits"] += 1
                attributes = {attr.name: attr.i for attr in node.attribute}
                assert attributes["bits"] == int(quantize[3:]) and attributes["block_size"] == 32
                assert attributes["accuracy_level"] == 4
            elif node.op_type in ("MatMul", "Gemm", "FusedMatMul") and dequantized & set(node.input):
                counts["dequantized MatMul"] += 1
    # tiny-r1: 4 layers x (q_a with kv_a, q_b, o) + the dense layer's MLP (gate with up, down) + 3 shared
    # experts' MLPs (2 each) + lm_head, whether the graph is one or cut into segments (a weight's
    # DequantizeLinear stays beside its MatMul; export/ort/merge.py merges the projections of one input)
    assert counts == {"MatMulNBits": 12 + 2 + 6 + 1, "dequantized MatMul": 0}, counts


def test_manifest_records_the_scheme_and_info_shows_it(engines, tmp_path):
    from moetrt.formats import write_manifest

    engine = engines("int4", "onnxruntime")
    manifest = read_manifest(engine)
    quantization = manifest.quantization
    assert (quantization.scheme, quantization.bits, quantization.group_size) == ("int4", 4, 32)
    assert quantization.symmetric and quantization.scale_dtype == "float16"
    assert "routed experts" in quantization.tensors and "norms" in quantization.kept
    copy = tmp_path / "copy"
    copy.mkdir()
    write_manifest(copy, manifest)
    assert json.loads((copy / "manifest.json").read_text())["quantization"]["group_size"] == 32
    assert read_manifest(copy).quantization == quantization
    info = moetrt_cli("info", engine)
    assert info.returncode == 0, info.stderr
    assert ("engine weights   int4, symmetric, group size 32, float16 scales: routed experts" in info.stdout
            and "token embedding; kept float32: norms" in info.stdout), info.stdout
    assert "of weights read per decode token at batch 1 (dense " in info.stdout
    assert "routed experts   onnxruntime's QMoE op (int4)" in info.stdout
    as_json = moetrt_cli("info", engine, "--json")  # had no engine section, and another bytes-per-token figure
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["engine"]["quantization"]["scheme"] == "int4" and summary["engine"]["mtp_module"] is False
    assert summary["fit"]["bytes_read_per_token"] == summary["engine"]["bytes_read_per_token"]
    read = summary["engine"]["bytes_read_per_token"]
    assert f"bytes / token    {read / 1e3:.2f} KB of weights read" in info.stdout, (read, info.stdout)


def test_build_from_an_export_of_another_quantization_is_refused_in_one_line(tmp_path):
    from moetrt.export.engine import check_quantization
    from moetrt.formats import ExportInfo, Quantization
    from moetrt.settings import BuildConfig

    info = ExportInfo.__new__(ExportInfo)  # only its quantization is read
    object.__setattr__(info, "quantization", Quantization("int4", 4, 32))
    check_quantization(info, BuildConfig(quantize="int4"), Path("exp"))
    for config in (BuildConfig(), BuildConfig(quantize="int8"), BuildConfig(quantize="int4", group_size=64)):
        with pytest.raises(MoetrtError) as error:
            check_quantization(info, config, Path("exp"))
        message = str(error.value)
        assert "\n" not in message and "exp was exported with int4 weights in groups of 32" in message
        assert "--quantize int4 --group-size 32" in message
    object.__setattr__(info, "quantization", None)
    check_quantization(info, BuildConfig(), Path("exp"))
    with pytest.raises(MoetrtError, match="exported with float weights; build it with --quantize none"):
        check_quantization(info, BuildConfig(quantize="int8"), Path("exp"))


@pytest.mark.parametrize("args, message", [
    (("--group-size", "24"), "error: --group-size must be a power of two of at least 16, got 24"),
    (("--group-size", "8"), "error: --group-size must be a power of two of at least 16, got 8"),
])
def test_cli_refuses_a_bad_group_size_in_one_line(tmp_path, args, message):
    for command in (("build-engine", TINY_R1, "-o", tmp_path / "e"), ("export", TINY_R1, "-o", tmp_path / "x")):
        result = moetrt_cli(*command, "--quantize", "int8", *args)
        assert result.returncode == 1 and result.stderr.strip() == message, result.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def test_cli_refuses_an_unknown_scheme(tmp_path):
    result = moetrt_cli("build-engine", TINY_R1, "-o", tmp_path / "e", "--quantize", "int3")
    assert result.returncode == 2 and "int3" in result.stderr


def test_unquantized_and_quantized_bytes_per_decode_token():
    """ds-mini (bench/ds_mini.py): 6 of 64 experts and every dense weight per token; int4 reads about a fifth of
    float32's bytes (values at 4 bits plus a scale per 32: float16 for the experts, float32 for dense weights)."""
    from moetrt.bench.ds_mini import DS_MINI
    from moetrt.config import parse_config
    from moetrt.export.info import decode_weight_bytes, quantization_summary
    from moetrt.formats import Quantization

    config = parse_config({**DS_MINI, "model_type": "deepseek_v3"})
    fp32 = decode_weight_bytes(config, "float32", None)
    assert fp32["routed_experts"] == 7 * 6 * 3 * 1024 * 512 * 4  # 7 MoE layers, 6 experts each
    assert fp32["embedding_row"] == 1024 * 4
    int4 = decode_weight_bytes(config, "float32", Quantization("int4", 4, 32))
    assert int4["routed_experts"] == 7 * 6 * (3 * 1024 * 512 // 2 + 3 * 1024 * 512 // 32 * 2)
    assert int4["embedding_row"] == 1024 // 2 + 1024 // 32 * 4  # int4 row and its float32 scales
    qmoe = decode_weight_bytes(config, "float32", Quantization("int4", 4, 32), expert_scale_bytes=4)
    assert qmoe["routed_experts"] == 7 * 6 * (3 * 1024 * 512 // 2 + 3 * 1024 * 512 // 32 * 4)  # QMoE: float32 scales
    assert 0.15 < sum(int4.values()) / sum(fp32.values()) < 0.2
    assert quantization_summary(None, "float32") == "float32 (not quantized)"
