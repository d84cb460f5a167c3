"""Bar chart of the share of each pattern's FLOP reduction its rows realise over dense FlexAttention.

Reads ``attnkit bench`` JSON files (ops rows with ``realised_fraction_vs_flex``) and draws, per
file (a pattern), one bar per op row, with the 0.8 target line. CPU only; matplotlib.

    python benchmarks/plot_realised.py benchmarks/results/h200-window-1024-cudnn-fwdbwd.json \\
        benchmarks/results/h200-sink-4-1024-cudnn-fwdbwd.json --out benchmarks/results/h200-realised-session14.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--rows", default="flex,attend", help="op rows to draw, in order")
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = a.rows.split(",")
    fig, ax = plt.subplots(figsize=(4 + 2.2 * len(a.files), 4.6))
    width = 0.8 / len(rows)
    for i, path in enumerate(a.files):
        result = json.load(open(path))
        cells = {c["name"]: c for c in result["cells"] if c["kind"] == "op" and c["status"] == "ok"}
        for j, name in enumerate(rows):
            cell = cells.get(name)
            if cell is None or cell.get("realised_fraction_vs_flex") is None:
                continue
            value = cell["realised_fraction_vs_flex"]
            x = i + (j - (len(rows) - 1) / 2) * width
            ax.bar(x, value, width * 0.9, color=f"C{j}", label=name if i == 0 else None)
            ax.text(x, max(value, a.target) + 0.02, f"{value:.2f}\n{cell['latency_ms']['median']:.2f} ms\n({cell['backend']})",
                    ha="center", va="bottom", fontsize=8)
    labels = []
    for path in a.files:
        result = json.load(open(path))
        cfg = result["config"]
        labels.append(f"{cfg.get('pattern')}\nseq {','.join(str(s) for s in cfg['seqs'])}, {cfg['mode']}, "
                      f"{cfg.get('timing', 'latency')} timing")
    ax.axhline(a.target, color="k", linestyle=":", label=f"target {a.target}")
    ax.set_xticks(range(len(a.files)), labels)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("realised share of the FLOP reduction\nover dense FlexAttention")
    ax.set_title(f"{result['device'].get('name', result['device']['type'])}: patterned rows against dense FlexAttention")
    ax.legend(loc="upper left", fontsize=8, ncol=len(rows) + 1)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
