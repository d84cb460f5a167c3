"""Bytes one rank sends per attention layer under attnkit.distributed, measured against the formulas
(issue 27, communication volume).

W gloo processes on this CPU (loopback) run one attention layer's core on their shares of a
sequence; :func:`attnkit.distributed.sent_bytes` counts what each rank sends, next to the formula:

- ring attention (causal, zigzag): ``W - 1`` key / value shards forward; backward the shards
  with their float32 ``dk`` / ``dv`` accumulators, plus one send home (``ring_bytes``);
  with a sliding window (contiguous): only the shards the window reaches;
- Ulysses: four all-to-alls, each sending ``(W - 1) / W`` of q, k, v, out (``ulysses_bytes``; forward);
- LASP-2 (Lightning): one all-gather of the ``[B, H, D, D]`` chunk state, ``(W - 1)`` states per
  rank in a ring all-gather (``lasp2_bytes``; forward), the same whatever the sequence length.

Shapes: a Llama-like layer scaled down for the CPU (batch 1, 8 query / 4 key-value heads of 64,
float32; Lightning 8 heads of 64). Writes JSON and a PNG (bytes per rank against the sequence
length, one line per scheme and W):

    PYTHONPATH=src python benchmarks/sp_bytes.py --out benchmarks/results/cpu/sp-bytes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

H, HKV, D = 8, 4, 64


def _rank(rank: int, world: int, seq: int, window: int) -> dict:
    from attnkit.distributed import (lasp2_bytes, lasp2_lightning, ring_attend, ring_bytes, sent_bytes, shard,
                                     ulysses_attend, ulysses_bytes)

    g = torch.Generator().manual_seed(0)
    q_all = torch.randn(1, H, seq, D, generator=g)
    k_all, v_all = (torch.randn(1, HKV, seq, D, generator=g) for _ in range(2))
    row = {}

    def measured(fn):
        sent_bytes(reset=True)
        fn()
        return sent_bytes(reset=True)

    q, k, v = (shard(t, world, rank, "zigzag").requires_grad_(True) for t in (q_all, k_all, v_all))
    out = None

    def fwd():
        nonlocal out
        out = ring_attend(q, k, v, causal=True, layout="zigzag")

    row["ring_fwd"] = [measured(fwd), ring_bytes(q, k, v, world)]
    row["ring_bwd"] = [measured(lambda: out.sum().backward()), ring_bytes(q, k, v, world, backward=True)]
    qc, kc, vc = (shard(t, world, rank, "contiguous") for t in (q_all, k_all, v_all))
    row["ring_window_fwd"] = [measured(lambda: ring_attend(qc, kc, vc, layout="contiguous", window=window)),
                              ring_bytes(qc, kc, vc, world, window=window)]
    if H % world == 0 and HKV % world == 0:  # Ulysses spreads the heads over the ranks
        row["ulysses_fwd"] = [measured(lambda: ulysses_attend(qc, kc, vc, pattern="causal")),
                              ulysses_bytes(qc, kc, vc, world)]
    ql, kl, vl = (shard(torch.randn(1, H, seq, D, generator=g), world, rank, "contiguous") for _ in range(3))
    slopes = torch.linspace(0.05, 0.5, H)
    row["lasp2_fwd"] = [measured(lambda: lasp2_lightning(ql, kl, vl, slopes)), lasp2_bytes((1, H, D, D), world=world)]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[768, 1536, 3072, 6144], help="whole-sequence lengths (multiples of 2 W)")
    p.add_argument("--world", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--window", type=int, default=256, help="the sliding window of the windowed ring")
    p.add_argument("--out", default="benchmarks/results/cpu/sp-bytes.json")
    p.add_argument("--plot", default=None, help="the PNG (default: --out with .png)")
    args = p.parse_args(argv)
    for name in ("seq", "world"):
        bad = [x for x in getattr(args, name) if x < (2 if name == "world" else 1)]
        if bad:
            p.error(f"--{name} values must be >= {2 if name == 'world' else 1}, got {bad}")
    bad = [(s, w) for s in args.seq for w in args.world if s % (2 * w)]
    if bad:
        p.error(f"every --seq must be a multiple of 2 x each --world (zigzag shards), got {bad}")
    if args.window < 1:
        p.error(f"--window must be >= 1, got {args.window}")
    from attnkit.distributed import spawn

    rows = []
    for world in args.world:
        for seq in args.seq:
            per_rank = spawn(world, _rank, seq, args.window)
            for scheme in per_rank[0]:  # (Ulysses only where the world size divides the heads)
                measured = [r[scheme][0] for r in per_rank]
                formula = [r[scheme][1] for r in per_rank]
                rows.append({"world": world, "seq": seq, "scheme": scheme, "measured_per_rank": measured,
                             "formula_per_rank": formula, "equal": measured == formula})
                print(f"W={world} seq={seq:6d} {scheme:16s} measured {max(measured):>12,d} B  formula "
                      f"{max(formula):>12,d} B  {'=' if measured == formula else 'DIFFERS'}", flush=True)
    record = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
              "shapes": {"heads": H, "kv_heads": HKV, "head_dim": D, "dtype": "float32", "window": args.window},
              "rows": rows, **_meta()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, args.out)
    _plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")
    return 0 if all(r["equal"] for r in rows) else 1


def _meta() -> dict:
    from attnkit._meta import run_metadata

    return run_metadata("cpu")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = ["ring_fwd", "ring_bwd", "ring_window_fwd", "ulysses_fwd", "lasp2_fwd"]
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(4.2 * len(worlds), 3.8), sharey=True)
    for ax, world in zip(axes if len(worlds) > 1 else [axes], worlds):
        for scheme in schemes:
            pts = sorted((r["seq"], max(r["measured_per_rank"])) for r in rows if r["world"] == world and r["scheme"] == scheme)
            ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o", label=scheme.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"W = {world} ranks")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
    (axes[0] if len(worlds) > 1 else axes).set_ylabel("MiB sent per rank, one layer")
    (axes[-1] if len(worlds) > 1 else axes).legend(fontsize=8)
    agree = "measured = formula in every cell" if all(r["equal"] for r in rows) else "SOME CELLS DIFFER FROM THE FORMULA"
    fig.suptitle(f"attnkit.distributed: bytes per rank per layer ({H} q / {HKV} kv heads of {D}, float32; {agree})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
