"""Bar chart of MoH's attention core against MHA's, from ``benchmarks/moh_core.py`` JSON.

One group per (MoH configuration, mode), one bar per routed path (``picked``: cuDNN on dense
rectangles; ``flex``: gathered rows through FlexAttention): the speedup over MHA's core in the
same call, beside the FLOP reduction and the issue's 1.5x target. CPU only; matplotlib.

    python benchmarks/plot_moh.py benchmarks/results/h200-moh-core-picked.json \\
        --out benchmarks/results/h200-moh-core-picked.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--target", type=float, default=1.5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    result = json.load(open(a.file))
    rows = [r for r in result["rows"] if r["mechanism"] != "mha"]
    groups = sorted({(r["mechanism"], r["mode"]) for r in rows}, key=lambda g: (g[0], g[1] != "fwd"))
    order = {"picked": 0, "picked-serial": 1, "flex": 2}
    paths = sorted({r["path"] for r in rows}, key=lambda x: order.get(x, 3))
    fig, ax = plt.subplots(figsize=(3 + 2.4 * len(groups), 4.6))
    width = 0.8 / (len(paths) + 1)
    for i, (mechanism, mode) in enumerate(groups):
        cells = {r["path"]: r for r in rows if (r["mechanism"], r["mode"]) == (mechanism, mode)}
        for j, path in enumerate(paths):
            if path in cells:
                x = i + (j - len(paths) / 2) * width
                speedup = cells[path]["speedup_vs_mha"]
                ax.bar(x, speedup, width * 0.9, color=f"C{j}", label=path if i == 0 else None)
                ax.text(x, speedup + 0.02, f"{speedup:.2f}", ha="center", fontsize=8)
        flops = next(iter(cells.values()))["flop_reduction"]
        x = i + (len(paths) / 2) * width
        ax.bar(x, flops, width * 0.9, color="lightgray", label="FLOP reduction" if i == 0 else None)
        ax.text(x, flops + 0.02, f"{flops:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(a.target, color="red", ls="--", lw=1, label=f"target {a.target}x")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m.replace('moh ', '')}\n{mode}" for m, mode in groups], fontsize=8)
    ax.set_ylabel("speedup over MHA's core (same call)")
    seq = rows[0]["seq"]
    ax.set_title(f"MoH attention core vs MHA, T={seq}, {result.get('device', '')}", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.legend(fontsize=8, loc="upper center", ncol=len(paths) + 2)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
