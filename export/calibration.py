"""The build's overflow check: a few calibration prompts through the staged engine, refused when any logit is NaN
or inf (a half-precision engine whose activations leave its dtype's range); its latent rows say where."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError

PROMPTS = 4
PROMPT_TOKENS = 32
SEED = 0
LARGEST = {"float16": 65504.0}  # finite magnitudes the dtype holds, where it is narrower than float32


def check_overflow(engine_dir: Path) -> None:
    """Score random calibration prompts (every position) on the engine at `engine_dir`, manifest written; raise
    MoetrtError naming the dtype, the layer by which the stream overflowed, and the fix."""
    from moetrt.runtime.backends import get_backend
    from moetrt.runtime.manifest import load_manifest

    manifest = load_manifest(engine_dir)
    profile = manifest.profile
    session = get_backend(manifest.backend).open_session(manifest)
    try:
        logits, rows = _score(session, profile.max_batch, min(profile.seq, profile.max_context, PROMPT_TOKENS))
    finally:
        close = getattr(session, "close", None)  # sessions holding device memory have one
        if close is not None:
            close()
    bad = int(logits.size - np.isfinite(logits).sum())
    if bad == 0:
        return
    dtype = manifest.dtype
    limit = f" ({dtype} holds magnitudes up to {LARGEST[dtype]:g})" if dtype in LARGEST else ""
    raise MoetrtError(f"the {dtype} engine overflows on {logits.shape[0]} calibration prompts:{_where(rows)} "
                      f"{bad} of {logits.size} logits are NaN or inf{limit}; build it in float32 (--dtype float32)")


def _where(rows: list) -> str:
    """Where the stream overflowed, from the per-layer latent rows (host arrays; device rows are not read)."""
    if not all(isinstance(r, np.ndarray) for r in rows):
        return ""
    # Layer i's latent rows come from the stream entering it, so the first non-finite ones show the stream had
    # overflowed by the end of layer i-1 (or earlier: ONNX Runtime's fused add + norm sums in fp32).
    first = next((i for i, r in enumerate(rows) if not np.isfinite(r).all()), len(rows))
    if first == 0:
        return " the embeddings are not finite and"
    return f" the residual stream has overflowed by the end of model.layers.{first - 1} and"


def _score(session, max_batch: int, tokens: int) -> tuple[np.ndarray, list]:
    """Logits `[B, S, vocab]` as float32 and the per-layer latent rows of one scoring call over random prompts."""
    batch = min(PROMPTS, max_batch)
    ids = np.random.default_rng(SEED).integers(0, session.vocab_size, (batch, tokens), dtype=np.int64)
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(tokens, dtype=np.int64), (batch, tokens)))
    cache = session.new_cache(batch, tokens)
    mask = cache.attention_mask(tokens, np.ones((batch, tokens), np.int64))
    logits, rows = session.run(ids, positions, mask, positions, cache.past(), cache.reserve(tokens))
    return np.asarray(logits, dtype=np.float32), list(rows)
