"""Export-time code: checkpoint config and loading, the torch reference model, ONNX tracing and lowering.

Importing this package is cheap; the torch-dependent modules are imported by whoever needs them.
"""
