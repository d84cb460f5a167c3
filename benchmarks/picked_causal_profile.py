"""Where the time of :func:`attnkit.ops.softmax.picked_causal.picked_causal_attention` goes, on one GPU.

MoH's routed heads at the issue's shape (12 routed heads of 16, each token picking 6, head dim
128, bf16): the split's forward and forward + backward for several leaf sizes, its plan alone,
and a profiler table of one training step (GPU time per kernel). CUDA and the cuDNN frontend only.

    PYTHONPATH=src python benchmarks/picked_causal_profile.py --seq 32768 --leaf 512 --repeat 10 \\
        --profile benchmarks/results/h200/picked-causal-profile.txt --out benchmarks/results/h200/picked-causal-profile.json
"""

from __future__ import annotations

import argparse

import torch

from attnkit.ops.softmax import picked_causal as pc
from cuda_timing import save_results, timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--routed", type=int, default=12)
    p.add_argument("--active", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--leaf", default="128,512,1024")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--profile", default=None, help="write the profiler table of one step (first leaf) here")
    p.add_argument("--trace", default=None, help="write the profiler's chrome trace of that step here")
    p.add_argument("--gaps", action="store_true", help="print where the GPU idles during that step")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    T, H, R, D = a.seq, a.heads, a.routed, a.head_dim
    shape = dict(device="cuda", dtype=torch.bfloat16)
    full = [torch.randn(1, H, T, D, **shape) for _ in range(3)]
    q, k, v = (t[:, H - R:].detach().requires_grad_() for t in full)  # the routed heads of a 16-head tensor
    scores = torch.rand(1, T, R, device="cuda")
    picked = torch.zeros(1, T, R, dtype=torch.bool, device="cuda")
    picked.scatter_(-1, scores.topk(a.active, dim=-1).indices, True)
    picked = picked.transpose(1, 2)  # [1, R, T], as the layer hands it
    g = torch.randn(1, R, T, D, **shape)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    rows = []
    for mode in ("fwd", "fwdbwd"):
        ms = timed(_step(sdpa, (q, k, v), g, mode), a.repeat)
        rows.append({"seq": T, "what": "sdpa causal, all rows of the routed heads", "mode": mode, "ms": ms})
        print(f"T={T} {mode:6s} sdpa causal on all {R} heads' rows: {ms:7.2f} ms", flush=True)
    for leaf in (int(x) for x in a.leaf.split(",")):
        plan_ms = timed(lambda: pc._plan(picked.reshape(R, T), T, leaf, 128, q.dtype), a.repeat)
        call = lambda: pc.picked_causal_attention(q, k, v, picked, engine="cudnn", leaf=leaf)  # noqa: E731
        for mode in ("fwd", "fwdbwd"):
            ms = timed(_step(call, (q, k, v), g, mode), a.repeat)
            rows.append({"seq": T, "what": f"picked split, leaf {leaf}", "mode": mode, "ms": ms, "plan_ms": plan_ms})
            print(f"T={T} {mode:6s} picked split leaf={leaf}: {ms:7.2f} ms (plan alone {plan_ms:.2f} ms)", flush=True)
        if a.profile and leaf == int(a.leaf.split(",")[0]):
            step = _step(call, (q, k, v), g, "fwdbwd")
            step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
            if a.trace:
                prof.export_chrome_trace(a.trace)
            if a.gaps:
                _print_gaps(prof)
            with open(a.profile, "w") as f:
                f.write(table)
            print(table[:6000])
    save_results(a.out, rows)


def _print_gaps(prof) -> None:
    """The GPU's idle intervals over 20 us between the step's first and last kernel, with the kernel after each."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy_until, idle = None, 0.0
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        if busy_until is not None and start - busy_until > 20:
            idle += start - busy_until
            print(f"  idle {start - busy_until:7.1f} us before {e.name[:70]}")
        busy_until = end if busy_until is None else max(busy_until, end)
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    print(f"  GPU span {span / 1e3:.2f} ms, idle gaps over 20 us: {idle / 1e3:.2f} ms")


def _step(fn, inputs, grad, mode):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


if __name__ == "__main__":
    main()
