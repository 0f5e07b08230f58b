"""JSON files moetrt reads (config.json, export.json, manifest.json): a damaged one is one line naming the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; MoetrtError ending in `fix` when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoetrtError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise MoetrtError(f"{path} must hold a JSON object; {fix}")
    return data
