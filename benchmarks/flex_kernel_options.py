"""Which FlexAttention ``kernel_options`` should each pattern ask for? The options on the patterned mechanisms' training step: forward +
backward through ``attend(backend="flex")`` with each set of options (``attnkit.ops.softmax.flex.
FLEX_KERNEL_OPTIONS``, which override each pattern's own ``flex_kernel_options``), for S2 (vert_stride 16, 64-token blocks, 16 local) at ``--s2-seq``,
and dense causal, window 1024 and sink 4 + 1024 at ``--seq``; dense causal SDPA (cuDNN) at
both lengths in the same process for the ratios. bf16, B = 1, 16 heads, D = 128. CUDA only.

    PYTHONPATH=src python benchmarks/flex_kernel_options.py --variants default,no-tma,tma --cases s2,window,sink \\
        --out benchmarks/results/h200/flex-kernel-options.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from attnkit import patterns
from attnkit.ops import attend
from attnkit.ops.softmax import flex as attention_module
from cuda_timing import save_results, timed

VARIANTS = {
    "default": {},  # attnkit as shipped: each pattern's own flex_kernel_options (S2: TMA)
    "no-tma": {"USE_TMA": False},
    "tma": {"USE_TMA": True},
    # since session 12 attend grants ROWS_GUARANTEED_SAFE only where it verified it (and reorders the
    # blocks for it); the earlier "safe" timings set it unverified
    "safe": {"ROWS_GUARANTEED_SAFE": True},
    "tma+safe": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
    "tma-nosafe": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": False},  # S2 as it was before rows-safe was granted
    "pinned": {"BLOCK_M": 128, "BLOCK_N": 64},  # the forward tile, fixed (attend grants rows-safe only then)
    "safe-pinned": {"ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 128, "BLOCK_N": 64},
    "tma+fwd8w3s": {"USE_TMA": True, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "tma+fwd4w2s": {"USE_TMA": True, "fwd_num_warps": 4, "fwd_num_stages": 2},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="default,tma,tma+safe,default")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--s2-seq", type=int, default=131072)
    p.add_argument("--cases", default="s2,causal,window,sink")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    H, D = 16, 128
    data = {}

    def tensors(T):
        if T not in data:
            data[T] = [torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
            data[T].append(torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16))
        return data[T]

    def step(T, fn):
        q, k, v, g = tensors(T)

        def run():
            if a.mode == "fwd":
                with torch.no_grad():
                    return fn(q, k, v)
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(g)
        return run

    cases = {
        "s2": (a.s2_seq, patterns.s2_strided(num_heads=H, block_size=64, local_blocks=16, vert_stride=16)),
        "causal": (a.seq, "causal"),
        "window": (a.seq, patterns.sliding_window(1024)),
        "sink": (a.seq, patterns.sink_window(4, 1024)),
    }
    rows = []
    for T in sorted({cases[c][0] for c in a.cases.split(",")}):
        ms = timed(step(T, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), a.repeat)
        rows.append({"case": "dense-sdpa", "seq": T, "mode": a.mode, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    for variant in a.variants.split(","):
        attention_module.FLEX_KERNEL_OPTIONS = dict(VARIANTS[variant])
        for case in a.cases.split(","):
            T, pattern = cases[case]
            t0 = time.perf_counter()
            try:
                ms = timed(step(T, lambda q, k, v: attend(q, k, v, pattern=pattern, backend="flex")), a.repeat)
                row = {"case": case, "seq": T, "mode": a.mode, "variant": variant, "ms": ms,
                       "first_calls_s": time.perf_counter() - t0}
            except Exception as e:  # an option this torch cannot lower: record it, go on
                row = {"case": case, "seq": T, "mode": a.mode, "variant": variant,
                       "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
