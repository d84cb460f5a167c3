"""PNG plots of a bench result: latency and memory vs sequence length (log-log) and speedup vs dense."""

from __future__ import annotations

from collections import defaultdict


def plot_bench(result: dict, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'attnkit[plot]'") from None

    series = defaultdict(list)
    for c in result["cells"]:
        if c["status"] == "ok":
            series[(c["kind"], c["name"])].append(c)
    cfg, dev = result["config"], result["device"]
    mode = cfg["mode"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = [
        ("per-token latency (ms)" if mode == "decode" else "latency (ms, median)", lambda c: c["latency_ms"]["median"], True),
        ("decode state (bytes)" if mode == "decode" else "peak memory (bytes)",
         (lambda c: c["state_bytes"]) if mode == "decode" else (lambda c: c["peak_memory_bytes"]), True),
        ("speedup over dense (x)", lambda c: c["speedup_vs_dense"], False),
    ]
    for ax, (label, get, logy) in zip(axes, panels):
        for (kind, name), cells in sorted(series.items()):
            pts = [(c["seq"], get(c)) for c in cells if get(c) is not None and get(c) > 0]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", linestyle="-" if kind == "layer" else "--", label=f"{name} ({kind})")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].axhline(1.0, color="gray", linewidth=0.8)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"attnkit bench · {mode} · {dev['name']} · {cfg['dtype']} · C={cfg['dim']}, H={cfg['heads']}, "
        f"D={cfg['head_dim']}, batch={cfg['batch']}, pattern={cfg['pattern']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
