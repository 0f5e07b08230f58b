"""Engine builds carry moetrt's CPU kernel compiled per instruction-set level; identical builds come from the cache."""

import pytest

from moetrt.errors import MoetrtError


def test_second_build_copies_the_cached_kernels_without_compiling(tmp_path, monkeypatch):
    import moetrt.plugins.cpu_experts as cpu_experts
    from moetrt.export.ort.build import build_kernels

    if cpu_experts.find_compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    first = build_kernels(tmp_path / "first")

    def refuse(*args, **kwargs):
        raise MoetrtError("compiled again")

    monkeypatch.setattr(cpu_experts, "compile_kernel", refuse)
    (tmp_path / "second").mkdir()
    second = build_kernels(tmp_path / "second")
    assert second == first and first
    for kernel in first:
        assert (tmp_path / "second" / kernel.file).read_bytes() == (tmp_path / "first" / kernel.file).read_bytes()
    # a damaged cached library is rebuilt, not copied into the engine
    cached = next((tmp_path / "cache").glob("cpu_experts-*.so"))
    cached.write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("MOETRT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "third").mkdir()
    assert build_kernels(tmp_path / "third") == first
    assert all(b"damaged" != (tmp_path / "third" / kernel.file).read_bytes() for kernel in first)
