"""Cut an `ort` export lowered with `moe_kernel="moetrt"` into ONNX Runtime segments around its expert nodes.

ONNX Runtime cannot run `moetrt.cpu::Experts` (moetrt's CPU expert kernel). The graph is cut at those nodes:
segment 0 runs from the graph inputs to the first expert node's inputs, segment k from the (k-1)-th expert
node's output to the k-th's inputs, the last one on to the logits. Every node goes to the earliest segment
whose values it needs, so a value computed once (rotary tables, the attention mask) is passed on to the
segments that use it rather than recomputed. Nodes that read only initializers and constants (constants, and a
quantized export's DequantizeLinear of a weight) are copied into each segment that uses them: a dequantized
weight must stay beside its MatMul for ONNX Runtime to fuse the pair into MatMulNBits, and not cross a segment
boundary as a float tensor computed on every call. The expert weights, already packed by the lowering, move to
one aligned file, `experts.bin`, that the runtime maps read-only: float32 values, or for quantized experts the
kernel's packed bytes (uint8).

An --mtp export's multi-token-prediction module (the nodes no main output needs: the main model's logits and
latent rows do not read them) is cut off into segments of its own, after the main model's last, and marked
`draft_only`: a call on which no row drafts runs the main model's segments alone, as a plain engine does, instead
of the module's nodes on empty tensors (bench/NOTES.md, speculative decoding). Each expert layer runs after the
segment that produces its inputs.

The segments are kept in memory and reference the export's external data file, which ONNX Runtime reads
from the export directory while it optimises each segment into the engine with its own data file, as the
single-graph engine is built; nothing is written into the export directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.formats import (DRAFT_IDS, EXPERTS_FILE, NEW_LATENT_PREFIX, ExpertLayer, OrtSegment, Span,
                            new_latent)
from moetrt.export.ort.lower import EXPERTS_DOMAIN, EXPERTS_OP

ALIGN = 64


def split(export_dir: Path, model_file: str, work: Path):
    """Cut the export into segments and write the packed experts to `work/experts.bin`.

    Returns (serialized segment models, whose external data lives in `export_dir`, their manifest entries
    (segment k is saved as `segment{k}.onnx`), the expert layers' manifest entries)."""
    import onnx

    model = onnx.load(str(export_dir / model_file), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    value_info = {info.name: info for info in [*graph.input, *graph.output, *graph.value_info]}
    graph_outputs = [output.name for output in graph.output]
    for node in graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise MoetrtError(f"node {node.name} ({node.op_type}) has a subgraph; the segment split cannot cut it")

    nodes_in_order = list(graph.node)  # (protobuf hands out a new wrapper per access: positions identify nodes)
    draft_only = _draft_only_nodes(nodes_in_order, [output.name for output in graph.output])
    main_experts = sum(1 for at, node in enumerate(nodes_in_order) if _is_experts(node) and at not in draft_only)
    stage: dict[str, int] = {graph_input.name: 0 for graph_input in graph.input}
    free: dict[str, onnx.NodeProto] = {}  # outputs of nodes that read only initializers and other such nodes
    experts: list[onnx.NodeProto] = []
    runs_after: list[int] = []  # the segment after which each expert node runs
    placed: list[tuple[int, onnx.NodeProto]] = []
    for position, node in enumerate(nodes_in_order):
        module = position in draft_only  # the module's stages follow the main model's last, main_experts
        if _is_experts(node):
            if module and len(experts) < main_experts:
                raise MoetrtError(f"{node.name}: the MTP module's experts come before the main model's; re-export")
            runs_after.append(len(experts) + (1 if module else 0))
            stage[node.output[0]] = runs_after[-1] + 1
            experts.append(node)
            continue
        inputs = [name for name in node.input if name]
        if all(name in initializers or name in free for name in inputs):
            free.update({output: node for output in node.output})
            continue
        at = max((stage[name] for name in inputs if name not in initializers and name not in free), default=0)
        if module:
            at = max(at, main_experts + 1)
        placed.append((at, node))
        stage.update({output: at for output in node.output})
    if not experts:
        raise MoetrtError("the export has no moetrt.cpu::Experts nodes to split at")

    segments = len(experts) + (2 if draft_only else 1)
    nodes = [[node for at, node in placed if at == k] for k in range(segments)]
    consumers: dict[str, set[int]] = {}
    for at, node in placed:
        for name in node.input:
            consumers.setdefault(name, set()).add(at)
    for after, node in zip(runs_after, experts):
        for name in node.input[:3]:
            consumers.setdefault(name, set()).add(after)  # the expert node runs right after that segment

    serialized, described = [], []
    for k in range(segments):
        produced = [output for node in nodes[k] for output in node.output]
        produced_set = set(produced)
        needed_free, inputs, seen = [], [], set()
        for node in nodes[k]:
            for name in node.input:
                if not name or name in seen or name in produced_set or name in initializers:
                    continue
                seen.add(name)
                if name in free:
                    _add_free(free[name], free, needed_free)
                else:
                    inputs.append(name)
        outputs = [name for name in produced if name in graph_outputs
                   or any(later > k for later in consumers.get(name, ()))
                   or any(after == k and name in node.input[:3] for after, node in zip(runs_after, experts))]
        outputs = list(dict.fromkeys(outputs))
        used_initializers = sorted({name for node in [*needed_free, *nodes[k]] for name in node.input
                                    if name in initializers})
        segment_graph = onnx.helper.make_graph(
            [*needed_free, *nodes[k]], f"{graph.name}.segment{k}",
            [_info(value_info, name) for name in inputs], [_info(value_info, name) for name in outputs],
            initializer=[initializers[name] for name in used_initializers],
        )
        segment = onnx.helper.make_model(segment_graph, opset_imports=[o for o in model.opset_import
                                                                       if o.domain != EXPERTS_DOMAIN])
        segment.ir_version = model.ir_version
        serialized.append(segment.SerializeToString())
        described.append(OrtSegment(f"segment{k}.onnx", tuple(inputs), tuple(outputs),
                                    draft_only=k > main_experts))

    layers = _write_experts(experts, initializers, export_dir, work / EXPERTS_FILE)
    return serialized, described, layers


def _is_experts(node) -> bool:
    return node.domain == EXPERTS_DOMAIN and node.op_type == EXPERTS_OP


def _draft_only_nodes(nodes: list, outputs: list[str]) -> set[int]:
    """Positions in `nodes` (a graph's, in its topological order) of those only an --mtp graph's draft outputs
    need (DRAFT_IDS, the module's latent rows): no other graph output reads them, directly or through other
    nodes. Empty for a graph without DRAFT_IDS."""
    if DRAFT_IDS not in outputs:
        return set()
    module_layer = max(int(name[len(NEW_LATENT_PREFIX):]) for name in outputs if name.startswith(NEW_LATENT_PREFIX))
    needed = {name for name in outputs if name not in (DRAFT_IDS, new_latent(module_layer))}
    main: set[int] = set()
    for position in reversed(range(len(nodes))):
        if any(name in needed for name in nodes[position].output):
            main.add(position)
            needed.update(name for name in nodes[position].input if name)
    return set(range(len(nodes))) - main


def _add_free(node, free: dict, needed: list) -> None:
    """Append `node` to `needed` after the free nodes it reads (each once): a segment's copy in dependency order."""
    if node in needed:
        return
    for name in node.input:
        if name in free:
            _add_free(free[name], free, needed)
    needed.append(node)


def _info(value_info: dict, name: str):
    if name not in value_info or not value_info[name].type.HasField("tensor_type"):
        raise MoetrtError(f"the export does not record the type of {name}; re-export the checkpoint")
    return value_info[name]


COPY_CHUNK = 64 << 20


def _copy_tensor_bytes(tensor, export_dir: Path, out, nbytes: int) -> None:
    """Append initializer `tensor`'s `nbytes` of data to `out`: copied in chunks from its external data file (never
    loaded whole, and the proto left as it is: onnx's to_array would keep every tensor's bytes on its proto), or from
    its raw_data."""
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        data = tensor.raw_data
        if len(data) != nbytes:
            raise MoetrtError(f"{tensor.name}: expected {nbytes} bytes of raw data, found {len(data)}; re-export")
        out.write(data)
        return
    fields = {entry.key: entry.value for entry in tensor.external_data}
    start, length = int(fields.get("offset", 0)), int(fields.get("length", nbytes))
    if length != nbytes:
        raise MoetrtError(f"{tensor.name}: its external data holds {length} bytes, not {nbytes}; re-export")
    with open(export_dir / fields["location"], "rb") as source:
        source.seek(start)
        left = nbytes
        while left:
            chunk = source.read(min(COPY_CHUNK, left))
            if not chunk:
                raise MoetrtError(f"{tensor.name}: its external data file ends early (truncated?); re-export")
            out.write(chunk)
            left -= len(chunk)


def _write_experts(experts, initializers, export_dir: Path, path: Path) -> list[ExpertLayer]:
    """Each expert node's packed weights, 64-byte aligned, into one file; their descriptions for the manifest."""
    from onnx import helper

    layers, offset = [], 0
    with open(path, "wb") as out:
        for node in experts:
            attributes = {attr.name: attr.i for attr in node.attribute}
            bits = attributes.get("bits", 32)
            wanted = np.float32 if bits == 32 else np.uint8
            spans = {}
            for key, name in zip(("gate_up", "down"), node.input[3:5]):
                tensor = initializers[name]
                dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
                if dtype != wanted:
                    raise MoetrtError(f"{name}: the moetrt expert kernel takes {np.dtype(wanted)} weights at {bits} "
                                      f"bits, not {dtype}; re-export the checkpoint")
                pad = -offset % ALIGN
                out.write(b"\0" * pad)
                offset += pad
                count = int(np.prod(tensor.dims))
                _copy_tensor_bytes(tensor, export_dir, out, count * np.dtype(dtype).itemsize)
                spans[key] = Span(offset, count)
                offset += count * np.dtype(dtype).itemsize
            layers.append(ExpertLayer(tuple(node.input[:3]), node.output[0], attributes["num_experts"],
                                      attributes["hidden_size"], attributes["intermediate_size"], attributes["slices"],
                                      spans["gate_up"], spans["down"], bits=bits,
                                      group_size=attributes.get("group_size", 0)))
    return layers
