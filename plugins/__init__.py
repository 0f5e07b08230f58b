"""Routed experts: the plugin spec, its torch reference, the Triton kernels and the TensorRT registration."""
