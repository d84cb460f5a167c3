"""PNG of a comparison: loss vs step for every mechanism, and the final metric per mechanism.

With several seeds: each seed's loss curve thin, their mean bold; the bar is the mean metric,
the whisker spans min to max and a dot marks each seed.
"""

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
        color = colors(i % colors.N)
        per_seed = run.get("per_seed") or []
        if len(per_seed) > 1:
            for seed_run in per_seed:
                if seed_run["loss_curve"]:
                    steps, losses = zip(*seed_run["loss_curve"])
                    ax_loss.plot(steps, losses, color=color, linewidth=0.6, alpha=0.35)
        if not run["loss_curve"]:
            continue
        steps, losses = zip(*run["loss_curve"])
        label = run["mechanism"] + (f" (mean of {len(per_seed)} seeds)" if len(per_seed) > 1 else "")
        ax_loss.plot(steps, losses, label=label, color=color, linewidth=1.6 if len(per_seed) > 1 else 1.5)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats/token)")
    ax_loss.set_yscale("log")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize=8)
    names = [r["mechanism"] for r in runs]
    values = [r["metric"] if r["metric"] is not None else 0.0 for r in runs]  # a diverged run: an empty bar
    bars = ax_metric.bar(range(len(names)), values, color=[colors(i % colors.N) for i in range(len(names))], alpha=0.85)
    for i, run in enumerate(runs):
        seed_metrics = [m for m in run.get("metrics", []) if m is not None]
        if len(run.get("metrics", [])) > 1 and seed_metrics:
            low, high = run["metric_min"], run["metric_max"]
            ax_metric.errorbar(i, run["metric"], yerr=[[run["metric"] - low], [high - run["metric"]]], color="black",
                               capsize=4, linewidth=1)
            ax_metric.scatter([i] * len(seed_metrics), seed_metrics, color="black", s=9, zorder=3)
    ax_metric.set_xticks(range(len(names)), names, rotation=40 if many else 0, ha="right" if many else "center",
                         fontsize=7 if many else 9)
    for bar, value, run in zip(bars, values, runs):
        if run["metric"] is None:
            label = "diverged"
        elif run.get("metric_min") is not None and len(run.get("metrics", [])) > 1:
            label = f"{value:.3g}\n[{run['metric_min']:.3g}, {run['metric_max']:.3g}]"
        else:
            label = f"{value:.3g}"
        ax_metric.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    chance = task.get("chance")
    if chance is None:  # results written before the task recorded it (schema attnkit.compare/1)
        evaluated = [r for r in runs if r.get("eval")]
        chance = evaluated[0]["eval"].get("chance") if evaluated else None
    if chance is not None:
        ax_metric.axhline(chance, color="gray", linestyle="--", linewidth=0.8, label="chance")
        ax_metric.legend(fontsize=8)
    seeds = result.get("seeds") or []
    ax_metric.set_ylabel(f"{task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is better)"
                         + (f", mean of {len(seeds)} seeds, min-max" if len(seeds) > 1 else ""))
    cfg = result["config"]
    fig.suptitle(
        f"attnkit compare · {task['task']} · preset {cfg['preset']} · {cfg['model']} · {cfg['train']['steps']} steps · "
        + (f"seeds {seeds[0]}-{seeds[-1]} · " if len(seeds) > 1 else "") + f"{result['device']['name']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
