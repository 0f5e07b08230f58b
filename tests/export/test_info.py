"""`moetrt info` arithmetic against DeepSeek's published figures."""

from pathlib import Path

from moetrt.config import load_config
from moetrt.export.info import count_parameters, describe, kv_bytes_per_token, weight_bytes

REFERENCE = Path(__file__).parents[2] / "docs" / "deepseek-v3-config.json"


def test_deepseek_v3_totals_match_published_671b_and_37b_active():
    counts = count_parameters(load_config(REFERENCE))
    assert round(counts.total / 1e9) == 671
    # DeepSeek: 36.6B activated per token including the 0.9B output head ("about 37B").
    assert abs(counts.active - 36.6e9) / 36.6e9 < 0.005


def test_mla_latent_cache_is_576_values_per_layer():
    config = load_config(REFERENCE)
    kv = kv_bytes_per_token(config)
    assert kv["latent"] == 61 * 576 * 2
    assert kv["per_head"] == 61 * 128 * (192 + 128) * 2


def test_fp8_bytes_are_about_half_of_bf16():
    bytes_ = weight_bytes(load_config(REFERENCE))
    assert 0.49 < bytes_["fp8"] / bytes_["bf16"] < 0.52
    assert 672e9 < bytes_["fp8"] < 676e9  # e4m3 linears + fp32 block scales + bf16 embeddings and head


def test_gpu_estimate_grows_with_context():
    config = load_config(REFERENCE)
    short = describe(config, context=4096)["gpus_141gb"]["fp8"]
    long = describe(config, context=131072, batch=64)["gpus_141gb"]["fp8"]
    assert short == 6 and long > short


def test_info_says_whether_an_engine_fits_this_machine(tmp_path):
    import json
    import subprocess
    import sys

    def info(source, *options):
        done = subprocess.run([sys.executable, "-m", "moetrt.cli", "info", str(source), *options],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    text = info(REFERENCE, "--quantize", "int4", "--context", "4096")
    line = next(line for line in text.splitlines() if line.startswith("fits memory"))
    assert "an int4 engine: NO:" in line  # ~360 GB of int4 weights
    fit = json.loads(info(REFERENCE, "--quantize", "int4", "--json"))["fit"]
    int8 = json.loads(info(REFERENCE, "--quantize", "int8", "--json"))["fit"]
    assert 0.5 < fit["weight_bytes"] / int8["weight_bytes"] < 0.6  # 4 bits + scales against 8 bits + scales
    assert 340e9 < fit["weight_bytes"] < 400e9 and fit["disk_needed"] == 2 * fit["weight_bytes"]
    assert fit["kv_bytes_per_token"] == 61 * 576 * 4  # the runtime's float32 latent cache
    tiny = json.loads(info(Path(__file__).parents[2] / "models" / "tiny-r1", "--json"))["fit"]
    assert tiny["fits_memory"] and tiny["bytes_read_per_token"] < tiny["weight_bytes"]
