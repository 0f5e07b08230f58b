"""Tests of the Triton routed experts that need a CUDA GPU (`make gpu-check`, `pytest -m gpu`).

Every module here is marked `gpu` and skips, saying why, where torch sees no GPU; tests/plugins/test_triton_moe.py
runs the same checks at tiny shapes under Triton's CPU interpreter.
"""

import pytest
import torch

from moetrt.plugins.moe_launch import ExpertsShape

ON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def tolerance(shape: ExpertsShape) -> float:
    """Relative error allowed against the reference: the looser of the compute and the activation dtype's."""
    return max(TOLERANCE[shape.compute_dtype], TOLERANCE[shape.act_dtype])
