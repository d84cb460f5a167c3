"""The ``attnkit`` command: ``list``, ``bench``, ``compare``, ``sinks``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def console():
    """A rich console for stdout; wide when stdout is not a terminal (logs, pipes)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def invoked_command(name: str) -> str | None:
    """The command line as typed, for result files (None when not run as ``attnkit <name>``)."""
    import shlex

    return "attnkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == [name] else None


def write_outputs(result: dict, out: str, plot: str | None, plot_fn, out_console) -> None:
    """Write the JSON to ``out`` and, unless ``plot == 'none'``, the PNG (default: next to the JSON)."""
    import json
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    written = [str(path)]
    if plot != "none":
        plot_path = Path(plot or path.with_suffix(".png"))
        plot_fn(result, plot_path)
        written.append(str(plot_path))
    out_console.print(f"wrote {', '.join(written)}")


def _cmd_list(args) -> int:
    from rich.table import Table

    from . import registry

    table = Table(title="attnkit mechanisms")
    for column in ("name", "family", "paper", "backends", "decode", "causal", "bidirectional", "varlen"):
        table.add_column(column, overflow="fold")
    yes = lambda flag: "yes" if flag else "-"  # noqa: E731
    for card in registry.mechanisms():
        caps = card.capabilities
        table.add_row(
            card.name,
            card.family,
            card.paper,
            ", ".join(caps.backends),
            yes(caps.decode),
            yes(caps.causal),
            yes(caps.bidirectional),
            yes(caps.varlen),
        )
    console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="attention mechanisms from recent research, one API")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered mechanisms")
    p_list.set_defaults(func=_cmd_list)
    from .analysis.cli import add_sinks_parser
    from .bench.cli import add_bench_parser
    from .compare.cli import add_compare_parser

    add_bench_parser(sub)
    add_compare_parser(sub)
    add_sinks_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"attnkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
