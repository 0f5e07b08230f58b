"""The torch reference model as a runtime Session, so the one generation loop (runtime/generate.py) drives it
like any engine: `moetrt eval CHECKPOINT`, `moetrt verify`, the benchmarks and the tests all go through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moetrt.errors import MoetrtError
from moetrt.progress import note
from moetrt.export.checkpoint import load_reference
from moetrt.export.model import DeepseekForCausalLM
from moetrt.runtime.evaluate import evaluate_session
from moetrt.runtime.kv_cache import LatentKVCache
from moetrt.tasks.chat import ChatTokenizer
from moetrt.tasks.evaluate import EvalReport, check_options


class ReferenceSession:
    """`DeepseekForCausalLM.step` behind the runtime's Session interface, over a float32 host LatentKVCache.

    Inputs reach torch as zero-copy views of the caller's numpy arrays (the cache's past rows included); a
    model of another dtype than float32 gets the past converted per call.
    """

    backend = "torch"

    def __init__(self, model: DeepseekForCausalLM, weights=None):
        self.model = model
        self._weights = weights  # the open CheckpointWeights of a streamed model, closed with the session
        self.config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.latent_dim = model.config.latent_dim
        self.vocab_size = model.config.vocab_size
        self._dtype = model.dtype

    def new_cache(self, slots: int, max_context: int) -> LatentKVCache:
        return LatentKVCache(self.num_layers, self.latent_dim, slots, max_context, np.float32)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
            logit_positions: np.ndarray, past: list[np.ndarray],
            new_rows: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Session.run (runtime/session.py): ids/positions `[B, S]`, mask `[B, P+S]`, logit_positions `[B, N]`
        (int64), past per layer `[P, B, D]` float32. Returns logits `[B, N, vocab]` float32 and the new rows
        `[S, B, D]` (written into `new_rows` when given)."""
        with torch.inference_mode():
            logits, rows = self.model.step(
                _as_tensor(input_ids),
                _as_tensor(position_ids),
                _as_tensor(attention_mask),
                [_as_tensor(layer, np.float32).to(self._dtype) for layer in past],
                _as_tensor(logit_positions),
            )
            if new_rows is None:
                new_rows = [layer.float().numpy() for layer in rows]
            else:
                for out, layer in zip(new_rows, rows):
                    torch.from_numpy(out).copy_(layer)
            return logits.float().numpy(), new_rows

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
            self._weights = None

    def __enter__(self) -> ReferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_tensor(array: np.ndarray, dtype=np.int64) -> torch.Tensor:
    # torch.from_numpy shares the array's memory, which torch may write: read-only views (np.broadcast_to) are
    # copied once instead
    array = np.asarray(array, dtype=dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# The reference is streamed layer by layer (export/streaming_reference.py) when its float32 weights would take more
# than this share of the memory available now.
STREAM_ABOVE_AVAILABLE = 0.5


def load_reference_session(checkpoint_dir: str | Path, dtype: str = "float32",
                           stream: bool | None = None) -> ReferenceSession:
    """The reference model of a Hugging Face checkpoint directory (on the CPU) as a Session.

    stream: compute it layer by layer from the memory-mapped shards (float32 only; slow, but memory stays about one
    layer), or load it whole; None streams when the float32 weights exceed STREAM_ABOVE_AVAILABLE of the memory
    available (said in a note)."""
    from moetrt.config import load_config
    from moetrt.export.checkpoint import CheckpointWeights
    from moetrt.export.info import count_parameters
    from moetrt.hardware import available_memory

    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise MoetrtError(f"{directory} is not a directory: point at a checkpoint directory")
    why = "as asked"
    if stream is None:
        needed = count_parameters(load_config(directory)).total * 4
        stream = dtype == "float32" and needed > STREAM_ABOVE_AVAILABLE * available_memory()
        why = f"its float32 weights, {needed / 1e9:.1f} GB, exceed half the {available_memory() / 1e9:.1f} GB available"
    if stream:
        note(f"reference: streamed layer by layer from the checkpoint's shards ({why})")
    if not stream:
        return ReferenceSession(load_reference(directory, dtype=dtype))
    if dtype != "float32":
        raise MoetrtError(f"the streamed reference computes in float32, not {dtype}")
    from moetrt.export.streaming import allocate_large_buffers_by_mmap
    from moetrt.export.streaming_reference import streamed_model

    allocate_large_buffers_by_mmap()  # each layer's freed weights go back to the system, not to a fragmenting heap
    weights = CheckpointWeights(directory)
    return ReferenceSession(streamed_model(weights), weights)


def evaluate_checkpoint(
    checkpoint_dir: str | Path, task: str = "arithmetic", n: int = 500, seed: int = 0, batch_size: int = 64
) -> EvalReport:
    """`moetrt eval CHECKPOINT`: held-out accuracy of the fp32 reference, evaluated as an engine is."""
    check_options(task, n, batch_size)
    session = load_reference_session(checkpoint_dir)
    return evaluate_session(session, ChatTokenizer.load(checkpoint_dir), task, n, seed, batch_size)
