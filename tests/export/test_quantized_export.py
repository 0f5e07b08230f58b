"""Block-wise int8/int4 weight quantization: the scheme's error bounds, its ONNX encoding, the quantized reference
model against transformers, the exported graph, and FP8 checkpoints quantized without a float32 model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import moetrt
from moetrt import MoetrtError
from moetrt.export.quantized import QuantizedEmbedding, QuantizedExperts, QuantizedLinear, finish_export
from moetrt.quantization import QuantScheme, dequantize_blocks, pack_int4, quantize_blocks, scheme_for, unpack_int4
from tests.checkpoints import build_model, make_checkpoint

NAME = "v3-qlora-grouped-yarn"
# Dimensions that are multiples of 32, so every weight the scheme covers is quantized.
SIZES = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, v_head_dim=16)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_error_is_within_half_a_step(bits, group):
    rng = np.random.default_rng(bits * group)
    weight = (rng.standard_normal((37, 256)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    weight[3, :group] = 0  # an all-zero group
    q, d = quantize_blocks(weight, QuantScheme(bits, group))
    assert q.dtype == np.int8 and d.dtype == np.float16 and d.shape == (37, 256 // group)
    assert q.min() >= (-127 if bits == 8 else -8) and q.max() <= (127 if bits == 8 else 7)
    restored = dequantize_blocks(q, d, group)
    step = np.abs(d.astype(np.float32)).repeat(group, axis=1)
    error = np.abs(restored - weight)
    # Rounding to the nearest level: half a step, plus float16 rounding of the scale (relative 2^-11 of the value).
    bound = step / 2 + np.abs(weight) * 2.0**-10 + 1e-12
    if bits == 4:  # Q4_0's rule maps the extreme to -8; its opposite +8 is clipped to 7: one step there
        bound = np.where(q == 7, step + np.abs(weight) * 2.0**-10, bound)
    assert (error <= bound).all(), float((error - bound).max())
    assert np.all(restored[3, :group] == 0)
    # the largest magnitude of each group is (nearly) exactly representable
    big = np.abs(weight).reshape(37, -1, group).max(-1)
    assert np.allclose(np.abs(restored).reshape(37, -1, group).max(-1), big, rtol=2.0**-9)


def test_int4_extreme_lands_on_minus_eight_as_q4_0_does():
    weight = np.array([[1.0, -0.5, 0.25] + [0.0] * 29, [-2.0, 1.0] + [0.0] * 30], dtype=np.float32)
    q, d = quantize_blocks(weight, QuantScheme(4, 32))
    assert q[0, 0] == -8 and q[1, 0] == -8
    assert d[0, 0] == np.float16(-0.125) and d[1, 0] == np.float16(0.25)


def test_scheme_names_and_refusals():
    assert scheme_for("none") is None
    assert scheme_for("int4", 64) == QuantScheme(4, 64)
    with pytest.raises(MoetrtError, match="--quantize must be one of"):
        scheme_for("int3")
    with pytest.raises(MoetrtError, match="power of two"):
        QuantScheme(8, 48)
    with pytest.raises(MoetrtError, match="not a multiple of the group size"):
        quantize_blocks(np.ones((2, 40), np.float32), QuantScheme(8, 32))
    with pytest.raises(MoetrtError, match="group-size"):
        moetrt.BuildConfig(quantize="int8", group_size=8)


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_blockwise_dequantize_linear_reads_our_blocks(bits):
    """The ONNX reference implementation of DequantizeLinear (opset 21, block-wise, INT4/INT8 tensors) gives the
    same weights as moetrt's dequantization: the encoding an engine graph carries means what we mean."""
    import onnx_ir as ir

    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((96, 40)).astype(np.float32)  # [K, N]: blocks along K, as MatMul's B
    q, d = quantize_blocks(weight.T, QuantScheme(bits, 32))  # [N, K] rows
    dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
    q_tensor = ir.serde.serialize_tensor(ir.Tensor(np.ascontiguousarray(q.T), dtype=dtype, name="q"))
    scale = numpy_helper.from_array(np.ascontiguousarray(d.T.astype(np.float32)), "scale")
    node = helper.make_node("DequantizeLinear", ["q", "scale"], ["w"], axis=0, block_size=32)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
                              initializer=[q_tensor, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (w,) = ReferenceEvaluator(model).run(None, {})
    assert np.array_equal(w, dequantize_blocks(q, d, 32).T)
    if bits == 4:
        assert np.array_equal(unpack_int4(pack_int4(q)), q)


def _dequantized_state(model) -> dict[str, torch.Tensor]:
    """The quantized moetrt model's weights, dequantized, under transformers' names."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantized().t()
        elif isinstance(module, QuantizedEmbedding):
            state[f"{name}.weight"] = torch.from_numpy(
                dequantize_blocks(module.weight_q.numpy(), module.weight_scale.numpy(), module.scheme.group_size))
        elif isinstance(module, QuantizedExperts):
            g = module.scheme.group_size
            state[f"{name}.gate_up_proj"] = torch.from_numpy(
                dequantize_blocks(module.gate_up_q.numpy(), module.gate_up_scale.numpy(), g))
            state[f"{name}.down_proj"] = torch.from_numpy(
                dequantize_blocks(module.down_q.numpy(), module.down_scale.numpy(), g))
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quantized"), NAME, **SIZES)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reference_equals_transformers_on_dequantized_weights(checkpoint, bits):
    model = moetrt.load_reference(checkpoint, quantize=QuantScheme(bits, 32))
    kinds = Counter(type(m).__name__ for m in model.modules())
    assert kinds["QuantizedExperts"] == 2 and kinds["QuantizedEmbedding"] == 1
    assert kinds["QuantizedLinear"] == 3 * 4 + 3 + 2 * 3 + 1  # attention x3 layers, dense MLP, shared x2, lm_head
    assert type(model.model.layers[0].self_attn.kv_b_proj) is torch.nn.Linear  # kept: absorbed per head
    expected = build_model(NAME, **SIZES)
    state = expected.state_dict()
    state.update(_dequantized_state(model))
    expected.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert (model(ids) - expected(ids).logits).abs().max() <= 2e-4
        plain = moetrt.load_reference(checkpoint)(ids)
        assert (model(ids) - plain).abs().max() > 1e-3  # the weights really are quantized


def test_quantized_load_refuses_half_precision(checkpoint):
    with pytest.raises(MoetrtError, match="quantized engines compute in float32"):
        moetrt.load_reference(checkpoint, dtype="float16", quantize=QuantScheme(8))


@pytest.mark.parametrize("bits", [pytest.param(8, marks=pytest.mark.slow), 4])  # int8 in `make test-slow` (CI time)
def test_traced_graph_holds_standard_dequantize_linear_and_quantized_expert_nodes(checkpoint, bits):
    import onnx_ir as ir

    from moetrt.export.onnx_export import trace

    graph = trace(moetrt.load_reference(checkpoint, quantize=QuantScheme(bits, 32)))
    assert finish_export(graph) == 1 + 12 + 3 + 6 + 1
    assert not any(node.domain == "moetrt" and node.op_type == "DequantizeBlocks" for node in graph.graph)
    dense = [node for node in graph.graph if node.op_type == "DequantizeLinear"
             and node.inputs[0].const_value is not None]
    assert len(dense) == 12 + 3 + 6 + 1
    for node in dense:
        assert node.inputs[0].dtype == (ir.DataType.INT4 if bits == 4 else ir.DataType.INT8)
        assert node.attributes["axis"].value == 0 and node.attributes["block_size"].value == 32
        assert [use[0].op_type for use in node.outputs[0].uses()] == ["MatMul"]
    experts = [node for node in graph.graph if node.op_type == "RoutedExperts"]
    assert len(experts) == 2
    for node in experts:
        assert node.attributes["bits"].value == bits and tuple(node.attributes["block_size"].value) == (1, 32)
        assert [value.dtype for value in node.inputs[3:]] == [ir.DataType.INT8] * 2 + [ir.DataType.FLOAT16] * 2


# VmHWM (the peak resident set of this process image) rather than ru_maxrss, which Linux carries over from the
# parent across exec: a child of a large pytest process would report the parent's peak.
FP8_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch
    import moetrt
    from moetrt.quantization import QuantScheme
    from moetrt.export import checkpoint, quantized
    def peak():
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    # warm-up on a small checkpoint: torch's first model construction costs ~170 MB once, whatever the model
    moetrt.load_reference(sys.argv[3], quantize=QuantScheme(int(sys.argv[2]), 32))
    before = peak()
    model = moetrt.load_reference(sys.argv[1], quantize=QuantScheme(int(sys.argv[2]), 32))
    print(json.dumps({"grown_bytes": peak() - before}))
""")


def test_fp8_checkpoint_quantizes_straight_without_a_float32_model(tmp_path, bits=4):
    """DeepSeek's FP8 e4m3 experts (128x128 block scales) -> int4 (int8 takes the same path), tensor by tensor: the
    loading process grows by well under the model's float32 size (4x the FP8 weights; int4 values are held one per
    byte until export, so the quantized model is about the FP8 size)."""
    from safetensors.torch import save_file

    config = dict(json.loads((make_checkpoint(tmp_path / "small", NAME, **SIZES) / "config.json").read_text()))
    config.update(hidden_size=512, moe_intermediate_size=256, n_routed_experts=32, n_group=4, topk_group=2,
                  num_hidden_layers=3, intermediate_size=512, vocab_size=96,
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]})
    directory = tmp_path / "fp8"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tmp_path / "small" / name).is_file():
            (directory / name).write_bytes((tmp_path / "small" / name).read_bytes())
    plain = build_model(NAME, **{k: v for k, v in config.items() if k in (
        "hidden_size", "moe_intermediate_size", "n_routed_experts", "n_group", "topk_group", "num_hidden_layers",
        "intermediate_size")}, **{k: SIZES[k] for k in ("q_lora_rank", "v_head_dim")})
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for name, tensor in plain.state_dict().items():
        if ".experts." in name and tensor.dim() == 3:  # stacked in transformers: write per-expert fp8 keys
            kind = "down_proj" if name.endswith("down_proj") else None
            for e in range(tensor.shape[0]):
                prefix = name.rsplit(".", 1)[0] + f".{e}."
                parts = [("down_proj", tensor[e])] if kind else [("gate_proj", tensor[e][: tensor.shape[1] // 2]),
                                                                 ("up_proj", tensor[e][tensor.shape[1] // 2:])]
                for part, weight in parts:
                    rows, cols = weight.shape
                    fp8 = (torch.randn(rows, cols, generator=generator) * 100).clamp(-448, 448)
                    tensors[f"{prefix}{part}.weight"] = fp8.to(torch.float8_e4m3fn)
                    tensors[f"{prefix}{part}.weight_scale_inv"] = torch.full(
                        (-(-rows // 128), -(-cols // 128)), 1e-4)
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    fp8_bytes = sum(t.numel() for t in tensors.values() if t.dtype == torch.float8_e4m3fn)
    del tensors, plain
    out = subprocess.run([sys.executable, "-c", FP8_SCRIPT, str(directory), str(bits), str(tmp_path / "small")],
                         capture_output=True,
                         text=True, env={"MOETRT_QUIET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown = json.loads(out.stdout.strip().splitlines()[-1])["grown_bytes"]
    float32_model = 4 * fp8_bytes
    print(f"fp8 experts {fp8_bytes / 1e6:.0f} MB; float32 would be {float32_model / 1e6:.0f} MB; "
          f"loading int{bits} grew the process by {grown / 1e6:.0f} MB")
    assert grown < 0.75 * float32_model
