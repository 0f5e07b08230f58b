"""Staged outputs: a killed build's staging directory is removed by the next build, and a full disk is one line."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt.atomic import OWNER_SUFFIX, DiskFullError, remove_stale_staging, staging_dir
from moetrt.errors import MoetrtError

ROOT = Path(__file__).resolve().parents[1]


def staged_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def fake_staging(out: Path, tag: str, owner: dict | None) -> Path:
    staged = out.parent / f".{out.name}.{tag}.partial"
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "model.onnx.data").write_bytes(b"\0" * 1000)
    if owner is not None:
        staged.with_name(staged.name + OWNER_SUFFIX).write_text(json.dumps(owner))
    return staged


def test_staging_dir_of_a_build_killed_with_sigkill_is_removed_by_the_next_build(tmp_path, monkeypatch, capsys):
    out = tmp_path / "engine"
    script = ("import sys, time; from pathlib import Path; from moetrt.atomic import staging_dir\n"
              f"with staging_dir(Path({str(out)!r})) as work:\n"
              "    (work / 'model.onnx.data').write_bytes(bytes(1 << 20))\n"
              "    print('ready', flush=True); time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
    left = staged_beside(out)
    assert len(left) == 2 and left[0].endswith(".partial") and left[1].endswith(".partial" + OWNER_SUFFIX)

    monkeypatch.setenv("MOETRT_QUIET", "0")
    with staging_dir(out) as work:
        (work / "manifest.json").write_text("{}")
    assert staged_beside(out) == [] and (out / "manifest.json").is_file()
    stderr = capsys.readouterr().err
    assert f"removed {tmp_path / left[0]} (1.0 MB), left by an earlier build that was killed" in stderr


def test_staging_of_a_live_process_another_host_or_no_owner_is_left_alone(tmp_path):
    out = tmp_path / "engine"
    here = socket.gethostname()
    live = fake_staging(out, "live", {"host": here, "pid": os.getpid()})
    elsewhere = fake_staging(out, "elsewhere", {"host": here + "-other", "pid": dead_pid()})
    unowned = fake_staging(out, "unowned", None)
    dead = fake_staging(out, "dead", {"host": here, "pid": dead_pid()})
    other_output = fake_staging(tmp_path / "other", "dead", {"host": here, "pid": dead_pid()})
    assert remove_stale_staging(out) == [dead]
    assert live.is_dir() and elsewhere.is_dir() and unowned.is_dir() and other_output.is_dir() and not dead.exists()
    assert not dead.with_name(dead.name + OWNER_SUFFIX).exists()


def test_a_finished_output_carries_no_owner_file_and_nothing_is_left_beside_it(tmp_path):
    out = tmp_path / "engine"
    for _ in range(2):  # the second run replaces the first
        with staging_dir(out) as work:
            (work / "graph.onnx").write_bytes(b"x")
            assert staged_beside(out) == sorted([work.name, work.name + OWNER_SUFFIX])
    assert sorted(os.listdir(out)) == ["graph.onnx"] and staged_beside(out) == []


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_inside_the_staging_block_is_one_line_naming_what_was_written(tmp_path, monkeypatch):
    out = tmp_path / "export"
    with pytest.raises(DiskFullError) as raised:
        with staging_dir(out) as work:
            (work / "model.onnx.data").write_bytes(b"\0" * 2_000_000)
            monkeypatch.setattr(Path, "write_bytes", no_space)
            (work / "model.onnx").write_bytes(b"graph")
    message = str(raised.value)
    assert message.startswith(f"no space left on device (need more than 2.0 MB at {tmp_path}, ")
    assert message.endswith(" free): free space there or choose another output directory")
    assert "\n" not in message and not out.exists() and staged_beside(out) == []


def test_disk_full_reports_the_callers_estimate_or_the_size_of_the_output_it_replaces(tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(DiskFullError, match=rf"^no space left on device \(need about 12.5 GB at {tmp_path}, "):
        with staging_dir(out, need_bytes=12_500_000_000):
            no_space()
    with staging_dir(out) as work:
        (work / "plan.bin").write_bytes(b"\0" * 3_000_000)
    with pytest.raises(DiskFullError, match=r"need about 3.0 MB at "):
        with staging_dir(out):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write failed: No space left on device")
    assert (out / "plan.bin").stat().st_size == 3_000_000  # the previous output stays


def test_disk_full_in_a_nested_staging_is_reported_once_for_the_outer_output(tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(DiskFullError) as raised:
        with staging_dir(out) as work:
            (work / "a.bin").write_bytes(b"\0" * 4_000_000)
            with staging_dir(work / ".export"):
                no_space()
    assert f"need more than 4.0 MB at {tmp_path}," in str(raised.value)
    assert staged_beside(out) == []


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(ValueError):
        with staging_dir(out):
            raise ValueError("a bug")
    assert staged_beside(out) == [] and not out.exists()


def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(MoetrtError, match=rf"^{tmp_path / 'afile'} is a file, not a directory; choose another"):
        with staging_dir(tmp_path / "afile" / "engine"):
            pass


def test_export_on_a_full_disk_prints_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import moetrt.export.onnx_export as onnx_export
    from moetrt.cli import main

    monkeypatch.setattr(onnx_export, "save_model", no_space)  # the disk fills while the weights are written
    monkeypatch.setattr(sys, "argv", ["moetrt", "export", str(ROOT / "models" / "tiny-r1"), "-o",
                                      str(tmp_path / "out"), "--target", "onnx"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on device (at {tmp_path}, ")
    assert os.listdir(tmp_path) == []


def test_write_bytes_on_a_full_disk_names_the_bytes_it_needed_and_leaves_nothing(tmp_path, monkeypatch):
    from moetrt.atomic import write_bytes

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=rf"^no space left on device \(need about 5.0 MB at {tmp_path}, "):
        write_bytes(tmp_path / "timing.cache", bytes(5_000_000))
    assert os.listdir(tmp_path) == []


def test_a_build_that_cannot_fit_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    from moetrt import hardware
    from moetrt.export.engine import build_engine

    monkeypatch.setattr(hardware, "disk_free", lambda path: 1000)
    with pytest.raises(MoetrtError, match=r"^the build writes about [\d.]+ GB \(the export and the engine\), and "
                                          r"0\.0 GB are free at .*; free space there or choose another -o$"):
        build_engine(ROOT / "models" / "tiny-r1", tmp_path / "engine", backend="ort")
    assert os.listdir(tmp_path) == []


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["build-engine", "export"])
def test_an_output_directory_holding_other_files_is_refused_and_kept(tmp_path, monkeypatch, capsys, command):
    """Writing an output replaces the directory whole; a directory that is not an earlier engine or export (here a
    notes file and a subfolder) was deleted without a word."""
    from moetrt.cli import main

    out = tmp_path / "models"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious\n")
    (out / "sub" / "y").write_text("x\n")
    before = _tree(out)
    monkeypatch.setattr(sys, "argv", ["moetrt", command, str(ROOT / "models" / "tiny-r1"), "-o", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 1 and len(lines) == 1, lines
    marker = "manifest.json" if command == "build-engine" else "export.json"
    assert lines[0] == (f"error: output directory {out} is not empty and holds no moetrt "
                        f"{'engine' if command == 'build-engine' else 'export'} (no {marker}); writing it would "
                        "delete what is there: choose a new or empty directory")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("where", ["the checkpoint", "its parent", "the current directory", "dot-dot"])
def test_an_output_that_is_or_holds_the_input_or_the_current_directory_is_refused(tmp_path, monkeypatch, where):
    """`-o CHECKPOINT`, `-o ..` from inside it, or `-o` a parent of the current directory would delete them, even
    where the directory holds an engine's manifest.json (an engine directory given as both)."""
    from moetrt.atomic import check_replaceable

    checkpoint = tmp_path / "models" / "ck"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text("{}\n")  # so only the input rule can refuse it
    monkeypatch.chdir(checkpoint if where == "dot-dot" else tmp_path / "models")
    out = {"the checkpoint": checkpoint, "its parent": checkpoint.parent, "the current directory": Path("."),
           "dot-dot": Path("..")}[where]
    with pytest.raises(MoetrtError, match=r"^output directory .* is (the input|the current directory) \(.*\) or "
                                          r"contains it, and writing it replaces the whole directory: choose a new "
                                          r"directory, e.g. -o .*-engine$"):
        check_replaceable(out, "manifest.json", "engine", (checkpoint,))


def test_an_empty_directory_or_an_earlier_output_may_be_replaced(tmp_path):
    from moetrt.atomic import check_replaceable

    (tmp_path / "empty").mkdir()
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "manifest.json").write_text("{}\n")
    (tmp_path / "engine" / "model.onnx").write_text("graph\n")
    for out in ("empty", "engine", "absent"):
        check_replaceable(tmp_path / out, "manifest.json", "engine", (ROOT / "models" / "tiny-r1",))
