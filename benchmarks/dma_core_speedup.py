"""How much of its FLOP reduction does DMA's attention core realise against dense attention? One GPU (issue 6).

Times fwd+bwd of what :class:`attnkit.layers.DynamicMaskAttention` runs after its projections:
the per-row thresholds (``kept_key_thresholds``), the block mask of the kept keys, and
FlexAttention with the key bias as ``score_mod`` over them; against dense causal cuDNN (SDPA) and
dense causal FlexAttention with the same bias (the patterned rows' own kernel). Two biases: i.i.d.
per key (the kept keys scattered over every block) and constant over 128-key spans (the kept keys
in whole blocks: the best case for block-sparse kernels). bf16, B = 1, 16 heads, D = 128. CUDA only.

    PYTHONPATH=src python benchmarks/dma_core_speedup.py --seq 32768 --keep 2048 --out benchmarks/results/h200/dma-core.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from attnkit import patterns
from attnkit.layers.dynamic_mask import _KeptKeys, kept_key_thresholds
from attnkit.ops import attend
from attnkit.ops.softmax.flex import block_mask_for
from cuda_timing import save_results, timed, training_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--keep", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    T, H, D = a.seq, a.heads, 128
    q, k, v = [torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)
    biases = {
        "scattered": torch.randn(1, H, T, device="cuda"),
        "block-spans": torch.randn(1, H, -(-T // 128), device="cuda").repeat_interleave(128, -1)[..., :T].contiguous(),
    }
    causal_pairs = T * (T + 1) / 2
    kept_pairs = sum(min(i + 1, a.keep) for i in range(T))
    rows = []

    def step(fn):
        return training_step(fn, (q, k, v), g)

    ms = timed(step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), a.repeat)
    rows.append({"case": "dense-sdpa", "seq": T, "ms": ms})
    print(json.dumps(rows[-1]), flush=True)
    for name, raw in biases.items():
        bias = raw.clone().requires_grad_()

        def add_bias(score, b, h, q_pos, k_pos):
            return score + bias[b, h, k_pos]

        ms = timed(step(lambda: attend(q, k, v, pattern="causal", score_mod=add_bias, backend="flex")), a.repeat)
        rows.append({"case": "dense-flex+bias", "bias": name, "seq": T, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)

        def dma():
            thresholds = kept_key_thresholds(bias.detach(), patterns.causal(), a.keep, T, 0)
            return attend(q, k, v, pattern=_KeptKeys(patterns.causal(), bias.detach(), thresholds, 0, 1),
                          score_mod=add_bias, backend="flex")

        t0 = time.perf_counter()
        ms = timed(step(dma), a.repeat)
        thresholds = kept_key_thresholds(bias.detach(), patterns.causal(), a.keep, T, 0)
        thr_ms = timed(lambda: kept_key_thresholds(bias.detach(), patterns.causal(), a.keep, T, 0), a.repeat)
        pattern = _KeptKeys(patterns.causal(), bias.detach(), thresholds, 0, 1)
        mask_ms = timed(lambda: block_mask_for(pattern, 1, H, T, T, 0, q.device), a.repeat)
        bm = block_mask_for(pattern, 1, H, T, T, 0, q.device)
        visited = float((bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) / bm.kv_num_blocks.numel())
        causal_blocks = (-(-T // 128) + 1) / 2
        rows.append({"case": "dma", "bias": name, "seq": T, "keep": a.keep, "ms": ms, "thresholds_ms": thr_ms,
                     "block_mask_ms": mask_ms, "blocks_per_row_block": visited, "causal_blocks_per_row_block": causal_blocks,
                     "flop_reduction": causal_pairs / kept_pairs, "first_calls_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
