"""The OpenAI-compatible HTTP server (the `serve` extra): `protocol` holds the wire format, `app` the ASGI app,
`launch` the uvicorn launcher, `limits` the options' defaults. `limits` imports without the extra; the rest
loads on first use."""

from __future__ import annotations

import importlib

from moetrt.runtime.server.limits import DEFAULT_LIMITS, ServerLimits

_LAZY = {"create_app": "app", "serve": "launch", "exposure_warning": "launch", "ApiError": "protocol",
         "error_body": "protocol"}

__all__ = ["DEFAULT_LIMITS", "ServerLimits", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
