"""moetrt's CPU expert kernel alone at ds-mini's expert shape, float32 against int8 and int4 weights.

`nice -n 5 python -m moetrt.bench.quant_kernel` times one MoE layer call (64 experts, hidden 1024, expert width
512, top-6, 2 slices, 2 threads) at batch 1 and 8, with a fresh random routing every call and seven layers'
worth of distinct weights in turn, so the experts come from memory as in a decode step and not from the 32 MB
cache. Rounds alternate the systems, since this VM's bandwidth swings 2x within seconds (bench/NOTES.md); each
round also samples the 2-thread copy bandwidth (bench/bandwidth.py). Printed per system and batch: median ms per
call and GB/s of weight bytes read (the distinct experts' packed bytes, scales included), medians over rounds
with their ranges, and the best single call's GB/s.
`--library NAME=PATH` adds the quantized runs of another build of the kernel (a variant being compared).
`--cached` times the compute instead: one expert (one slice, one thread) called over and over from the caches,
1 and 8 rows, in CPU time of the calling thread, which other processes on a shared machine sway far less;
printed per system: the best of the rounds' mean µs per call (Python's call included) and GB/s of weights.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np

from moetrt.bench.bandwidth import copy_bandwidth

E, H, I, K, SLICES, THREADS, LAYERS = 64, 1024, 512, 6, 2, 2, 7  # ds-mini's routed experts, 7 MoE layers


def random_quantized(rng: np.random.Generator, bits: int, group: int) -> tuple[np.ndarray, ...]:
    """Values and float16 scales of one layer's experts, as the export hands them to `pack_quantized`."""
    low, high = (-127, 128) if bits == 8 else (-8, 8)
    fc1_q = rng.integers(low, high, (E, 2 * I, H), dtype=np.int8)
    down_q = rng.integers(low, high, (E, H, I), dtype=np.int8)
    fc1_d = (rng.random((E, 2 * I, H // group)) * 1e-3).astype(np.float16)
    down_d = (rng.random((E, H, I // group)) * 1e-3).astype(np.float16)
    return fc1_q, fc1_d, down_q, down_d


def layers(rng: np.random.Generator, bits: int, group: int, library: ctypes.CDLL | None) -> list:
    """LAYERS kernels over distinct copies of one layer's packed weights."""
    from moetrt.plugins.cpu_experts import CpuExperts, pack_down, pack_gate_up, pack_quantized

    if bits == 32:
        packed = (pack_gate_up(rng.standard_normal((E, 2 * I, H), dtype=np.float32) * 0.02, SLICES).reshape(-1),
                  pack_down(rng.standard_normal((E, H, I), dtype=np.float32) * 0.02, SLICES).reshape(-1))
    else:
        packed = pack_quantized(*random_quantized(rng, bits, group), bits, group, SLICES)
    return [CpuExperts(packed[0].copy(), packed[1].copy(), E, H, I, SLICES, THREADS, library, bits,
                       group if bits != 32 else 0) for _ in range(LAYERS)]


def time_calls(kernels: list, rng: np.random.Generator, tokens: int, calls: int,
               per_expert: int) -> tuple[float, float, float, float]:
    """Over `calls` calls, layers in turn: median seconds per call, median and best GB/s of weights read (the
    best call shows what the kernel reaches when no other process takes its cores or bandwidth), and the median
    CPU seconds per call over all the process's threads (less swayed by other processes than the wall time)."""
    seconds, rates, cpu = [], [], []
    for index in range(calls + 2):
        x = rng.standard_normal((tokens, H)).astype(np.float32)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]).astype(np.int32)
        weights = rng.random((tokens, K)).astype(np.float32)
        kernel = kernels[index % LAYERS]
        start, start_cpu = time.perf_counter(), time.process_time()
        kernel(x, ids, weights)
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if index >= 2:
            seconds.append(elapsed)
            cpu.append(elapsed_cpu)
            rates.append(len(np.unique(ids)) * per_expert / elapsed / 1e9)
    return statistics.median(seconds), statistics.median(rates), max(rates), statistics.median(cpu)


def cached(systems: dict[str, tuple[int, ctypes.CDLL | None]], group: int, rounds: int, calls: int) -> None:
    """The `--cached` runs: each system's kernel on one expert of ds-mini's shape, from the caches."""
    from moetrt.plugins.cpu_experts import CpuExperts, pack_quantized, quantized_bytes

    rng = np.random.default_rng(1)
    kernels = {}
    for name, (bits, library) in systems.items():
        fc1_q, fc1_d, down_q, down_d = (array[:2] for array in random_quantized(rng, bits, group))
        packed = pack_quantized(fc1_q, fc1_d, down_q, down_d, bits, group, 1)
        kernels[name] = (bits, CpuExperts(*packed, 2, H, I, 1, 1, library, bits, group))
    for tokens in (1, 8):
        x = rng.standard_normal((tokens, H)).astype(np.float32)
        ids, weights = np.zeros((tokens, 1), np.int32), np.ones((tokens, 1), np.float32)
        best = dict.fromkeys(kernels, float("inf"))
        for round_ in range(rounds):
            for name in list(kernels) if round_ % 2 == 0 else list(reversed(kernels)):
                kernel = kernels[name][1]
                kernel(x, ids, weights)
                start = time.thread_time()
                for _ in range(calls):
                    kernel(x, ids, weights)
                best[name] = min(best[name], (time.thread_time() - start) / calls)
        for name, seconds in best.items():
            per_expert = 3 * quantized_bytes(H, I, kernels[name][0], group)
            print(f"{name} {tokens} row(s): {seconds * 1e6:.1f} µs per call, {per_expert / seconds / 1e9:.1f} GB/s")


def main(argv: list[str] | None = None) -> None:
    from moetrt.plugins.cpu_experts import load_library, quantized_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=42, help="calls per system, batch and round")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--library", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--cached", action="store_true", help="one expert from the caches, CPU time (see above)")
    options = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    group = options.group_size
    libraries = [("", None)] + [(name, load_library(path)) for name, _, path in
                                (entry.partition("=") for entry in options.library)]
    if options.cached:
        cached({f"int{bits}{'-' + name if name else ''}": (bits, library) for name, library in libraries
                for bits in (8, 4) if bits in options.bits}, group, options.rounds * 2, options.calls * 5)
        return
    per_expert = {32: 3 * H * I * 4, **{bits: 3 * quantized_bytes(H, I, bits, group) for bits in (8, 4)}}
    systems = {}
    for name, library in libraries:
        for bits in (32, 8, 4):
            if bits in options.bits:
                label = "fp32" if bits == 32 else f"int{bits}"
                systems[f"{label}{'-' + name if name else ''}"] = (bits, layers(rng, bits, group, library))
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    bandwidth = []
    for round_ in range(options.rounds):
        order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
        bandwidth.append(copy_bandwidth(THREADS, repeats=3))
        for tokens in (1, 8):
            for name in order:
                bits, kernels = systems[name]
                results.setdefault((name, tokens), []).append(
                    time_calls(kernels, rng, tokens, options.calls, per_expert[bits]))
        line = ", ".join(f"{name} b{tokens} {values[-1][0] * 1e3:.2f} ms {values[-1][1]:.1f} GB/s "
                         f"(best {values[-1][2]:.1f})" for (name, tokens), values in results.items())
        print(f"round {round_ + 1} (copy {bandwidth[-1] / 1e9:.1f} GB/s): {line}", flush=True)
    print(f"\ncopy bandwidth, 2 threads: median {statistics.median(bandwidth) / 1e9:.1f} GB/s "
          f"({min(bandwidth) / 1e9:.1f}-{max(bandwidth) / 1e9:.1f}); group size {group}")
    print("| system | batch | ms per layer call | CPU ms per call | GB/s of weights read | best call GB/s |\n"
          "|---|---|---|---|---|---|")
    for (name, tokens), values in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        ms = [value[0] * 1e3 for value in values]
        cpu = [value[3] * 1e3 for value in values]
        rates = [value[1] for value in values]
        print(f"| {name} | {tokens} | {statistics.median(ms):.3f} ({min(ms):.3f}-{max(ms):.3f}) | "
              f"{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | "
              f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
              f"{max(value[2] for value in values):.1f} |")


if __name__ == "__main__":
    main()
