"""Engine directories: one-command ONNX Runtime builds, manifests, load-time checks and integrity."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moetrt
from moetrt import MoetrtError
from moetrt.export.engine import build_engine
from moetrt.runtime.engine import Engine
from moetrt.runtime.manifest import load_manifest
from moetrt.settings import BuildProfile
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "v3-qlora-grouped-yarn")


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory):
    """Built with the CLI, in one command, straight from the transformers checkpoint."""
    out = tmp_path_factory.mktemp("engines") / "tiny"
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "build-engine", str(checkpoint), "-o", str(out),
                             "--backend", "auto", "--max-context", "256"],
                            capture_output=True, text=True, env={"MOETRT_QUIET": "0", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "backend: ort (TensorRT is not installed, so ONNX Runtime)" in result.stderr or "backend: ort (no CUDA" in result.stderr
    return out


def test_manifest_describes_the_engine(engine_dir):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["backend"] == "ort" and manifest["dtype"] == "float32"
    assert manifest["ort"]["provider"] == "CPUExecutionProvider" and manifest["ort"]["optimization_level"] == "extended"
    assert manifest["ort"]["cpu_arch"] and isinstance(manifest["ort"]["cpu_flags"], list)
    assert manifest["profile"] == {"max_batch": 8, "max_seq": 256, "max_context": 256}
    assert {"model.onnx", "model.onnx.data", "config.json"} <= set(manifest["artifacts"])
    assert all(len(a["sha256"]) == 64 and a["bytes"] > 0 for a in manifest["artifacts"].values())
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["moetrt"]
    assert manifest["io"]["cache"]["layout"].startswith("position-major")
    assert manifest["tokenizer"] is False
    assert not list(engine_dir.parent.glob(".*partial"))


def test_scoring_a_batch_matches_the_reference(engine_dir, checkpoint):
    engine = Engine.load(engine_dir)
    ids = np.random.default_rng(0).integers(0, 96, (3, 21))
    with torch.no_grad():
        want = moetrt.load_reference(checkpoint)(torch.from_numpy(ids)).numpy()
    assert np.abs(engine.logits(ids) - want).max() <= 1e-4


def test_building_twice_gives_identical_artifacts(engine_dir, checkpoint, tmp_path):
    again = build_engine(checkpoint, tmp_path / "again", backend="ort", profile=BuildProfile(max_context=256))
    first = json.loads((engine_dir / "manifest.json").read_text())["artifacts"]
    second = json.loads((again / "manifest.json").read_text())["artifacts"]
    assert first == second


def _copy_engine(engine_dir, tmp_path):
    copy = tmp_path / "engine"
    copy.mkdir()
    for file in engine_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_changed_byte_fails_integrity_check(engine_dir, tmp_path):
    copy = _copy_engine(engine_dir, tmp_path)
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx.data").write_bytes(bytes(data))
    load_manifest(copy)  # sizes still match: the cheap checks pass
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "verify", str(copy), "--integrity"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: engine artifact model.onnx.data has sha256 ")
    assert "the file was modified or damaged; rebuild the engine" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "moetrt.cli", "verify", str(engine_dir), "--integrity"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "integrity: ok" in ok.stdout


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["versions"].update(onnxruntime="1.19.0"),
         "engine was optimised by onnxruntime 1.19.0 but {installed} is installed: an offline-optimised model is "
         "tied to its onnxruntime version; rebuild the engine"),
        (lambda m: m["ort"].update(provider="CUDAExecutionProvider"),
         "engine was optimised for CUDAExecutionProvider, which this onnxruntime does not offer"),
        (lambda m: m["artifacts"]["model.onnx"].update(bytes=1), "engine artifact model.onnx is"),
        (lambda m: m.update(format_version=99), "has format version 99, this moetrt reads 3: rebuild"),
        (lambda m: m.update(format_version=2), "has format version 2, this moetrt reads 3: rebuild the engine with "
         "this moetrt (`moetrt build-engine CHECKPOINT -o ENGINE`)"),
        (lambda m: m.pop("artifacts"), "lacks the field 'manifest.artifacts'; rebuild the engine"),
        (lambda m: m["ort"].pop("provider"), "lacks the field 'manifest.section.provider'; rebuild the engine"),
    ],
    ids=["onnxruntime-version", "provider", "size", "format", "old-format", "no-artifacts", "no-provider"],
)
def test_edited_manifest_fails_loading_with_the_reason(engine_dir, tmp_path, edit, message):
    import onnxruntime

    copy = _copy_engine(engine_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoetrtError) as error:
        Engine.load(copy)
    assert message.format(installed=onnxruntime.__version__) in str(error.value)


def test_missing_cpu_feature_fails_loading(engine_dir, tmp_path, monkeypatch):
    from moetrt import hardware

    copy = _copy_engine(engine_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["ort"]["cpu_flags"] = ["avx512f"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ("avx2",))
    with pytest.raises(MoetrtError, match="optimised on a CPU with avx512f, which this CPU lacks"):
        Engine.load(copy)


def test_interrupted_build_leaves_nothing_that_loads(checkpoint, tmp_path, monkeypatch):
    import moetrt.export.ort.build as ort_build

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_build, "build_ort", crash)
    with pytest.raises(KeyboardInterrupt):
        build_engine(checkpoint, tmp_path / "engine", backend="ort")
    # Ctrl-C keeps the work for the next build to resume from (export/resume.py), hidden beside the output
    left = [path.name for path in tmp_path.iterdir()]
    assert "engine" not in left and all(name.startswith(".engine.") for name in left), left
    assert not list(tmp_path.rglob("manifest.json"))
    with pytest.raises(MoetrtError):
        Engine.load(tmp_path / "engine")


def test_trt_without_tensorrt_is_a_one_line_error_pointing_at_ort(checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "build-engine", str(checkpoint), "-o",
                             str(tmp_path / "e"), "--backend", "trt"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: cannot build a TensorRT engine: TensorRT is not installed; "
                                     "`--backend ort` works on this machine")


# slow (two exports and a build, ~30 s); `make test-slow` runs it
@pytest.mark.slow
def test_builds_from_an_export_directory_and_checks_its_target(checkpoint, tmp_path):
    from moetrt.export.onnx_export import export_onnx

    trt_export = export_onnx(checkpoint, tmp_path / "trt-export", target="trt")
    with pytest.raises(MoetrtError, match="exported for target trt; the ort backend builds from ort or onnx"):
        build_engine(trt_export, tmp_path / "e1", backend="ort")
    portable = export_onnx(checkpoint, tmp_path / "onnx-export", target="onnx")
    engine = Engine.load(build_engine(portable, tmp_path / "e2", backend="ort"))
    assert json.loads((tmp_path / "e2" / "manifest.json").read_text())["export_target"] == "onnx"
    assert engine.logits(np.array([[1, 2, 3]])).shape == (1, 3, 96)
