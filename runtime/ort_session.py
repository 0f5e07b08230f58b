"""ONNX Runtime session over an engine's offline-optimised graph (numpy in, numpy out, no torch).

The caller owns the latent cache: `past` arrays are bound as inputs by pointer and the new rows are
written by ONNX Runtime straight into caller-provided arrays (slices of the preallocated cache).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from moetrt.errors import MoetrtError
from moetrt.runtime.kv_cache import LatentKVCache
from moetrt.runtime.manifest import Manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtSession:
    backend = "ort"

    def __init__(self, manifest: Manifest, threads: int | None = None):
        if manifest.dtype not in NUMPY_DTYPES:
            raise MoetrtError(f"ONNX Runtime sessions run float32 or float16 engines, not {manifest.dtype}")
        config = manifest.model_config
        self.num_layers = config.num_hidden_layers
        self.latent_dim = config.latent_dim
        self.vocab_size = config.vocab_size
        self.dtype = np.dtype(NUMPY_DTYPES[manifest.dtype])
        ort_info = manifest.data["ort"]
        options = ort.SessionOptions()
        # The graph was optimised when the engine was built; do not pay for it again at every load.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = [ort_info["provider"]] + (["CPUExecutionProvider"] if ort_info["provider"] != "CPUExecutionProvider" else [])
        self._session = ort.InferenceSession(str(manifest.path(ort_info["model"])), options, providers=providers)
        self._device = "cuda" if ort_info["provider"] == "CUDAExecutionProvider" else "cpu"

    def new_cache(self, slots: int, max_context: int) -> LatentKVCache:
        return LatentKVCache(self.num_layers, self.latent_dim, slots, max_context, self.dtype)

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        logit_positions: np.ndarray,
        past: list[np.ndarray],
        new_rows: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call. ids/positions `[B, S]`, mask `[B, P+S]`, logit_positions `[B, N]` (all int64),
        past per layer `[P, B, D]` (C-contiguous). New rows go into `new_rows` (`[S, B, D]` each) when given.
        Returns logits `[B, N, vocab]` and the new rows.
        """
        binding = self._session.io_binding()
        for name, array in (("input_ids", input_ids), ("position_ids", position_ids),
                            ("attention_mask", attention_mask), ("logit_positions", logit_positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for layer, array in enumerate(past):
            binding.bind_cpu_input(f"past_latent.{layer}", array)
        binding.bind_output("logits", self._device)
        for layer in range(self.num_layers):
            name = f"new_latent.{layer}"
            if new_rows is None:
                binding.bind_output(name, self._device)
            else:
                out = new_rows[layer]
                binding.bind_output(name, "cpu", 0, self.dtype, list(out.shape), out.ctypes.data)
        self._session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        return logits, (new_rows if new_rows is not None else [value.numpy() for value in outputs[1:]])
