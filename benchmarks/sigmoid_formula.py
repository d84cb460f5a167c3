"""Which formula should the Triton sigmoid kernels compute sigmoid with? Accuracy and speed of the two.

``tanh``: ``(1 + tanh(x/2)) / 2`` with one MUFU ``tanh.approx.f32``; ``exp``: ``1 / (1 + 2^(-x log2 e))``
with ``ex2.approx`` and ``rcp.approx`` (:data:`attnkit.ops.sigmoid.sigmoid_triton.SIGMOID_FORMULA`). Under a
``-log n`` bias nearly every weight is small, where ``1 + tanh`` cancels. Measures, per formula:
the elementwise relative error over ``x`` in [-30, 10]; the attention output's error against a
float64 reference (batch item 0, heads 0-1, in row chunks) at the benchmark shape (causal, bias
-log T, bf16, B = tokens / T, 16 heads, D = 128); forward and forward + backward times next to
causal SDPA through cuDNN, in one process. CUDA only.

    PYTHONPATH=src python benchmarks/sigmoid_formula.py --seq 8192,32768 --out benchmarks/results/h200/sigmoid-formula.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from cuda_timing import save_results, timed, training_step
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.ops.sigmoid import sigmoid_triton
from attnkit.ops.sigmoid import sigmoid_attend, sigmoid_attend_reference

FORMULAS = ("exp", "tanh")


def elementwise_errors() -> dict:
    x = torch.linspace(-30, 10, 1 << 20, device="cuda")
    exact = torch.sigmoid(x.double())
    out = {}
    for formula in FORMULAS:
        rel = ((sigmoid_triton.sigmoid_values(x, formula).double() - exact) / exact).abs()
        out[formula] = {f"[{lo}, {hi})": float(rel[(x >= lo) & (x < hi)].max())
                        for lo, hi in ((-30, -15), (-15, -8), (-8, -4), (-4, 0), (0, 10))}
    return out


def reference_error(q, k, v, out, bias: float, heads: int = 2, rows: int = 2048) -> float:
    """Relative rms error of ``out[0, :heads]`` against :func:`sigmoid_attend_reference` in float64,
    ``rows`` query rows at a time (the whole ``T x T`` weights would not fit at 32k)."""
    T = q.shape[2]
    num = den = 0.0
    k, v = k[:1, :heads].double(), v[:1, :heads].double()
    for start in range(0, T, rows):
        ref = sigmoid_attend_reference(q[:1, :heads, start:start + rows].double(), k, v, pattern="causal", bias=bias,
                                       q_offset=start)
        num += float(((out[:1, :heads, start:start + rows].double() - ref) ** 2).sum())
        den += float((ref**2).sum())
    return math.sqrt(num / den)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    H, D = 16, 128
    rows = [{"elementwise_max_relative_error": elementwise_errors()}]
    print(json.dumps(rows[0]), flush=True)
    for T in (int(s) for s in a.seq.split(",")):
        rows.append(measure(T, max(1, a.tokens // T), H, D, a.repeat))
        print(json.dumps(rows[-1]), flush=True)
        save_results(a.out, rows)
        torch.cuda.empty_cache()


def measure(T: int, B: int, H: int, D: int, repeat: int) -> dict:
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    bias = -math.log(T)
    row = {"seq": T, "batch": B}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        with torch.no_grad():
            row["sdpa_cudnn_fwd_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeat)
        row["sdpa_cudnn_fwdbwd_ms"] = timed(training_step(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g), repeat // 2)

    def run():
        return sigmoid_attend(q, k, v, pattern="causal", bias=bias, backend="triton")

    for formula in FORMULAS:
        sigmoid_triton.SIGMOID_FORMULA = formula
        with torch.no_grad():
            row[f"{formula}_fwd_ms"] = timed(run, repeat)
            row[f"{formula}_output_error"] = reference_error(q, k, v, run(), bias)
        row[f"{formula}_fwdbwd_ms"] = timed(training_step(run, (q, k, v), g), repeat // 2)
        row[f"{formula}_fwd_speed_vs_cudnn"] = row["sdpa_cudnn_fwd_ms"] / row[f"{formula}_fwd_ms"]
        row[f"{formula}_fwdbwd_speed_vs_cudnn"] = row["sdpa_cudnn_fwdbwd_ms"] / row[f"{formula}_fwdbwd_ms"]
    sigmoid_triton.SIGMOID_FORMULA = "exp"
    return row

if __name__ == "__main__":
    main()
