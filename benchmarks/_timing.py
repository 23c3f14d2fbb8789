"""Shared timing helper for the benchmark scripts: median wall time after one warm-up call."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one warm-up call)."""

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
