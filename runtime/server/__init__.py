"""The OpenAI-compatible HTTP server (the `serve` extra): `protocol` holds the wire format, `app` the ASGI app
and the launcher."""

from moetrt.runtime.server.app import create_app, serve
from moetrt.runtime.server.protocol import DEFAULT_MAX_BODY_BYTES, ApiError, error_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiError", "create_app", "error_body", "serve"]
