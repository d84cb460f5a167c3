"""The timing helper of the CUDA benchmark scripts in this folder (imported by them as
``from cuda_timing import timed``; Python puts the script's folder on the path)."""

from __future__ import annotations

import time

import torch


def timed(fn, repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` calls after ``warmup``
    (compiles and autotuning happen there), synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3
