"""Where a FlexAttention training step's time goes: the CUDA kernels of ``--steps`` fwd+bwd steps of
``attend(backend="flex")`` per case, from ``torch.profiler`` (after warm-up), summed per kernel name.
bf16, B = 1, 16 heads, D = 128. CUDA only.

    PYTHONPATH=src python benchmarks/flex_profile.py --cases window,sink --seq 32768 --out profile.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from attnkit import patterns
from attnkit.ops import attend
from cuda_timing import save_results, training_step

CASES = {"window": patterns.sliding_window(1024), "sink": patterns.sink_window(4, 1024), "causal": "causal"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="window,sink,causal")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    q, k, v = [torch.randn(1, 16, a.seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)
    rows = []
    for case in a.cases.split(","):
        pattern = CASES[case]

        step = training_step(lambda: attend(q, k, v, pattern=pattern, backend="flex"), (q, k, v), g)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step()
            torch.cuda.synchronize()
        per_kernel = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type.name == "CUDA":
                per_kernel[e.name][0] += e.device_time / 1e3 / a.steps
                per_kernel[e.name][1] += 1
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
        row = {"case": case, "seq": a.seq, "kernel_ms_per_step": round(sum(t for t, _ in per_kernel.values()), 4),
               "kernels": [{"name": n[:120], "ms": round(t, 4), "calls_per_step": c / a.steps} for n, (t, c) in top[:a.top]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
