"""Which KV-cache method keeps the subject's passkey accuracy at the fewest cached bytes?

Reads one or more ``attnkit eval`` records (eval.json) and draws issue 23's Pareto chart: per
prompt length, passkey accuracy averaged over needle depths against the KV bytes the method's
cache held after the prefill (measured from the cache's tensors, as a fraction of full
attention's), one line per method family through its budgets, full attention and StreamingLLM as
the two ends. Also writes a table (Markdown, to stdout) and the points as JSON.

    attnkit eval --method full --method streaming:sink=4,window=256 ... --out /tmp/pareto
    python benchmarks/kv_pareto.py /tmp/pareto/eval.json --out benchmarks/results/cpu/kv-pareto

Methods whose cache keeps every token (LongHeads, ProxyAttn: sparse attention over a full cache)
sit at 1.0: they save compute, not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def points(records: list[dict]) -> list[dict]:
    """One point per (method row, length): family, label, accuracy, kv bytes and their ratio to full."""
    # full attention's bytes per length (they depend on the model's shape only: any record's full row)
    full = {length: m["lengths"][length]["kv_bytes"] for record in records for m in record["methods"]
            if m["name"] == "full" for length in m["lengths"]}
    out = []
    for record in records:
        for m in record["methods"]:
            for length, acc in m["mean_accuracy"]["passkey"].items():
                if length not in full:
                    raise ValueError(f"no record has a 'full' row at length {length} to normalise the bytes by "
                                     f"(add one: attnkit eval --method full --lengths {length})")
                kv = m["lengths"][length]["kv_bytes"]
                out.append({"family": m["name"], "label": m["label"], "length": int(length), "accuracy": acc,
                            "kv_bytes": kv, "kv_vs_full": kv / full[length], "command": record.get("command")})
    return out


def plot(rows: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    lengths = sorted({r["length"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    markers = "osD^vP*Xh<>"
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.2 * len(lengths), 5.2), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for i, fam in enumerate(families):
            pts = sorted((r for r in rows if r["length"] == length and r["family"] == fam), key=lambda r: r["kv_vs_full"])
            if not pts:
                continue
            xs, ys = [p["kv_vs_full"] for p in pts], [p["accuracy"] for p in pts]
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[fam], label=fam, lw=1.5, ms=7, alpha=0.85)
        _annotate(ax, [r for r in rows if r["length"] == length], colors)
        ax.set_xscale("log")
        low = min(r["kv_vs_full"] for r in rows if r["length"] == length)
        ticks = [2.0 ** -e for e in range(0, 12) if 2.0 ** -e >= low / 1.5]  # 1, 1/2, 1/4, ... down to the data
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("KV bytes after prefill / full attention's (log)")
        ax.set_title(f"passkey at {length} tokens")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylim(-0.03, 1.05)
    axes[0][0].set_ylabel("accuracy (mean over depths)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("KV-cache methods on the attnkit subject: accuracy against measured cache bytes", fontsize=11)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def _short(label: str) -> str:
    """A row's options without the pattern file: the budget that tells its points apart."""
    opts = label.split(":", 1)[1] if ":" in label else ""
    return ",".join(o for o in opts.split(",") if not o.startswith("pattern="))


def _annotate(ax, rows: list[dict], colors: dict) -> None:
    """One label per place on the chart: points that coincide (same bytes within 2 %, same accuracy
    within 0.02) share a label naming each family once, so no two labels are drawn over each other."""
    places: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: (r["kv_vs_full"], -r["accuracy"])):
        for place in places:
            if abs(place[0]["kv_vs_full"] / r["kv_vs_full"] - 1) < 0.02 and abs(place[0]["accuracy"] - r["accuracy"]) < 0.02:
                place.append(r)
                break
        else:
            places.append([r])
    for place in places:
        families = list(dict.fromkeys(r["family"] for r in place))
        parts = []
        for fam in families:
            opts = [_short(r["label"]) for r in place if r["family"] == fam]
            if len(families) == 1:
                parts.append(opts[0] if len(opts) == 1 else f"{fam} x{len(opts)}")
            else:
                parts.append(fam + (f" x{len(opts)}" if len(opts) > 1 else ""))
        text = "; ".join(p for p in parts if p)
        if text:
            color = colors[families[0]] if len(families) == 1 else "0.3"
            right = place[0]["kv_vs_full"] > 0.7  # near full's end: the label to the left, above the point
            ax.annotate(text, (place[0]["kv_vs_full"], place[0]["accuracy"]), fontsize=6.5,
                        xytext=(-6, 5) if right else (3, -9), textcoords="offset points", color=color,
                        ha="right" if right else "left")


def table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    head = "| method | " + " | ".join(f"acc {n} | KV/full {n}" for n in lengths) + " |"
    lines = [head, "|---" * (1 + 2 * len(lengths)) + "|"]
    for label in labels:
        cells = []
        for n in lengths:
            r = next((r for r in rows if r["label"] == label and r["length"] == n), None)
            cells += ["" , ""] if r is None else [f"{r['accuracy']:.2f}", f"{r['kv_vs_full']:.3f}"]
        short = label.replace("pattern=benchmarks/results/cpu/", "pattern=")
        lines.append(f"| {short} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="attnkit eval JSON files (one of them with a 'full' row per length)")
    p.add_argument("--out", required=True, help="output stem: STEM.json and STEM.png")
    a = p.parse_args(argv)
    records = []
    for f in a.records:
        try:
            records.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            p.error(f"cannot read {f}: {err}")
    try:
        rows = points(records)
    except (KeyError, ValueError) as err:
        p.error(f"not attnkit eval records with passkey accuracy: {err}")
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/kv_pareto.py " + " ".join(a.records) + f" --out {a.out}",
              "sources": [r.get("command") for r in records], "model": records[0].get("model"), "points": rows}
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, stem.with_suffix(".json"))
    plot(rows, stem.with_suffix(".png"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
