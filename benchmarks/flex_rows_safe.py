"""Does FlexAttention's ``ROWS_GUARANTEED_SAFE`` turn rows to NaN where attnkit refuses it, and
is it exact where attnkit grants it? S2 (vert_stride 16, 64-token blocks, 16 local blocks) forward
through compiled ``flex_attention`` with S2's kernel options, on (a) FlexAttention's own block
order and (b) attnkit's reordered one (``diagonal_first``), each with and without the flag:
NaN rows and the largest difference from the guarded output. Also times attnkit's check and
reordering (once per shape, then cached). CUDA only.

    PYTHONPATH=src python benchmarks/flex_rows_safe.py --seq 32768 --out benchmarks/results/h200/flex-rows-safe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

from attnkit import patterns
from attnkit.ops.softmax.flex import block_mask_for, diagonal_first, first_tiles_cover_rows
from cuda_timing import save_results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    T, H, D = a.seq, a.heads, 128
    s2 = patterns.s2_strided(num_heads=H, block_size=64, local_blocks=16, vert_stride=16)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    own = block_mask_for(s2, 1, H, T, T, 0, "cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reordered = diagonal_first(own, 0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    checks = {name: first_tiles_cover_rows(mask, s2, T, T, 0, 64) for name, mask in (("own", own), ("reordered", reordered))}
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    compiled = torch.compile(flex_attention, dynamic=False)
    base = {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64}
    rows = {"seq": T, "reorder_s": t1 - t0, "check_both_s": t2 - t1, "verified": checks}
    with torch.no_grad():
        for name, mask in (("own", own), ("reordered", reordered)):
            guarded = compiled(q, k, v, block_mask=mask, kernel_options={**base, "ROWS_GUARANTEED_SAFE": False})
            unguarded = compiled(q, k, v, block_mask=mask, kernel_options={**base, "ROWS_GUARANTEED_SAFE": True})
            nan_rows = unguarded.isnan().any(-1)
            finite = ~nan_rows
            rows[name] = {
                "nan_rows": int(nan_rows.sum()),
                "rows": nan_rows.numel(),
                "max_abs_diff_finite_rows": float((unguarded.float() - guarded.float()).abs()[finite].max()),
                "guarded_nan_rows": int(guarded.isnan().any(-1).sum()),
            }
    print(json.dumps(rows), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
