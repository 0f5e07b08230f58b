"""ONNX Runtime engines away from the machine and the onnxruntime release that built them: the version policy
(same major.minor loads), the dependency pin that matches it, and a saved graph tied to no CPU's instruction sets."""

import tomllib
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from packaging.requirements import Requirement

from moetrt import hardware
from moetrt.errors import MoetrtError
from moetrt.runtime import ort as ort_backend
from moetrt.runtime.manifest import load_manifest

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def _installed_as(monkeypatch, version):
    monkeypatch.setattr(ort_backend, "package_version", lambda package: version)


def test_engine_loads_under_another_patch_release_of_the_same_minor(chat_engine_dir, monkeypatch):
    from moetrt.runtime.engine import Engine

    recorded = load_manifest(chat_engine_dir).versions["onnxruntime"]
    _installed_as(monkeypatch, f"{ort_backend.minor_version(recorded)}.99")
    assert Engine.load(chat_engine_dir).logits(np.array([[1, 2, 3]])).shape[:2] == (1, 3)


@pytest.mark.parametrize("installed", ["next-minor", "next-major", None])
def test_engine_from_another_minor_release_is_refused_in_one_line(chat_engine_dir, monkeypatch, installed):
    recorded = load_manifest(chat_engine_dir).versions["onnxruntime"]
    major, minor = map(int, recorded.split(".")[:2])
    version = {"next-minor": f"{major}.{minor + 1}.0", "next-major": f"{major + 1}.0.0", None: None}[installed]
    _installed_as(monkeypatch, version)
    with pytest.raises(MoetrtError) as error:
        load_manifest(chat_engine_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"engine was optimised by onnxruntime {recorded} but {version or 'none'} is installed")
    assert f"rebuild the engine, or pip install 'onnxruntime=={major}.{minor}.*'" in message


def test_the_dependency_pin_admits_exactly_the_minor_engines_load_under():
    """pyproject's onnxruntime range and the load policy agree: a fresh install can never pull a release that
    refuses the engines this moetrt builds."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d).specifier for d in dependencies if Requirement(d).name == "onnxruntime"]
    installed = onnxruntime.__version__
    major, minor = map(int, ort_backend.minor_version(installed).split("."))
    assert pin.contains(installed)
    assert pin.contains(f"{major}.{minor}.0") and pin.contains(f"{major}.{minor}.99")
    assert not pin.contains(f"{major}.{minor + 1}.0") and not pin.contains(f"{major + 1}.0.0")
    assert not pin.contains(f"{major}.{minor - 1}.99")


def test_graph_is_saved_without_cpu_specific_passes_and_finished_at_load(chat_engine_dir):
    from moetrt.runtime.ort.session import load_optimization_level

    section = load_manifest(chat_engine_dir).section
    assert section.optimization_level == "extended" and section.cpu_flags == ()
    assert load_optimization_level(section) == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_engine_loads_on_a_cpu_with_fewer_instruction_sets_than_the_builder(chat_engine_dir, monkeypatch):
    """Built here (AVX2 or AVX-512), served on a CPU that shows only SSE4.2: nothing in the graph refuses it."""
    from moetrt.runtime.engine import Engine

    monkeypatch.setattr(hardware, "cpu_flags", lambda: ("sse4_2",))
    assert Engine.load(chat_engine_dir).logits(np.array([[4, 5]])).shape[:2] == (1, 2)
