"""This machine's memory-copy bandwidth, the denominator of the decode roofline.

A copy of N bytes is counted as 2N bytes moved (read + write), as STREAM's Copy counts it, with the copy
split across the benchmark's thread count; the best of several repeats of a 512 MiB copy.
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
        return copy_bandwidth(self.threads, repeats=repeats, buffers=(self.source, self.target))


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
