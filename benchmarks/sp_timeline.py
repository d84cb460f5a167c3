"""Sequence parallelism on W GPUs, simulated from one GPU's measured compute (issue 27, scaling).

Multi-GPU machines are not lent, so this measures what one rank computes for its share of a long
sequence and simulates the W-rank timeline with the interconnect's bandwidth as a parameter:

- **ring attention** (softmax, causal, zigzag shards): ``W`` steps; at each, a rank attends its
  queries to one key / value shard (measured: full blocks of ``T = S / W`` queries against ``T``
  keys, the diagonal step causal) while the next shard travels (``kv`` bytes over the link); a
  step costs ``max(compute, transfer)``. Zigzag gives every rank the same causal work, about half
  of the full steps' pairs.
- **LASP-2** (Lightning attention): each rank runs its chunk (measured), one all-gather of the
  ``[B, H, D, D]`` states (a ring all-gather moves ``(W - 1)`` states per rank), and the prefix
  combination (measured).

Both in bf16 on a Llama-3-8B-shaped layer (32 query / 8 KV heads of 128 for softmax; 32 heads of
128 for Lightning), batch 1, the sequence ``--seq`` split over each ``W`` of ``--world``. The
record: per W the simulated times of both and the ratio; the crossover is where LASP-2's time
falls below ring's (for the same sequence, the linear model against the softmax one: what the
paper's +36.6% at 2048K tokens on 64 GPUs compares).

    PYTHONPATH=src python benchmarks/sp_timeline.py --out benchmarks/results/h200/sp-timeline.json
    PYTHONPATH=src python benchmarks/sp_timeline.py --device cpu --tiny   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _timer(device):
    def timed(fn, repeat=5, warmup=2):
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(out)

    return timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1 << 20, help="the whole sequence (default: 1M tokens)")
    p.add_argument("--world", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--bandwidth-gbs", type=float, default=450.0,
                   help="per-GPU link bandwidth one way, GB/s (default 450: NVLink 4 on H100 / H200)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes (a dry run)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.seq < 1 or any(w < 1 for w in a.world) or a.bandwidth_gbs <= 0:
        p.error("--seq, --world and --bandwidth-gbs must be positive")
    from attnkit import attend
    from attnkit.ops.linear.lightning import lightning_attend

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv, d = (4, 2, 16) if a.tiny else (32, 8, 128)
    seq = min(a.seq, 4096) if a.tiny else a.seq
    timed = _timer(device)
    bw = a.bandwidth_gbs * 1e9
    rows = []
    for world in a.world:
        if seq % (2 * world):
            p.error(f"--seq {seq} must split into 2 x {world} zigzag chunks")
        T = seq // world
        q = torch.randn(1, hq, T, d, device=device, dtype=dtype)
        k = torch.randn(1, hkv, T, d, device=device, dtype=dtype)
        v = torch.randn(1, hkv, T, d, device=device, dtype=dtype)
        full_ms = timed(lambda: attend(q, k, v))  # a full T x T block
        causal_ms = timed(lambda: attend(q, k, v, pattern="causal"))
        kv_bytes = 2 * k.numel() * k.element_size()
        transfer_ms = 1e3 * kv_bytes / bw
        # zigzag: the diagonal step is causal; the other W - 1 steps each hold half a full block's pairs
        ring_ms = max(causal_ms, transfer_ms) + (world - 1) * max(full_ms / 2, transfer_ms)
        ql = torch.randn(1, hq, T, d, device=device, dtype=dtype)
        kl = torch.randn(1, hq, T, d, device=device, dtype=dtype)
        vl = torch.randn(1, hq, T, d, device=device, dtype=dtype)
        slopes = torch.linspace(0.01, 0.5, hq, device=device)
        local_ms = timed(lambda: lightning_attend(ql, kl, vl, slopes))
        state = torch.zeros(1, hq, d, d, device=device, dtype=torch.float32)
        decay = torch.rand(1, hq, T, 1, device=device)
        prefix_ms = timed(lambda: (ql.float() * decay) @ state)
        state_bytes = state.numel() * state.element_size()
        gather_ms = 1e3 * (world - 1) * state_bytes / bw
        lasp2_ms = local_ms + gather_ms + prefix_ms
        row = {"world": world, "tokens_per_rank": T, "softmax_full_block_ms": full_ms,
               "softmax_causal_block_ms": causal_ms, "kv_shard_bytes": kv_bytes, "kv_transfer_ms": transfer_ms,
               "ring_ms": ring_ms, "lightning_chunk_ms": local_ms, "lasp2_allgather_ms": gather_ms,
               "lasp2_prefix_ms": prefix_ms, "lasp2_ms": lasp2_ms, "ring_over_lasp2": ring_ms / lasp2_ms,
               "ring_transfer_bound": transfer_ms > full_ms / 2}
        rows.append(row)
        print(f"W={world:4d} T={T:8d}  ring {ring_ms:10.2f} ms (block {full_ms:.2f}, kv {transfer_ms:.2f})  "
              f"LASP-2 {lasp2_ms:8.2f} ms (chunk {local_ms:.2f}, gather {gather_ms:.3f})  ring / LASP-2 "
              f"{row['ring_over_lasp2']:.1f}", flush=True)
        del q, k, v, ql, kl, vl
    record = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:] if argv is None
                                              else [os.path.relpath(__file__)] + list(argv)),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "seq": seq, "bandwidth_gbs": a.bandwidth_gbs, "heads": [hq, hkv, d], "rows": rows}
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
