"""The CLI surface: one-line errors with exit status 1, tracebacks only with --verbose."""

import json
import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).parent / "data" / "deepseek-v3-config.json"


def moetrt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *args], capture_output=True, text=True, env=env)


def test_info_reports_deepseek_v3():
    result = moetrt("info", str(REFERENCE))
    assert result.returncode == 0, result.stderr
    assert "671.03B total, 36.63B active per token" in result.stdout
    assert "MLA latent 70.27 KB vs per-head 5.00 MB (71x)" in result.stdout


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
    result = moetrt("export", str(checkpoint), "-o", str(tmp_path / "out"), "--target", "onnx")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "export.json").is_file()
    bad = moetrt("export", str(checkpoint), "-o", str(tmp_path / "out2"), "--dtype", "int8")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: dtype 'int8' is not one of float32, float16, bfloat16"
    assert not (tmp_path / "out2").exists()


def test_build_engine_refuses_a_context_beyond_the_models_before_exporting(tmp_path):
    tiny_r1 = Path(__file__).parents[1] / "models" / "tiny-r1"
    result = moetrt("build-engine", str(tiny_r1), "-o", str(tmp_path / "e"), "--max-context", "1024")
    assert result.returncode == 1
    assert result.stderr == ("error: --max-context 1024 exceeds the 512 positions this deepseek_v3 model supports "
                             "(max_position_embeddings 512); pass --allow-long-context to build it anyway\n")
    assert not (tmp_path / "e").exists()
