"""PNG of a comparison: loss vs step for every mechanism, and the final metric per mechanism."""

from __future__ import annotations


def plot_compare(result: dict, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'attnkit[plot]'") from None
    runs = result["runs"]
    task = result["task"]
    many = len(runs) > 6
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(15 if many else 13, 6 if many else 4.8))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    for i, run in enumerate(runs):
        if not run["loss_curve"]:
            continue
        steps, losses = zip(*run["loss_curve"])
        ax_loss.plot(steps, losses, label=run["mechanism"], color=colors(i % colors.N))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats/token)")
    ax_loss.set_yscale("log")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize=8)
    names = [r["mechanism"] for r in runs]
    values = [r["metric"] if r["metric"] is not None else 0.0 for r in runs]  # a diverged run: an empty bar
    bars = ax_metric.bar(range(len(names)), values, color=[colors(i % colors.N) for i in range(len(names))])
    ax_metric.set_xticks(range(len(names)), names, rotation=40 if many else 0, ha="right" if many else "center",
                         fontsize=7 if many else 9)
    for bar, value, run in zip(bars, values, runs):
        label = "diverged" if run["metric"] is None else f"{value:.3g}"
        ax_metric.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    evaluated = [r for r in runs if r.get("eval")]
    chance = evaluated[0]["eval"].get("chance") if evaluated else None
    if chance is not None:
        ax_metric.axhline(chance, color="gray", linestyle="--", linewidth=0.8, label="chance")
        ax_metric.legend(fontsize=8)
    ax_metric.set_ylabel(f"{task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is better)")
    cfg = result["config"]
    fig.suptitle(
        f"attnkit compare · {task['task']} · preset {cfg['preset']} · {cfg['model']} · {cfg['train']['steps']} steps · "
        f"{result['device']['name']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
