"""The `moetrt` command line: each command wires options to the library function a user would call.

Imports happen inside the commands, so inference commands never load torch and every command starts fast.
User errors (MoetrtError) print one line and exit 1; `--verbose` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional
import typer

from moetrt.errors import MoetrtError

app = typer.Typer(
    help="Compile DeepSeek-V3/R1-class MoE checkpoints into engines and run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_verbose = False


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors."),
) -> None:
    global _verbose
    _verbose = verbose or _verbose


def _human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@app.command()
def info(
    source: Path = typer.Argument(..., help="Checkpoint directory, its config.json, or an engine directory."),
    context: int = typer.Option(32768, min=1, help="Tokens of context per sequence for the GPU estimate."),
    batch: int = typer.Option(1, min=1, help="Concurrent sequences for the GPU estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Layers, experts, routing, parameters, weight bytes, KV-cache bytes and GPUs needed."""
    from moetrt.export.config import load_config
    from moetrt.export.info import describe

    summary = describe(load_config(source), context=context, batch=batch)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    kv = summary["kv_bytes_per_token"]
    weights = summary["weight_bytes"]
    lines = [
        f"model            {summary['model_type']}: {summary['layers']} layers "
        f"({summary['dense_layers']} dense, {summary['moe_layers']} MoE)"
        + (f", {summary['mtp_layers_skipped']} MTP layer not loaded" if summary["mtp_layers_skipped"] else ""),
        f"experts          {summary['routed_experts']} routed + {summary['shared_experts']} shared, "
        f"{summary['experts_per_token']} active per token",
        f"routing          {summary['router']}, scale {summary['routed_scaling_factor']:g}, "
        f"normalised {summary['norm_topk_prob']}",
        f"attention        {summary['attention']}, rope {summary['rope']}",
        f"parameters       {_human_count(summary['total_params'])} total, "
        f"{_human_count(summary['active_params'])} active per token",
        f"weights          bf16 {_human_bytes(weights['bf16'])}, fp8 with block scales "
        f"{_human_bytes(weights['fp8'])} (checkpoint stored as {summary['stored_as']})",
        f"KV cache / token MLA latent {_human_bytes(kv['latent'])} vs per-head {_human_bytes(kv['per_head'])} "
        f"({kv['per_head'] / kv['latent']:.0f}x), bf16",
        f"141 GB GPUs      bf16 {summary['gpus_141gb']['bf16']}, fp8 {summary['gpus_141gb']['fp8']} "
        f"(weights + latent cache for {summary['batch']} x {summary['context']} tokens, 90% usable)",
    ]
    typer.echo("\n".join(lines))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory (safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to write."),
    target: str = typer.Option("ort", help="Lowering of the expert dispatch: trt (plugin), ort, onnx (portable)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
) -> None:
    """Trace a checkpoint to ONNX with the latent KV cache and one expert-dispatch node per MoE layer."""
    from moetrt.export.onnx_export import export_onnx

    out = export_onnx(checkpoint, output, target=target, dtype=dtype)
    typer.echo(f"exported {checkpoint} -> {out} (target {target}, {dtype})")


@app.command("build-engine")
def build_engine_command(
    source: Path = typer.Argument(..., help="Checkpoint directory (exported first) or export directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Engine directory to write."),
    backend: str = typer.Option("auto", help="auto (TensorRT with a GPU, else ONNX Runtime), trt or ort."),
    dtype: Optional[str] = typer.Option(None, help="float32 (default), float16 or bfloat16."),
    max_batch: int = typer.Option(8, help="Largest batch the engine serves."),
    max_seq: Optional[int] = typer.Option(None, help="Most tokens per call, the prefill chunk (default 512)."),
    max_context: int = typer.Option(4096, help="Most cached positions per sequence."),
    portable: bool = typer.Option(False, help="Build from the standard-ops lowering (no plugin)."),
) -> None:
    """Build a self-describing engine directory (manifest.json, graph, tokenizer files)."""
    import time

    from moetrt.export.engine import build_engine

    start = time.perf_counter()
    engine = build_engine(source, output, backend=backend, dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                          max_context=max_context, portable=portable)
    typer.echo(f"built {engine} in {time.perf_counter() - start:.1f}s")


@app.command()
def verify(
    engine: Path = typer.Argument(..., help="Engine directory."),
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint to compare against (fidelity check)."),
    integrity: bool = typer.Option(False, "--integrity", help="Hash every artifact against the manifest."),
    prompts: int = typer.Option(8, help="Prompts for the fidelity check."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check an engine: its manifest (and hashes), and with a checkpoint its fidelity to the torch reference."""
    from moetrt.runtime.manifest import load_manifest

    manifest = load_manifest(engine, integrity=integrity)
    checks = {"manifest": "ok", "integrity": "ok" if integrity else "not checked"}
    if checkpoint is None:
        typer.echo(json.dumps(checks) if as_json else "\n".join(f"{k}: {v}" for k, v in checks.items()))
        return
    from moetrt.export.verify import verify_engine

    report = verify_engine(manifest.directory, checkpoint, prompts=prompts)
    typer.echo(json.dumps({**checks, **report.to_dict()}, indent=2) if as_json else report.describe())
    if not report.passed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: one-line errors for user mistakes, tracebacks for bugs."""
    global _verbose
    _verbose = os.environ.get("MOETRT_VERBOSE", "") not in ("", "0")
    try:
        app()
    except MoetrtError as error:
        if _verbose:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
