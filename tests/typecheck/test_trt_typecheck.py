"""mypy over the TensorRT code against tensorrt-stubs and each fetched version of NVIDIA's tensorrt.plugin sources.

`make test` fetches the plugin sources (tests/typecheck/trt_plugin_sources.py) into build/trt-plugin/VERSION;
without them (no network when the venv was made) this test skips and says so. No TensorRT is imported or faked:
mypy reads the stubs and NVIDIA's Python sources as text.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = ROOT / "build" / "trt-plugin"
CONFIG = Path(__file__).with_name("mypy-trt.ini")
# Every module that touches TensorRT, tensorrt.plugin or the formulas they evaluate symbolically.
MODULES = [
    "moetrt.plugins.trt_plugin",
    "moetrt.plugins.trt_stages",
    "moetrt.plugins.moe_launch",
    "moetrt.export.trt.build",
    "moetrt.export.trt.plan",
    "moetrt.runtime.trt.session",
    "moetrt.runtime.trt.cuda_memory",
    "moetrt.runtime.trt.device_cache",
    "moetrt.runtime.session",  # the protocols the TensorRT session and its cache are checked against
    "moetrt.runtime.kv_cache",
]
# The package as mypy must see it: pyproject maps moetrt.export/plugins/runtime onto top-level folders, and the
# editable install's import hook is invisible to mypy.
PACKAGES = {"moetrt": "moetrt", "moetrt/export": "export", "moetrt/plugins": "plugins", "moetrt/runtime": "runtime"}


def shadow_tree(root: Path) -> Path:
    """build/mypy-trt/src/moetrt/... of symlinks to the sources, in the installed package's layout."""
    for package, folder in PACKAGES.items():
        target = root / package
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / folder).rglob("*.py"):
            link = target / source.relative_to(ROOT / folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(source)
    for link in root.rglob("*.py"):
        if not link.exists():  # a source file was removed
            link.unlink()
    return root


def versions() -> list[str]:
    return sorted(p.name for p in PLUGIN_SOURCES.glob("*") if (p / "tensorrt" / "plugin" / "__init__.pyi").is_file())


@pytest.mark.parametrize("version", versions() or [pytest.param(None, marks=pytest.mark.skip(
    reason="tensorrt.plugin sources not fetched (build/trt-plugin is empty: `make test` fetches them from PyPI)"))])
def test_tensorrt_code_typechecks(version):
    src = shadow_tree(ROOT / "build" / "mypy-trt" / "src")
    env = {**os.environ, "MYPYPATH": f"{PLUGIN_SOURCES / version}{os.pathsep}{src}"}
    cache = ROOT / "build" / "mypy-trt" / f"cache-{version}"
    command = [sys.executable, "-m", "mypy", "--config-file", str(CONFIG), "--cache-dir", str(cache),
               *(arg for module in MODULES for arg in ("-m", module))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"mypy against tensorrt.plugin {version}:\n{done.stdout}{done.stderr}"
