"""moetrt importable from a checkout that is not installed: a bare GPU machine (`make gpu-check-quick`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_importable() -> None:
    """pyproject maps moetrt.export, .plugins, .runtime and .bench onto top-level folders; where no install maps
    them, those folders join moetrt's package path, which gives the same modules."""
    import moetrt

    if importlib.util.find_spec("moetrt.plugins") is None:
        moetrt.__path__.append(str(ROOT))
