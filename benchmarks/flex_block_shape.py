"""Which FlexAttention block shape serves a pattern best in training (forward + backward)?

Times ``attend`` (and dense causal FlexAttention, the same kernel family) on one shape with the
pattern's block shape overridden, and prints each pattern's realised fraction of its FLOP
reduction. The data behind the patterns' ``flex_block_size`` choices (issue 6). CUDA only.

    PYTHONPATH=src python benchmarks/flex_block_shape.py --seq 131072 --cases s2 --blocks 128x64,64x64 --sdpa \\
        --out benchmarks/results/h200/flex-block-shape-s2.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attnkit import patterns
from attnkit.ops import attend
from attnkit.registry import dense_attention_flops
from cuda_timing import timed, training_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", default="window,sink,s2")
    p.add_argument("--blocks", default="128,128x64", help="block shapes to time: 128 (FlexAttention's) or QxKV")
    p.add_argument("--sdpa", action="store_true", help="also time dense causal SDPA (the S2 target's baseline)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    T, H, D = a.seq, a.heads, a.head_dim
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

    def step(pattern):
        return training_step(lambda: attend(q, k, v, pattern=pattern, backend="flex"), (q, k, v), g)

    dense = patterns.causal()
    dense_ms = timed(step(dense), a.repeat)
    dense_flops = dense_attention_flops(1, T, num_heads=H, head_dim=D, pattern=dense)
    rows = [{"pattern": "causal (dense flex)", "blocks": "128", "ms": dense_ms}]
    print(f"dense causal flex: {dense_ms:.2f} ms")
    if a.sdpa:
        sdpa = training_step(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)
        rows.append({"pattern": "causal (dense SDPA)", "ms": timed(sdpa, a.repeat)})
        print(f"dense causal SDPA: {rows[-1]['ms']:.2f} ms")
    every = {"window": ("window:1024", patterns.sliding_window(1024)), "sink": ("sink:4:1024", patterns.sink_window(4, 1024)),
             "s2": ("s2:64:16:16", patterns.s2_strided(num_heads=H, block_size=64, local_blocks=16, vert_stride=16))}
    cases = [every[c] for c in a.cases.split(",")]
    shapes = [None if b == "128" else tuple(int(x) for x in b.split("x")) for b in a.blocks.split(",")]
    for name, pattern in cases:
        for blocks in shapes:
            pattern.flex_block_size = blocks
            t0 = time.perf_counter()
            try:
                ms = timed(step(pattern), a.repeat)
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"{name} blocks={blocks}: {type(err).__name__}: {str(err)[:200]}")
                continue
            reduction = dense_flops / dense_attention_flops(1, T, num_heads=H, head_dim=D, pattern=pattern)
            realised = dense_ms / ms / reduction
            sdpa_ms = next((r["ms"] for r in rows if r["pattern"] == "causal (dense SDPA)"), None)
            rows.append({"pattern": name, "blocks": str(blocks or 128), "ms": ms, "flop_reduction": reduction,
                         "speedup_vs_dense_sdpa": None if sdpa_ms is None else sdpa_ms / ms,
                         "speedup_vs_dense_flex": dense_ms / ms, "realised_fraction_vs_flex": realised,
                         "first_call_s": time.perf_counter() - t0})
            print(f"{name:12s} blocks={str(blocks or 128):10s} {ms:8.2f} ms  speedup {dense_ms / ms:5.2f}x of "
                  f"{reduction:5.2f}x -> realised {realised:.2f}  (incl. compile {time.perf_counter() - t0:.0f} s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": "python benchmarks/flex_block_shape.py " + f"--seq {T} --heads {H} --head-dim {D} "
                       f"--cases {a.cases} --blocks {a.blocks}" + (" --sdpa" if a.sdpa else ""),
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
