"""Trace the reference model to one ONNX decoder graph (prefill and decode) with the MLA latent cache.

The graph's cache interface, fixed here for every later piece:

- inputs: `input_ids [batch, seq]` int64, `position_ids [batch, seq]` int64 (per row), `attention_mask
  [batch, past_len + seq]` int64 (1 real token, 0 padding), and per layer `past_latent.{i} [past_len, batch,
  latent_dim]`: the cache of the tokens so far, position-major so "the first P positions" of a preallocated
  `[max_context, batch, latent_dim]` buffer is a contiguous prefix.
- `logit_positions [batch, n_logits]` int64: the positions in `seq` that get logits (all for scoring, the
  last for a prefill, none for a prefill chunk before the last).
- outputs: `logits [batch, n_logits, vocab]` and per layer only the new rows, `new_latent.{i} [seq, batch,
  latent_dim]`, which the runtime writes into its cache in place.

Routing is standard ONNX ops; each MoE layer's routed experts are ONE plugin node, lowered per target.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from moetrt.atomic import staging_dir, write_json
from moetrt.errors import MoetrtError
from moetrt.export.checkpoint import DTYPES, load_reference
from moetrt.export.config import ModelConfig
from moetrt.export.model import DeepseekForCausalLM
from moetrt.progress import note, stage

TARGETS = ("trt", "ort", "onnx")
OPSET = 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORT_JSON = "export.json"
# Files that make an export (and later an engine) self-sufficient for serving.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
EXPORT_FORMAT_VERSION = 1


class DecoderGraph(nn.Module):
    """`DeepseekForCausalLM.step` with flat tensor inputs and outputs, as the ONNX graph sees it."""

    def __init__(self, model: DeepseekForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, logit_positions, *past_latents):
        logits, new_latents = self.model.step(
            input_ids, position_ids, attention_mask, list(past_latents), logit_positions
        )
        return (logits, *new_latents)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position_ids", "attention_mask", "logit_positions"]
    inputs += [f"past_latent.{i}" for i in range(num_layers)]
    outputs = ["logits"] + [f"new_latent.{i}" for i in range(num_layers)]
    return inputs, outputs


def io_description(config: ModelConfig, dtype: str) -> dict:
    """The graph's inputs and outputs with symbolic shapes, for export.json and engine manifests."""
    layers = range(config.num_hidden_layers)
    latent = {"dtype": dtype, "shape": ["past_len", "batch", config.latent_dim]}
    new = {"dtype": dtype, "shape": ["seq", "batch", config.latent_dim]}
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_len"]},
            {"name": "logit_positions", "dtype": "int64", "shape": ["batch", "n_logits"]},
            *({"name": f"past_latent.{i}", **latent} for i in layers),
        ],
        "outputs": [
            {"name": "logits", "dtype": dtype, "shape": ["batch", "n_logits", config.vocab_size]},
            *({"name": f"new_latent.{i}", **new} for i in layers),
        ],
        "cache": {
            "layout": "position-major [past_len, batch, latent_dim] per layer",
            "latent_dim": config.latent_dim,
            "num_layers": config.num_hidden_layers,
            "kv_lora_rank": config.kv_lora_rank,
            "rope_dim": config.qk_rope_head_dim,
            "input_prefix": "past_latent.",
            "output_prefix": "new_latent.",
            "notes": (
                "row = [RMSNorm(compressed kv) (kv_lora_rank) | RoPE'd shared key (rope_dim)]; total_len = "
                "past_len + seq; the graph returns only the seq new rows, the caller appends them in place"
            ),
        },
    }


def trace(model: DeepseekForCausalLM) -> "onnx_ir.Model":  # noqa: F821
    """torch.onnx (dynamo) export with dynamic batch, seq and past_len; returns the onnx_ir model."""
    config = model.config
    layers = config.num_hidden_layers
    batch, seq, past = 2, 3, 5  # distinct sizes, so no dimension gets specialised to another
    dtype = model.lm_head.weight.dtype
    example = (
        torch.randint(0, config.vocab_size, (batch, seq)),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.tensor([[seq - 1]] * batch),
        *(torch.zeros(past, batch, config.latent_dim, dtype=dtype) for _ in range(layers)),
    )
    dim = torch.export.Dim
    batch_dim, seq_dim = dim("batch"), dim("seq")
    dynamic_shapes = {
        "input_ids": {0: batch_dim, 1: seq_dim},
        "position_ids": {0: batch_dim, 1: seq_dim},
        "attention_mask": {0: batch_dim, 1: dim.AUTO},
        "logit_positions": {0: batch_dim, 1: dim("n_logits")},
        "past_latents": tuple({0: dim.AUTO, 1: batch_dim} for _ in range(layers)),
    }
    inputs, outputs = io_names(layers)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            DecoderGraph(model),
            example,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    _name_dynamic_dims(program.model, layers)
    _forget_lifted_inputs(program.model)
    return program.model


def _forget_lifted_inputs(model) -> None:
    """onnx_ir's graph-input list keeps zero-count keys for the weights torch.onnx lifted out of the inputs,
    which would pin every original weight through lowering (+0.6x peak memory for the ort target)."""
    for io in (model.graph.inputs, model.graph.outputs):
        counter = getattr(io, "_ref_counter", None)
        if counter is not None:
            for value in [value for value, count in counter.items() if count <= 0]:
                del counter[value]


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints its progress to stdout; keep stdout for the commands' own output."""
    import io
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _name_dynamic_dims(model, layers: int) -> None:
    """Give the dims torch.export left anonymous ("s53") the names export.json documents."""
    import onnx_ir as ir

    for value in model.graph.inputs:
        if value.name == "attention_mask":
            value.shape = ir.Shape([value.shape[0], "total_len"])
        elif value.name.startswith("past_latent."):
            value.shape = ir.Shape(["past_len", *value.shape[1:]])


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    target: str = "ort",
    dtype: str = "float32",
    expert_slices: int | None = None,
    moe_kernel: str = "auto",
) -> Path:
    """Export a checkpoint to `out_dir/model.onnx` (+ `model.onnx.data`, `export.json`, tokenizer files).

    target: "ort" (ONNX Runtime's com.microsoft::MoE), "trt" (the TensorRT plugin node) or "onnx" (standard
    ops only). expert_slices (ort only): sub-experts per expert that balance the CPU MoE kernel's threads;
    None picks one per CPU thread (1 for a GPU). moe_kernel (ort only): "onnxruntime" (its MoE op), "moetrt"
    (moetrt's CPU expert kernel, plugins/cpu_experts.c) or "auto" (moetrt's for float32 experts of 1 MiB and up
    on the CPU; see `export/passes/ort.py`). The directory is written under a temporary name and renamed
    when complete; returns it.
    """
    from moetrt.export.passes import lower

    if target not in TARGETS:
        raise MoetrtError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise MoetrtError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    with staging_dir(out_dir) as work:
        with stage("exporting", total=4) as advance:
            advance(0, "loading checkpoint")
            model = load_reference(checkpoint_dir, dtype=dtype)
            config = model.config
            kernel, why = "none", ""
            if target != "ort":
                expert_slices = 1
            else:
                from moetrt.export.engine import ort_provider
                from moetrt.export.passes.ort import choose_moe_kernel, default_expert_slices

                if expert_slices is None:
                    expert_slices = default_expert_slices(config.moe_intermediate_size)
                kernel, why = choose_moe_kernel(moe_kernel, config.hidden_size, config.moe_intermediate_size,
                                                expert_slices, dtype, ort_provider() == "CPUExecutionProvider")
                note(f"experts: {kernel} ({why})")
            advance(1, "tracing to ONNX")
            graph = trace(model)
            del model  # the graph holds the weights now; lowering can then free what it replaces
            gc.collect()
            advance(1, f"lowering for {target}")
            lower(graph, target, expert_slices=expert_slices, moe_kernel=kernel if target == "ort" else "onnxruntime")
            advance(1, "saving")
            save_model(graph, work / MODEL_FILE)
            advance(1, "done")
        copy_tokenizer_files(checkpoint_dir, work)
        description = export_description(config, target, dtype, checkpoint_dir, work)
        write_json(work / EXPORT_JSON, {**description, "expert_slices": expert_slices, "moe_kernel": kernel})
    return out_dir


def save_model(model, path: Path) -> None:
    """Save with every initializer in one external data file beside the graph (no 2 GB protobuf limit)."""
    import onnx_ir as ir

    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, "config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def export_description(config: ModelConfig, target: str, dtype: str, checkpoint_dir: Path, work: Path) -> dict:
    from moetrt.versions import tool_versions
    from moetrt.plugins.spec import MOE_DISPATCH

    return {
        "format": "moetrt-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "target": target,
        "dtype": dtype,
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE,
        "opset": OPSET,
        "source": str(checkpoint_dir.resolve()),
        "tokenizer": (work / "tokenizer.json").is_file(),
        **io_description(config, dtype),
        "plugin": {"op_type": MOE_DISPATCH.op_type, "domain": MOE_DISPATCH.domain, "version": MOE_DISPATCH.version},
        "model_config": config.to_dict(),
        "versions": tool_versions(),
    }
