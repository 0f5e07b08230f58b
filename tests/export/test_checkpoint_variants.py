"""Checkpoint variants transformers 5.x loads: each must load in moetrt and give transformers' logits.

Each variant is written by transformers (`save_pretrained`), then its config.json or tensors are edited the way
real checkpoints differ (absent fields, nulls the router never reads, fields transformers ignores, tensors the
config makes redundant); transformers reloads the edited files (`from_pretrained`) and is the reference.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetrt
from moetrt import MoetrtError
from moetrt.config import load_config
from tests.checkpoints import BASE

# DeepSeek-V2's code normalises when norm_topk_prob while transformers' V2 ignores it (tested on its own in
# test_reference_model.py), so the V2 variants here leave it off.
V2 = dict(norm_topk_prob=False, topk_method="greedy")
V2_LITE_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def _drop(*names):
    return lambda config: [config.pop(name, None) for name in names]


def _set(**values):
    return lambda config: config.update(values)


def _add(**tensors):
    return lambda state: state.update({name: make() for name, make in tensors.items()})


def _no_rope_dict(config):
    config.pop("rope_parameters", None)
    config.update(rope_scaling=None, rope_theta=10000.0)


def _copy_embedding_to_head(state):
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()


# name -> (family, model overrides, config.json edit, tensor edit)
VARIANTS = {
    # Nulls and values the chosen router never reads.
    "v2-greedy-null-groups": ("v2", dict(V2, n_group=None, topk_group=None), None, None),
    "v2-greedy-unread-groups": ("v2", V2, _set(n_group=3, topk_group=5), None),
    "v2-lite": ("v2", dict(V2, q_lora_rank=None, n_group=1, topk_group=1, rope_parameters=V2_LITE_YARN), None, None),
    "v3-norm-topk-prob-null": ("v3", {}, _set(norm_topk_prob=None), None),
    "v3-rope-interleave-null": ("v3", {}, _set(rope_interleave=None), None),
    # No rope dict, or no rope fields at all (rope_theta defaults to 10000).
    "v2-rope-scaling-null": ("v2", V2, _no_rope_dict, None),
    "v3-no-rope-fields": ("v3", {}, _drop("rope_parameters", "rope_scaling", "rope_theta"), None),
    "v3-yarn-factor-null": ("v3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                                                         "original_max_position_embeddings": 128}), None, None),
    # Absent fields take transformers' family defaults.
    "v2-absent-fields": ("v2", dict(V2, first_k_dense_replace=0, routed_scaling_factor=1.0, rms_norm_eps=1e-6,
                                    max_position_embeddings=2048, v_head_dim=128),
                         _drop("first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor",
                               "rms_norm_eps", "topk_method", "norm_topk_prob", "max_position_embeddings",
                               "v_head_dim"), None),
    "v3-absent-first-k-dense": ("v3", dict(num_hidden_layers=4, first_k_dense_replace=3),
                                _drop("first_k_dense_replace"), None),
    # Fields transformers' model does not read.
    "v3-router-fields-ignored": ("v3", {}, _set(topk_method="greedy", scoring_func="softmax"), None),
    "v3-mlp-bias-ignored": ("v3", {}, _set(mlp_bias=True), None),
    "v3-moe-layer-freq-ignored": ("v3", {}, _set(moe_layer_freq=2), None),
    # Tensors the config makes redundant.
    "v2-greedy-with-correction-bias": ("v2", V2, None, _add(**{
        f"model.layers.{layer}.mlp.gate.e_score_correction_bias": (lambda: torch.ones(8)) for layer in (1, 2)})),
    "v3-mtp-layer": ("v3", {}, _set(num_nextn_predict_layers=1), _add(**{
        "model.layers.3.eh_proj.weight": lambda: torch.ones(48, 96),
        "model.layers.3.enorm.weight": lambda: torch.ones(48),
        "model.layers.3.shared_head.head.weight": lambda: torch.ones(96, 48),
        "model.layers.3.mlp.experts.0.up_proj.weight": lambda: torch.ones(24, 48)})),
    "v3-rotary-buffers": ("v3", {}, None, _add(**{
        "model.rotary_emb.inv_freq": lambda: torch.ones(4),
        "model.rotary_emb.original_inv_freq": lambda: torch.ones(4),
        "model.layers.0.self_attn.rotary_emb.inv_freq": lambda: torch.ones(4),
        "model.layers.0.self_attn.rotary_emb.cos_cached": lambda: torch.ones(512, 8),
        "model.layers.0.self_attn.rotary_emb.sin_cached": lambda: torch.ones(512, 8)})),
    # Tied embeddings with a head in the file too: transformers runs the file's head (untied where it differs).
    "v3-tied-with-an-equal-head": ("v3", dict(tie_word_embeddings=True), None, _copy_embedding_to_head),
    "v3-tied-with-another-head": ("v3", dict(tie_word_embeddings=True), None,
                                  _add(**{"lm_head.weight": lambda: torch.randn(96, 48)})),
    "v3-no-shared-experts": ("v3", dict(n_shared_experts=0), None, None),
    "v2-no-shared-experts": ("v2", dict(V2, n_shared_experts=0), None, None),
    # One expert per token: V3 normalises its weight to 1 (then scales); V2 scales.
    "v3-one-expert-normalised": ("v3", dict(num_experts_per_tok=1), None, None),
    "v3-one-expert-unnormalised": ("v3", dict(num_experts_per_tok=1, norm_topk_prob=False), None, None),
    "v2-one-expert": ("v2", dict(V2, num_experts_per_tok=1, norm_topk_prob=True), None, None),
}


def write_variant(directory, family, overrides, edit_config=None, edit_tensors=None):
    """Save a transformers model of the variant into `directory` and edit its files; returns transformers'
    model reloaded from them."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    model_class, config_class = ((DeepseekV3ForCausalLM, DeepseekV3Config) if family == "v3"
                                 else (DeepseekV2ForCausalLM, DeepseekV2Config))
    torch.manual_seed(0)
    model = model_class(config_class(**{**BASE, **overrides}))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    model.save_pretrained(directory)
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(directory / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return model_class.from_pretrained(directory).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loads_and_matches_transformers(name, tmp_path):
    reference = write_variant(tmp_path, *VARIANTS[name])
    ours = moetrt.load_reference(tmp_path)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(ids).logits, ours(ids)
    assert (got - want).abs().max().item() <= 2e-4, name


def test_one_expert_normalised_weight_is_the_scaling_factor(tmp_path):
    """The issue's input: k=1 with norm_topk_prob true routed with the raw sigmoid score (logits off by 0.99)."""
    write_variant(tmp_path, "v3", dict(num_experts_per_tok=1))
    gate = moetrt.load_reference(tmp_path).model.layers[1].mlp.gate
    _, weights = gate(torch.randn(16, 48, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(weights, torch.full((16, 1), 2.5))


def test_absent_fields_take_transformers_defaults(tmp_path):
    write_variant(tmp_path, *VARIANTS["v2-absent-fields"][:3])
    config = load_config(tmp_path)
    assert (config.first_k_dense_replace, config.routed_scaling_factor) == (0, 1.0)
    assert (config.max_position_embeddings, config.v_head_dim) == (2048, 128)
    assert (config.topk_method, config.n_group, config.topk_group, config.norm_topk_prob) == ("greedy", 1, 1, False)


@pytest.mark.parametrize("family, overrides, edit, message", [
    # transformers refuses these too (strict config) or fails at the first forward: moetrt says which field.
    ("v3", {}, _set(n_group=None, topk_group=None), "missing field(s) n_group, topk_group required for deepseek_v3"),
    ("v3", {}, _set(first_k_dense_replace=None), "missing field(s) first_k_dense_replace"),
    ("v2", dict(V2, topk_method="group_limited_greedy"), _set(n_group=None), "missing field(s) n_group"),
    ("v2", V2, _drop("num_experts_per_tok"), "missing field(s) num_experts_per_tok required for deepseek_v2"),
    ("v2", V2, _set(kv_lora_rank=None), "missing field(s) kv_lora_rank"),
])
def test_fields_transformers_cannot_run_without_are_named(family, overrides, edit, message, tmp_path):
    write_variant(tmp_path, family, overrides)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoetrtError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moetrt.load_reference(tmp_path)


def test_a_used_correction_bias_that_is_missing_is_still_refused(tmp_path):
    write_variant(tmp_path, "v3", {}, None, lambda state: state.pop("model.layers.1.mlp.gate.e_score_correction_bias"))
    with pytest.raises(MoetrtError, match="missing: model.layers.1.mlp.gate.e_score_correction_bias"):
        moetrt.load_reference(tmp_path)
