"""tiny-r1's engine with moetrt's CPU expert kernel (`--moe-kernel moetrt`): the graph cut into segments around
the experts, checked against the torch reference and against the checkpoint's own answers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.export.ort.plan import choose_moe_kernel
from moetrt.formats import read_export_info, read_manifest
from tests.runtime.test_tiny_r1_engine import TINY_R1, moetrt_cli


@pytest.fixture(scope="module")
def engine(tiny_r1_quantized):
    """tiny-r1 with its routed experts in moetrt's kernel: the session's build, shared with the expert-parallel
    tests (tests that change it work on a copy)."""
    return tiny_r1_quantized("none", "moetrt")


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


def test_engine_carries_the_kernel_built_for_each_level_and_says_which_runs(engine):
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import choose, targets

    ort = read_manifest(engine).section
    assert ort.optimization_level == "extended" and ort.cpu_flags == ()  # the graph needs no particular CPU
    levels = targets(hardware.cpu_arch())
    assert [kernel.target for kernel in ort.kernels] == [target.name for target in levels]
    artifacts = read_manifest(engine).artifacts
    for kernel, target in zip(ort.kernels, levels):
        assert kernel.file in artifacts and (engine / kernel.file).is_file()
        assert target.cpu_flags is None or kernel.cpu_flags == target.cpu_flags
    assert "kernels/ort_ops.so" in artifacts and (engine / "kernels/ort_ops.so").is_file()  # the onnxruntime op
    chosen = choose(ort.kernels, hardware.cpu_flags())
    info = moetrt_cli("info", engine)
    carried = ", ".join(target.name for target in levels)
    assert f"CPU kernel       {chosen.target} (carried: {carried})" in info.stdout, info.stderr
    assert "each call        one onnxruntime run: the main model's segments joined into one graph" in info.stdout


def test_engine_loads_without_a_compiler_or_a_writable_cache(engine, monkeypatch, tmp_path):
    """A serving host needs neither gcc nor ~/.cache: the engine brings its kernel."""
    from moetrt.runtime.engine import Engine

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(blocker / "cache"))
    loaded = Engine.load(engine)
    assert len(loaded.session._segments) == 1  # joined, with the op library the engine carries
    logits = loaded.logits(np.array([[3, 4, 5, 6]]))
    assert logits.shape[:2] == (1, 4) and np.isfinite(logits).all()


def test_cpu_without_the_best_level_runs_a_lower_build_that_agrees(engine, monkeypatch):
    """An engine built on an AVX-512 or AVX2 machine on a CPU with only x86-64-v2: the v2 build runs, and computes
    what the build chosen for this CPU computes."""
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import X86_64_V2, X86_64_V3, X86_64_V4, expert_kernel
    from moetrt.runtime.engine import Engine

    if hardware.cpu_arch() != "x86_64" or not set(X86_64_V3) <= set(hardware.cpu_flags()):
        pytest.skip("needs an x86-64-v3 CPU")
    ort = read_manifest(engine).section
    ids = np.array([[7, 8, 9, 10, 11]])
    logits = {}
    for flags, level in ((X86_64_V4, "x86-64-v4"), (X86_64_V3, "x86-64-v3"), (X86_64_V2, "x86-64-v2")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: tuple(flags))
        assert expert_kernel(ort.kernels, engine).description.startswith(f"{level} (carried: ")
        if level != "x86-64-v4":  # choosing it is all this CPU can check
            logits[level] = Engine.load(engine).logits(ids)
    np.testing.assert_allclose(logits["x86-64-v2"], logits["x86-64-v3"], rtol=1e-4, atol=1e-4)


def test_no_build_fits_compiles_here_or_refuses_in_one_line(engine, monkeypatch, tmp_path):
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import expert_kernel
    from moetrt.runtime.manifest import load_manifest

    ort = read_manifest(engine).section
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ())  # a CPU (or VM) that shows none of the levels' flags
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(tmp_path / "cache"))
    choice = expert_kernel(ort.kernels, engine)
    assert choice.path is None and choice.description.startswith("compiled for this CPU: none of the engine's builds")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(MoetrtError) as error:
        load_manifest(engine)
    message = str(error.value)
    assert "\n" not in message and f"this {hardware.cpu_arch()} CPU" in message
    assert all(kernel.target in message for kernel in ort.kernels)
    assert "cannot be compiled here (no C compiler)" in message and "--moe-kernel onnxruntime" in message


def test_engine_without_carried_builds_compiles_the_kernel_at_load(engine, monkeypatch, tmp_path):
    """Engines built before the kernels were carried (no `kernels`, graph saved at level "all") still load where
    a compiler is."""
    from moetrt.runtime.engine import Engine

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["ort"]["kernels"]
    manifest["ort"].update(optimization_level="all")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(tmp_path / "cache"))
    result = moetrt_cli("info", copy)
    assert "CPU kernel       compiled for this CPU: the engine carries no build" in result.stdout, result.stderr
    assert Engine.load(copy).logits(np.array([[1, 2]])).shape[:2] == (1, 2)


def test_verify_passes(engine):
    result = moetrt_cli("verify", engine, TINY_R1, "--prompts", "4", "--task-problems", "48", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["answers_differing"] == 0
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]


# Loads the engine in a fresh process (segment by segment with per-segment arenas if argv[2] is "separate", with
# one shared arena if "shared", as one joined graph if "joined"), runs a full batch of max_context-token rows and
# prints how much anonymous memory that added, in MB.
ARENA_CHILD = """
import sys, numpy as np
import moetrt.runtime.ort.session as session
if sys.argv[2] == "separate":
    session.shared_cpu_arena = lambda: None  # the config entry then falls back to each session's own arena
from moetrt.runtime.engine import Engine
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1e3
engine = Engine.load(sys.argv[1])
ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, (engine.manifest.profile.max_batch, engine.max_context))
before = anon()
logits = engine.logits(ids)
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_segments_share_one_memory_arena(engine):
    """Each segment's session with its own arena keeps its own largest activations; one shared arena keeps the
    largest segment's. The same long batch through the same engine must add well under the separate arenas'
    memory (measured: 174 MB shared, 454 MB separate, 4 segments)."""
    growth = {}
    for mode in ("shared", "separate", "joined"):
        segmented = {"MOETRT_SEGMENTED": "1"} if mode != "joined" else {}
        done = subprocess.run([sys.executable, "-c", ARENA_CHILD, str(engine), mode], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MOETRT_QUIET": "1", **segmented})
        assert done.returncode == 0, done.stderr
        growth[mode] = float(done.stdout.split()[-1])
    print(f"anonymous memory added by one full batch: {growth}")
    assert growth["shared"] < 0.6 * growth["separate"], growth
    assert growth["joined"] < 0.6 * growth["separate"], growth  # one session, one arena


def test_eval_answers_as_the_checkpoint_does(engine):
    runs = [moetrt_cli("eval", source, "--num-problems", "40", "--seed", "11", "--json")
            for source in (engine, TINY_R1)]
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


# slow (an export and a build, ~28 s); `make test-slow` runs it
@pytest.mark.slow
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


@pytest.mark.parametrize("name, reason", [("../outside.so", "climbs out with '..'"),
                                          ("kernels/unrecorded.so", "the manifest's artifacts do not record")])
def test_engine_refuses_a_kernel_it_does_not_hold(engine, tmp_path, name, reason):
    """The kernels are code the loader runs: only files inside the engine that its artifacts record."""
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    shutil.copyfile(engine / read_manifest(engine).section.kernels[0].file, copy / "kernels" / "unrecorded.so")
    manifest = json.loads((copy / "manifest.json").read_text())
    for kernel in manifest["ort"]["kernels"]:
        kernel["file"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoetrtError, match=reason):
        read_manifest(copy)


@pytest.mark.parametrize("which", ["kernel", "onnxruntime op library"])
def test_damaged_kernel_is_refused_in_one_line_before_it_is_loaded(engine, tmp_path, which):
    """A carried kernel (or the onnxruntime op library) with bytes flipped but its size kept would crash the
    process (SIGILL, SIGSEGV) once called: its hash is checked against the manifest before the loader maps it."""
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import choose

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    chosen = choose(read_manifest(copy).section.kernels, hardware.cpu_flags())
    if chosen is None:
        pytest.skip("no carried build fits this CPU")
    library = copy / (chosen.file if which == "kernel" else "kernels/ort_ops.so")
    data = bytearray(library.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(byte ^ 0xFF for byte in data[middle:middle + 4096])
    library.write_bytes(bytes(data))
    result = moetrt_cli("generate", copy, "1+1", "-n", "3")
    assert result.returncode == 1, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and library.name in errors[0] and "is damaged" in errors[0], result.stderr
    assert f"moetrt verify {copy} --integrity" in errors[0] and "Traceback" not in result.stderr


def test_segments_run_as_one_onnxruntime_graph_with_the_same_outputs(engine, monkeypatch):
    """Where moetrt's onnxruntime op library compiles, the segments and the expert layers between them load as one
    joined graph (runtime/ort/fused.py): one session run per call, the same logits and latent rows as running the
    segments one by one. A kernel build from before the op (older engines carry one) and MOETRT_SEGMENTED=1 run
    the segments one by one."""
    import moetrt.runtime.ort.session as ort_session
    from moetrt.runtime.engine import Engine

    section = read_manifest(engine).section
    ids = np.array([[5, 6, 7, 8, 9], [0, 0, 12, 13, 14]], np.int64)
    mask = (np.arange(5)[None, :] >= np.array([[0], [2]])).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    outputs = {}
    for mode in ("joined", "segmented", "old kernel build"):
        monkeypatch.setenv("MOETRT_SEGMENTED", "1" if mode == "segmented" else "")
        if mode == "old kernel build":
            chosen = ort_session._kernel_library

            class OldBuild:  # the entry point the op calls is missing
                def __init__(self, library):
                    self.moetrt_experts = library.moetrt_experts

            monkeypatch.setattr(ort_session, "_kernel_library",
                                lambda manifest, section: (OldBuild(chosen(manifest, section)[0]), "old"))
        session = Engine.load(engine).session
        assert len(session._segments) == (1 if mode == "joined" else len(section.segments))
        assert ("in the onnxruntime graph" in session._kernel_description) == (mode == "joined")
        past = [np.zeros((0, 2, session.latent_dim), session.dtype) for _ in range(session.num_layers)]
        outputs[mode] = session.run(ids, positions, mask, positions, past)
    for mode in ("segmented", "old kernel build"):
        np.testing.assert_allclose(outputs["joined"][0], outputs[mode][0], rtol=0, atol=1e-5)
        for joined_rows, rows in zip(outputs["joined"][1], outputs[mode][1]):
            np.testing.assert_allclose(joined_rows, rows, rtol=0, atol=1e-5)


@pytest.mark.parametrize("damage", ["random bytes", "data outside the engine"])
def test_a_damaged_segment_is_one_line_naming_it_when_joined(engine, tmp_path, damage):
    """The joined graph reads every segment file at load: a segment replaced by bytes of the same size, or one whose
    external data leads out of the engine (which onnxruntime refuses), is one line naming that segment."""
    import onnx

    from tests.runtime.test_manifest_safety import assert_one_line_error, edit_manifest

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    segment = copy / "segment1.onnx"
    if damage == "random bytes":
        segment.write_bytes(bytes(range(256)) * (segment.stat().st_size // 256) + b"\0" * (segment.stat().st_size % 256))
        wanted = ["cannot load the engine's segment1.onnx", "the file is damaged or was replaced"]
    else:
        model = onnx.load(segment, load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../secret"
        onnx.save(model, segment)
        edit_manifest(copy, lambda m: m["artifacts"]["segment1.onnx"].update(bytes=segment.stat().st_size))
        wanted = ["onnxruntime cannot load the engine's segment1.onnx as one graph", "escapes model directory"]
    assert_one_line_error(moetrt_cli("generate", copy, "1+1", "-n", "2"), *wanted, "rebuild the engine",
                          f"`moetrt verify {copy} --integrity`")


def test_info_says_how_a_call_runs_here(engine, monkeypatch):
    """`moetrt info`'s "each call" line follows what loading would do: joined, or segment by segment and why."""
    assert "each call        one onnxruntime run: the main model's segments joined" in moetrt_cli("info", engine).stdout
    monkeypatch.setenv("MOETRT_SEGMENTED", "1")
    assert ("each call        one onnxruntime run per segment, the kernel called between them (MOETRT_SEGMENTED is "
            "set)") in moetrt_cli("info", engine).stdout
