"""``attnkit compare``: train small models that differ only in their attention; table, JSON, PNG."""

from __future__ import annotations

import argparse
import sys

from .._checks import parse_value
from .._console import StepPrinter, err_console
from .harness import (DEFAULT_MECHANISMS, MODEL_KEYS, PRESETS, TASKS, TRAIN_DEFAULTS, TRAIN_KEYS, CompareConfig, run_compare,
                      task_option_keys)


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _kv(text: str) -> dict:
    """``a=1,b=x`` -> {"a": 1, "b": "x"} (ints, floats and true / false parsed; ``none`` -> None)."""
    out = {}
    for item in _names(text):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        value = value.strip()
        out[key.strip().replace("-", "_")] = None if value.lower() == "none" else parse_value(value)
    return out


# DecoderLM's own defaults, for the help of keys no preset sets
_MODEL_DEFAULTS = {"mlp_hidden": "8/3 dim rounded up to 64", "norm_eps": 1e-06}


def _preset_values(section: str, key: str, task: str | None = None) -> str:
    """``cpu 128, gpu 256``: a key's value in every preset (task-specific overrides first)."""
    values = []
    for preset_name, preset in PRESETS.items():
        tasks = [task] if task else list(TASKS)
        found = {str(preset[t].get(section, {}).get(key)) for t in tasks if key in preset[t].get(section, {})}
        base = preset.get(section, {}).get(key, {**TRAIN_DEFAULTS, **_MODEL_DEFAULTS}.get(key))
        if found:
            shown = "/".join(sorted(found)) + (f" (mqar; else {base})" if base is not None and not task else "")
        else:
            shown = str(base) if base is not None else "-"
        values.append(f"{preset_name} {shown}")
    return ", ".join(values)


def _keys_help(keys: dict, section: str) -> str:
    return "; ".join(f"{key}: {what} (default: {_preset_values(section, key)})" for key, (_, what) in keys.items())


def _task_options_help() -> str:
    parts = []
    for task in TASKS:
        items = []
        for key, default in task_option_keys(task).items():
            presets = [f"{name} {preset[task]['task'][key]}" for name, preset in PRESETS.items() if key in preset[task]["task"]]
            items.append(f"{key} (default: {', '.join(presets) if presets else default})")
        parts.append(f"{task}: {', '.join(items)}")
    return ("key=value,... for the task; lists separated by '/', e.g. train_num_pairs=2/4/8 (see attnkit.tasks.MQAR). "
            + "; ".join(parts))


def add_compare_parser(sub) -> None:
    steps = "; ".join(f"{name}: " + ", ".join(f"{t} {preset[t]['steps']}" for t in TASKS) for name, preset in PRESETS.items())
    seeds = ", ".join(f"{name} {preset['seeds']}" for name, preset in PRESETS.items())
    p = sub.add_parser(
        "compare",
        help="quality side by side: train one small LM per mechanism",
        description="Train one DecoderLM per mechanism and seed with identical data order, optimiser, width and depth, "
        "then report the task metric (mean, min and max over the seeds), loss curves, wall time and tokens/s. "
        "Finished runs are reused.",
    )
    p.add_argument("--task", default="mqar", choices=TASKS, help=f"{' | '.join(TASKS)} (default: mqar)")
    p.add_argument("--mechanisms", type=_names, default=list(DEFAULT_MECHANISMS),
                   help="comma-separated registered names (see 'attnkit list'); per-mechanism layer options as "
                   "name:key=value[:key=value], e.g. sliding-window:window=16 "
                   f"(default: {','.join(DEFAULT_MECHANISMS)})")
    p.add_argument("--steps", type=int, default=None, help=f"training steps, an integer >= 1 (default: the preset's; {steps})")
    p.add_argument("--seed", type=int, default=0, help="first seed, an integer >= 0; the runs use seed, seed+1, ... (default: 0)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per mechanism, an integer >= 1; the table reports mean, min and max (default: the preset's; {seeds})")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help=f"{' | '.join(PRESETS)}: model, optimiser and task sizes (default: cpu)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index> (default: cpu)")
    p.add_argument("--task-options", type=_kv, default={}, help=_task_options_help())
    p.add_argument("--model", type=_kv, default={}, help="overrides, e.g. dim=256,num_layers=4; " + _keys_help(MODEL_KEYS, "model"))
    p.add_argument("--train", type=_kv, default={}, help="overrides, e.g. lr=1e-3,batch_size=64; " + _keys_help(TRAIN_KEYS, "train"))
    p.add_argument("--corpus", default=None, help="text task: a text file or folder (default: Python's stdlib source)")
    p.add_argument("--cache-dir", default=".attnkit-cache/compare", help="where finished runs are kept (default: .attnkit-cache/compare)")
    p.add_argument("--save", default=None, help="save each trained model (safetensors + config) under DIR/<mechanism> "
                   "(further seeds: DIR/<mechanism>-seed<N>); trains again instead of reusing (default: no saving)")
    p.add_argument("--out", default=None, help="JSON file (default: attnkit-compare-<task>.json)")
    p.add_argument("--plot", default=None, help="PNG file, or 'none' to skip (default: next to the JSON, .png)")
    p.set_defaults(func=cmd_compare)


class _Progress:
    """A rich progress bar on a terminal; plain flushed lines (about every 10% of a run's steps) when
    stderr is a file or a pipe, where a bar shows nothing until the command ends. The bar starts with
    the first run, so a configuration error is printed alone."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.plain = not self.stream.isatty()
        self.printer = StepPrinter("compare", self.stream)
        self.bar = None
        self.task = None

    def _bar(self):
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=err_console())
            self.bar.start()
        return self.bar

    def start(self, name, steps):
        if self.plain:
            self.printer.line(f"{name}: training, {steps} steps")
            return self.printer.start(name, steps)
        bar = self._bar()
        self.task = bar.add_task(name, total=steps, loss=float("nan"))

        def on_step(step, loss):
            bar.update(self.task, completed=step, loss=loss)

        return on_step

    def done(self, name):
        if self.plain:
            self.printer.line(f"{name}: done")
        else:
            self._bar().update(self.task, description=f"{name} done")

    def reused(self, name):
        if self.plain:
            self.printer.line(f"{name}: reusing the finished run from the cache")
        else:
            self._bar().console.print(f"[dim]{name}: reusing the finished run from the cache[/]")

    def note(self, message):
        if self.plain:
            self.printer.line(f"warning: {message}")
        else:
            from rich.markup import escape

            (self.bar.console if self.bar else err_console()).print(f"[yellow]warning:[/] {escape(message)}",
                                                                     highlight=False)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def print_table(result: dict, console) -> None:
    from rich.table import Table

    task = result["task"]
    seeds = result.get("seeds") or [result["config"].get("seed")]
    several = len(seeds) > 1
    title = f"attnkit compare · {task['task']} · {task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is better)"
    if several:
        title += f" · seeds {seeds[0]}-{seeds[-1]}: mean, min, max"
    table = Table(title=title)
    columns = ["mechanism", f"{task['metric']} mean" if several else task["metric"]]
    columns += ["min", "max"] if several else []
    columns += ["final train loss", "params", "wall s" + ("/seed" if several else ""), "tokens/s", "reused"]
    for col in columns:
        table.add_column(col, justify="left" if col == "mechanism" else "right")
    for run in result["runs"]:
        if run.get("metric") is None:
            cells = ["[red]diverged[/]"] + ([""] * 2 if several else []) + [(run.get("message") or "").split(": ")[-1],
                                                                           f"{run['params']:,}", "", "", ""]
            table.add_row(run["mechanism"], *cells)
            continue
        cells = [f"{run['metric']:.4f}"]
        if several:
            cells += [f"{run['metric_min']:.4f}", f"{run['metric_max']:.4f}"]
        if run.get("status") == "partly diverged":
            failed = sum(m is None for m in run["metrics"])
            cells[0] += f" [red]({failed} of {len(run['metrics'])} diverged)[/]"
        cells += [f"{run['final_train_loss']:.4f}", f"{run['params']:,}", f"{run['wall_s']:.1f}",
                  f"{run['tokens_per_s']:,.0f}", "yes" if run.get("reused") else ""]
        table.add_row(run["mechanism"], *cells)
    console.print(table)
    from rich.markup import escape

    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def cmd_compare(args) -> int:
    from pathlib import Path

    from .._console import check_folder, check_writable, console, invoked_command, plot_path_for, write_outputs

    # the outputs first: a path that cannot be written must not cost a finished training run
    out = args.out or f"attnkit-compare-{args.task}.json"
    check_writable(Path(out), "--out")
    plot_path = plot_path_for(out, args.plot)
    if plot_path is not None:
        if plot_path.resolve() == Path(out).resolve():
            raise ValueError(f"--plot {args.plot!r} would overwrite --out; accepted: another path, or 'none'")
        check_writable(plot_path, "--plot")
    check_folder(args.save, "--save")
    check_folder(args.cache_dir, "--cache-dir")
    cfg = CompareConfig(task=args.task, mechanisms=args.mechanisms, preset=args.preset, steps=args.steps, seed=args.seed,
                        seeds=args.seeds, device=args.device, task_options=args.task_options, model=args.model,
                        train=args.train, corpus=args.corpus, cache_dir=args.cache_dir)
    command = invoked_command("compare")
    progress = _Progress()
    try:
        result = run_compare(cfg, progress=progress, command=command, save_dir=args.save)
    finally:
        progress.close()
    out_console = console()
    print_table(result, out_console)
    from .plot import plot_compare

    write_outputs(result, out, args.plot, plot_compare, out_console)
    return 0
