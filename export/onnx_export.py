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
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from moetrt.atomic import check_replaceable, discard_staging, staging_dir
from moetrt.config import ModelConfig, load_config
from moetrt.errors import MoetrtError
from moetrt.export import resume
from moetrt.export.checkpoint import DTYPES, CheckpointWeights
from moetrt.export.lowering import LoweringPlan, lower
from moetrt.export.model import DeepseekForCausalLM
from moetrt.formats import (
    ATTENTION_MASK,
    DATA_FILE,
    EXPORT_JSON,
    MODEL_FILE,
    MTP_ATTENTION_MASK,
    PAST_LATENT_PREFIX,
    TOKENIZER_FILES,
    ExportInfo,
    NodeRef,
    Quantization,
    graph_input_names,
    graph_io,
    graph_output_names,
    write_export_info,
)
from moetrt.export.quantized import check_quantizable, finish_export
from moetrt.export.streaming import (
    WeightStream,
    allocate_large_buffers_by_mmap,
    bind_weights,
    fold_weights,
    hollow_model,
    reads_lazy_weight,
)
from moetrt.progress import byte_progress, note, stage
from moetrt.quantization import QuantScheme
from moetrt.settings import OrtOptions

OPSET = 21


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


class SpeculativeGraph(nn.Module):
    """`DeepseekForCausalLM.speculative_step` with flat tensor inputs and outputs (formats.py's order: the MTP
    inputs and the MTP module's latent layer after the main layers'); the draft leaves as token ids."""

    def __init__(self, model: DeepseekForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, logit_positions, *rest):
        *past_latents, mtp_input_ids, mtp_attention_mask, draft_positions, mtp_past = rest
        logits, new_latents, mtp_rows, draft_logits = self.model.speculative_step(
            input_ids, position_ids, attention_mask, list(past_latents), logit_positions, mtp_input_ids,
            mtp_attention_mask, mtp_past, draft_positions)
        return (logits, *new_latents, mtp_rows, draft_logits.argmax(-1))


def trace(model: DeepseekForCausalLM, stream: WeightStream | None = None) -> "onnx_ir.Model":  # noqa: F821
    """torch.onnx (dynamo) export with dynamic batch, seq and past_len; returns the onnx_ir model. A model with
    an MTP module (`model.mtp`) traces to the speculative graph (SpeculativeGraph).

    stream: `model` is hollow (export/streaming.py) and its weights come from `stream` when the graph is saved.
    Either way the ops that read only weights are folded lazily (streaming.fold_weights) before onnxscript's
    optimizer (what torch.onnx's `optimize=True` runs) optimizes the rest."""
    config = model.config
    layers = config.num_hidden_layers
    mtp = len(model.mtp)
    batch, seq, past = 2, 3, 5  # distinct sizes, so no dimension gets specialised to another
    dtype = model.dtype
    example = (
        torch.randint(0, config.vocab_size, (batch, seq)),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.tensor([[seq - 1]] * batch),
        *(torch.zeros(past, batch, config.latent_dim, dtype=dtype) for _ in range(layers)),
    )
    dim = torch.export.Dim
    batch_dim, seq_dim = dim("batch"), dim("seq")
    latent_dims = tuple({0: dim.AUTO, 1: batch_dim} for _ in range(layers))
    dynamic_shapes = {
        "input_ids": {0: batch_dim, 1: seq_dim},
        "position_ids": {0: batch_dim, 1: seq_dim},
        "attention_mask": {0: batch_dim, 1: dim.AUTO},
        "logit_positions": {0: batch_dim, 1: dim("n_logits")},
    }
    if mtp:
        mtp_seq = seq - 1  # the module runs on a prefix of the positions: a size of its own, not seq's
        example = (*example, torch.full((batch, mtp_seq), -1, dtype=torch.int64),
                   torch.ones(batch, past + mtp_seq, dtype=torch.int64), torch.tensor([[mtp_seq - 1]] * batch),
                   torch.zeros(past, batch, config.latent_dim, dtype=dtype))
        dynamic_shapes["rest"] = (*latent_dims, {0: batch_dim, 1: dim("mtp_seq")}, {0: batch_dim, 1: dim.AUTO},
                                  {0: batch_dim, 1: dim("n_drafts")}, {0: dim.AUTO, 1: batch_dim})
    else:
        dynamic_shapes["past_latents"] = latent_dims
    inputs, outputs = graph_input_names(layers, mtp), graph_output_names(layers, mtp)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            (SpeculativeGraph if mtp else DecoderGraph)(model),
            example,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    graph = program.model
    _name_dynamic_dims(graph, layers + mtp)
    _forget_lifted_inputs(graph)
    if stream is not None:
        bind_weights(graph, stream)
    fold_weights(graph)
    _optimize(graph)
    return graph


def _optimize(graph) -> None:
    """What torch.onnx.export(optimize=True) runs (onnxscript's torch 2.8+ API: optimize_ir, then its ONNX
    fusions), leaving the lazily folded weights to be read when saved."""
    import onnxscript
    from onnxscript.rewriter import onnx_fusions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize_ir(graph, should_fold=lambda node: False if reads_lazy_weight(node) else None)
        onnx_fusions.fuse(graph)


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
        if value.name == ATTENTION_MASK:
            value.shape = ir.Shape([value.shape[0], "total_len"])
        elif value.name == MTP_ATTENTION_MASK:
            value.shape = ir.Shape([value.shape[0], "mtp_total_len"])
        elif value.name.startswith(PAST_LATENT_PREFIX):
            value.shape = ir.Shape(["past_len", *value.shape[1:]])


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    target: str | LoweringPlan = "ort",
    dtype: str = "float32",
    ort: OrtOptions | None = None,
    quantize: QuantScheme | None = None,
    mtp: bool = False,
    resume_from: list[Path] | None = None,
    keep_journal: bool = False,
) -> Path:
    """Export a checkpoint to `out_dir/model.onnx` (+ `model.onnx.data`, `export.json`, tokenizer files).

    target: a LoweringPlan, or a target name: "ort" (ONNX Runtime's com.microsoft::MoE or moetrt's CPU expert
    kernel, as the ONNX Runtime backend plans it from `ort`: export/ort/plan.py), "trt" (the TensorRT plugin
    nodes) or "onnx" (standard ops only). The directory is written under a temporary name and renamed when
    complete; returns it. quantize: hold the weights block-quantized (export/quantized.py says which and how they
    export). mtp: trace the speculative graph with the checkpoint's multi-token-prediction module (a draft per
    call, for `--speculative mtp`). Raises MoetrtError for an unknown target or dtype, a checkpoint it cannot read, or quantization of a
    model that does not compute in float32.

    Resuming (export/resume.py): the weights are journaled as they are written; the weights that an earlier export
    into `out_dir` wrote before it was killed, or that the staging directories in `resume_from` hold (an earlier
    build's, adopted by build_engine), are copied instead of computed again when the fingerprint matches, and a
    finished export among `resume_from` is used whole. `keep_journal`: leave the journal in the finished export
    (build_engine's, so that a build killed after the export resumes from it), else it is removed.
    """
    from moetrt.export.backends import plan_target

    if dtype not in DTYPES:
        raise MoetrtError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_replaceable(out_dir, EXPORT_JSON, "export", (checkpoint_dir,))
    if quantize is not None:
        check_quantizable(dtype)
    plan = target if isinstance(target, LoweringPlan) else plan_target(target, load_config(checkpoint_dir), dtype,
                                                                        ort or OrtOptions(), quantize)
    if plan.target == "ort":
        note(f"experts: {plan.moe_kernel} ({plan.why})")
    allocate_large_buffers_by_mmap()
    expected = resume.fingerprint(checkpoint_dir, dtype, quantize, plan, mtp)
    adopted = resume.adopt_stale(out_dir)
    candidates = [*(resume_from or []), *adopted]
    finished = next(filter(None, (resume.finished_export(candidate, expected) for candidate in candidates)), None)
    with staging_dir(out_dir, keep_on_interrupt=True) as work:
        if finished is not None:
            note(f"resuming: the export an earlier build finished ({finished}) is used as it is")
            for item in finished.iterdir():
                os.replace(item, work / item.name)
        else:
            _export_into(work, checkpoint_dir, plan, dtype, quantize, mtp, expected, candidates)
        if not keep_journal:
            (work / resume.JOURNAL).unlink(missing_ok=True)
    for staged in adopted:
        discard_staging(staged)
    return out_dir


def _export_into(work: Path, checkpoint_dir: Path, plan: LoweringPlan, dtype: str, quantize: QuantScheme | None,
                 mtp: bool, expected: dict, candidates: list[Path]) -> None:
    """export_onnx's work, in its staging directory `work`: trace, lower, write the weights (journaled; those that a
    partial export among `candidates` holds are copied from it), tokenizer and export.json."""
    with CheckpointWeights(checkpoint_dir, dtype=dtype, quantize=quantize, mtp=mtp) as weights, \
            stage("exporting", total=3) as advance:
        config, quantization = weights.config, weights.quantization
        advance(0, "tracing to ONNX (no weights loaded)")
        stream = WeightStream(weights)
        graph = trace(hollow_model(weights), stream)
        if quantization is not None:
            finish_export(graph)
        advance(1, f"lowering for {plan.target}")
        lower(graph, plan)
        earlier = resume.partial_export(candidates, expected)
        if earlier is not None:
            count, nbytes, damaged = resume.reuse_tensors(graph, earlier)
            note(f"resuming: {count} tensors ({nbytes / 1e6:,.0f} MB) are copied from what an earlier build wrote "
                 f"before it stopped ({earlier.path.parent}); the rest is read from the checkpoint"
                 + (f" ({damaged} journaled tensors no longer had their checksum and are computed again)"
                    if damaged else ""))
        elif candidates:
            note(f"not resuming: what an earlier build left ({', '.join(map(str, candidates))}) does not match this "
                 "build (another checkpoint, other options or another moetrt) or holds no finished tensor; it is "
                 "removed once this build is done")
        advance(1, "writing weights")
        save_model(graph, work / MODEL_FILE, progress=True, journal=resume.JournalWriter(work, DATA_FILE, expected))
        advance(1, "done")
    copy_tokenizer_files(checkpoint_dir, work)
    write_export_info(work, export_info(config, plan, dtype, checkpoint_dir, work, quantization, int(mtp)))


def save_model(model, path: Path, progress: bool = False, journal: resume.JournalWriter | None = None) -> None:
    """Save with every initializer in one external data file beside the graph (no 2 GB protobuf limit), written
    tensor by tensor (lazy weights are read, converted and written one at a time). progress: report the bytes
    written with a rate and ETA. journal: record what is on disk as it goes (export/resume.py)."""
    import onnx_ir as ir

    if not progress and journal is None:
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
        return
    names = {id(value.const_value): name for name, value in model.graph.initializers.items()}
    sizes = [value.const_value.nbytes for value in model.graph.initializers.values()
             if value.const_value is not None and value.const_value.nbytes >= 1024]

    def written(tensor, info, advance) -> None:
        if journal is not None and id(tensor) in names:
            journal.record(names[id(tensor)], info.offset, tensor.nbytes)
        advance(tensor.nbytes)

    bar = byte_progress(sum(sizes), "writing weights") if progress else contextlib.nullcontext(lambda _: None)
    with bar as advance:
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024,
                callback=lambda tensor, info: written(tensor, info, advance))
    if journal is not None:
        journal.finish()


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, "config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def export_info(config: ModelConfig, plan: LoweringPlan, dtype: str, checkpoint_dir: Path, work: Path,
                quantization: Quantization | None = None, mtp_layers: int = 0) -> ExportInfo:
    from moetrt.export.checkpoint import checkpoint_fingerprint
    from moetrt.plugins.spec import ROUTED_EXPERTS
    from moetrt.versions import tool_versions

    return ExportInfo(
        target=plan.target, dtype=dtype, opset=OPSET, source=str(checkpoint_dir.resolve()),
        tokenizer=(work / "tokenizer.json").is_file(), io=graph_io(config, dtype, mtp_layers),
        node=NodeRef(ROUTED_EXPERTS.op_type, ROUTED_EXPERTS.domain, ROUTED_EXPERTS.version), model_config=config,
        versions=tool_versions(), expert_slices=plan.expert_slices, moe_kernel=plan.moe_kernel,
        quantization=quantization, checkpoint=checkpoint_fingerprint(checkpoint_dir),
    )
