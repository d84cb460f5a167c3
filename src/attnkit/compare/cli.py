"""``attnkit compare``: train small models that differ only in their attention; table, JSON, PNG."""

from __future__ import annotations

import argparse

from .._checks import parse_number
from .harness import DEFAULT_MECHANISMS, PRESETS, TASKS, CompareConfig, run_compare


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _kv(text: str) -> dict:
    """``a=1,b=x`` -> {"a": 1, "b": "x"} (ints and floats parsed)."""
    out = {}
    for item in _names(text):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_number(value)
    return out


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="quality side by side: train one small LM per mechanism",
        description="Train one DecoderLM per mechanism with identical data order, optimiser, width and depth, "
        "then report the task metric, loss curves, wall time and tokens/s. Finished runs are reused.",
    )
    p.add_argument("--task", default="mqar", help=f"{' | '.join(TASKS)} (default mqar)")
    p.add_argument("--mechanisms", type=_names, default=list(DEFAULT_MECHANISMS), help="comma-separated names; per-mechanism options as name:key=value, e.g. sliding-window:window=16")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu", help=f"{' | '.join(PRESETS)}")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--task-options", type=_kv, default={}, help="e.g. num_pairs=16,seq_len=128")
    p.add_argument("--model", type=_kv, default={}, help="overrides, e.g. dim=256,num_layers=4")
    p.add_argument("--train", type=_kv, default={}, help="overrides, e.g. lr=1e-3,batch_size=64")
    p.add_argument("--corpus", default=None, help="text task: a text file or folder (default: Python's stdlib source)")
    p.add_argument("--cache-dir", default=".attnkit-cache/compare", help="where finished runs are kept")
    p.add_argument("--save", default=None, help="save each trained model (safetensors + config) under DIR/<mechanism>")
    p.add_argument("--out", default=None, help="JSON file (default attnkit-compare-<task>.json)")
    p.add_argument("--plot", default=None, help="PNG file (default next to --out); 'none' to skip")
    p.set_defaults(func=cmd_compare)


class _Progress:
    def __init__(self, bar):
        self.bar = bar
        self.task = None

    def start(self, name, steps):
        self.task = self.bar.add_task(name, total=steps, loss=float("nan"))

        def on_step(step, loss):
            self.bar.update(self.task, completed=step, loss=loss)

        return on_step

    def done(self, name):
        self.bar.update(self.task, description=f"{name} done")

    def reused(self, name):
        self.bar.console.print(f"[dim]{name}: reusing the finished run from the cache[/]")


def print_table(result: dict, console) -> None:
    from rich.table import Table

    task = result["task"]
    table = Table(title=f"attnkit compare · {task['task']} · {task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is better)")
    for col in ("mechanism", task["metric"], "final train loss", "params", "wall s", "tokens/s", "reused"):
        table.add_column(col, justify="left" if col == "mechanism" else "right")
    for run in result["runs"]:
        if run.get("status") == "diverged":
            table.add_row(run["mechanism"], "[red]diverged[/]", run["message"].split(": ", 1)[-1], f"{run['params']:,}",
                          "", "", "")
            continue
        table.add_row(run["mechanism"], f"{run['metric']:.4f}", f"{run['final_train_loss']:.4f}", f"{run['params']:,}",
                      f"{run['wall_s']:.1f}", f"{run['tokens_per_s']:,.0f}", "yes" if run.get("reused") else "")
    console.print(table)


def cmd_compare(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..cli import console, invoked_command, write_outputs

    cfg = CompareConfig(task=args.task, mechanisms=args.mechanisms, preset=args.preset, steps=args.steps, seed=args.seed,
                        device=args.device, task_options=args.task_options, model=args.model, train=args.train,
                        corpus=args.corpus, cache_dir=args.cache_dir)
    command = invoked_command("compare")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console()) as bar:
        result = run_compare(cfg, progress=_Progress(bar), command=command, save_dir=args.save)
    out_console = console()
    print_table(result, out_console)
    from .plot import plot_compare

    write_outputs(result, args.out or f"attnkit-compare-{cfg.task}.json", args.plot, plot_compare, out_console)
    return 0
