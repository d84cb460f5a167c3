"""PNG plot of a bench result, one panel per family: speedup over the dense reference vs sequence length.

A panel holds a handful of rows, each labelled at its right end; noisy cells are hollow grey
markers joined by dotted grey lines (not drawn as facts). Two more panels: the dense
references' own latency (what the speedups are relative to) and each row's memory against
dense at the longest sequence. The full table stays in the JSON.
"""

from __future__ import annotations

import math
from collections import defaultdict

FAMILY_ORDER = ("baseline", "heads", "sharing", "pattern", "score", "linear", "control", "op")
NOISY_COLOUR = "0.6"


def _families(cells: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """family -> row name -> its cells (every status), in family order then run order."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for c in cells:
        out[c.get("family") or c["kind"]].setdefault(row_name(c), []).append(c)
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


def row_name(cell: dict) -> str:
    """A row's name, with its pattern when the run measured the row once per pattern."""
    return f"{cell['name']} {cell['pattern']}" if cell.get("pattern") not in (None, "", "causal") else cell["name"]


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Nudge label heights (log10 units) apart by at least ``gap``, keeping their order."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        placed[i] = max(ys[i], last + gap)
        last = placed[i]
    shift = (max(placed) - max(ys)) / 2 if ys else 0.0  # centre the stack on the data
    return [p - shift for p in placed]


def _row_lines(ax, rows: dict[str, list[dict]], get, reference: str | None) -> list[str]:
    """Draw each row's line; returns notes for rows with no measured point."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    ends, notes = [], []
    for i, (name, cells) in enumerate(rows.items()):
        colour = "black" if name == reference else colours[i % len(colours)]
        pts = sorted((c["seq"], get(c), bool(c.get("noisy"))) for c in cells
                     if c["status"] == "ok" and get(c) is not None and get(c) > 0)
        bad = sorted({c["status"] for c in cells if c["status"] != "ok"})
        if bad:
            seqs = [c["seq"] for c in cells if c["status"] != "ok"]
            notes.append(f"{name}: {'/'.join(bad)} at {', '.join(map(str, seqs))}")
        if not pts:
            continue
        width = 2.2 if name == reference else 1.4
        for (x0, y0, n0), (x1, y1, n1) in zip(pts, pts[1:]):
            trusted = not (n0 or n1)
            ax.plot([x0, x1], [y0, y1], color=colour if trusted else NOISY_COLOUR, linewidth=width if trusted else 1.0,
                    linestyle="-" if trusted else ":", zorder=2)
        for x, y, noisy in pts:
            if noisy:
                ax.plot(x, y, marker="o", markersize=5, markerfacecolor="white", markeredgecolor=NOISY_COLOUR, zorder=3)
            else:
                ax.plot(x, y, marker="o", markersize=5, color=colour, zorder=3)
        x, y, noisy = pts[-1]
        ends.append((name, x, y, NOISY_COLOUR if noisy else colour))
    if ends:
        heights = _spread_labels([math.log10(y) for _, _, y, _ in ends], gap=0.07)
        # the spread labels can sit above or below the data (rows within a few % of each other): the
        # y range takes them in, else they stood outside the panel and tight_layout shrank it to a strip
        ax.plot([x for _, x, _, _ in ends], [10**h for h in heights], linestyle="none", marker="none")
        for (name, x, y, colour), h in zip(ends, heights):
            ax.annotate(f"{name} {y:.2g}", xy=(x, y), xytext=(x * 1.12, 10**h), fontsize=7.5, color=colour,
                        va="center", ha="left", arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.5, alpha=0.6))
    return notes


def _axes_seq(ax, seqs: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if seqs:
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlim(min(seqs) / 1.3, max(seqs) * 3.2)  # room for the end labels
    ax.set_xlabel("sequence length", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax, axis: str = "y") -> None:
    """Log y (or x) with plain numbers (0.5, 2) instead of powers of ten; minor ticks labelled only
    where the range is narrow enough to leave room for them."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    scale = getattr(ax, f"{axis}axis")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    scale.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    scale.set_major_formatter(plain)
    low, high = getattr(ax, f"get_{axis}lim")()
    scale.set_minor_formatter(plain if high / low < 12 else NullFormatter())
    ax.tick_params(axis=axis, which="both", labelsize=7)


def _note(ax, notes: list[str]) -> None:
    if notes:
        text = "\n".join(notes[:4] + ([f"+{len(notes) - 4} more (see JSON)"] if len(notes) > 4 else []))
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=6, color="0.35", va="bottom", ha="left")


def plot_bench(result: dict, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'attnkit[plot]'") from None

    cfg, dev = result["config"], result["device"]
    mode = cfg["mode"]
    cells = result["cells"]
    seqs = sorted({c["seq"] for c in cells})
    families = _families(cells)
    n_panels = len(families) + 1  # and the latency panel; memory gets a column of its own
    ncols = 3
    nrows = max(2, math.ceil(n_panels / ncols))
    fig = plt.figure(figsize=(6.0 * ncols + 4.6, 3.9 * nrows))
    grid = fig.add_gridspec(nrows, ncols + 1, width_ratios=[6.0] * ncols + [4.6])
    flat = [fig.add_subplot(grid[r, c]) for r in range(nrows) for c in range(ncols)]
    speedup = lambda c: c["speedup_vs_dense"]  # noqa: E731
    for ax, (family, rows) in zip(flat, families.items()):
        reference = "dense-sdpa" if family == "op" else "mha" if "mha" in rows else None
        notes = _row_lines(ax, rows, speedup, reference)
        ax.axhline(1.0, color="black", linewidth=0.7, linestyle="--", zorder=1)
        _log_y(ax)
        _axes_seq(ax, seqs)
        title = "ops (attention core) vs dense-sdpa" if family == "op" else f"{family} layers vs mha"
        ax.set_title(title, fontsize=9.5)
        ax.set_ylabel("speedup over dense (x)", fontsize=8)
        _note(ax, notes)
    # the dense references' own latency: what every speedup above is relative to
    ax = flat[len(families)]
    lat_rows = defaultdict(list)
    for c in cells:
        if c["status"] == "ok" and c["dense_latency_ms"] is not None:
            lat_rows["mha (layers)" if c["kind"] == "layer" else "dense-sdpa (ops)"].append(c)
    for i, (label, rows) in enumerate(sorted(lat_rows.items())):
        by_seq = defaultdict(list)
        for c in rows:
            by_seq[c["seq"]].append(c["dense_latency_ms"])
        xs = sorted(by_seq)
        med = [sorted(by_seq[s])[len(by_seq[s]) // 2] for s in xs]
        ax.plot(xs, med, marker="o", color=("black", "tab:blue")[i % 2], label=label)
    _log_y(ax)
    _axes_seq(ax, seqs)
    ax.set_title("dense reference latency (median over its interleaved samples)", fontsize=9.5)
    ax.set_ylabel("per-token latency (ms)" if mode == "decode" else "latency (ms)", fontsize=8)
    if lat_rows:
        ax.legend(fontsize=7.5)
    # memory against dense at the longest sequence where the dense reference row ran
    _memory_bars(fig.add_subplot(grid[:, ncols]), cells, mode)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    peak = result.get("peak", {})
    commit = (result.get("git_commit") or "no git checkout")[:10]
    fig.suptitle(
        f"attnkit bench · {mode} · {dev['name']} · {cfg['dtype']} · C={cfg['dim']}, H={cfg['heads']}, D={cfg['head_dim']}, "
        f"batch={cfg['batch']}, pattern={cfg['pattern']} · commit {commit}\n"
        "speedup = median of per-round ratios against the dense reference timed interleaved with the row; "
        f"hollow grey = noisy (a rerun may differ by >25 %); % of peak: {peak.get('source', '?')}; full table in the JSON",
        fontsize=9.5,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _memory_bars(ax, cells: list[dict], mode: str) -> None:
    key = "state_bytes" if mode == "decode" else "peak_memory_bytes"
    dense = {(c["kind"], c["seq"]): c[key] for c in cells
             if c["status"] == "ok" and c["name"] in ("mha", "dense-sdpa") and c[key]}
    seq = max((s for _, s in dense), default=None)
    rows = [c for c in cells if c["seq"] == seq and c["status"] == "ok" and c[key] is not None
            and dense.get((c["kind"], seq))]
    what = "decode state" if mode == "decode" else "peak memory"
    # the family legend sits between the title and the bars (below them it covered the x label)
    ax.set_title(f"{what} vs dense at seq {seq}" if seq else f"{what}: no dense reference row", fontsize=9.5,
                 pad=20 if seq else None)
    if not rows:
        ax.set_axis_off()
        return
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    rows.sort(key=lambda c: (order.get(c["family"], len(order)), c[key] / dense[(c["kind"], seq)]))
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    fam_colour = {f: colours[i % len(colours)] for i, f in enumerate(dict.fromkeys(c["family"] for c in rows))}
    ratios = [max(c[key] / dense[(c["kind"], seq)], 1e-3) for c in rows]
    ys = range(len(rows))
    ax.barh(ys, ratios, color=[fam_colour[c["family"]] for c in rows], height=0.75)
    ax.set_yticks(list(ys), [row_name(c) if c["kind"] == "layer" else f"[op] {row_name(c)}" for c in rows],
                  fontsize=max(5.0, min(8.0, 420 / max(len(rows), 1))))
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.7, linestyle="--")
    _log_y(ax, "x")  # the default minor labels (2x10^-1, 3x10^-1, ...) ran into each other
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=fam_colour[f]) for f in fam_colour], labels=list(fam_colour),
              fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    # the title above as many legend rows as there are (two rows covered a 20-point pad)
    ax.set_title(f"{what} vs dense at seq {seq}", fontsize=9.5, pad=8 + 11 * -(-len(fam_colour) // 4))
    ax.set_xlabel(f"{what} / dense's (x; left of the line = less)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
