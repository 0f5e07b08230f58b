"""The `trt` lowering: keep each dispatch node as TensorRT's ONNX parser maps it to the registered plugin.

The parser looks a custom node up by op type, `plugin_version` and `plugin_namespace` (read from the node's
domain since TensorRT 10.10; older parsers need the attribute), so both are set from the spec.
"""

from __future__ import annotations

import onnx_ir as ir

from moetrt.export.passes import dispatch_nodes
from moetrt.plugins.spec import MOE_DISPATCH


def lower_trt(model: ir.Model) -> None:
    for node in dispatch_nodes(model):
        node.attributes["plugin_version"] = ir.AttrString("plugin_version", str(MOE_DISPATCH.version))
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", MOE_DISPATCH.domain)
    model.opset_imports[MOE_DISPATCH.domain] = MOE_DISPATCH.version
