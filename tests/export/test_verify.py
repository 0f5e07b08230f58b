"""`moetrt verify ENGINE CHECKPOINT`: PASS for a faithful engine, FAIL (exit 1) when answers would change."""

import json
import os
import re
import subprocess
import sys

import pytest

from moetrt.export.engine import build_engine
from moetrt.settings import BuildProfile
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    checkpoint = make_checkpoint(root / "ckpt", "v2-group-limited")
    impostor = make_checkpoint(root / "other", "v2-group-limited", seed=1)  # same config, other weights
    engine = build_engine(checkpoint, root / "engine", backend="ort", profile=BuildProfile(max_context=128))
    return engine, checkpoint, impostor


def verify(*args):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", "verify", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "MOETRT_QUIET": "0"})


def test_faithful_engine_passes(setup):
    engine, checkpoint, _ = setup
    result = verify(engine, checkpoint, "--prompts", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["greedy_rows_agreeing"] == 4 and report["greedy_tokens_compared"] > 20
    # progress off a terminal: the comparison's first and last lines (each scoring group is a unit of work)
    counts = re.findall(r" verify: verifying against the reference (\d+)/(\d+)", result.stderr)
    assert counts[0][0] == "0" and counts[-1][0] == counts[-1][1] != "0", result.stderr


def test_streamed_reference_gives_the_loaded_ones_report(setup):
    """--stream-reference (layer by layer from the shards, what a checkpoint larger than memory gets) and
    --whole-reference compute the same reference: the same verdict and figures (float32 summation order aside)."""
    engine, checkpoint, _ = setup
    reports = []
    for how in ("--stream-reference", "--whole-reference"):
        result = verify(engine, checkpoint, "--prompts", "2", "--json", how)
        assert result.returncode == 0, result.stderr
        assert ("reference: streamed layer by layer" in result.stderr) == (how == "--stream-reference")
        reports.append(json.loads(result.stdout))
    streamed, whole = reports
    assert streamed.keys() == whole.keys() and whole["greedy_tokens_compared"] > 10
    for key, value in whole.items():
        if key == "max_abs_logit_diff":  # about 2e-6: float32 rounding, where the references' summation orders show
            assert abs(streamed[key] - value) <= 1e-6, key
        elif isinstance(value, float):
            assert streamed[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert streamed[key] == value, key


def test_verify_says_whether_the_checkpoint_is_the_engines(setup, tmp_path):
    """The manifest records the checkpoint's fingerprint (its tensors' names, dtypes, shapes and bytes): verify
    says on its first line whether the checkpoint is the engine's. A copy elsewhere, re-saved or re-sharded, is;
    one with other weights (the impostor: same config, other seed) or one edited tensor is not, and the
    comparison still fails it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from moetrt.export.checkpoint import checkpoint_fingerprint

    engine, checkpoint, impostor = setup
    result = verify(engine, impostor, "--prompts", "3")
    assert result.returncode == 1 and result.stdout.strip().endswith("FAIL")
    assert "diverged at step" in result.stdout
    first = result.stdout.splitlines()[0]
    assert first.startswith("checkpoint  NOT the one the engine was built from: as many tensors and bytes, other "
                            "names, dtypes, shapes or values (every byte hashed); compared anyway"), first
    assert "verify: checkpoint" in result.stderr and "NOT the one the engine was built from" in result.stderr

    reference = checkpoint_fingerprint(checkpoint)
    resharded = shutil.copytree(checkpoint, tmp_path / "resharded", ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {name: value for path in sorted(checkpoint.glob("*.safetensors")) for name, value in
               load_file(path).items()}
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[::2]}, resharded / "part-1.safetensors")
    save_file({name: tensors[name] for name in names[1::2]}, resharded / "part-2.safetensors")
    assert checkpoint_fingerprint(resharded) == reference and reference.whole
    edited = dict(tensors)
    name = names[len(names) // 2]
    edited[name] = edited[name].copy()
    edited[name].reshape(-1)[edited[name].size // 3] += 0.5  # one weight, away from any sample a large file takes
    save_file(edited, resharded / "part-1.safetensors")
    (resharded / "part-2.safetensors").unlink()
    assert checkpoint_fingerprint(resharded) != reference

    result = verify(engine, checkpoint, "--prompts", "1", "--task-problems", "0", "--json")
    report = json.loads(result.stdout)
    assert report["checkpoint_matches"] is True and report["checkpoint"].startswith("the one the engine was built")


def test_an_engine_that_does_not_record_its_checkpoint_still_verifies(setup, tmp_path):
    """An engine whose manifest does not record its checkpoint (built before moetrt recorded it): verify says it
    was not checked, and compares as before."""
    import shutil

    engine, checkpoint, _ = setup
    unrecorded = shutil.copytree(engine, tmp_path / "engine")
    manifest = json.loads((unrecorded / "manifest.json").read_text())
    del manifest["checkpoint"]
    (unrecorded / "manifest.json").write_text(json.dumps(manifest))
    result = verify(unrecorded, checkpoint, "--prompts", "2", "--task-problems", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("checkpoint  not checked: the engine does not record")


def test_the_engine_is_released_before_the_reference_loads(setup, tmp_path, monkeypatch):
    """verify runs the engine first and lets it go: when the reference loads, the Engine is gone and no data file of
    the engine (moetrt's kernel maps experts.bin; the kernel's library stays loaded) is mapped, so peak memory is the larger side's, not the sum of both
    (a streamed reference of a model larger than memory beside its engine; issue 22)."""
    import gc
    import weakref
    from pathlib import Path

    from moetrt.export import reference_session
    from moetrt.export.verify import verify_engine
    from moetrt.runtime.engine import Engine
    from moetrt.settings import OrtOptions

    _, checkpoint, _ = setup
    engine_dir = build_engine(checkpoint, tmp_path / "kernel", backend="ort", ort=OrtOptions("moetrt", 1),
                              profile=BuildProfile(max_context=128))
    assert (engine_dir / "experts.bin").is_file()
    engines, seen = [], {}
    load_engine, load_reference = Engine.load.__func__, reference_session.load_reference_session

    def tracked_engine(cls, *args, **kwargs):
        engine = load_engine(cls, *args, **kwargs)
        engines.append(weakref.ref(engine))
        return engine

    def checked_reference(*args, **kwargs):
        gc.collect()
        seen["engines alive"] = [ref() is not None for ref in engines]
        mapped = {line.split()[-1] for line in open("/proc/self/maps") if str(Path(engine_dir).resolve()) in line}
        seen["engine files mapped"] = sorted(path for path in mapped if not path.endswith(".so"))  # (code stays)
        return load_reference(*args, **kwargs)

    monkeypatch.setattr(Engine, "load", classmethod(tracked_engine))
    monkeypatch.setattr(reference_session, "load_reference_session", checked_reference)
    report = verify_engine(engine_dir, checkpoint, prompts=2, task=None)
    assert report.passed, report.describe()
    assert seen == {"engines alive": [False], "engine files mapped": []}


@pytest.mark.slow  # a second engine build (~20 s); test_verify_kl.py checks the prompts' bounds in make test
def test_an_engine_with_a_short_context_is_verified_with_shorter_greedy_runs(setup, tmp_path):
    """Random prompts of up to 39 tokens plus 32 new ones did not fit a 48-position engine: verify refused to run.
    It now shortens both to fit, and says so."""
    _, checkpoint, _ = setup
    engine = build_engine(checkpoint, tmp_path / "short", backend="ort", profile=BuildProfile(max_context=48))
    result = verify(engine, checkpoint, "--prompts", "3", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["greedy_rows_agreeing"] == 3 and report["greedy_tokens_compared"] > 0
    note = re.search(r"verify: greedy continuations of (\d+) tokens, not 32: the engine's context is 48", result.stderr)
    assert note and 24 <= int(note.group(1)) < 32, result.stderr  # prompts of at most 48 // 2 tokens
