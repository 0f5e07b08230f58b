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
    """Buffers kept between samples, so each sample is only the copies (the bench takes one beside every
    decode repeat)."""

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
    """Bytes per second (read + write) of a `threads`-way memory copy."""
    if buffers is None:
        source = np.ones(size // 4, dtype=np.float32)
        target = np.zeros_like(source)
    else:
        source, target = buffers

    def copy(part: int) -> None:
        span = slice(part * len(source) // threads, (part + 1) * len(source) // threads)
        np.copyto(target[span], source[span])  # numpy releases the GIL for the copy

    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=(part,)) for part in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, 2 * source.nbytes / (time.perf_counter() - start))
    return best


def read_bandwidth(threads: int = 2, size: int = 512 << 20, repeats: int = 7,
                   buffer: np.ndarray | None = None) -> float:
    """Bytes per second of a `threads`-way read of `size` bytes (float32 `buffer`, or a fresh one of ones): each
    thread takes numpy's max over its share (see the module docstring); the best of `repeats`."""
    source = np.ones(size // 4, dtype=np.float32) if buffer is None else buffer

    def read(part: int) -> None:
        source[part * len(source) // threads:(part + 1) * len(source) // threads].max()  # releases the GIL

    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=read, args=(part,)) for part in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, source.nbytes / (time.perf_counter() - start))
    return best
