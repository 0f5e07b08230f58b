"""The torch reference model against transformers' DeepseekV3/V2ForCausalLM, and its latent cache."""

import numpy as np
import pytest
import torch

import moetrt
from moetrt.config import load_config
from moetrt.export.model import route_tokens
from moetrt.export.reference_session import ReferenceSession
from tests.checkpoints import CONFIGS, build_model, make_checkpoint
from tests.greedy import assert_greedy_agrees, greedy_with_logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, transformers model, moetrt reference loaded from its saved checkpoint)."""
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, build_model(request.param), moetrt.load_reference(directory)


def test_logits_match_transformers(pair):
    name, reference, ours = pair
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 2e-4, name


def test_greedy_continuation_matches_transformers(pair):
    name, reference, ours = pair
    prompt = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    reference.generation_config.eos_token_id = None  # run all 24 steps; EOS is just another token here
    with torch.no_grad():
        generated = reference.generate(
            prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0,
        )
    want = generated.sequences[0, prompt.shape[1] :].tolist()
    want_logits = torch.stack([step[0] for step in generated.logits])
    got, _ = greedy_with_logits(ReferenceSession(ours), [prompt[0].tolist()], max_new_tokens=24)
    assert assert_greedy_agrees(want, want_logits, got[0], name) > 0


def test_cached_decode_equals_full_forward(pair):
    name, _, ours = pair
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        logits, cache = ours.step(ids[:, :10])
        steps = [logits]
        for t in range(10, 24):
            logits, rows = ours.step(ids[:, t : t + 1], past_latents=cache)
            cache = [torch.cat([c, r]) for c, r in zip(cache, rows)]
            steps.append(logits)
    assert cache[0].shape == (24, 2, ours.config.latent_dim)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4, name


def test_left_padded_batch_equals_rows_alone(pair):
    name, _, ours = pair
    prompts = [[5, 9, 11, 40, 7, 3, 22, 8], [17, 4, 60], [33, 2, 90, 14, 6]]
    session = ReferenceSession(ours)
    batched = greedy_with_logits(session, prompts, max_new_tokens=12)
    for prompt, tokens, logits in zip(prompts, *batched):
        alone_tokens, alone_logits = greedy_with_logits(session, [prompt], max_new_tokens=12)
        assert assert_greedy_agrees(alone_tokens[0], alone_logits[0], tokens, name) > 0
        steps = min(len(tokens), len(alone_tokens[0]))
        assert np.abs(logits[:steps] - alone_logits[0][:steps]).max() <= 1e-4


def test_correction_bias_changes_v3_selection(tmp_path):
    directory = make_checkpoint(tmp_path, "v3-qlora-grouped-yarn")
    model = moetrt.load_reference(directory)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(512, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with_bias, _ = gate(x)
    without_bias, _ = route_tokens(x, gate.weight, torch.zeros_like(gate.e_score_correction_bias), model.config)
    changed = (with_bias.sort(-1).values != without_bias.sort(-1).values).any(-1).float().mean()
    assert changed > 0.05


def _v2_config(tmp_path, **overrides):
    make_checkpoint(tmp_path, "v2-group-limited", **overrides)
    return load_config(tmp_path)


@pytest.mark.parametrize("norm", [True, False])
def test_v2_router_follows_deepseek_normalisation(tmp_path, norm):
    """DeepSeek's V2 code normalises the top-k weights OR scales them; transformers' V2 ignores the flag."""
    config = _v2_config(tmp_path, norm_topk_prob=norm)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, config.hidden_size, generator=generator)
    weight = torch.randn(config.n_routed_experts, config.hidden_size, generator=generator)
    ids, weights = route_tokens(x, weight, None, config)

    scores = (x @ weight.t()).softmax(-1)
    groups = scores.view(64, config.n_group, -1).amax(-1)
    kept = groups.topk(config.topk_group, -1).indices
    allowed = torch.zeros_like(groups, dtype=torch.bool).scatter(1, kept, True)
    allowed = allowed.repeat_interleave(config.n_routed_experts // config.n_group, dim=1)
    want_ids = scores.masked_fill(~allowed, 0.0).topk(config.num_experts_per_tok, -1).indices
    want = scores.gather(1, want_ids)
    want = want / want.sum(-1, keepdim=True) if norm else want * config.routed_scaling_factor
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.allclose(weights.gather(1, order), want.gather(1, want_order), atol=1e-6)
    if norm:
        assert torch.allclose(weights.sum(-1), torch.ones(64))
