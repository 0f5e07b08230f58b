"""tiny-r1's engine with moetrt's CPU expert kernel (`--moe-kernel moetrt`): the graph cut into segments around
the experts, checked against the torch reference and against the checkpoint's own answers."""

import json

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.export.ort.plan import choose_moe_kernel
from moetrt.formats import read_export_info, read_manifest
from tests.runtime.test_tiny_r1_engine import TINY_R1, moetrt_cli


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-r1-kernel"
    result = moetrt_cli("build-engine", TINY_R1, "-o", out, "--backend", "ort", "--moe-kernel", "moetrt")
    assert result.returncode == 0, result.stderr
    return out


def test_manifest_describes_segments_and_experts(engine):
    ort = read_manifest(engine).section
    assert ort.moe_kernel == "moetrt" and len(ort.segments) == 4 and len(ort.expert_layers) == 3
    assert ort.segments[0].inputs[:1] == ("input_ids",) and ort.segments[-1].outputs == ("logits",)
    for layer, segment in zip(ort.expert_layers, ort.segments):
        assert set(layer.inputs) <= set(segment.outputs)  # the kernel reads what the segment before made
        assert layer.gate_up.offset % 64 == 0 and layer.down.offset % 64 == 0
    assert (engine / "experts.bin").stat().st_size == 4 * sum(
        span.count for layer in ort.expert_layers for span in (layer.gate_up, layer.down))
    info = moetrt_cli("info", engine)
    assert "routed experts   moetrt's CPU kernel, 4 graph segments" in info.stdout, info.stderr


def test_verify_passes(engine):
    result = moetrt_cli("verify", engine, TINY_R1, "--prompts", "4", "--task-problems", "48", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["answers_differing"] == 0
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]


def test_eval_answers_as_the_checkpoint_does(engine):
    runs = [moetrt_cli("eval", source, "-n", "40", "--seed", "11", "--json") for source in (engine, TINY_R1)]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    ours, theirs = (json.loads(run.stdout) for run in runs)
    assert [p["output"] for p in ours["problems"]] == [p["output"] for p in theirs["problems"]]


def test_segments_agree_with_the_single_graph_engine(engine, tmp_path):
    """The same prompts, batched and left-padded, through both engines: logits within fp32 noise."""
    from moetrt.runtime.engine import Engine

    single = tmp_path / "single"
    result = moetrt_cli("build-engine", TINY_R1, "-o", single, "--backend", "ort", "--moe-kernel", "onnxruntime")
    assert result.returncode == 0, result.stderr
    logits = []
    for path in (engine, single):
        session = Engine.load(path).session
        cache = session.new_cache(3, 32)
        ids = np.array([[5, 6, 7, 8, 9], [0, 0, 12, 13, 14], [0, 20, 21, 22, 23]], np.int64)
        mask = (np.arange(5)[None, :] >= np.array([[0], [2], [1]])).astype(np.int64)
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
        past = [np.zeros((0, 3, session.latent_dim), session.dtype) for _ in range(session.num_layers)]
        out, _ = session.run(ids, positions, mask, np.full((3, 1), 4, np.int64), past)
        logits.append(out)
        del cache
    assert np.abs(logits[0] - logits[1]).max() <= 1e-4 + 1e-5 * np.abs(logits[1]).max()


def test_kernel_choice(monkeypatch):
    assert choose_moe_kernel("auto", 96, 64, 2, "float32", cpu=True)[0] == "onnxruntime"  # tiny-r1: 74 KB experts
    assert choose_moe_kernel("auto", 1024, 512, 2, "float32", cpu=True)[0] == "moetrt"  # ds-mini: 6 MB
    assert choose_moe_kernel("auto", 1024, 512, 2, "float16", cpu=True)[0] == "onnxruntime"
    assert choose_moe_kernel("auto", 1024, 512, 2, "float32", cpu=False)[0] == "onnxruntime"
    monkeypatch.setenv("PATH", "")  # no C compiler: auto falls back, the engine must load where it is built
    monkeypatch.delenv("CC", raising=False)
    assert choose_moe_kernel("auto", 1024, 512, 2, "float32", cpu=True) == (
        "onnxruntime", "no C compiler here to build moetrt's kernel")
    with pytest.raises(MoetrtError, match="computes in float32"):
        choose_moe_kernel("moetrt", 96, 64, 2, "float16", cpu=True)
    with pytest.raises(MoetrtError, match="--moe-kernel must be"):
        choose_moe_kernel("fast", 96, 64, 2, "float32", cpu=True)


def test_cli_refuses_the_kernel_where_it_cannot_run(tmp_path):
    result = moetrt_cli("build-engine", TINY_R1, "-o", tmp_path / "e", "--moe-kernel", "moetrt", "--dtype", "float16")
    assert result.returncode != 0 and "--moe-kernel moetrt cannot be used here: it computes in float32" in result.stderr
    assert not (tmp_path / "e").exists()


def test_engine_from_an_export_leaves_the_export_as_it_was(tmp_path):
    export = tmp_path / "export"
    result = moetrt_cli("export", TINY_R1, "-o", export, "--target", "ort", "--moe-kernel", "moetrt")
    assert result.returncode == 0, result.stderr
    assert read_export_info(export).moe_kernel == "moetrt"
    before = sorted(path.name for path in export.iterdir())
    result = moetrt_cli("build-engine", export, "-o", tmp_path / "engine", "--backend", "ort")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in export.iterdir()) == before
    assert read_manifest(tmp_path / "engine").section.moe_kernel == "moetrt"
    result = moetrt_cli("build-engine", export, "-o", tmp_path / "other", "--moe-kernel", "onnxruntime")
    assert result.returncode != 0 and "exported with its experts in moetrt" in result.stderr
