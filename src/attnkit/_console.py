"""Console and output helpers shared by the subcommands (``attnkit bench``, ``compare``, ``sinks``).

They live here rather than in :mod:`attnkit.cli` so that the subcommand modules need not
import the top-level command (which imports them: a circle).
"""

from __future__ import annotations

import sys
import time

__all__ = ["console", "err_console", "invoked_command", "write_outputs", "StepPrinter"]


def console():
    """A rich console for stdout; wide when stdout is not a terminal (logs, pipes)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def err_console():
    """A rich console for stderr (progress, notes); wide when stderr is not a terminal."""
    from rich.console import Console

    return Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)


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


class StepPrinter:
    """Plain progress lines for logs: one line each time a run passes another ``every`` fraction
    of its steps, flushed at once (a rich bar shows nothing in a file until the command ends).

        compare: mha seed 0: step 100/1000 (10%) loss 3.2104, 25.3 s
    """

    def __init__(self, prefix: str, stream=None, every: float = 0.1):
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], got {every}")
        self.prefix, self.every = prefix, every
        self.stream = stream if stream is not None else sys.stderr

    def line(self, text: str) -> None:
        print(f"{self.prefix}: {text}", file=self.stream, flush=True)

    def start(self, name: str, total: int):
        """A callback ``on_step(step, loss)`` for one run of ``total`` steps."""
        start = time.perf_counter()
        next_mark = [self.every]

        def on_step(step: int, loss: float) -> None:
            if step / total + 1e-9 < next_mark[0] and step != total:
                return
            while next_mark[0] <= step / total + 1e-9:
                next_mark[0] += self.every
            self.line(f"{name}: step {step}/{total} ({100 * step / total:.0f}%) loss {loss:.4f}, "
                      f"{time.perf_counter() - start:.1f} s")

        return on_step
