"""Two engines of the same model, measured alternately in fresh processes: `python -m moetrt.bench.ab A B`.

Each round runs `moetrt.bench.systems moetrt-ort` on engine A, then B, then (next round) B, then A, so slow
drifts of this machine's memory bandwidth fall on both; prints per-round decode rates, prefill rates and the
median B/A ratios. Used for the before/after figures in bench/NOTES.md.

`--pairs N` instead loads both engines in this one process and alternates short runs (decode b1 of 32 tokens,
b8 of 16, a 256-token prefill), N pairs each: seconds apart rather than a minute, which is what resolves a few
percent on a VM whose speed swings within minutes. Prints the median B/A ratio and its quartiles. With
`--segmented-a`, A is loaded with MOETRT_SEGMENTED=1 (one onnxruntime run per segment) and B as it loads by
default (a kernel engine's segments joined into one graph, runtime/ort/fused.py): `python -m moetrt.bench.ab E E
--pairs 15 --segmented-a` measures the joined graph against segment by segment on one engine E.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from moetrt.bench.run import run_system
from moetrt.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=0, help="in-process alternation with N pairs per figure")
    parser.add_argument("--segmented-a", action="store_true",
                        help="with --pairs: load A segment by segment (MOETRT_SEGMENTED=1)")
    options = parser.parse_args(argv)
    if options.segmented_a and not options.pairs:
        parser.error("--segmented-a needs --pairs (both engines in this process)")
    if options.pairs:
        in_process(options.a, options.b, options.pairs, options.threads, options.segmented_a)
        return
    args = {"repeats": options.repeats, "new_tokens": 32, "prefill_len": 256, "decode_prompt_len": 16,
            "batches": [1, 8], "threads": options.threads, "vocab": load_config(options.a).vocab_size}
    ratios: dict[str, list[float]] = {"prefill": [], "1": [], "8": []}
    for round_ in range(options.rounds):
        order = (options.a, options.b) if round_ % 2 == 0 else (options.b, options.a)
        got = {engine: run_system("moetrt-ort", Path(engine), Path(engine), args) for engine in order}
        a, b = got[options.a], got[options.b]
        line = [f"round {round_ + 1}:"]
        for key, pick in (("prefill", lambda r: r["prefill_tps"]), ("1", lambda r: r["decode_tps"]["1"]),
                          ("8", lambda r: r["decode_tps"]["8"])):
            ra, rb = statistics.median(pick(a)), statistics.median(pick(b))
            ratios[key].append(rb / ra)
            label = "prefill tok/s" if key == "prefill" else f"decode b{key} tok/s"
            line.append(f"{label} A {ra:.1f} B {rb:.1f} (B/A {rb / ra:.2f})")
        print(" ".join(line), flush=True)
    print("median B/A: " + ", ".join(f"{'prefill' if k == 'prefill' else 'decode b' + k} {statistics.median(v):.2f}x"
                                     for k, v in ratios.items()))


def in_process(a: str, b: str, pairs: int, threads: int, segmented_a: bool = False) -> None:
    """`--pairs`: both engines in this process (bench/systems.py's moetrt runner), runs alternating A B / B A, the
    B/A ratio of each pair; `segmented_a`: A loaded with MOETRT_SEGMENTED=1."""
    import os

    from moetrt.bench.systems import moetrt_engine, prompts_for

    before = os.environ.get("MOETRT_SEGMENTED")
    if segmented_a:
        os.environ["MOETRT_SEGMENTED"] = "1"
    try:
        runs = [moetrt_engine(a, a, threads)]
    finally:
        if before is None:
            os.environ.pop("MOETRT_SEGMENTED", None)
        else:
            os.environ["MOETRT_SEGMENTED"] = before
    runs.append(moetrt_engine(b, b, threads))
    vocab = load_config(a).vocab_size
    measures = {
        "decode b1": lambda run: run(prompts_for(vocab, 1, 16), 33).decode_rate(1),
        "decode b8": lambda run: run(prompts_for(vocab, 8, 16), 17).decode_rate(8),
        "prefill 256": lambda run: 256 / run(prompts_for(vocab, 1, 256), 2).ttft(),
    }
    for run in runs:
        run(prompts_for(vocab, 1, 16), 4)  # warm up
    for label, measure in measures.items():
        rates: tuple[list[float], list[float]] = ([], [])
        for pair in range(pairs):
            for index in ((0, 1) if pair % 2 == 0 else (1, 0)):
                rates[index].append(measure(runs[index]))
        ratios = [rb / ra for ra, rb in zip(*rates)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{label}: A {statistics.median(rates[0]):.1f} B {statistics.median(rates[1]):.1f} tok/s, B/A median "
              f"{statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}, {pairs} pairs)", flush=True)

if __name__ == "__main__":
    main()
