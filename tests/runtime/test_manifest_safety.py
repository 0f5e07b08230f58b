"""A manifest names only files inside its engine directory, and a damaged engine or manifest is one line and exit 1.

Each test tampers with a copy of the session's chat engine (tests/runtime/conftest.py)."""

import json
import shutil
import subprocess
import sys

import onnx
import pytest

from moetrt.errors import MoetrtError
from moetrt.formats import file_sha256, read_manifest
from moetrt.runtime.engine import Engine
from moetrt.runtime.manifest import load_manifest


def moetrt_cli(*args):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def engine(chat_engine_dir, tmp_path):
    """A copy of the chat engine in tmp_path/engine, next to tmp_path/secret (a file outside it)."""
    copy = tmp_path / "engine"
    shutil.copytree(chat_engine_dir, copy)
    (tmp_path / "secret").write_text("outside the engine")
    return copy


def edit_manifest(engine_dir, edit):
    path = engine_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def record(engine_dir, name, path):
    """An artifact record for `path` stored under `name`, as a build would write it."""
    edit_manifest(engine_dir, lambda m: m["artifacts"].update({name: {"sha256": "0" * 64,
                                                                      "bytes": path.stat().st_size}}))


@pytest.mark.parametrize("name, reason", [("../secret", "climbs out with '..'"),
                                          ("{secret}", "is an absolute path"),
                                          ("/etc/passwd", "is an absolute path")],
                         ids=["dotdot", "absolute", "etc-passwd"])
def test_engine_rejects_manifest_with_artifact_outside_directory(engine, name, reason):
    name = name.format(secret=engine.parent / "secret")
    outside = engine / name  # an absolute name replaces the engine's path
    if not outside.is_file():
        pytest.skip(f"{outside} does not exist here")
    record(engine, name, outside)
    result = moetrt_cli("verify", engine, "--integrity")
    assert_one_line_error(result, f"manifest.artifacts key {name!r} {reason}", f"must lie inside {engine}",
                          "rebuild the engine")
    assert "sha256" not in result.stderr and file_sha256(outside)[:16] not in result.stderr + result.stdout


@pytest.mark.parametrize("where, edit", [
    ("manifest.section.model '{secret}' is an absolute path", lambda m, s: m["ort"].update(model=str(s))),
    ("manifest.section.external_data '../secret' climbs out", lambda m, s: m["ort"].update(external_data="../secret")),
    ("manifest.section.model 'sub/../../secret' climbs out", lambda m, s: m["ort"].update(model="sub/../../secret")),
], ids=["absolute-model", "dotdot-external-data", "dotdot-inside-a-name"])
def test_engine_rejects_section_file_outside_directory(engine, where, edit):
    secret = engine.parent / "secret"
    edit_manifest(engine, lambda m: edit(m, secret))
    for command in (("info",), ("generate", "hi", "--max-new-tokens", "2")):
        assert_one_line_error(moetrt_cli(command[0], engine, *command[1:]), where.format(secret=secret))


def test_integrity_check_hashes_nothing_when_a_name_leads_out(engine, monkeypatch):
    import moetrt.runtime.manifest as runtime_manifest

    hashed = []
    monkeypatch.setattr(runtime_manifest, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    record(engine, "../secret", engine.parent / "secret")
    with pytest.raises(MoetrtError, match="climbs out with '..'"):
        load_manifest(engine, integrity=True)
    assert hashed == []
    edit_manifest(engine, lambda m: m["artifacts"].pop("../secret"))
    with pytest.raises(MoetrtError, match="modified or damaged"):  # the stub hash: hashing does run otherwise
        load_manifest(engine, integrity=True)
    assert hashed


def test_engine_rejects_symlink_leading_out_of_directory(engine, chat_engine_dir):
    (engine / "model.onnx").unlink()
    (engine / "model.onnx").symlink_to(chat_engine_dir / "model.onnx")  # same bytes, so sizes and hashes match
    result = moetrt_cli("verify", engine, "--integrity")
    assert_one_line_error(result, "manifest.section.model 'model.onnx' leads to "
                          f"{(chat_engine_dir / 'model.onnx').resolve()} through a symlink", "rebuild the engine")


def test_info_checks_the_manifest_before_reading_the_engines_config(engine, tmp_path):
    outside = tmp_path / "config.json"
    outside.write_text("not a config")  # read first, this would be the error instead
    (engine / "config.json").unlink()
    (engine / "config.json").symlink_to(outside)
    assert_one_line_error(moetrt_cli("info", engine), "'config.json' leads to", "through a symlink")


def test_symlinks_that_stay_inside_load(engine, tmp_path):
    (engine / "kept").mkdir()
    (engine / "config.json").rename(engine / "kept" / "config.json")
    (engine / "config.json").symlink_to("kept/config.json")
    record(engine, "kept/config.json", engine / "kept" / "config.json")
    link = tmp_path / "current"
    link.symlink_to(engine)  # an engine reached through a link to its directory
    manifest = load_manifest(link)
    assert manifest.directory == link and manifest.path("config.json").is_file()


def test_section_file_the_artifacts_do_not_record_is_refused(engine):
    shutil.copy(engine / "model.onnx", engine / "unrecorded.onnx")
    edit_manifest(engine, lambda m: m["ort"].update(model="unrecorded.onnx"))
    with pytest.raises(MoetrtError, match="manifest.section.model names 'unrecorded.onnx', which the manifest's "
                                          "artifacts do not record; rebuild the engine"):
        read_manifest(engine)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("artifacts"), "lacks the field 'manifest.artifacts'; rebuild the engine"),
    (lambda m: m.pop("profile"), "lacks the field 'manifest.profile'; rebuild the engine"),
    (lambda m: m.update(backend="trt"), "lacks its 'trt' section; rebuild the engine"),
    (lambda m: m.update(backend="trt", trt=m["ort"]), "lacks the field 'manifest.section.plan'; rebuild the engine"),
    (lambda m: m.update(backend="llama.cpp"), "unknown backend 'llama.cpp' (this moetrt runs ort, trt)"),
    (lambda m: m.update(profile="big"), "manifest.profile should be an object; rebuild the engine"),
    (lambda m: m["profile"].update(max_batch=0), "manifest.profile: --max-batch must be at least 1, got 0"),
    (lambda m: m["artifacts"]["config.json"].update(bytes="12"),
     "manifest.artifacts.config.json.bytes should be int, got '12'"),
    (lambda m: m["model_config"].update(hidden_size="wide"), "manifest.model_config.hidden_size should be int"),
    (lambda m: m["model_config"]["rope"].pop("theta"), "lacks the field 'manifest.model_config.rope.theta'"),
    (lambda m: m["ort"].update(layout="pipeline"), "layout is 'pipeline', not 'graph' or 'segments'"),
    (lambda m: m["ort"].update(model=None), "layout is 'graph' but it names no model; rebuild the engine"),
    (lambda m: m["ort"].update(layout="segments"), "layout is 'segments' but it has 0 segments"),
], ids=["no-artifacts", "no-profile", "other-backend", "section-of-another-backend", "unknown-backend",
        "profile-type", "profile-value", "artifact-bytes-type", "model-config-type", "model-config-field",
        "unknown-layout", "graph-without-model", "segments-without-segments"])
def test_malformed_manifest_is_one_error_naming_the_field(engine, edit, message):
    edit_manifest(engine, edit)
    with pytest.raises(MoetrtError) as error:
        read_manifest(engine)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [("{\"format\": ", "is not valid JSON"),
                                           ("[1, 2]", "must hold a JSON object"),
                                           ("\"manifest\"", "must hold a JSON object")],
                         ids=["truncated", "list", "string"])
def test_malformed_manifest_json_is_one_line_from_the_cli(engine, text, message):
    (engine / "manifest.json").write_text(text)
    assert_one_line_error(moetrt_cli("verify", engine, "--integrity"), message, "rebuild the engine")


def test_experts_file_shorter_than_its_spans_is_refused_at_read_time(engine):
    """A segmented section whose experts file (here model.onnx.data, with its recorded size) is too short for the
    spans the kernel would read: refused before anything maps it."""
    size = (engine / "model.onnx.data").stat().st_size
    layer = {"inputs": ["h", "ids", "w"], "output": "out", "num_experts": 2, "hidden_size": 8,
             "intermediate_size": 8, "slices": 1, "gate_up": {"offset": 0, "count": 16},
             "down": {"offset": size - 32, "count": 16}}
    edit_manifest(engine, lambda m: m["ort"].update(
        layout="segments", model=None, experts_file="model.onnx.data", expert_layers=[layer],
        segments=[{"model": "model.onnx", "inputs": [], "outputs": []}] * 2))
    with pytest.raises(MoetrtError, match=f"expert layer 0 reads bytes {size - 32} to {size + 32} of "
                                          f"model.onnx.data, which holds {size}; rebuild the engine"):
        read_manifest(engine)


def test_model_replaced_by_random_bytes_is_one_line_naming_the_file(engine):
    model = engine / "model.onnx"
    model.write_bytes(bytes(range(256)) * (model.stat().st_size // 256) + b"\0" * (model.stat().st_size % 256))
    assert_one_line_error(moetrt_cli("generate", engine, "hi", "--max-new-tokens", "2"),
                          "onnxruntime cannot load the engine's model.onnx", "INVALID_PROTOBUF",
                          "the file is damaged or was replaced; rebuild the engine",
                          f"`moetrt verify {engine} --integrity`")
    assert_one_line_error(moetrt_cli("verify", engine, "--integrity"), "engine artifact model.onnx has sha256")


def test_graph_whose_external_data_leads_out_is_refused_by_onnxruntime(engine):
    """Paths inside model.onnx are onnxruntime's to check (it refuses locations outside the model's folder since
    1.2x); the session turns its refusal into one line naming the file."""
    model = onnx.load(engine / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret"
    onnx.save(model, engine / "model.onnx")
    edit_manifest(engine, lambda m: m["artifacts"]["model.onnx"].update(bytes=(engine / "model.onnx").stat().st_size))
    with pytest.raises(MoetrtError, match="onnxruntime cannot load the engine's model.onnx .*escapes model "
                                          "directory.*rebuild the engine") as error:
        Engine.load(engine)
    assert "\n" not in str(error.value)
