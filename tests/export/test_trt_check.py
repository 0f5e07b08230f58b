"""`--check-trt` / `build-engine --dry-run`: what TensorRT's parser would refuse, found with no TensorRT or GPU."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from moetrt import MoetrtError
from moetrt.config import load_config
from moetrt.export.trt.check import NO_NAMESPACE_NOTE, check_trt_export
from moetrt.export.trt.plan import dimension_ranges, optimization_profiles, plan_trt_build, timing_cache_path
from moetrt.formats import ExportInfo, NodeRef, TensorIO, graph_io
from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.spec import LAUNCH_ATTRIBUTE, MOE_STAGES
from moetrt.plugins.trt_stages import StageAttribute
from moetrt.settings import BuildProfile
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_R1 = ROOT / "models" / "tiny-r1"


def moetrt(*args):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *args], capture_output=True, text=True,
                          env={"MOETRT_QUIET": "1", "PATH": ""})


def save(tmp_path, nodes, inputs, outputs, initializers=(), opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_each_kind_of_refusal_is_reported(tmp_path):
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),  # no importer
        helper.make_node("NonZero", ["ids"], ["nz"]),  # INT64: NonZero takes FP32/FP16 only
        helper.make_node("Pow", ["h", "x"], ["p"]),  # FP16 base, FP32 exponent: strong typing
        helper.make_node("ReduceSum", ["x", "axes"], ["r"]),  # axes not a constant
        helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0),  # sorted must be 1
        helper.make_node("Cast", ["x"], ["d"], to=TensorProto.UINT16),  # a type TensorRT lacks
    ]
    inputs = [value("x", TensorProto.FLOAT, [4]), value("ids", TensorProto.INT64, [4]),
              value("h", TensorProto.FLOAT16, [4]), value("axes", TensorProto.INT64, [1])]
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    outputs = [value(n, TensorProto.UNDEFINED, None) for n in ("u", "nz", "p", "r", "v", "i", "d")]
    report = check_trt_export(save(tmp_path, nodes, inputs, outputs, [k]))
    kinds = {f.op: f.kind for f in report.refused}
    assert kinds == {"Unique": "operator", "NonZero": "type", "Pow": "strong-typing", "ReduceSum": "constant",
                     "TopK": "attribute", "Cast": "type"}, report.format()
    assert "REFUSED (6)" in report.format()


def test_int64_where_int32_is_needed_says_so(tmp_path):
    nodes = [helper.make_node("TensorScatter", ["cache", "update", "index"], ["out"], axis=-2)]
    inputs = [value("cache", TensorProto.INT64, [1, 1, 4, 2]), value("update", TensorProto.INT64, [1, 1, 1, 2]),
              value("index", TensorProto.INT64, [1])]
    report = check_trt_export(save(tmp_path, nodes, inputs, [value("out", TensorProto.INT64, None)], opset=24))
    assert [f.kind for f in report.refused] == ["int64", "int64"]
    assert "int32 is needed" in report.refused[0].problem


def stage_node(stage, inputs, outputs, **attributes):
    spec = MOE_STAGES[stage]
    return helper.make_node(spec.op_type, inputs, outputs, domain=spec.domain, **attributes)


def test_plugin_nodes_that_differ_from_the_spec_are_refused(tmp_path):
    shape = ExpertsShape(1, 48, 24, 8, 2, "float32", "float32")
    launch = StageAttribute.uniform(shape.dims, "float32", select_config(shape)).encode()
    ids, weights = value("ids", TensorProto.INT64, [3, 2]), value("w", TensorProto.FLOAT, [3, 2])
    outs = [value(n, TensorProto.INT32, None) for n in ("s", "b", "n")]
    nodes = [
        stage_node("align", ["ids"], ["s", "b", "n"], launch=launch),  # ids must be int32
        stage_node("align", ["ids32"], ["s2", "b2", "n2"], launch="{not json", plugin_version="1"),
        stage_node("align", ["ids32"], ["s3", "b3", "n3"], launch=launch, plugin_version="2"),
        helper.make_node("MoeRoute", ["w"], ["r"], domain="moetrt"),
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
    ]
    extra = [helper.make_opsetid("moetrt", 1)]
    path = save(tmp_path, nodes, [ids, weights], outs + [value("r", TensorProto.FLOAT, None)], extra_opsets=extra)
    problems = [f.problem for f in check_trt_export(path).refused if f.kind == "plugin"]
    assert any("topk_ids (ids) is INT64, the plugin takes INT32" in p for p in problems), problems
    assert any("bad `launch` attribute" in p for p in problems)
    assert any("plugin_version '2', the plugin is version 1" in p for p in problems)
    assert any("registers no plugin MoeRoute" in p for p in problems)


def test_a_plugin_node_without_namespace_gets_the_importers_rule_as_a_note(tmp_path):
    shape = ExpertsShape(1, 48, 24, 8, 2, "float32", "float32")
    launch = StageAttribute.select(shape.dims, "float32").encode()
    outs = [value(n, TensorProto.INT32, None) for n in ("s", "b", "n")]
    node = stage_node("align", ["ids"], ["s", "b", "n"], launch=launch, plugin_version="1")
    path = save(tmp_path, [node], [value("ids", TensorProto.INT32, [3, 2])], outs,
                extra_opsets=[helper.make_opsetid("moetrt", 1)])
    report = check_trt_export(path)
    assert report.ok and report.notes == [NO_NAMESPACE_NOTE]
    assert "no ONNX operator has their op type" in report.format() and "10.10" not in report.format()


def test_profiles_cover_prefill_chunks_and_padded_decode():
    ranges = dimension_ranges(max_batch=4, max_seq=64, max_context=256)
    assert ranges["prefill"]["seq"] == (1, 64, 64) and ranges["prefill"]["total_len"][2] == 256
    assert ranges["decode"]["seq"] == (1, 1, 1) and ranges["decode"]["past_len"][2] == 256
    inputs = (TensorIO("past_latent.0", "float32", ("past_len", "batch", 24)),)
    prefill, decode = optimization_profiles(inputs, BuildProfile(max_batch=4, max_seq=64, max_context=256))
    assert prefill.shapes["past_latent.0"] == ((0, 1, 24), (0, 1, 24), (255, 4, 24))
    assert decode.shapes["past_latent.0"] == ((0, 1, 24), (128, 4, 24), (256, 4, 24))


def test_timing_caches_are_kept_per_gpu_model_and_driver(monkeypatch, tmp_path):
    """An H100 and an H200 are both sm_90: their timings must not share a file; nor a driver's with another's."""
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(tmp_path))
    h100 = timing_cache_path("10.13.3.9", "NVIDIA H100 80GB HBM3", (9, 0), 12080)
    h200 = timing_cache_path("10.13.3.9", "NVIDIA H200", (9, 0), 12080)
    newer_driver = timing_cache_path("10.13.3.9", "NVIDIA H200", (9, 0), 13000)
    assert len({h100, h200, newer_driver}) == 3 and {h100.parent, h200.parent} == {tmp_path}
    assert h200.name == "trt-timing-10.13.3.9-NVIDIA-H200-sm90-cuda12.8.cache"
    assert h100.name == "trt-timing-10.13.3.9-NVIDIA-H100-80GB-HBM3-sm90-cuda12.8.cache"
    assert timing_cache_path("10.13.3.9", "GPU/../x", (9, 0), None).name.endswith("GPU-..-x-sm90-cuda-unknown.cache")


def fake_export(target):
    """The export description of tiny-r1 lowered for `target` (plan_trt_build reads nothing else)."""
    config = load_config(TINY_R1)
    return ExportInfo(target=target, dtype="float32", opset=21, source="", tokenizer=False,
                      io=graph_io(config, "float32"), node=NodeRef("RoutedExperts", "moetrt", 1), model_config=config,
                      versions={})


def test_plan_says_which_engines_need_python():
    profile = BuildProfile(max_batch=2, max_seq=16, max_context=64)
    trt, portable = fake_export("trt"), fake_export("onnx")
    assert not plan_trt_build(trt, profile, "aot").python_at_runtime
    assert plan_trt_build(trt, profile, "jit").python_at_runtime
    assert plan_trt_build(portable, profile, "jit").plugin_form == "none"
    assert plan_trt_build(trt, profile).profiles[0].shapes["input_ids"] == ((1, 1), (1, 16), (2, 16))
    with pytest.raises(MoetrtError, match="made for target ort"):
        plan_trt_build(fake_export("ort"), profile)


def assert_stage_kernels_match_their_launches(export_dir):
    """Compile every stage node's kernel as the AOT plugin would (sm_90, on the CPU) and check each PTX entry's
    parameters against the arguments TensorRT passes."""
    from moetrt.plugins.aot_kernels import engine_stage, entry_param_problems

    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    stages = {spec.op_type: name for name, spec in MOE_STAGES.items()}
    nodes = [n for n in model.graph.node if n.op_type in stages]
    assert nodes
    for node in nodes:
        attribute = StageAttribute.decode(next(a.s.decode() for a in node.attribute if a.name == LAUNCH_ATTRIBUTE))
        assert entry_param_problems(engine_stage(stages[node.op_type], attribute, 90, None)) == []


# slow (~30 s); the embedded model's check below runs in `make test`
@pytest.mark.slow
def test_export_check_trt_and_dry_run_report_and_exit_by_the_verdict(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "v2-greedy-yarn")
    export = moetrt("export", str(checkpoint), "-o", str(tmp_path / "trt"), "--target", "trt", "--check-trt")
    assert export.returncode == 0, export.stderr
    assert "ok: nothing TensorRT's parser would refuse" in export.stdout
    assert_stage_kernels_match_their_launches(tmp_path / "trt")
    dry = moetrt("build-engine", str(tmp_path / "trt"), "-o", str(tmp_path / "e"), "--dry-run", "--max-context", "64")
    assert dry.returncode == 0, dry.stderr
    assert "profile decode:" in dry.stdout and "plugin form: aot (no Python at run time)" in dry.stdout
    assert not (tmp_path / "e").exists()
    (tmp_path / "trt" / "model.onnx").write_bytes(onnx.helper.make_model(onnx.helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"])], "g", [value("x", TensorProto.FLOAT, [3])],
        [value("y", TensorProto.FLOAT, None)])).SerializeToString())
    refused = moetrt("build-engine", str(tmp_path / "trt"), "-o", str(tmp_path / "e"), "--dry-run")
    assert refused.returncode == 1 and "[operator]" in refused.stdout


@pytest.mark.skipif(not (TINY_R1 / "config.json").is_file(), reason="models/tiny-r1 is not in this checkout yet")
def test_embedded_model_passes_check_trt_and_its_kernels_match(tmp_path):
    result = moetrt("export", str(TINY_R1), "-o", str(tmp_path / "trt"), "--target", "trt", "--check-trt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stage_kernels_match_their_launches(tmp_path / "trt")
    dry = moetrt("build-engine", str(tmp_path / "trt"), "-o", str(tmp_path / "e"), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
