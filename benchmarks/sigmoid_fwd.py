"""The Triton sigmoid-attention forward with pointer loads only, TMA loads only, and both offered
to its autotuner (attnkit's default on Hopper), against softmax attention through SDPA (FlashAttention and cuDNN), in one process:
issue 6's "sigmoid forward within 10% of softmax". Causal, bias -log T, bf16, B = tokens / T,
16 heads, D = 128. Also the largest difference between the two sigmoid outputs and the tiles
the autotuner picked. CUDA only.

    PYTHONPATH=src python benchmarks/sigmoid_fwd.py --seq 8192,32768 --out sigmoid-fwd.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.ops.sigmoid import sigmoid_triton
from attnkit.ops.sigmoid import sigmoid_attend
from cuda_timing import save_results, timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    H, D = 16, 128
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        B = max(1, a.tokens // T)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = {"seq": T, "batch": B}
        with torch.no_grad():
            for name, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
                with sdpa_kernel([backend]):
                    row[name] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeat)
            outs = {}
            variants = (("sigmoid_pointer_ms", False), ("sigmoid_tma_ms", True), ("sigmoid_auto_ms", "auto"))
            for name, tma in variants:
                sigmoid_triton.TMA_FORWARD = tma

                def run():
                    return sigmoid_attend(q, k, v, pattern="causal", bias=-math.log(T), backend="triton")

                row[name] = timed(run, a.repeat)
                outs[name] = run()
            sigmoid_triton.TMA_FORWARD = "auto"
        row["tma_vs_pointer_max_abs_diff"] = float((outs["sigmoid_tma_ms"].float() - outs["sigmoid_pointer_ms"].float()).abs().max())
        for loads, tuner in sigmoid_triton._FWD_BY_LOADS.items():
            row["config_" + "+".join(loads)] = str(getattr(tuner[0], "best_config", None))
        best = min(row["sdpa_flash_ms"], row["sdpa_cudnn_ms"])
        row["speed_vs_fastest_softmax"] = {n: best / row[n] for n, *_ in variants}
        rows.append(row)
        print(json.dumps(row), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
