"""Installing: the Makefile's TORCH reaches pip word by word, dependencies are used, and a command missing an extra
names the one to install."""

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.test_gpu_check import MAKE_ENV

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Python that prints its arguments as JSON, standing in for the venv's python: the recipe runs through the shell.
ECHO_ARGS = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def pip_torch_arguments(tmp_path: Path, *make_args: str) -> list[str]:
    """The arguments `make install` gives pip for torch, as the shell splits the recipe line."""
    command = ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", f"PY={ECHO_ARGS}", *make_args]
    recipe = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True, env=MAKE_ENV)
    [line] = [line for line in recipe.stdout.splitlines() if "pip install -q" in line and "torch" in line]
    ran = subprocess.run(["sh", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(ran.stdout)[1:]  # after "-m"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_readmes_gpu_recipe_gives_pip_the_index_url_as_its_own_arguments(tmp_path):
    [torch] = re.findall(r'make install TORCH="([^"]+)"', (ROOT / "README.md").read_text())
    assert "--index-url" in torch
    assert pip_torch_arguments(tmp_path, f"TORCH={torch}") == ["pip", "install", "-q", *torch.split()]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_torch_requirements_reach_pip_whole_by_default_and_with_comparisons(tmp_path):
    assert pip_torch_arguments(tmp_path) == ["pip", "install", "-q", "torch==2.13.0"]
    assert pip_torch_arguments(tmp_path, "TORCH=torch>=2.9,<3") == ["pip", "install", "-q", "torch>=2.9,<3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no shell redirection wrote a file named "=2.9,<3"


# Extras that need hardware or a vendor's index (CUDA wheels, TensorRT): `make install` leaves them out on purpose.
HARDWARE_EXTRAS = {"gpu", "trt"}


def extras_installed_with(extra: str) -> set[str]:
    """`extra` and every extra its own `moetrt[...]` requirements pull in, recursively."""
    found, todo = set(), [extra]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            for requirement in PYPROJECT["optional-dependencies"][name]:
                if requirement.startswith("moetrt["):
                    todo.extend(requirement[len("moetrt["):requirement.index("]")].split(","))
    return found


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_installs_every_extra_but_the_hardware_ones(tmp_path):
    """CI (.ci/run: make test on a clean clone) runs the tests of every extra that installs anywhere, the MPI
    jobs of expert parallelism among them."""
    command = ["make", "-n", "install", f"VENV={tmp_path / 'venv'}"]
    recipe = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True, env=MAKE_ENV)
    [editable] = re.findall(r'pip install -q -e "\.\[([a-z,]+)\]"', recipe.stdout)
    installed = set().union(*(extras_installed_with(extra) for extra in editable.split(",")))
    wanted = set(PYPROJECT["optional-dependencies"]) - HARDWARE_EXTRAS
    assert installed == wanted, f"make install leaves out {sorted(wanted - installed)}"


def test_the_mpi_extra_brings_mpi4py_and_mpichs_wheel():
    assert {requirement_name(r) for r in PYPROJECT["optional-dependencies"]["mpi"]} == {"mpi4py", "mpich"}


def imported_top_level_modules() -> set[str]:
    found = set()
    for folder in ("moetrt", "export", "runtime", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower().replace("-", "_")


def test_every_core_dependency_is_imported_by_the_package():
    imported = imported_top_level_modules()
    unused = [r for r in PYPROJECT["dependencies"] if requirement_name(r) not in imported]
    assert unused == [], f"core dependencies nothing imports: {unused}"


def test_each_module_the_cli_maps_to_an_extra_is_a_requirement_of_that_extra():
    from moetrt.cli import EXTRA_FOR_MODULE

    extras = PYPROJECT["optional-dependencies"]
    for module, extra in EXTRA_FOR_MODULE.items():
        names = {requirement_name(r) for r in extras[extra]}
        assert module in names or f"{module}_python" in names, (module, extra, names)


# Runs the CLI with the listed modules unimportable, as after `pip install moetrt` without extras.
WITHOUT_EXTRAS = """
import importlib.abc, sys
MISSING = {"torch", "onnx", "onnx_ir", "onnxscript", "safetensors", "fastapi", "uvicorn", "transformers", "triton",
           "mpi4py"}
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = ["moetrt", *sys.argv[1:]]
from moetrt.cli import main
main()
"""


@pytest.mark.parametrize("command", [
    ["export", "models/tiny-r1", "-o", "{tmp}/export"],
    ["build-engine", "models/tiny-r1", "-o", "{tmp}/engine"],
    ["eval", "models/tiny-r1", "--num-problems", "1"],
])
def test_a_command_without_its_extra_says_which_to_install(tmp_path, command):
    args = [arg.format(tmp=tmp_path) for arg in command]
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(rf"error: moetrt {command[0]} needs (torch|onnx_ir|onnx), which the export extra installs: "
                        r"pip install 'moetrt\[export\]'\n", done.stderr), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_expert_parallel_without_the_mpi_extra_says_which_to_install(tmp_path, command):
    args = [command, str(tmp_path / "engine"), *(["1+1="] if command == "generate" else []), "--expert-parallel"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(r"error: --expert-parallel needs mpi4py .*pip install 'moetrt\[mpi\]'.*\n", done.stderr), \
        done.stderr


def test_info_of_a_checkpoint_needs_no_extra():
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, "info", "docs/deepseek-v3-config.json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "671.03B total" in done.stdout, done.stderr
