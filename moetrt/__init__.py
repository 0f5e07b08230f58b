"""moetrt: compile DeepSeek-V3/R1-class Mixture-of-Experts checkpoints into engines and serve them.

The public API is imported lazily so that `import moetrt` (and the runtime) never pulls in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetrt.errors import MoetrtError

__version__ = "0.1.0"

_LAZY = {
    "load_reference": "moetrt.export.checkpoint",
    "load_config": "moetrt.config",
    "export_onnx": "moetrt.export.onnx_export",
    "build_engine": "moetrt.export.engine",
    "Engine": "moetrt.runtime.engine",  # torch-free
    "BuildConfig": "moetrt.settings",
    "BuildProfile": "moetrt.settings",
    "OrtOptions": "moetrt.settings",
    "TrtOptions": "moetrt.settings",
}

if TYPE_CHECKING:
    from moetrt.export.checkpoint import load_reference
    from moetrt.config import load_config
    from moetrt.export.engine import build_engine
    from moetrt.export.onnx_export import export_onnx
    from moetrt.runtime.engine import Engine
    from moetrt.settings import BuildConfig, BuildProfile, OrtOptions, TrtOptions

__all__ = ["MoetrtError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moetrt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
