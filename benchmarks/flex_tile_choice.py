"""Would another forward tile close FlexAttention's gap to SDPA? Dense causal attention through
FlexAttention with each ``kernel_options`` tile, against SDPA's fastest backend at the same shape.

Inductor picks one forward tile per (head dim, dtype, GPU) unless max-autotune is on; this
measures what the others would give (bf16, B=1, 16 heads, D=128). CUDA only.

    PYTHONPATH=src python benchmarks/flex_tile_choice.py --seq 32768 --out benchmarks/results/h200/flex-tile-choice.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from cuda_timing import timed

TILES = [None, (128, 64, 3, 4), (128, 128, 2, 8), (128, 128, 3, 8), (128, 64, 3, 8), (128, 64, 4, 8), (64, 128, 3, 4),
         (128, 128, 1, 8), (64, 64, 4, 4)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    T, H, D = a.seq, a.heads, 128
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeat, warmup=3)
        rows = [{"tile": "sdpa", "ms": sdpa}]
        print(f"sdpa causal: {sdpa:.3f} ms", flush=True)
        for tile in TILES:
            options = None if tile is None else dict(BLOCK_M=tile[0], BLOCK_N=tile[1], num_stages=tile[2], num_warps=tile[3])
            try:
                ms = timed(lambda: compiled(q, k, v, block_mask=causal, kernel_options=options), a.repeat, warmup=3)
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"{tile}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
            rows.append({"tile": tile or "inductor default", "ms": ms, "vs_sdpa": sdpa / ms})
            print(f"{str(tile or 'inductor default'):22s} {ms:7.3f} ms = {sdpa / ms:.2f} of sdpa's speed", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": f"python benchmarks/flex_tile_choice.py --seq {T} --heads {H}", "device":
                       torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
