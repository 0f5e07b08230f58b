"""ONNX export: every target runs in ONNX Runtime on the CPU and matches the torch reference."""

import functools
import json
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import moetrt
from moetrt import MoetrtError
from moetrt.export.onnx_export import export_onnx
from moetrt.formats import read_export_info
from moetrt.export.reference_session import ReferenceSession
from moetrt.plugins.routed_experts import moe_stage_reference, routed_experts_reference
from moetrt.plugins.spec import LAUNCH_ATTRIBUTE, MOE_STAGES, ROUTED_EXPERTS
from moetrt.plugins.trt_stages import StageAttribute
from tests.checkpoints import make_checkpoint
from tests.greedy import assert_greedy_agrees, greedy_with_logits
from tests.onnx_helpers import feeds, greedy_onnx

CONFIGS = ["v3-qlora-grouped-yarn", "v2-greedy-yarn"]
TARGETS = ["ort", "onnx", "trt"]
PROMPTS = [[5, 9, 11, 40, 7, 3, 22, 8, 61], [17, 4, 60], [33, 2, 90, 14, 6]]


@pytest.fixture(scope="module", params=CONFIGS)
def checkpoint(request, tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return directory, moetrt.load_reference(directory)


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    directory, _ = checkpoint
    root = tmp_path_factory.mktemp("exports")
    return {target: export_onnx(directory, root / target, target=target) for target in TARGETS}


@functools.cache
def _register_stages_as_python_ops():
    """The trt export's stage nodes, each as an onnxruntime-extensions Python op running moe_stage_reference."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    kinds = {"int32": PyCustomOpDef.dt_int32, "float32": PyCustomOpDef.dt_float}
    attrs = {name: PyCustomOpDef.dt_string for name in (LAUNCH_ATTRIBUTE, "plugin_version", "plugin_namespace")}
    for stage, spec in MOE_STAGES.items():
        def run(*arrays, stage=stage, **attributes):
            attribute = StageAttribute.decode(attributes[LAUNCH_ATTRIBUTE])
            tensors = [torch.from_numpy(np.array(a)) for a in arrays]
            outputs = moe_stage_reference(stage, attribute.dims, attribute.block_m, *tensors)
            return tuple(o.numpy() for o in outputs) if len(outputs) > 1 else outputs[0].numpy()

        onnx_op(op_type=spec.op_type, domain="ai.onnx.contrib",
                inputs=[kinds[t.dtypes[0]] for t in spec.inputs],
                outputs=[kinds[t.dtypes[0]] for t in spec.outputs], attrs=attrs)(run)


def trt_plugin_session_options():
    """Bind the trt export's plugin nodes to the torch stage references, as onnxruntime-extensions Python ops."""
    from onnxruntime_extensions import get_library_path

    _register_stages_as_python_ops()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def session_for(export_dir, target, tmp_path):
    path = export_dir / "model.onnx"
    if target != "trt":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A test copy with the plugin's domain renamed to the one onnxruntime-extensions serves Python ops from.
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.domain == ROUTED_EXPERTS.domain:
            node.domain = "ai.onnx.contrib"
    for opset in model.opset_import:
        if opset.domain == ROUTED_EXPERTS.domain:
            opset.domain = "ai.onnx.contrib"
    copy = tmp_path / "trt_as_pyop.onnx"
    onnx.save(model, str(copy), save_as_external_data=True, location="trt_as_pyop.data")
    return ort.InferenceSession(str(copy), trt_plugin_session_options(), providers=["CPUExecutionProvider"])


def test_export_directory_contents(exports, checkpoint):
    _, reference = checkpoint
    for target, directory in exports.items():
        described = read_export_info(directory)
        assert described.target == target and described.model_config == reference.config
        assert described.io.cache.latent_dim == reference.config.latent_dim
        assert [i.name for i in described.io.inputs][:5] == ["input_ids", "position_ids", "attention_mask",
                                                             "logit_positions", "past_latent.0"]
        assert json.loads((directory / "export.json").read_text())["format_version"] == 2
        assert (directory / "model.onnx.data").stat().st_size > 0
        assert not list(directory.parent.glob(".*partial"))


def test_graphs_pass_checker_and_shape_inference(exports):
    stage_ops = {(spec.domain, spec.op_type) for spec in MOE_STAGES.values()}
    for target, directory in exports.items():
        onnx.checker.check_model(str(directory / "model.onnx"), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(directory / "model.onnx")), strict_mode=True)
        ops = {(n.domain, n.op_type) for n in inferred.graph.node}
        assert (stage_ops <= ops) == (target == "trt")
        assert (ROUTED_EXPERTS.domain, ROUTED_EXPERTS.op_type) not in ops
        assert (("com.microsoft", "MoE") in ops) == (target == "ort")
        if target == "onnx":
            assert all(domain == "" for domain, _ in ops)


def test_trt_export_expands_each_moe_layer_into_four_stage_nodes(exports, checkpoint):
    _, reference = checkpoint
    config = reference.config
    model = onnx.load(str(exports["trt"] / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == ROUTED_EXPERTS.domain]
    op_types = [spec.op_type for spec in MOE_STAGES.values()]
    assert [n.op_type for n in nodes] == op_types * len(config.moe_layers)
    for node, spec in zip(nodes, list(MOE_STAGES.values()) * len(config.moe_layers)):
        assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_version"] == b"1" and attributes["plugin_namespace"] == b"moetrt"
        attribute = StageAttribute.decode(attributes[LAUNCH_ATTRIBUTE].decode())
        assert attribute.dims.num_experts == config.n_routed_experts
        assert attribute.dims.top_k == config.num_experts_per_tok and attribute.dtype == "float32"


def test_trt_parser_check_passes_trt_and_portable_exports_and_refuses_ort(exports, checkpoint):
    from moetrt.export.trt.check import check_trt_export

    _, reference = checkpoint
    report = check_trt_export(exports["trt"])
    assert report.ok, report.format()
    moe_layers = len(reference.config.moe_layers)
    assert report.plugin_nodes == {f"moetrt::{spec.op_type}": moe_layers for spec in MOE_STAGES.values()}
    assert check_trt_export(exports["onnx"]).ok, check_trt_export(exports["onnx"]).format()
    refused = check_trt_export(exports["ort"])
    assert {f.op for f in refused.refused if f.kind == "operator"} == {"com.microsoft::MoE"}


@pytest.mark.parametrize("target", TARGETS)
def test_full_sequence_logits_match_reference(exports, checkpoint, target, tmp_path):
    _, reference = checkpoint
    config = reference.config
    session = session_for(exports[target], target, tmp_path)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 17))
    positions = np.broadcast_to(np.arange(17), (2, 17))
    got = session.run(None, feeds(config.num_hidden_layers, config.latent_dim, ids, positions, np.ones((2, 17))))[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_logit_positions_select_rows_including_none(exports, checkpoint):
    _, reference = checkpoint
    config = reference.config
    session = session_for(exports["ort"], "ort", None)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    positions, mask = np.broadcast_to(np.arange(9), (2, 9)), np.ones((2, 9))
    base = feeds(config.num_hidden_layers, config.latent_dim, ids, positions, mask)
    full = session.run(None, base)
    picked = session.run(None, {**base, "logit_positions": np.array([[8, 2], [0, 8]])})
    assert np.allclose(picked[0][0], full[0][0, [8, 2]], atol=1e-6)
    assert np.allclose(picked[0][1], full[0][1, [0, 8]], atol=1e-6)
    none = session.run(None, {**base, "logit_positions": np.zeros((2, 0), np.int64)})
    assert none[0].shape == (2, 0, config.vocab_size)
    assert all(np.array_equal(a, b) for a, b in zip(none[1:], full[1:]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3-left-padded"])
def test_cached_greedy_decode_matches_reference(exports, checkpoint, target, prompts, tmp_path):
    _, reference = checkpoint
    config = reference.config
    session = session_for(exports[target], target, tmp_path)
    got, _ = greedy_onnx(session, config.num_hidden_layers, config.latent_dim, prompts, steps=32)
    want_tokens, want_logits = greedy_with_logits(ReferenceSession(reference), prompts, max_new_tokens=32)
    for row in range(len(prompts)):
        compared = assert_greedy_agrees(want_tokens[row], want_logits[row], got[row], f"{target} row {row}")
        assert compared > 8


@pytest.mark.parametrize("norm, slices, threads", [(True, 1, 1), (False, 1, 2), (True, 2, 2), (False, 4, 3)])
def test_ort_lowering_of_one_routed_experts_node_matches_reference(tmp_path, norm, slices, threads):
    """A graph of just the routed-experts node, lowered to com.microsoft::MoE, with activations beyond +-10; with
    experts cut into slices (any thread count stays exact, the slices only balance the threads)."""
    import onnx_ir as ir

    from moetrt.export.lowering import LoweringPlan, lower

    rng = np.random.default_rng(1 + norm)
    tokens, hidden, inter, experts, top_k = 37, 40, 24, 8, 3
    x = (rng.standard_normal((tokens, hidden)) * 6).astype(np.float32)
    assert np.abs(x).max() > 10
    w1 = (rng.standard_normal((experts, 2 * inter, hidden)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((experts, hidden, inter)) * 0.3).astype(np.float32)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.uniform(0.05, 1.0, (tokens, top_k)).astype(np.float32)
    if norm:
        weights = weights / weights.sum(-1, keepdims=True) * 2.5

    class RoutedExperts(torch.nn.Module):
        def forward(self, hidden_states, topk_ids, topk_weights):
            from moetrt.plugins.routed_experts import routed_experts

            return routed_experts(hidden_states, topk_ids, topk_weights, torch.from_numpy(w1), torch.from_numpy(w2))

    tensors = (torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights))
    program = torch.onnx.export(RoutedExperts(), tensors, dynamo=True, input_names=["hidden", "ids", "weights"],
                                dynamic_shapes={"hidden_states": {0: torch.export.Dim("T")},
                                                "topk_ids": {0: torch.export.Dim("T")},
                                                "topk_weights": {0: torch.export.Dim("T")}}, verbose=False)
    model = lower(program.model, LoweringPlan("ort", expert_slices=slices, moe_kernel="onnxruntime"))
    moe = [n for n in model.graph if n.domain == "com.microsoft"]
    assert [n.op_type for n in moe] == ["MoE"] and moe[0].attributes["k"].value == top_k * slices
    assert moe[0].inputs[2].shape == [slices * experts, 2 * inter // slices, hidden]
    ir.save(model, tmp_path / "moe.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"hidden": x, "ids": ids, "weights": weights})[0]
    want = routed_experts_reference(*tensors, torch.from_numpy(w1), torch.from_numpy(w2)).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_expert_slices_must_divide_the_expert_width():
    from moetrt.export.ort.plan import default_expert_slices

    assert default_expert_slices(512, threads=2) == 2 and default_expert_slices(512, threads=6) == 4
    assert default_expert_slices(63, threads=2) == 1 and default_expert_slices(2048, threads=64) == 16


def test_checkpoint_without_tokenizer_exports(exports):
    for directory in exports.values():
        assert read_export_info(directory).tokenizer is False
        assert not (directory / "tokenizer.json").exists()


def _broken(tmp_path, checkpoint_dir, break_it):
    source = tmp_path / "source"
    source.mkdir()
    for file in checkpoint_dir.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    break_it(source)
    return source


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "not supported"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), "not a valid safetensors"),
    ],
    ids=["bad-json", "bad-model-type", "corrupt-weights"],
)
def test_bad_input_leaves_no_output(tmp_path, checkpoint, break_it, message):
    source = _broken(tmp_path, checkpoint[0], break_it)
    with pytest.raises(MoetrtError, match=message):
        export_onnx(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_unwritable_output_is_a_one_line_error(tmp_path, checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(MoetrtError, match="a-file is a file, not a directory") as error:
        export_onnx(checkpoint[0], blocker / "out")
    assert "\n" not in str(error.value)
    with pytest.raises(MoetrtError, match="exists and is not a directory"):
        export_onnx(checkpoint[0], blocker)


EXPORT_PEAK_SCRIPT = """
import sys
import torch
from moetrt.export.onnx_export import export_onnx

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.zeros(1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
export_onnx(sys.argv[1], sys.argv[2], target=sys.argv[3])
print(status("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_export_over_2gb_with_peak_memory_under_twice_the_weights(tmp_path, target):
    import subprocess
    import sys

    from tests.checkpoints import build_model

    overrides = dict(hidden_size=1024, moe_intermediate_size=1024, intermediate_size=2048, n_routed_experts=64,
                     num_hidden_layers=4, vocab_size=4096)
    build_model("v3-qlora-grouped-yarn", **overrides).save_pretrained(tmp_path / "big", max_shard_size="1GB")
    weights = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    assert weights > 2 * 1024**3
    result = subprocess.run([sys.executable, "-c", EXPORT_PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "out"),
                             target], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split()[-1])
    print(f"{target}: export of {weights / 1e9:.2f} GB peaked at {peak / 1e9:.2f} GB ({peak / weights:.2f}x)")
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size >= weights * 0.99
    assert peak < 2 * weights
