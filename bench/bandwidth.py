"""This machine's memory bandwidth, the denominator of the decode roofline: copy and read.

Copy: a copy of N bytes is counted as 2N bytes moved (read + write), as STREAM's Copy counts it, with the copy
split across the benchmark's thread count; the best of several repeats of a 512 MiB copy.

Read: N bytes read once, as a decode step reads its weights (no writes), split across the threads; the best of
several repeats of a 512 MiB read. numpy's float32 max is the reader: it is vectorized and releases the GIL, and
on this project's 2-core VM (Emerald Rapids) it reads 23.4 GB/s with 2 threads, against 22-29 GB/s for a C loop of
512-bit loads with and without software prefetch, where the copy measured 31-38 GB/s. Two cores read less than
the copy's counted bytes because each core's outstanding misses bound its read rate (1 thread: 12 GB/s); so a
weight-streaming step can reach at most read / copy (0.6-0.75 here) of the copy roofline.
"""

from __future__ import annotations

import threading
import time

import numpy as np


class CopyProbe:
    """Buffers kept between samples, so each sample is only the copies or reads (`make bench` takes a copy sample
    before and after every decode repeat, `make bench-quantized` both kinds before and after every round)."""

    def __init__(self, threads: int = 2, size: int = 512 << 20):
        self.threads = threads
        self.source = np.ones(size // 4, dtype=np.float32)
        self.target = np.zeros_like(self.source)

    def sample(self, repeats: int = 5) -> float:
        """Copy bandwidth now, bytes per second (read + write)."""
        return copy_bandwidth(self.threads, repeats=repeats, buffers=(self.source, self.target))

    def sample_read(self, repeats: int = 5) -> float:
        """Read bandwidth now, bytes per second (`read_bandwidth` over the copy's source buffer)."""
        return read_bandwidth(self.threads, repeats=repeats, buffer=self.source)


def copy_bandwidth(threads: int = 2, size: int = 512 << 20, repeats: int = 7,
                   buffers: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Bytes per second (read + write) of a `threads`-way memory copy of `size` bytes (or of `buffers`, float32
    source and target), the best of `repeats`. Raises ValueError for fewer than one thread or repeat, or fewer
    elements than threads. Sizes well beyond the last-level cache measure memory; smaller ones measure caches."""
    if buffers is None:
        source = np.ones(size // 4, dtype=np.float32)
        target = np.zeros_like(source)
    else:
        source, target = buffers

    def copy(span: slice) -> None:
        np.copyto(target[span], source[span])  # numpy releases the GIL for the copy

    return 2 * source.nbytes / _best_time(threads, repeats, len(source), copy)


def read_bandwidth(threads: int = 2, size: int = 512 << 20, repeats: int = 7,
                   buffer: np.ndarray | None = None) -> float:
    """Bytes per second of a `threads`-way read of `size` bytes (float32 `buffer`, or a fresh one of ones): each
    thread takes numpy's max over its share (see the module docstring); the best of `repeats`. Raises ValueError
    as copy_bandwidth does."""
    source = np.ones(size // 4, dtype=np.float32) if buffer is None else buffer

    def read(span: slice) -> None:
        source[span].max()  # numpy releases the GIL for the reduction

    return source.nbytes / _best_time(threads, repeats, len(source), read)


def _best_time(threads: int, repeats: int, elements: int, work) -> float:
    """The shortest of `repeats` wall times of `threads` threads each running `work(span)` over its share of
    `elements` (seconds). An exception in a worker is raised here."""
    if threads < 1 or repeats < 1:
        raise ValueError(f"bandwidth probes need at least 1 thread and 1 repeat, got threads={threads}, "
                         f"repeats={repeats}")
    if elements < threads:
        raise ValueError(f"a buffer of {elements} elements cannot be split over {threads} threads: give a larger "
                         "size (the default, 512 MiB, measures memory)")
    spans = [slice(part * elements // threads, (part + 1) * elements // threads) for part in range(threads)]
    errors: list[BaseException] = []

    def run(span: slice) -> None:
        try:
            work(span)
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=run, args=(span,)) for span in spans]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
        if errors:
            raise errors[0]
    return best
