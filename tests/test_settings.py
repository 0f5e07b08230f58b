"""Build settings fitted to the model: the default context is the model's (max_position_embeddings or YaRN's
extended window), cut where the latent cache would not fit; a longer --max-context is refused unless allowed."""

import dataclasses
import json
from pathlib import Path

import pytest

from moetrt import MoetrtError
from moetrt.config import load_config, parse_config
from moetrt.settings import DEFAULT_LATENT_CACHE_BYTES, BuildProfile, fit_profile

ROOT = Path(__file__).parents[1]
TINY_R1 = load_config(ROOT / "models" / "tiny-r1")
DEEPSEEK_V3 = load_config(ROOT / "docs" / "deepseek-v3-config.json")


def test_the_default_context_is_the_models():
    profile, how = fit_profile(BuildProfile(), TINY_R1, "float32")
    assert (profile.max_context, profile.seq) == (512, 512)
    assert how == ("context: 512 positions, the model's (max_position_embeddings 512); latent cache 1,024 bytes per "
                   "token (4 layers x 64 values x 4 bytes)")


def test_an_mtp_engine_counts_the_modules_cache_layer():
    """An --mtp engine keeps a latent-cache layer for the MTP module; the build's line and `info` left it out."""
    _, how = fit_profile(BuildProfile(), TINY_R1, "float32", mtp_layers=1)
    assert how.endswith("latent cache 1,280 bytes per token (4 layers + 1 MTP x 64 values x 4 bytes)"), how


def test_the_default_context_is_cut_where_the_latent_cache_would_not_fit():
    """DeepSeek-V3 supports 163840 positions: 11.5 GB of bf16 latent cache per sequence, 92 GB for 8."""
    assert DEEPSEEK_V3.supported_context == 163840
    assert DEEPSEEK_V3.latent_bytes_per_token(2) == 61 * 576 * 2 == 70272
    profile, how = fit_profile(BuildProfile(), DEEPSEEK_V3, "bfloat16")
    assert profile.max_context == DEFAULT_LATENT_CACHE_BYTES // (8 * 70272) // 256 * 256 == 15104
    assert "15104 positions, of the model's 163840, so that 8 sequences' latent cache fits 8 GiB" in how
    assert "latent cache 70,272 bytes per token (61 layers x 576 values x 2 bytes)" in how
    one, _ = fit_profile(BuildProfile(max_batch=1), DEEPSEEK_V3, "float32")
    assert one.max_context == 60928  # 8 GiB / 140,544 bytes = 61122, to a multiple of 256


def test_yarn_extends_what_the_model_supports():
    raw = json.loads((ROOT / "docs" / "deepseek-v3-config.json").read_text())
    raw["max_position_embeddings"] = 4096  # the pre-YaRN window; rope_scaling says 4096 x 40
    config = parse_config(raw)
    assert config.supported_context == 163840
    plain = parse_config({**raw, "rope_scaling": None})
    assert plain.supported_context == 4096
    with pytest.raises(MoetrtError, match=r"supports \(YaRN's 4096 x 40\)"):
        fit_profile(BuildProfile(max_context=200000), config, "bfloat16")


def test_a_context_beyond_the_models_is_refused_naming_the_limit_and_the_override():
    with pytest.raises(MoetrtError) as refused:
        fit_profile(BuildProfile(max_context=1024), TINY_R1, "float32")
    assert str(refused.value) == ("--max-context 1024 exceeds the 512 positions this deepseek_v3 model supports "
                                  "(max_position_embeddings 512); pass --allow-long-context to build it anyway")
    profile, how = fit_profile(BuildProfile(max_context=1024), TINY_R1, "float32", allow_long_context=True)
    assert profile.max_context == 1024 and "(beyond the model's, --allow-long-context)" in how


def test_a_given_context_within_the_model_is_kept():
    profile = BuildProfile(max_batch=2, max_seq=16, max_context=128)
    assert fit_profile(profile, TINY_R1, "float16")[0] == profile


def test_max_seq_is_resolved_and_checked_against_the_fitted_context():
    profile, _ = fit_profile(BuildProfile(max_batch=2), TINY_R1, "float32")
    assert dataclasses.astuple(profile) == (2, 512, 512)
    with pytest.raises(MoetrtError, match=r"--max-seq \(1024\) cannot exceed --max-context \(512\)"):
        fit_profile(BuildProfile(max_seq=1024), TINY_R1, "float32")
