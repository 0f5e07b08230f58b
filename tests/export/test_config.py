"""config.json parsing: both rope layouts, family defaults, and clear errors."""

import json
from pathlib import Path

import pytest

from moetrt import MoetrtError
from moetrt.config import ModelConfig, load_config, parse_config

REFERENCE = Path(__file__).parents[2] / "docs" / "deepseek-v3-config.json"


def test_reads_the_published_deepseek_v3_config():
    config = load_config(REFERENCE)
    assert (config.model_type, config.scoring_func, config.topk_method) == ("deepseek_v3", "sigmoid", "noaux_tc")
    assert config.latent_dim == 576
    assert config.rope.kind == "yarn" and config.rope.factor == 40 and config.rope.original_max_position_embeddings == 4096
    assert config.fp8 is not None and config.fp8.block_size == (128, 128)
    assert config.moe_layers == list(range(3, 61))
    assert config.eos_token_ids == (1,)


def test_legacy_rope_scaling_and_rope_parameters_agree():
    raw = json.loads(REFERENCE.read_text())
    legacy = parse_config(raw)
    modern = dict(raw)
    modern.pop("rope_theta")
    rope = dict(modern.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    modern["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    assert parse_config(modern).rope == legacy.rope


def test_config_round_trips_through_dict():
    config = load_config(REFERENCE)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_v2_defaults_to_softmax_greedy_router():
    raw = json.loads(REFERENCE.read_text())
    raw.update(model_type="deepseek_v2", topk_method=None, scoring_func=None, norm_topk_prob=None)
    config = parse_config(raw)
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob) == ("softmax", "greedy", False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"kv_lora_rank": None}, "missing field(s) kv_lora_rank"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "deepseek_v2", "topk_method": "sparse"}, "topk_method='sparse' is not supported"),
        ({"n_group": 7}, "multiple of n_group"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type 'dynamic' is not supported"),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    raw = json.loads(REFERENCE.read_text())
    raw.update(change)
    with pytest.raises(MoetrtError) as error:
        parse_config(raw)
    assert message in str(error.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(MoetrtError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MoetrtError, match="not valid JSON"):
        load_config(tmp_path)
