"""S2-Attention's training step with one FlexAttention backward tile offered to Inductor.

Inductor's sm90 backward tile (64 x 128 / 128 x 64) does not divide S2's 64-token key blocks,
so attnkit offers its own (``attnkit.ops.softmax.flex.SMALL_BWD_TILES``). This times
``attend`` forward + backward on the S2 pattern (vert_stride 16, 64-token blocks, 16 local
blocks) with the tile given on the command line, against dense causal SDPA in the same
process: run it once per tile (a fresh process each, so that Inductor compiles anew). CUDA only.

    PYTHONPATH=src TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/s2_bwd_tiles.py --tile 64,64,128,64,3,8
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
from cuda_timing import timed, training_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tile", required=True, help="block_m1,block_n1,block_m2,block_n2,stages,warps")
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dense", action="store_true", help="also time dense causal SDPA (the 8x target's baseline)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tile = tuple(int(x) for x in a.tile.split(","))
    attention_module.SMALL_BWD_TILES = (tile,)
    T, H, D = a.seq, a.heads, 128
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

    def step(fn):
        return training_step(fn, (q, k, v), g)

    s2 = patterns.s2_strided(num_heads=H, block_size=64, local_blocks=16, vert_stride=16)
    t0 = time.perf_counter()
    s2_ms = timed(step(lambda: attend(q, k, v, pattern=s2)), a.repeat)
    row = {"tile": tile, "seq": T, "s2_ms": s2_ms, "first_calls_s": time.perf_counter() - t0}
    if a.dense:
        row["dense_sdpa_ms"] = timed(step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), a.repeat)
        row["speedup"] = row["dense_sdpa_ms"] / s2_ms
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
