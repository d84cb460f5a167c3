"""Two versions of the Lightning Triton kernels timed in one process, interleaved (A B A B):
``--modules`` names importable modules that define ``lightning_attention_triton`` (e.g. the
current ``attnkit.ops.linear.lightning_triton`` and an older copy of it saved beside it), for a
refactor that must not cost time. Forward and forward + backward, bf16, 16 heads, D = 128,
batch = tokens / seq. Also the largest output difference between the two. CUDA only.

    PYTHONPATH=src python benchmarks/lightning_ab.py --modules attnkit.ops.linear.lightning_triton,attnkit.ops.linear._old --out ab.json
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from attnkit.ops.linear.lightning import alibi_slopes
from cuda_timing import save_results, timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modules", required=True, help="two comma-separated module names")
    p.add_argument("--seq", default="8192,32768,131072")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per case")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    names = a.modules.split(",")
    fns = {n: importlib.import_module(n).lightning_attention_triton for n in names}
    H, D = 16, 128
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        B = max(1, a.tokens // T)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        outs = {}
        for mode in ("fwd", "fwdbwd"):
            times = {n: [] for n in names}
            for _ in range(a.rounds):
                for n, fn in fns.items():
                    def run(fn=fn):
                        if mode == "fwd":
                            with torch.no_grad():
                                return fn(q, k, v, slopes)[0]
                        for t in (q, k, v):
                            t.grad = None
                        fn(q, k, v, slopes)[0].backward(g)
                    times[n].append(timed(run, a.repeat))
                    if mode == "fwd":
                        outs[n] = run()
            row = {"seq": T, "batch": B, "mode": mode, "ms": times,
                   "ratio_second_over_first": min(times[names[1]]) / min(times[names[0]])}
            if mode == "fwd":
                row["max_abs_diff"] = float((outs[names[0]].float() - outs[names[1]].float()).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_results(a.out, rows)


if __name__ == "__main__":
    main()
