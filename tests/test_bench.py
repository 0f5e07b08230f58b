"""`make bench` end to end on tiny-r1 at its smallest: every system runs, each decode repeat gets its own pair
of bandwidth samples, and the table, JSON and chart are written."""

import json
import subprocess
import sys


def test_bench_runs_and_pairs_bandwidth_with_each_repeat(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moetrt.bench.run", "--models", "tiny-r1", "--repeats", "2",
                             "--new-tokens", "4", "--prefill-len", "16", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    (model,) = data["results"]
    assert len(data["bandwidth"]) == 3 * 2 * 2 * 2  # systems x batches x repeats x (before, after)
    for system in ("moetrt-ort", "moetrt-torch", "transformers"):
        runs = model["systems"][system]
        for batch in ("1", "8"):
            assert len(runs["decode_tps"][batch]) == len(runs["decode_bandwidth"][batch]) == 2
            assert all(0 < fraction < 10 for fraction in runs["roofline_fraction"][batch])
    table = (tmp_path / "results.md").read_text()
    assert "| tiny-r1 | moetrt-ort |" in table and "experts in onnxruntime" in table
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert "tiny-r1 batch 8: moetrt-ort" in result.stdout


def test_read_bandwidth_reads_each_thread_share_of_the_given_buffer():
    import numpy as np
    import pytest

    from moetrt.bench.bandwidth import CopyProbe, copy_bandwidth, read_bandwidth

    buffer = np.ones(1 << 18, dtype=np.float32)
    for threads in (1, 2, 3):
        rate = read_bandwidth(threads, repeats=2, buffer=buffer)
        assert np.isfinite(rate) and rate > 0
    for bad in ({"threads": 0}, {"threads": -1}, {"repeats": 0}):  # these timed nothing and returned 1e14 or 0
        for probe in (read_bandwidth, copy_bandwidth):
            with pytest.raises(ValueError, match="at least 1 thread and 1 repeat"):
                probe(**bad, size=1 << 20)
    with pytest.raises(ValueError, match="a buffer of 2 elements cannot be split over 3 threads"):
        read_bandwidth(3, size=8)
    with pytest.raises(ValueError, match="a buffer of 0 elements"):
        CopyProbe(2, size=0).sample_read()
