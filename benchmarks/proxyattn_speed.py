"""ProxyAttn's prefill attention against dense causal cuDNN attention (issue 23, item 6).

One attention layer shaped like Llama-3.1-8B's (32 query heads, 8 KV heads, head dim 128),
random bf16 q / k / v, B = 1, at each ``--seq``. Timed in one run, each the median of
``--repeat`` calls:

- ``dense``: causal SDPA forced onto cuDNN (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``); k / v
  are repeated to 32 heads before timing (cuDNN takes no GQA flag);
- ``proxy``: the proxy heads' block importance (:func:`attnkit.hf.proxyattn.proxy_importance`);
- ``budget``: the dynamic per-head budgets (:func:`head_budgets`), run for their cost;
- ``select``: the block grid at a fixed ``--budget`` fraction (random inputs attend almost
  uniformly, so the dynamic budget would keep nearly every block: the fraction stands in for the
  density measured on a real model, e.g. the subject at the budget that keeps its passkey accuracy);
- ``sparse``: the block mask from the grid and FlexAttention over it (attnkit's ``flex`` backend).

``speedup = dense / (proxy + budget + select + sparse)``; ``attention_speedup = dense / sparse``.

    PYTHONPATH=src python benchmarks/proxyattn_speed.py --seq 32768 65536 131072 --budget 0.05 0.1 0.2 \\
        --out benchmarks/results/h200/proxyattn-speed.json
    PYTHONPATH=src python benchmarks/proxyattn_speed.py --device cpu   # a dry run at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _timer(device: torch.device):
    def timed(fn, repeat: int, warmup: int = 2) -> float:
        """Median wall time of ``fn()`` in ms (synchronised on CUDA), after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    return timed


def main(argv=None) -> dict:
    from attnkit._checks import parse_device
    from attnkit.hf.proxyattn import BlockSelection, density, head_budgets, proxy_importance, select_blocks
    from attnkit.ops import attend

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (default 32k 64k 128k; cpu: 512)")
    p.add_argument("--budget", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="fractions of the visible key blocks each head keeps")
    p.add_argument("--gamma", type=float, default=0.95, help="the dynamic budget's mass (timed, not used to select)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--query-stride", type=int, default=16)
    p.add_argument("--proxy-heads", type=int, default=None, help="default: one per KV head (8)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    device = parse_device(a.device)
    cuda = device.type == "cuda"
    seqs = a.seq or ([32768, 65536, 131072] if cuda else [512])
    if not cuda:  # a dry run: tiny shapes, float32 (CPU FlexAttention runs eagerly)
        a.heads, a.kv_heads, a.head_dim = min(a.heads, 4), min(a.kv_heads, 2), min(a.head_dim, 32)
        a.block_size = min(a.block_size, 64)
        a.repeat = min(a.repeat, 2)
    for s in seqs:
        if s % a.block_size:
            raise ValueError(f"--seq {s} must be a multiple of --block-size {a.block_size}")
    dtype = torch.bfloat16 if cuda else torch.float32
    timed = _timer(device)
    scale = a.head_dim ** -0.5
    rows = []
    for S in seqs:
        torch.manual_seed(0)
        q = torch.randn(1, a.heads, S, a.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, a.kv_heads, S, a.head_dim, device=device, dtype=dtype)
        v = torch.randn(1, a.kv_heads, S, a.head_dim, device=device, dtype=dtype)
        start = torch.zeros(1, dtype=torch.long, device=device)
        g = a.heads // a.kv_heads
        k_rep, v_rep = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)

        def dense():
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)

        common = dict(scale=scale, start=start, block_size=a.block_size)
        importance = proxy_importance(q, k, proxy_heads=a.proxy_heads, query_stride=a.query_stride, **common)
        t_dense = timed(dense, a.repeat)
        t_proxy = timed(lambda: proxy_importance(q, k, proxy_heads=a.proxy_heads, query_stride=a.query_stride,
                                                 **common), a.repeat)
        t_budget = timed(lambda: head_budgets(q, k, importance, gamma=a.gamma, query_stride=a.query_stride,
                                              **common), a.repeat)
        needed = head_budgets(q, k, importance, gamma=a.gamma, query_stride=a.query_stride, **common)
        dynamic = select_blocks(importance, num_query_heads=a.heads, start=start, block_size=a.block_size,
                                first_query_block=0, needed=needed)
        for budget in a.budget:
            def select():
                return select_blocks(importance, num_query_heads=a.heads, start=start, block_size=a.block_size,
                                     first_query_block=0, budget=budget)

            blocks = select()

            def sparse():
                return attend(q, k, v, pattern=BlockSelection(blocks, start, a.block_size), scale=scale,
                              backend="flex")

            t_select = timed(select, a.repeat)
            t_sparse = timed(sparse, a.repeat)
            # the sparse output against the dense one over the same blocks, on the last query block
            # (a check that the timed path attends where it should: relative RMS of the difference)
            out = sparse()[:, :, -a.block_size:].float()
            last = slice(S - a.block_size, S)
            i = torch.arange(S - a.block_size, S, device=device)[:, None]
            j = torch.arange(S, device=device)[None, :]
            allowed = (j <= i) & blocks[0][:, i // a.block_size, j // a.block_size]  # [H, b, S]
            logits = (q[0, :, last].float() @ k_rep[0].float().transpose(-1, -2)) * scale
            ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v_rep[0].float()
            error = float((out[0] - ref).norm() / ref.norm())
            total = t_proxy + t_budget + t_select + t_sparse
            row = {"seq": S, "budget": budget, "density": density(blocks, start, a.block_size),
                   "dynamic_density_random_inputs": density(dynamic, start, a.block_size), "gamma": a.gamma,
                   "dense_ms": t_dense, "proxy_ms": t_proxy, "budget_ms": t_budget, "select_ms": t_select,
                   "sparse_ms": t_sparse, "total_ms": total, "speedup": t_dense / total,
                   "attention_speedup": t_dense / t_sparse, "rel_rms_error_last_block": error}
            rows.append(row)
            print(json.dumps({key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
              "block_size": a.block_size, "query_stride": a.query_stride, "proxy_heads": a.proxy_heads, "rows": rows}
    if a.out:
        import shlex
        import sys

        result["command"] = "python " + " ".join(shlex.quote(x) for x in sys.argv)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
