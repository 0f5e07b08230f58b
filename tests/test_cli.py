"""The CLI surface: one-line errors with exit status 1, tracebacks only with --verbose."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "deepseek-v3-config.json"


def moetrt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *args], capture_output=True, text=True, env=env)


def test_info_reports_deepseek_v3():
    result = moetrt("info", str(REFERENCE))
    assert result.returncode == 0, result.stderr
    assert "671.03B total, 36.63B active per token" in result.stdout
    assert "MLA latent 70.27 KB vs per-head 5.00 MB (71x)" in result.stdout


def test_the_readmes_info_examples_name_files_in_the_repository():
    examples = re.findall(r"moetrt info ([\w./-]+)", (ROOT / "README.md").read_text())
    assert "docs/deepseek-v3-config.json" in examples
    assert all((ROOT / path).exists() for path in examples if not path.isupper()), examples  # SOURCE: a placeholder


def test_info_json():
    result = moetrt("info", str(REFERENCE), "--json", "--context", "8192")
    data = json.loads(result.stdout)
    assert data["total_params"] > 670e9 and data["context"] == 8192


def test_user_error_is_one_line_with_status_1(tmp_path):
    result = moetrt("info", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: no config.json at {tmp_path}/config.json: point at a Hugging Face checkpoint directory"]


def test_verbose_shows_the_traceback(tmp_path):
    result = moetrt("--verbose", "info", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "MoetrtError" in result.stderr


def test_export_command_writes_an_export_and_rejects_bad_options(tmp_path):
    from tests.checkpoints import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", "v3-qlora-grouped-yarn")
    result = moetrt("export", str(checkpoint), "-o", str(tmp_path / "out"), "--target", "onnx",
                    env={**os.environ, "MOETRT_QUIET": "0"})
    assert result.returncode == 0, result.stderr
    # stderr is a pipe: plain timestamped progress lines, named for the command
    progress = [line for line in result.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line)]
    assert progress[0].endswith(" export: exporting 0/3") and progress[-1].endswith(" export: done 3/3"), progress
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "export.json").is_file()
    bad = moetrt("export", str(checkpoint), "-o", str(tmp_path / "out2"), "--dtype", "int8")
    assert bad.returncode == 2  # click's usage error, listing the choices
    assert bad.stderr.splitlines()[-1] == ("Error: Invalid value for '--dtype': Value error, 'int8' is not one of "
                                           "'float32', 'float16', 'bfloat16'.")
    assert not (tmp_path / "out2").exists()


def test_build_engine_refuses_a_context_beyond_the_models_before_exporting(tmp_path):
    tiny_r1 = Path(__file__).parents[1] / "models" / "tiny-r1"
    result = moetrt("build-engine", str(tiny_r1), "-o", str(tmp_path / "e"), "--max-context", "1024")
    assert result.returncode == 1
    assert result.stderr == ("error: --max-context 1024 exceeds the 512 positions this deepseek_v3 model supports "
                             "(max_position_embeddings 512); pass --allow-long-context to build it anyway\n")
    assert not (tmp_path / "e").exists()


def test_version_prints_the_installed_version():
    import tomllib

    result = moetrt("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0 and result.stdout == f"moetrt {version}\n"


def command_params(name: str) -> dict:
    import typer

    from moetrt.cli import app

    command = typer.main.get_command(app).commands[name]
    return {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("command, choices", [
    ("export", {"--target": "ort|trt|onnx", "--dtype": "float32|float16|bfloat16",
                "--moe-kernel": "auto|moetrt|onnxruntime"}),
    ("build-engine", {"--backend": "auto|ort|trt", "--dtype": "float32|float16|bfloat16",
                      "--moe-kernel": "auto|moetrt|onnxruntime", "--trt-plugin": "aot|jit"}),
    ("eval", {"--task": "arithmetic"}),
])
def test_help_lists_the_choices_of_each_option_that_has_them(command, choices):
    result = moetrt(command, "--help", env={**os.environ, "TERMINAL_WIDTH": "240"})
    for option, listed in choices.items():
        assert re.search(rf"{option} .*<{re.escape(listed)}>", result.stdout), (option, result.stdout)


def test_the_cli_target_choices_are_the_lowerings():
    from moetrt.cli import TARGET_CHOICES
    from moetrt.export.lowering import TARGETS

    assert TARGET_CHOICES == tuple(TARGETS)


def test_a_wrong_choice_is_a_plain_usage_error_on_one_line():
    result = moetrt("build-engine", "models/tiny-r1", "-o", "/nonexistent/e", "--backend", "tensorrt")
    assert result.returncode == 2 and "│" not in result.stderr  # click's text, not a panel wrapped at 80 columns
    assert result.stderr.splitlines()[-1] == ("Error: Invalid value for '--backend': Value error, 'tensorrt' is not "
                                              "one of 'auto', 'ort', 'trt'.")


def test_verbose_after_the_command_shows_the_traceback(tmp_path):
    for flag in ("--verbose", "-v"):
        result = moetrt("info", str(tmp_path), flag)
        assert result.returncode == 1 and "Traceback" in result.stderr and "MoetrtError" in result.stderr


def test_n_means_max_new_tokens_wherever_it_is_taken():
    from moetrt.cli import app
    import typer

    commands = typer.main.get_command(app).commands
    taking_n = {name: params["-n"].name for name in commands if "-n" in (params := command_params(name))}
    assert taking_n == {"generate": "max_new_tokens", "chat": "max_new_tokens"}
    assert "--num-problems" in command_params("eval")


@pytest.mark.parametrize("args", [
    ["info", "{missing}"], ["info", "{file}"],
    ["export", "{missing}", "-o", "{tmp}/o"], ["export", "{file}", "-o", "{tmp}/o"],
    ["export", "models/tiny-r1", "-o", "{file}/o"],
    ["build-engine", "{missing}", "-o", "{tmp}/e"], ["build-engine", "{file}", "-o", "{tmp}/e"],
    ["build-engine", "models/tiny-r1", "-o", "{file}"],
    ["verify", "{missing}"], ["verify", "{file}"],
    ["eval", "{missing}"], ["eval", "{file}"],
    ["generate", "{missing}", "hi"], ["generate", "{file}", "hi"],
    ["chat", "{missing}"], ["chat", "{file}"],
])
def test_a_bad_path_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys, args):
    from moetrt.cli import main

    (tmp_path / "afile").write_text("not a model\n")
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "afile", "tmp": tmp_path}
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["moetrt", *(arg.format(**paths) for arg in args)])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 1 and len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_ctrl_c_in_chat_stops_the_reply_and_returns_to_the_prompt(monkeypatch):
    from typer.testing import CliRunner

    from moetrt.cli import app
    from moetrt.runtime.engine import Engine

    seen = []

    def chat_stream(messages, **options):
        seen.append([m["content"] for m in messages])
        yield SimpleNamespace(reasoning="", text="partial", finish_reason=None)
        if len(seen) == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-reply
        yield SimpleNamespace(reasoning="", text=" reply", finish_reason="stop")

    fake = SimpleNamespace(manifest=SimpleNamespace(backend="ort"), chat_stream=chat_stream,
                           options=lambda **options: options)
    monkeypatch.setattr(Engine, "load", lambda *args, **kwargs: fake)
    result = CliRunner().invoke(app, ["chat", "engine"], input="first\nsecond\n/exit\n")
    assert result.exit_code == 0, result.output
    assert seen == [["first"], ["second"]]  # the stopped exchange is not kept
    assert "(stopped" in result.output and "partial reply" in result.output


@pytest.mark.parametrize("source", ["models/tiny-r1", "{engine}"])
def test_eval_names_num_problems_when_it_is_below_one(tmp_path, source):
    """eval takes no -n (that is max_new_tokens elsewhere): its refusal names the option it has, before loading."""
    (tmp_path / "manifest.json").write_text("{}")  # an engine directory by its look; refused before it is read
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "eval", source.format(engine=tmp_path),
                             "--num-problems", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (result.returncode, result.stderr) == (1, "error: --num-problems must be at least 1, got 0\n")
