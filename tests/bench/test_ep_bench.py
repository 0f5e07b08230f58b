"""The expert-parallel benchmark's pure parts, with no MPI job: the setups it launches, the smaps parsing of
the experts.bin residency, the combine-time summaries, the greedy comparison and the report."""

import mmap
import os

from moetrt.bench import ep_driver
from moetrt.bench import expert_parallel as ep

SMAPS = """7f0000000000-7f0000400000 r--s 00000000 fd:01 1234   /tmp/engine/experts.bin
Size:               4096 kB
Rss:                1024 kB
Pss:                 512 kB
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 900 kB
7f0000500000-7f0000600000 r--p 00000000 fd:01 99     /tmp/engine/segment0.onnx
Rss:                 300 kB
7f0000600000-7f0000700000 r--s 00400000 fd:01 1234   /tmp/engine/experts.bin
Rss:                  40 kB
VmFlags: rd sh mr mw me ms sd
"""


def test_setups_start_with_the_plain_engine_and_give_one_rank_a_single_combine():
    labels = [s.label for s in ep.setups([1, 2, 4], ["allreduce", "alltoallv"])]
    assert labels == ["plain", "EP n=1 allreduce", "EP n=2 allreduce", "EP n=2 alltoallv", "EP n=4 allreduce",
                      "EP n=4 alltoallv"]


def test_experts_residency_sums_only_the_experts_bin_mappings():
    assert ep_driver.mapped_rss(SMAPS, "experts.bin") == (1024 + 40) * 1024
    assert ep_driver.mapped_rss(SMAPS, "segment0.onnx") == 300 * 1024
    assert ep_driver.mapped_rss(SMAPS, "absent.bin") == 0


def test_rank_report_counts_only_the_touched_pages_of_a_mapped_experts_bin(tmp_path):
    path = tmp_path / "experts.bin"
    path.write_bytes(b"\1" * (256 * mmap.PAGESIZE))
    assert ep_driver.rank_report(3, os.getpid())["experts_resident_bytes"] == 0  # not mapped yet
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[0] == 1  # one page read; the kernel may map more around it (fault-around, a large folio)
        report = ep_driver.rank_report(3, os.getpid())
        held = ep_driver.rank_report(3, os.getpid(), held_bytes=5000)
    assert report["rank"] == 3 and report["pid"] == os.getpid()
    assert report["peak_rss_bytes"] >= report["rss_bytes"] > 0
    assert mmap.PAGESIZE <= report["experts_resident_bytes"] <= path.stat().st_size
    assert held["experts_resident_bytes"] == report["experts_resident_bytes"] + 5000


def decode_runs(seconds: list[float], steps: int = 31, layers: int = 7, step_seconds: float = 0.05):
    return {"combine": [{"calls": steps * layers, "seconds": s, "bytes": steps * layers * 4096, "steps": steps}
                        for s in seconds],
            "step_seconds": [step_seconds] * len(seconds)}


def test_decode_combine_is_per_step_per_layer_and_a_share_of_the_step():
    got = ep.decode_combine(decode_runs([0.31, 0.62, 0.93]))
    assert abs(got["step_ms"] - 20.0) < 1e-9  # 0.62 s over 31 steps
    assert abs(got["layer_ms"] - 20.0 / 7) < 1e-9
    assert abs(got["share"] - 0.4) < 1e-9  # 20 ms of a 50 ms step
    assert got["bytes_per_step"] == 7 * 4096


def test_combine_summaries_are_empty_for_the_plain_engine():
    assert ep.decode_combine({"combine": [{}, {}], "step_seconds": [0.1, 0.1]}) == {}
    assert ep.prefill_combine({"combine": [{}], "seconds": [1.0]}) == {}


def test_prefill_combine_counts_the_whole_prompt_as_one_step():
    got = ep.prefill_combine({"combine": [{"calls": 7, "seconds": 0.07, "bytes": 7 * 2 << 20}], "seconds": [1.4]})
    assert abs(got["step_ms"] - 70.0) < 1e-9 and abs(got["layer_ms"] - 10.0) < 1e-9
    assert abs(got["share"] - 0.05) < 1e-9


def test_greedy_match_names_the_first_difference():
    assert ep.greedy_match([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == "equal"
    assert ep.greedy_match([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == "row 1 token 1"
    assert ep.greedy_match([[1, 2, 3]], [[1, 2]]) == "row 0 length 2 vs 3"
    assert ep.greedy_match(None, [[1]]) == "—"


def job(ranks, combine, layer_seconds, tokens=((5, 6),)):
    runs = {**decode_runs([layer_seconds * 31 * 7] * 2), "tps": [20.0, 22.0], "tokens": [list(t) for t in tokens]}
    return {"setup": {"ranks": ranks, "combine": combine}, "ranks": ranks, "threads": 2 // ranks or 1,
            "load_seconds": 3.0, "prefill_len": 512, "experts_bytes": 1000,
            "decode": {"1": runs},
            "prefill": {"seconds": [1.0, 1.2], "tokens": [[9]],
                        "combine": [{"calls": 7, "seconds": 7 * layer_seconds, "bytes": 1}] * 2},
            "ranks_report": [{"rank": r, "peak_rss_bytes": 2e9, "experts_resident_bytes": 1000 // ranks}
                             for r in range(ranks)]}


def test_combine_verdicts_pick_the_cheaper_combine_per_workload():
    results = {"EP n=2 allreduce": job(2, "allreduce", 0.001), "EP n=2 alltoallv": job(2, "alltoallv", 0.002)}
    (line,) = ep.combine_verdicts(results)
    assert line.startswith("n=2: decode b1: allreduce (1.000 vs 2.000 ms per layer, 2.00x)")
    assert "prefill 512: allreduce" in line


def test_report_has_throughput_combine_and_memory_rows():
    results = {"plain": {**job(1, None, 0.0), "prefill": {"seconds": [1.1], "combine": [{}], "tokens": [[9]]}},
               "EP n=2 allreduce": job(2, "allreduce", 0.001, tokens=((5, 7),))}
    results["plain"]["decode"]["1"]["combine"] = [{}, {}]
    text = ep.render({"header": ["head"], "results": results, "notes": ["shared machine"]})
    assert "| plain | 1 × 2 | 21.0 (20.0–22.0) | 1.10 (465) | 3.0 | reference |" in text
    assert "b1 row 0 token 1, prefill equal" in text
    assert "| EP n=2 allreduce | decode b1 | 7.00 | 1.000 | 14% |" in text
    assert "| EP n=2 allreduce | 1 | 2000 | 0 | 50.0% |" in text
    assert "- shared machine" in text
    assert "| plain | decode b1 |" not in text  # no combine rows without combine statistics


def test_rounds_join_the_runs_and_keep_the_first_rounds_tokens_and_memory():
    first, later = job(2, "allreduce", 0.001), job(2, "allreduce", 0.003, tokens=((8, 8),))
    first["isolated_combine"] = {"1": {"median_ms": 0.5, "min_ms": 0.4}}
    later["isolated_combine"] = {"1": {"median_ms": 0.7, "min_ms": 0.3}}
    later["load_seconds"] = 2.0
    merged = ep.merge_rounds(first, later)
    assert merged["decode"]["1"]["tps"] == [20.0, 22.0, 20.0, 22.0]
    assert len(merged["decode"]["1"]["combine"]) == 4 and len(merged["prefill"]["seconds"]) == 4
    assert merged["decode"]["1"]["tokens"] == [[5, 6]] and merged["load_seconds"] == 2.0
    assert merged["isolated_combine"]["1"] == {"median_ms": [0.5, 0.7], "min_ms": [0.4, 0.3]}
    assert first["decode"]["1"]["tps"] == [20.0, 22.0]  # the inputs stay as they were
    assert ep.isolated_cell(merged, "decode b1") == "0.600 (0.300)"
    assert ep.isolated_cell(merged, "prefill 512") == "—"
    assert ep.workload_tokens("decode b8") == "8" and ep.workload_tokens("prefill 512") == "512"
