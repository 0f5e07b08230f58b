"""The llama.cpp side-by-side benchmark's pure parts, with no llama.cpp binary: parsing llama-bench's and
llama-batched-bench's output, the alternating round order, the ratio table, the converter's config and tokenizer
fixes, the GGUF metadata check, the greedy check's byte comparison, the sdist unpacking, and rows for quantized
engines this moetrt cannot build."""

import io
import json
import tarfile
from types import SimpleNamespace

import pytest

from moetrt.bench import llamacpp, quantized
from moetrt.errors import MoetrtError

# llama-bench -o json prints this shape (one object per test; fields abridged), after any log lines on stdout
LLAMA_BENCH_JSON = """load_backend: loaded CPU backend
[
  {
    "build_commit": "0c1e570",
    "model_type": "deepseek2 ?B F32",
    "n_threads": 2,
    "n_prompt": 64,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ts": 351.5,
    "stddev_ts": 2.1,
    "samples_ns": [ 182000000, 183000000, 181000000 ],
    "samples_ts": [ 351.6, 349.7, 353.5 ]
  },
  {
    "build_commit": "0c1e570",
    "n_prompt": 0,
    "n_gen": 64,
    "avg_ts": 55.0,
    "samples_ts": [ 54.0, 56.0, 55.0 ]
  }
]
"""

BATCHED_ROW = {"n_kv_max": 704, "n_batch": 2048, "is_pp_shared": 0, "n_threads": 2, "pp": 16, "tg": 64, "pl": 8,
               "n_kv": 640, "t_pp": 0.5, "speed_pp": 256.0, "t_tg": 4.6, "speed_tg": 111.3, "t": 5.1, "speed": 125.5}
BATCHED_JSONL = (f"main: n_kv_max = 704, n_batch = 2048\n{json.dumps(BATCHED_ROW)}\n"
                 "llama_perf_context_print: total time = 5200.00 ms\n")


def test_llama_bench_json_is_keyed_by_test_with_every_repetition():
    parsed = llamacpp.parse_llama_bench(LLAMA_BENCH_JSON)
    assert parsed == {"pp64": [351.6, 349.7, 353.5], "tg64": [54.0, 56.0, 55.0]}


def test_llama_bench_combined_test_and_missing_samples_fall_back_to_the_average():
    out = json.dumps([{"n_prompt": 16, "n_gen": 32, "avg_ts": 40.5}])
    assert llamacpp.parse_llama_bench(out) == {"pp16+tg32": [40.5]}


def test_llama_bench_output_without_json_is_refused():
    with pytest.raises(MoetrtError, match="no JSON"):
        llamacpp.parse_llama_bench("error: failed to load model\n")


def test_batched_bench_jsonl_skips_log_lines_and_keys_rows_by_parallel_sequences():
    rows = llamacpp.parse_batched_bench(BATCHED_JSONL)
    assert list(rows) == [8]
    assert rows[8]["speed_tg"] == 111.3 and rows[8]["speed_pp"] == 256.0


def test_rounds_alternate_so_each_pair_runs_a_b_then_b_a():
    systems = [("moetrt", "fp32"), ("llama.cpp", "f32"), ("moetrt", "int8"), ("llama.cpp", "q8_0")]
    first, second, third = (quantized.round_order(systems, r) for r in range(3))
    assert first == third == systems
    assert second == systems[::-1]
    for a, b in ((0, 1), (2, 3)):  # within each pair the order flips from one round to the next
        assert first.index(systems[a]) < first.index(systems[b])
        assert second.index(systems[a]) > second.index(systems[b])


def _results():
    m = g = quantized.system_name
    return {
        "header": ["header line"],
        "pairs": [{"label": "fp32", "quantize": "none", "gguf": "f32"},
                  {"label": "int8", "quantize": "int8", "gguf": "q8_0"},
                  {"label": "int4", "quantize": "int4", "gguf": "q4_0"}],
        "systems": {
            m("moetrt", "fp32"): {"decode_b1": [45.0, 40.0, 50.0], "decode_b8": [110.0, 120.0, 100.0],
                                  "prefill": [390.0, 380.0, 400.0], "bytes": 3_255_000_000},
            g("llama.cpp", "f32"): {"decode_b1": [50.0, 50.0, 50.0], "decode_b8": [100.0, 100.0, 100.0],
                                    "prefill": [350.0, 350.0, 350.0], "bytes": 3_254_000_000},
            m("moetrt", "int8"): {"bytes": 0, "note": "build_engine(quantize='int8') built a 32-bit engine"},
            g("llama.cpp", "q8_0"): {"decode_b1": [150.0], "decode_b8": [200.0], "prefill": [500.0],
                                     "bytes": 866_000_000},
        },
        "notes": ["moetrt int8: not supported yet"],
    }


def test_report_cells_hold_the_median_and_range_over_rounds():
    report = quantized.render(_results())
    row = next(line for line in report.splitlines() if line.startswith("| moetrt fp32 |"))
    assert row == "| moetrt fp32 | 45 (40–50) | 110 (100–120) | 390 (380–400) | 3255 MB |"
    assert "| llama.cpp Q8_0 | 150 | 200 | 500 | 866 MB |" in report
    assert "| moetrt int8 | — | — | — | — |" in report
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith(("| llama.cpp ", "| moetrt "))
            and "/" not in line.split(" | ")[0]]
    assert rows == ["| llama.cpp f32", "| llama.cpp Q8_0", "| moetrt fp32", "| moetrt int8"]


def test_report_ratios_are_per_round_with_the_issue_targets_and_size_ratio():
    report = quantized.render(_results())
    ratio_row = next(line for line in report.splitlines() if line.startswith("| fp32 / f32 |"))
    # batch 1 rounds: 45/50, 40/50, 50/50 -> median 0.90, target >= 1.0
    assert "0.90× (0.90, 0.80, 1.00) ≥1× MISS" in ratio_row
    assert "1.10× (1.10, 1.20, 1.00)" in ratio_row  # batch 8, no fp32 target
    assert "1.00× PASS (≤1.05×)" in ratio_row  # 3255 / 3254 MB
    # no ratio row for a type moetrt did not measure
    assert not any(line.startswith("| int8 / Q8_0 |") for line in report.splitlines())
    assert "- moetrt int8: not supported yet" in report


def test_per_round_ratios_skip_rounds_with_a_zero_denominator():
    assert quantized.per_round_ratios([2.0, 3.0, 4.0], [1.0, 0.0, 2.0]) == [2.0, 2.0]
    assert quantized.ratio_cell([1.6, 1.4, 1.5], 1.5) == "1.50× (1.60, 1.40, 1.50) ≥1.5× PASS"
    assert quantized.cell([]) == "—"


def test_converter_config_gets_sigmoid_routing_written_out():
    config = {"model_type": "deepseek_v3", "n_group": 8, "topk_group": 4}
    fixed = llamacpp.llama_config(config)
    assert fixed["scoring_func"] == "sigmoid" and fixed["topk_method"] == "noaux_tc"
    assert "scoring_func" not in config  # the caller's dict is left alone


def test_converter_config_refuses_routing_the_comparison_does_not_cover():
    with pytest.raises(MoetrtError, match="routing"):
        llamacpp.llama_config({"model_type": "deepseek_v3", "scoring_func": "softmax", "n_group": 8, "topk_group": 4})
    with pytest.raises(MoetrtError, match="n_group"):
        llamacpp.llama_config({"model_type": "deepseek_v3", "topk_group": 4})


def test_byte_level_tokenizer_has_exactly_vocab_size_entries_and_round_trips_bytes():
    tokenizer = llamacpp.byte_level_tokenizer(1000, bos_id=0, eos_id=1)
    assert tokenizer.get_vocab_size() == 1000
    assert sorted(tokenizer.get_vocab().values()) == list(range(1000))
    assert tokenizer.id_to_token(0) == "<|bos|>" and tokenizer.id_to_token(1) == "<|eos|>"
    text = "Héllo,\n wörld 42 🦙"
    ids = tokenizer.encode(text).ids
    assert llamacpp.token_bytes(tokenizer, [0, *ids, 1]) == b"<|bos|>" + text.encode() + b"<|eos|>"
    with pytest.raises(MoetrtError, match="258"):
        llamacpp.byte_level_tokenizer(200)


def test_gguf_check_refuses_softmax_routing_an_unknown_pre_tokenizer_and_another_vocabulary_size():
    config = {"n_group": 8, "topk_group": 4, "vocab_size": 32000}
    good = {"general.architecture": "deepseek2", "deepseek2.expert_gating_func": llamacpp.SIGMOID,
            "deepseek2.expert_group_count": 8, "deepseek2.expert_group_used_count": 4, "vocab_entries": 32000,
            "tokenizer.ggml.pre": "gpt-2"}
    llamacpp.check_gguf(good, config)
    with pytest.raises(MoetrtError, match="expert_gating_func"):
        llamacpp.check_gguf({**good, "deepseek2.expert_gating_func": 1}, config)
    with pytest.raises(MoetrtError, match="vocabulary"):
        llamacpp.check_gguf({**good, "vocab_entries": 32001}, config)
    with pytest.raises(MoetrtError, match="pre-tokenizer"):  # llama.cpp knows GPT-2's as "gpt-2", not "gpt2"
        llamacpp.check_gguf({**good, "tokenizer.ggml.pre": "gpt2"}, config)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_sources_leave_the_sdist_with_their_git_link_set_aside(tmp_path):
    version = "9.9.9"
    top = f"llama_cpp_python-{version}"
    (tmp_path / "sdist").mkdir()
    with tarfile.open(tmp_path / "sdist" / f"{top}.tar.gz", "w:gz") as tar:
        _add(tar, f"{top}/vendor/llama.cpp/CMakeLists.txt", b"project(llama)\n")
        _add(tar, f"{top}/vendor/llama.cpp/.git", b"gitdir: ../../.git/modules/vendor/llama.cpp\n")
        _add(tar, f"{top}/.git/modules/vendor/llama.cpp/HEAD", b"0c1e57098bba43ac29e6e3b677cdceebdd22334f\n")
    src = llamacpp.fetch_sources(tmp_path, version)  # the archive is there: nothing is downloaded
    assert src == tmp_path / "src"
    assert (src / "CMakeLists.txt").is_file()
    assert not (src / ".git").exists() and (src / ".git.sdist").is_file()
    assert llamacpp.LlamaCpp(tmp_path).commit() == "0c1e570"
    assert not (tmp_path / "sdist" / top).exists()
    with pytest.raises(MoetrtError, match="make llamacpp"):
        llamacpp.LlamaCpp(tmp_path).tool("llama-bench")


def test_engine_row_is_dropped_when_build_engine_ignores_quantize(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    built = []

    def fake_build(model_dir, engine_dir, quantize="none"):
        built.append(quantize)
        engine_dir.mkdir(parents=True)
        (engine_dir / "manifest.json").write_text("{}")

    monkeypatch.setattr("moetrt.bench.run.build", fake_build)
    monkeypatch.setattr("moetrt.formats.read_manifest", lambda d: SimpleNamespace(quantization=None))
    engine, why = quantized.moetrt_engine(checkpoint, quantized.PAIRS[1], tmp_path / "engines", rebuild=False)
    assert engine is None and "32-bit" in why and built == ["int8"]
    assert not (tmp_path / "engines" / "ckpt-int8").exists()

    monkeypatch.setattr("moetrt.formats.read_manifest", lambda d: SimpleNamespace(quantization=SimpleNamespace(bits=8)))
    engine, why = quantized.moetrt_engine(checkpoint, quantized.PAIRS[1], tmp_path / "engines", rebuild=False)
    assert engine == tmp_path / "engines" / "ckpt-int8" and why == ""


def test_divergence_names_the_first_token_that_parts_and_what_llama_cpp_may_have_picked():
    tokenizer = llamacpp.byte_level_tokenizer(1000)
    new = tokenizer.encode("cdef").ids
    assert llamacpp.divergence(tokenizer, new, b"cdef") is None
    k, candidates = llamacpp.divergence(tokenizer, new, b"cdxy")
    assert k == len(tokenizer.encode("cd").ids)
    assert candidates and all(b"xy".startswith(llamacpp.token_bytes(tokenizer, [c])) for c in candidates)
    # llama.cpp stops at end of generation: a shorter print means it picked EOS where the reference went on
    assert llamacpp.divergence(tokenizer, new, b"cd") == (k, [1])
    # the reference's own EOS ends what llama.cpp prints
    assert llamacpp.divergence(tokenizer, [*new, 1, 5], b"cdef") is None


def test_completion_output_loses_the_end_of_text_marker_and_exit_newlines_only():
    assert llamacpp.parse_completion(b"ab\n [end of text]\n\n\n") == b"ab\n"
    assert llamacpp.parse_completion(b"=\xb2C\n\n") == b"=\xb2C"
    assert llamacpp.parse_completion(b"<|bos|>x\n\n") == b"<|bos|>x"


def test_greedy_summary_separates_a_near_tie_from_a_different_model():
    base = {"ids": list(range(24)), "agreed": 17, "match": False}
    assert llamacpp.describe_greedy({**base, "match": True}) == "MATCH (24 of 24 tokens)"
    tie = llamacpp.describe_greedy({**base, "near_tie": True, "margin": 2e-4})
    assert tie.startswith("MATCH up to a near tie: the first 17 of 24 tokens equal")
    assert llamacpp.describe_greedy({**base, "near_tie": False, "margin": 0.5}).startswith("DIFFERENT")


def test_other_cpu_share_counts_busy_time_that_is_not_ours():
    sample = quantized.CpuSample
    # 2 cores for 10 s: 14 s busy, 8 of them ours (the benchmark and its waited-for children) -> 6 / 20
    assert quantized.other_cpu_share(sample(100, 50, 0), sample(114, 58, 10), cores=2) == pytest.approx(0.3)
    assert quantized.other_cpu_share(sample(100, 50, 0), sample(104, 58, 10), cores=2) == 0.0  # ours, all of it
    assert quantized.contention_warning([0.02, 0.3, 0.05]).startswith(
        "**Not quiet-machine figures**: other processes or the hypervisor (steal) took 30% of the CPUs during round 2")
    assert quantized.contention_warning([0.02, 0.1]) == "" and quantized.contention_warning([]) == ""


def test_a_process_the_bench_did_not_start_shows_as_other_work():
    import os
    import subprocess
    import sys
    import time

    before = quantized.cpu_sample()
    if before is None:
        pytest.skip("no /proc/stat: CPU accounting is Linux's")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.6)
        during = quantized.cpu_sample()  # the spinner is not waited for yet: its time is not ours
    finally:
        spinner.wait()
    share = quantized.other_cpu_share(before, during, os.cpu_count() or 1)
    print(f"other work while a spinner ran: {share:.0%} of {os.cpu_count()} CPUs")
    assert share >= 0.5 / (os.cpu_count() or 1)


def test_report_warns_when_other_work_shared_the_cores():
    assert "Not quiet-machine figures" in quantized.busy_warning(5.4, threads=2, cores=2)
    assert quantized.busy_warning(2.3, threads=2, cores=2) == ""
    assert quantized.busy_warning(4.0, threads=2, cores=16) == ""  # plenty of idle cores left


def test_roofline_table_puts_each_round_rate_over_that_round_bandwidth():
    m = quantized.system_name
    results = {
        "header": [], "pairs": [], "notes": [],
        "bandwidth": {"copy": [40e9, 20e9], "read": [20e9, 10e9]},
        "systems": {
            m("moetrt", "int4"): {"decode_b1": [100.0, 60.0], "token_bytes": 100_000_000},
            m("llama.cpp", "q4_0"): {"decode_b1": [80.0, 40.0], "token_bytes": 150_000_000},
            m("moetrt", "int8"): {"bytes": 0},  # not measured: no row
        },
    }
    lines = quantized.render(results).splitlines()
    ours = next(line for line in lines if line.startswith("| moetrt int4 | 100 MB"))
    # copy: 100 x 0.1 GB / 40 = 25%, 60 x 0.1 / 20 = 30%; read: 50%, 60% (median of two: their mean)
    assert ours == "| moetrt int4 | 100 MB | 28% (25%–30%) ≥70% MISS | 55% (50%–60%) ≥70% MISS |"
    theirs = next(line for line in lines if line.startswith("| llama.cpp Q4_0 | 150 MB"))
    assert theirs == "| llama.cpp Q4_0 | 150 MB | 30% (30%–30%) | 60% (60%–60%) |"  # no target for llama.cpp
    assert not any(line.startswith("| moetrt int8 | ") and "MB |" in line and "%" in line for line in lines)
    assert quantized.roofline_fractions([10.0], 2_000_000_000, [0.0]) == []
    assert not any("above 100%" in line for line in lines)
    results["bandwidth"]["read"] = [20e9, 5e9]  # a dip in one round's read samples: 60 x 0.1 GB / 5 = 120%
    assert any(line.startswith("A share above 100% is a round whose bandwidth samples fell below")
               for line in quantized.render(results).splitlines())


def test_no_roofline_table_without_bandwidth_samples():
    assert "roofline" not in quantized.render(_results())
