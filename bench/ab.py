"""Two engines of the same model, measured alternately in fresh processes: `python -m moetrt.bench.ab A B`.

Each round runs `moetrt.bench.systems moetrt-ort` on engine A, then B, then (next round) B, then A, so slow
drifts of this machine's memory bandwidth fall on both; prints per-round decode rates, prefill rates and the
median B/A ratios. Used for the before/after figures in bench/NOTES.md.
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
    options = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
