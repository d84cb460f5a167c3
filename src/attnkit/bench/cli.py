"""``attnkit bench``: argument parsing, progress bar, terminal table, JSON-lines stream, JSON and PNG output."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .._console import check_writable, plot_path_for
from .suites import SUITES, get_suite, suite_help
from .harness import DTYPES, MAX_SAMPLES, MODES, OPS, PATTERNED_OPS, STOP_SPREAD, TIMINGS, BenchConfig, count_cells, default_config, \
    fmt_bytes, run_bench, validate_config

CPU, CUDA = default_config("cpu"), default_config("cuda")
CUDA_ONLY_OPS = tuple(o for o in OPS if o.startswith("dense-sdpa-") or o == "fla-lightning")


def _int_list(text: str) -> list[int]:
    if not text.strip(", "):
        return []  # reported as "--seq is empty" by the checks
    try:
        return [int(s) for s in text.split(",")]  # an empty item ("16,,32") is an error, not skipped
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [] if text in ("", "none") else [s.strip() for s in text.split(",") if s.strip()]


class _Once(argparse.Action):
    """Store an option's value, refusing it a second time: ``--suite dense --suite heads`` would
    otherwise run ``heads`` alone while the command line names both."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"argument {option_string}: given twice ({getattr(namespace, self.dest)!r} and {values!r}); "
                         "accepted: one value")
        setattr(namespace, self.dest, values)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _both(key: str) -> str:
    return f"{CPU[key]} on CPU, {CUDA[key]} on CUDA"


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and memory of every mechanism side by side",
        description="Measure every registered mechanism (layers) and the attention-core baselines (ops) "
        "across sequence lengths, each cell timed interleaved with its dense reference (mha for layers, "
        "dense-sdpa for ops). Defaults: CPU, C=512, 8 heads, seq 256-2048, fp32; on CUDA a 1B-class "
        "layer (C=2048, 16 heads, head dim 128, bf16, seq 2k-32k, batch = 32k/seq). Cells are streamed "
        "to the --out path with .jsonl (JSON lines) as they finish; a CUDA context fault stops the run with them kept. "
        "--suite NAME runs a named preset of rows (the project's kept measurements); options given beside it override "
        "its values.",
    )
    p.add_argument("--suite", default=None, choices=list(SUITES), metavar="NAME", action=_Once,
                   help=f"a named preset of the options below ({suite_help()}); on CUDA at the sizes of "
                   "benchmarks/results/h200/<suite>-<mode>.json, on CPU at shorter lengths (default: none)")
    p.add_argument("--mechanisms", type=_name_list, default=None,
                   help="comma-separated registered names (see 'attnkit list'), or 'none' for ops only "
                   "(default: all registered)")
    p.add_argument("--ops", type=_name_list, default=None,
                   help=f"comma-separated attention-core rows from: {', '.join(OPS)}; 'none' to skip "
                   f"(default: all of them on CUDA; on CPU all but {', '.join(CUDA_ONLY_OPS)})")
    p.add_argument("--seq", type=_int_list, default=None,
                   help="comma-separated positive sequence lengths (default: "
                   f"{','.join(map(str, CPU['seqs']))} on CPU, {','.join(map(str, CUDA['seqs']))} on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="positive batch size (default: 1 on CPU, max(1, 32768 // seq) on CUDA)")
    p.add_argument("--dim", type=int, default=None, help=f"model width C, positive, divisible by --heads (default: {_both('dim')})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads H, positive (default: {_both('heads')})")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads of the op rows (a GQA-shaped core, e.g. SQA's), a positive divisor of --heads "
                   "(default: --heads)")
    p.add_argument("--head-dim", type=int, default=None,
                   help=f"head dim D, positive (default: {_both('head_dim')} when neither --dim nor --heads is given, "
                   "else C/H)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), metavar="DTYPE",
                   help=f"one of {', '.join(DTYPES)} (default: {_both('dtype')})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help=f"one of {', '.join(MODES)} (default: fwd, or the suite's first mode)")
    p.add_argument("--pattern", default=None,
                   help="pattern of the op rows: causal | full | window:W | sink:N:W | s2:BLOCK:LOCAL:STRIDE; several "
                   "comma-separated measure the patterned rows (flex, attend, sigmoid, reference) once per pattern "
                   "(default: causal, or the suite's)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"fewest timed rounds per cell, 1 to {MAX_SAMPLES}; more are taken until the p10-p90 band is "
                   f"within {STOP_SPREAD * 100:.0f}%% of the median or --max-time runs out (default: {_both('repeat')})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed warm-up calls per cell, >= 0; the last (an extra one when 0) measures peak memory "
                   f"(default: {_both('warmup')})")
    p.add_argument("--max-time", type=_seconds, default=None,
                   help=f"seconds of sampling per cell once --repeat rounds are in, > 0 (default: {_both('max_time')})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads during the run, positive; more use more cores, 1 is steadier on a machine "
                   "shared with other work, where a thread waiting for a descheduled one stalls every op "
                   "(default: 1 on CPU, torch's own on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers (default: off)")
    p.add_argument("--small-flex-tiles", action="store_true",
                   help="let training steps run patterns on their own 64-token FlexAttention blocks "
                        "(attnkit.ops.softmax.flex.enable_small_flex_backward_tiles, for this run only; default: off)")
    p.add_argument("--timing", default="latency", choices=TIMINGS,
                   help="latency (each call timed alone, host launch gaps included) | throughput (each sample is the "
                   "mean of 10 calls queued back to back: tokens/s of a busy GPU) (default: latency)")
    p.add_argument("--out", default=None,
                   help="JSON file, written at the end; the cells also go, as they finish, to the same path with .jsonl "
                   "(default: attnkit-bench-<cpu|cuda>-<mode>.json)")
    p.add_argument("--plot", default=None, help="PNG file, or 'none' to skip (default: --out with .png)")
    p.set_defaults(func=cmd_bench)


def make_config(args) -> BenchConfig:
    from .. import registry

    defaults = default_config(args.device)
    cuda = args.device.startswith("cuda")
    suite = getattr(args, "suite", None)
    if suite is not None:  # the suite's values replace the device's defaults; options given explicitly still win
        fields = get_suite(suite).config_fields(args.device)
        if not cuda and "ops" in fields:
            fields["ops"] = [o for o in fields["ops"] if o not in CUDA_ONLY_OPS]
        defaults = {**defaults, **fields}
    dim = args.dim if args.dim is not None else defaults["dim"]
    heads = args.heads if args.heads is not None else defaults["heads"]
    if args.head_dim is not None:
        head_dim = args.head_dim
    elif args.dim is None and args.heads is None:
        head_dim = defaults["head_dim"]
    else:
        head_dim = dim // heads if heads > 0 else 0  # heads <= 0 is refused by validate_config
    if args.ops is not None:
        ops = args.ops
    elif "ops" in defaults:
        ops = defaults["ops"]
    else:
        ops = [o for o in OPS if cuda or o not in CUDA_ONLY_OPS]
    if args.mechanisms is not None:
        mechanisms = args.mechanisms
    else:
        mechanisms = defaults.get("mechanisms", [c.name for c in registry.mechanisms()])
    pattern = args.pattern if args.pattern is not None else defaults.get("pattern", "causal")
    if args.pattern is None and not any(o in PATTERNED_OPS for o in ops):
        pattern = "causal"  # the suite's patterns, with no row left to compute them (e.g. --suite patterns --ops none)
    return BenchConfig(
        mechanisms=mechanisms,
        ops=ops,
        seqs=args.seq if args.seq is not None else defaults["seqs"],
        batch=args.batch if args.batch is not None else defaults["batch"],
        dim=dim,
        heads=heads,
        head_dim=head_dim,
        dtype=args.dtype if args.dtype is not None else defaults["dtype"],
        device=args.device,
        mode=args.mode if args.mode is not None else defaults.get("mode", "fwd"),
        pattern=pattern,
        repeat=args.repeat if args.repeat is not None else defaults["repeat"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        max_time=args.max_time if args.max_time is not None else defaults["max_time"],
        compile=args.compile,
        small_flex_tiles=args.small_flex_tiles,
        kv_heads=args.kv_heads,
        threads=args.threads if args.threads is not None else defaults["threads"],
        timing=args.timing,
    )


def stream_path(out: Path) -> Path:
    """Where the cells are streamed: ``r.json`` -> ``r.jsonl``, any other name gets ``.jsonl`` appended."""
    return out.with_suffix(".jsonl") if out.suffix == ".json" else out.with_name(out.name + ".jsonl")


def check_outputs(out: Path, plot: str | None) -> tuple[Path, Path | None]:
    """The JSON, JSON-lines and PNG paths, each checked writable (and matplotlib present for a plot)."""
    plot_path = plot_path_for(out, plot)
    stream = stream_path(out)
    check_writable(out, "--out")
    check_writable(stream, "--out (its JSON-lines stream)")
    if plot_path is not None:
        if plot_path.resolve() in (out.resolve(), stream.resolve()):
            raise ValueError(f"--plot {str(plot_path)!r} would overwrite the results; accepted: another path, or 'none'")
        check_writable(plot_path, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'attnkit[plot]', or pass --plot none") from None
    return stream, plot_path


def print_table(result: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    mode = result["config"]["mode"]
    peak = result["peak"]
    if peak["source"] == "vendor spec":
        peak_text = f"peak {peak['tflops']:.0f} TFLOP/s (vendor spec)"
    else:
        peak_text = "peak " + ("-" if peak["tflops"] is None else f"{peak['tflops']:.3g}") + " TFLOP/s (best matmul of the run)"
    table = Table(title=f"attnkit bench · {mode} · {result['device']['name']} · {peak_text}",
                  caption="speedup: median of per-round ratios against the dense reference timed interleaved "
                  "(p10-p90 band); noisy = a second run may differ by more than ~25 %")
    cols = ["row", "seq", "batch", "backend", "median ms", "p10-p90 ms",
            "state" if mode == "decode" else "peak mem", "TFLOP/s", "% peak", "speedup", "p10-p90", "noise",
            "FLOP red.", "realised"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("row", "backend") else "right", no_wrap=True)
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for c in result["cells"]:
        row = c["name"] if c["kind"] == "layer" else escape(f"[op] {c['name']}")
        if c.get("pattern") not in (None, "", "causal"):
            row += escape(f" [{c['pattern']}]")
        if c["status"] != "ok":
            table.add_row(row, str(c["seq"]), str(c["batch"]), c["status"].upper(), escape(c["message"][:90]),
                          *[""] * (len(cols) - 5))
            continue
        lat = c["latency_ms"]
        band = "-" if c["speedup_p10"] is None else f"{c['speedup_p10']:.2f}-{c['speedup_p90']:.2f}"
        noise = f(c["noise"], ".0%") + (" noisy" if c["noisy"] else "")
        style = "dim" if c["noisy"] else None
        table.add_row(
            row, str(c["seq"]), str(c["batch"]), c["backend"], f(lat["median"], ".3f"),
            f"{lat['p10']:.3f}-{lat['p90']:.3f}",
            fmt_bytes(c["state_bytes"] if mode == "decode" else c["peak_memory_bytes"]),
            f(c["tflops"], ".3g"), f(c["pct_peak"], ".1f"), f(c["speedup_vs_dense"], ".2f"), band, noise,
            f(c["flop_reduction"], ".2f"), f(c["realised_fraction"], ".2f"), style=style,
        )
    console.print(table)


class _Stream:
    """The JSON-lines file: a header line (the result without cells), then one line per finished cell."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w")  # noqa: SIM115 - closed in close()

    def header(self, header: dict) -> None:
        self._write({"header": header})

    def cell(self, cell: dict) -> None:
        self._write(cell)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # on disk now: a crash later loses nothing finished
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def cmd_bench(args) -> int:
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .._console import console, invoked_command, write_outputs

    cfg = make_config(args)
    validate_config(cfg)
    device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    suite = getattr(args, "suite", None)
    out = Path(args.out or f"attnkit-bench-{device}-{suite + '-' if suite else ''}{cfg.mode}.json")
    stream_file, plot_path = check_outputs(out, args.plot)
    err_console = Console(stderr=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device == "cpu" and load > (os.cpu_count() or 1):
        err_console.print(f"[yellow]attnkit bench: the load average is {load:.1f} on {os.cpu_count()} cores: other work "
                          "shares the CPU, expect noisy cells (they are flagged)[/]")
    command = invoked_command("bench")
    stream = _Stream(stream_file)
    try:
        with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            task = bar.add_task("starting", total=count_cells(cfg))

            def on_cell(cell: dict) -> None:
                stream.cell(cell)
                bar.advance(task)

            result = run_bench(cfg, progress=lambda desc: bar.update(task, description=desc), command=command,
                               on_start=stream.header, on_cell=on_cell, suite=suite)
    finally:
        stream.close()
    from .plot import plot_bench

    out_console = console()
    print_table(result, out_console)
    write_outputs(result, str(out), "none" if plot_path is None else str(plot_path), plot_bench, out_console)
    stopped = result["stopped"]
    if stopped is None:
        if result["cells"] and not any(c["status"] == "ok" for c in result["cells"]):
            # nothing was measured (every row unsupported here, skipped or failed): a script
            # running the bench should not take the empty table for a result
            statuses = sorted({c["status"] for c in result["cells"]})
            print(f"attnkit bench: no cell was measured (statuses: {', '.join(statuses)}); "
                  "see the message column for why", file=sys.stderr)
            return 1
        return 0
    finished = len(result["cells"]) - (1 if stopped["kind"] else 0)  # a context fault's own cell is the last
    print(f"attnkit bench: stopped at cell {stopped['cell']}: {stopped['message']}\n"
          f"  {finished} cell(s) finished before it are in {stream_file} and {out}"
          + ("; the CUDA context cannot be used after this fault: leave that row out (--mechanisms / --ops) "
             "to measure the rest" if stopped["kind"] else ""), file=sys.stderr)
    return 1
