"""Lightning attention's Triton kernels with the state walk split into segments of
``segment_chunks`` chunks (64 tokens each), forward and forward + backward, against one walk
over the whole sequence and the default choice (about four walk programs per SM).

bf16, 16 heads, head dim 128, ALiBi-style slopes; batch = ``--tokens`` / seq, so that every
length does the same work. CUDA only.

    PYTHONPATH=src python benchmarks/lightning_segments.py --seq 32768,131072 --out lightning-segments.json
"""

from __future__ import annotations

import argparse
import json

import torch

from attnkit.ops.linear.lightning import alibi_slopes
from attnkit.ops.linear.lightning_triton import CHUNK, _blocks, _segments, lightning_attention_triton
from cuda_timing import timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="32768,131072")
    p.add_argument("--tokens", type=int, default=32768, help="batch = max(1, tokens // seq)")
    p.add_argument("--segments", default="default,all,256,64,32,16,8")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    H, D = a.heads, 128
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    rows = []
    for T in (int(x) for x in a.seq.split(",")):
        B = max(1, a.tokens // T)
        NT = -(-T // CHUNK)
        q, k, v = ((torch.randn(B, H, T, D, device="cuda") * 0.1).bfloat16().requires_grad_() for _ in range(3))
        go = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        for name in a.segments.split(","):
            seg = None if name == "default" else NT if name == "all" else int(name)
            BK, BV = _blocks(D, D)
            chosen = _segments(NT, B * H * (D // BK) * (D // BV), q.device, seg)

            def fwd():
                with torch.no_grad():
                    lightning_attention_triton(q, k, v, slopes, segment_chunks=seg)

            def fwdbwd():
                o, _ = lightning_attention_triton(q, k, v, slopes, segment_chunks=seg)
                torch.autograd.grad(o, (q, k, v), go)

            row = {"seq": T, "batch": B, "segments": name, "segment_chunks": chosen[0], "num_segments": chosen[1],
                   "fwd_ms": timed(fwd, a.repeat, warmup=3), "fwdbwd_ms": timed(fwdbwd, a.repeat, warmup=3)}
            row["fwdbwd_mtok_per_s"] = B * T / row["fwdbwd_ms"] / 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": "python benchmarks/lightning_segments.py " + " ".join(
                f"--{k} {v}" for k, v in vars(a).items() if k != "out" and v is not None),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
