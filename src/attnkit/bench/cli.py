"""``attnkit bench``: argument parsing, progress bar, terminal table, JSON and PNG output."""

from __future__ import annotations

import argparse

from .harness import OPS, BenchConfig, count_cells, default_config, fmt_bytes, run_bench


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [] if text in ("", "none") else [s.strip() for s in text.split(",") if s.strip()]


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and memory of every mechanism side by side",
        description="Measure every registered mechanism (layers) and the attention-core baselines (ops) "
        "across sequence lengths. Defaults: CPU, C=512, 8 heads, seq 256-2048, fp32; on CUDA a 1B-class "
        "layer (C=2048, 16 heads, head dim 128, bf16, seq 2k-32k, batch = 32k/seq).",
    )
    p.add_argument("--mechanisms", type=_name_list, default=None, help="comma-separated names (default: all registered; 'none' for ops only)")
    p.add_argument("--ops", type=_name_list, default=None, help=f"attention-core baselines (default: all of {', '.join(OPS)} that apply; 'none' to skip)")
    p.add_argument("--seq", type=_int_list, default=None, help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 32768/seq on CUDA)")
    p.add_argument("--dim", type=int, default=None, help="model width C")
    p.add_argument("--heads", type=int, default=None, help="attention heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads of the op rows (a GQA-shaped core, e.g. SQA's); default --heads")
    p.add_argument("--head-dim", type=int, default=None, help="head dim D (default C/H)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--mode", default="fwd", help="fwd | fwdbwd | decode")
    p.add_argument("--pattern", default="causal", help="pattern of the op rows: causal | full | window:W | sink:N:W | s2:BLOCK:LOCAL:STRIDE")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per cell")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per cell")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers")
    p.add_argument("--timing", default="latency", help="latency (each call timed alone, host launch gaps included) | "
                   "throughput (each sample is the mean of 10 calls queued back to back: tokens/s of a busy GPU)")
    p.add_argument("--out", default=None, help="JSON file (default: attnkit-bench-<device>-<mode>.json)")
    p.add_argument("--plot", default=None, help="PNG file (default: next to --out); 'none' to skip")
    p.set_defaults(func=cmd_bench)


def make_config(args) -> BenchConfig:
    from .. import registry

    defaults = default_config(args.device)
    dim = args.dim or defaults["dim"]
    heads = args.heads or defaults["heads"]
    head_dim = args.head_dim or (defaults["head_dim"] if not args.dim and not args.heads else None) or dim // max(heads, 1)
    if args.ops is None:
        cuda = args.device.startswith("cuda")
        ops = [o for o in OPS if cuda or not (o.startswith("dense-sdpa-") or o == "fla-lightning")]  # CUDA-only rows
    else:
        ops = args.ops
    return BenchConfig(
        mechanisms=args.mechanisms if args.mechanisms is not None else [c.name for c in registry.mechanisms()],
        ops=ops,
        seqs=args.seq or defaults["seqs"],
        batch=args.batch if args.batch is not None else defaults["batch"],
        dim=dim,
        heads=heads,
        head_dim=head_dim,
        dtype=args.dtype or defaults["dtype"],
        device=args.device,
        mode=args.mode,
        pattern=args.pattern,
        repeat=args.repeat or defaults["repeat"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        compile=args.compile,
        kv_heads=args.kv_heads,
        timing=args.timing,
    )


def print_table(result: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    mode = result["config"]["mode"]
    table = Table(title=f"attnkit bench · {mode} · {result['device']['name']} · matmul peak {result['matmul_tflops']:.1f} TFLOP/s")
    cols = ["row", "seq", "batch", "backend", "median ms", "p10-p90 ms",
            "state" if mode == "decode" else "peak mem", "TFLOP/s", "% peak", "speedup", "FLOP red.", "realised"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("row", "backend") else "right", no_wrap=True)
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for c in result["cells"]:
        row = c["name"] if c["kind"] == "layer" else escape(f"[op] {c['name']}")
        if c["status"] != "ok":
            table.add_row(row, str(c["seq"]), str(c["batch"]), c["status"].upper(), c["message"][:70],
                          *[""] * (len(cols) - 5))
            continue
        lat = c["latency_ms"]
        table.add_row(
            row, str(c["seq"]), str(c["batch"]), c["backend"], f(lat["median"], ".3f"),
            f"{lat['p10']:.3f}-{lat['p90']:.3f}",
            fmt_bytes(c["state_bytes"] if mode == "decode" else c["peak_memory_bytes"]),
            f(c["tflops"], ".3g"), f(c["pct_matmul_peak"], ".1f"), f(c["speedup_vs_dense"], ".2f"),
            f(c["flop_reduction"], ".2f"), f(c["realised_fraction"], ".2f"),
        )
    console.print(table)


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = make_config(args)
    console = Console(stderr=True)
    from ..cli import invoked_command

    command = invoked_command("bench")
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=count_cells(cfg))
        started = [False]

        def progress(desc: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=desc)

        result = run_bench(cfg, progress=progress, command=command)
        bar.advance(task)
    from ..cli import console, write_outputs

    out_console = console()
    print_table(result, out_console)
    device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    from .plot import plot_bench

    write_outputs(result, args.out or f"attnkit-bench-{device}-{cfg.mode}.json", args.plot, plot_bench, out_console)
    return 0
