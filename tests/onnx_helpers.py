"""Driving an exported decoder graph from tests: feeds, and a plain greedy loop over ONNX Runtime."""

from __future__ import annotations

import numpy as np


def feeds(num_layers, latent_dim, ids, positions, mask, past=None, dtype=np.float32, logit_positions=None):
    batch, seq = ids.shape
    if logit_positions is None:
        logit_positions = np.broadcast_to(np.arange(seq), (batch, seq))
    out = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64),
           "attention_mask": mask.astype(np.int64), "logit_positions": np.ascontiguousarray(logit_positions, np.int64)}
    for layer in range(num_layers):
        out[f"past_latent.{layer}"] = (
            past[layer] if past is not None else np.zeros((0, batch, latent_dim), dtype=dtype)
        )
    return out


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    return ids, mask, positions


def greedy_onnx(session, num_layers, latent_dim, prompts, steps):
    """Prefill then `steps` cached decode steps; returns per prompt the tokens and the logits of each step."""
    ids, mask, positions = left_pad(prompts)
    last = np.full((len(prompts), 1), ids.shape[1] - 1)
    outputs = session.run(None, feeds(num_layers, latent_dim, ids, positions, mask, logit_positions=last))
    logits, cache = outputs[0][:, -1], outputs[1:]
    next_position = positions[:, -1] + 1
    tokens, step_logits = [], []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(token)
        step_logits.append(logits)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        outputs = session.run(None, feeds(num_layers, latent_dim, token[:, None], next_position[:, None], mask, cache))
        logits = outputs[0][:, -1]
        cache = [np.concatenate([c, n], axis=0) for c, n in zip(cache, outputs[1:])]
        next_position = next_position + 1
    tokens, step_logits = np.stack(tokens, 1), np.stack(step_logits, 1)
    return [list(t) for t in tokens], list(step_logits)
