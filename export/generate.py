"""Greedy generation with the torch reference model and its latent cache (for eval, verify and tests).

Prompts of different lengths are left-padded; each row gets its own positions and an attention mask, the
same cache interface the exported graph uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moetrt.export.model import DeepseekForCausalLM


@dataclass
class GreedyOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including a stop token
    logits: list[torch.Tensor] = field(default_factory=list)  # per prompt `[steps, vocab]` when requested


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids `[B, S]` for left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def prefill(model: DeepseekForCausalLM, ids, mask, positions) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits, cache = model.step(ids, positions, mask)
    return logits[:, -1], cache


def decode_one_token(model, token, mask, positions, cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits, rows = model.step(token[:, None], positions[:, None], mask, cache)
    return logits[:, -1], [torch.cat([past, new], dim=0) for past, new in zip(cache, rows)]


@torch.inference_mode()
def generate_greedy(
    model: DeepseekForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    return_logits: bool = False,
) -> GreedyOutput:
    """Greedy continuation of each prompt (batched), stopping a row at a stop id or after max_new_tokens."""
    ids, mask, positions = left_pad(prompts)
    logits, cache = prefill(model, ids, mask, positions)
    next_position = positions[:, -1] + 1
    batch = len(prompts)
    out = GreedyOutput(tokens=[[] for _ in range(batch)], logits=[[] for _ in range(batch)] if return_logits else [])
    done = torch.zeros(batch, dtype=torch.bool)
    stops = torch.tensor(stop_ids, dtype=torch.long)
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1)
        for row in range(batch):
            if not done[row]:
                out.tokens[row].append(int(token[row]))
                if return_logits:
                    out.logits[row].append(logits[row].float())
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        logits, cache = decode_one_token(model, token, mask, next_position, cache)
        next_position = next_position + 1
    if return_logits:
        out.logits = [torch.stack(rows) for rows in out.logits]
    return out
