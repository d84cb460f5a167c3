"""The helpers of the CUDA benchmark scripts in this folder (imported by them as
``from cuda_timing import timed``; Python puts the script's folder on the path)."""

from __future__ import annotations

import json
import shlex
import sys
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


def training_step(fn, inputs, grad):
    """A closure for :func:`timed`: clear the gradients of ``inputs``, run ``fn()`` and backpropagate
    ``grad`` through its output (one forward + backward)."""
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


def save_results(path: str | None, rows) -> None:
    """Write ``rows`` to ``path`` (if given) as JSON beside the command line that made them, the
    time, the code hash, the GPU and the torch version (``benchmarks/results_readme.py`` lists them)."""
    if not path:
        return
    from datetime import datetime, timezone

    from attnkit._meta import code_hash

    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    with open(path, "w") as f:
        json.dump({"command": command, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "code_hash": code_hash(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
