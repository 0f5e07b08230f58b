"""One ONNX Runtime graph for an engine's segments and the expert layers between them (one session run per step).

An engine built for moetrt's CPU expert kernel is a chain of segments cut at the routed experts
(export/ort/split.py); run segment by segment, each step is one session run per segment with the kernel called
from Python in between. A ds-mini int4 batch-1 step spent about 0.7 ms of 7 in that glue: the bindings of eight
runs, seven kernel calls through ctypes, the Python between them (bench/NOTES.md). Where moetrt's ONNX Runtime
op library is available (plugins/ort_ops.py: the kernel as the custom op `moetrt.ort::Experts`, run on ONNX
Runtime's own threads), the runtime joins the main model's segments back into one graph at load, each expert
layer a node reading its three inputs and `moetrt.kernel.<i>`, an int64 [10] input that holds what the runtime
loaded for the layer (plugins/ort_ops.kernel_params). The engine's files are not changed: the joined graph references
the segments' own external data files (their folder is given to ONNX Runtime), so an engine built before this
runs either way, and the segmented path stays for what the joined graph does not cover (expert parallelism,
which combines ranks' outputs between segments; the MTP module's segments, skipped on calls that do not draft).

Each segment was optimised on its own, so names ONNX Runtime made up (initializers, node outputs) may repeat
across segments: every name that does not cross a segment boundary is prefixed with its segment's index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moetrt.formats import EngineManifest, OrtSection

KERNEL_INPUT_PREFIX = "moetrt.kernel."


@dataclass(frozen=True)
class JoinedGraph:
    """The joined model (`model`, serialized ONNX whose initializers reference the segments' data files in the
    engine directory), its inputs and outputs in order, and which expert layers (indices into the section's
    `expert_layers`) it runs: those after a main-model segment."""

    model: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: tuple[int, ...]


def segment_named(error: str, section: OrtSection) -> str | None:
    """The file of the main segment whose prefixed name (`s<k>/`) an onnxruntime error about the joined graph
    mentions, or None."""
    found = re.search(r"\bs(\d+)/", error)
    main = [segment for segment in section.segments if not segment.draft_only]
    return main[int(found.group(1))].model if found and int(found.group(1)) < len(main) else None


def kernel_input(layer: int) -> str:
    """The joined graph's input holding expert layer `layer`'s kernel parameters (int64 [10])."""
    return f"{KERNEL_INPUT_PREFIX}{layer}"


def join_segments(manifest: EngineManifest, section: OrtSection, domain: str, op_type: str) -> JoinedGraph:
    """The main model's segments of `section` (those not `draft_only`) as one graph, with an `op_type` node of
    `domain` for each expert layer whose inputs a main segment makes, placed right after that segment. Values the
    draft-only segments or their expert layer read stay outputs of the joined graph. Raises MoetrtError for an
    engine whose expert layers do not each follow one main segment (a damaged manifest)."""
    import onnx

    from moetrt.errors import MoetrtError

    main = [segment for segment in section.segments if not segment.draft_only]
    protos = []
    for segment in main:
        try:
            protos.append(onnx.load(str(manifest.path(segment.model)), load_external_data=False))
        except Exception as error:  # protobuf's DecodeError and the like: bytes that are no ONNX model
            reason = " ".join(str(error).split()) or type(error).__name__
            raise MoetrtError(f"cannot load the engine's {segment.model} ({reason}): the file is damaged or was "
                              f"replaced; rebuild the engine (`moetrt verify {manifest.directory} --integrity` names "
                              "every changed file)") from None
    after: dict[int, list[int]] = {}
    for index, layer in enumerate(section.expert_layers):
        makers = [k for k, segment in enumerate(main) if layer.inputs[0] in segment.outputs]
        if len(makers) > 1 or (makers and not set(layer.inputs) <= set(main[makers[0]].outputs)):
            raise MoetrtError(f"expert layer {index}'s inputs do not come from one engine segment; rebuild the engine")
        if makers:
            after.setdefault(makers[0], []).append(index)
    joined_layers = [index for k in sorted(after) for index in after[k]]

    # What is read outside the joined graph: by draft-only segments and the expert layers not joined.
    read_outside = {name for segment in section.segments if segment.draft_only for name in segment.inputs}
    read_outside.update(name for index, layer in enumerate(section.expert_layers) if index not in joined_layers
                        for name in layer.inputs)
    read_inside = {name for segment in main for name in segment.inputs}
    read_inside.update(name for index in joined_layers for name in section.expert_layers[index].inputs)

    nodes, initializers, inputs = [], [], []
    made: set[str] = set()
    input_names: set[str] = set()
    opsets: dict[str, int] = {}
    value_types = {}
    for k, (segment, proto) in enumerate(zip(main, protos)):
        graph = proto.graph
        for opset in proto.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        boundary = {*segment.inputs, *segment.outputs}
        rename = {tensor.name: f"s{k}/{tensor.name}" for tensor in graph.initializer}
        for node in graph.node:
            for name in node.output:
                if name and name not in boundary:
                    rename[name] = f"s{k}/{name}"
        for tensor in graph.initializer:
            tensor.name = rename[tensor.name]
            initializers.append(tensor)
        for node in graph.node:
            node.name = f"s{k}/{node.name}"
            node.input[:] = [rename.get(name, name) for name in node.input]
            node.output[:] = [rename.get(name, name) for name in node.output]
            for attribute in node.attribute:
                if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise MoetrtError(f"segment {k}'s node {node.name} has a subgraph; the segments cannot be joined")
            nodes.append(node)
        for info in graph.input:
            if info.name not in made and info.name not in input_names:
                inputs.append(info)
                input_names.add(info.name)
        for info in graph.output:
            value_types[info.name] = info
            made.add(info.name)
        for index in after.get(k, ()):
            layer = section.expert_layers[index]
            kernel_info = onnx.helper.make_tensor_value_info(kernel_input(index), onnx.TensorProto.INT64, [10])
            inputs.append(kernel_info)
            nodes.append(onnx.helper.make_node(op_type, [*layer.inputs, kernel_input(index)], [layer.output],
                                               name=f"experts{index}", domain=domain))
            made.add(layer.output)
            value_types[layer.output] = onnx.helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT,
                                                                           None)
    kept = [name for segment in main for name in segment.outputs if name not in read_inside or name in read_outside]
    kept += [layer.output for index in joined_layers if (layer := section.expert_layers[index]).output in read_outside]
    outputs = [value_types[name] for name in dict.fromkeys(kept)]
    opsets[domain] = 1
    graph = onnx.helper.make_graph(nodes, "moetrt.joined", inputs, outputs, initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(name, version)
                                                         for name, version in opsets.items()])
    model.ir_version = protos[0].ir_version
    return JoinedGraph(model.SerializeToString(), tuple(i.name for i in inputs), tuple(o.name for o in outputs),
                       tuple(joined_layers))
