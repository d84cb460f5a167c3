"""Console and output helpers shared by the subcommands (``attnkit bench``, ``compare``, ``sinks``).

They live here rather than in :mod:`attnkit.cli` so that the subcommand modules need not
import the top-level command (which imports them: a circle).
"""

from __future__ import annotations

import sys
import time

__all__ = ["console", "err_console", "invoked_command", "write_atomic", "write_outputs", "StepPrinter"]


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


def plot_path_for(out, plot: str | None):
    """The PNG path of ``--plot`` (``None`` for 'none'; default: next to the JSON). A name without
    a suffix gets ``.png``, which is what matplotlib writes anyway, so the path printed is the real one."""
    from pathlib import Path

    if plot == "none":
        return None
    if plot and Path(plot).is_dir():
        raise ValueError(f"--plot {plot!r} is a directory; accepted: a PNG file path, or 'none'")
    path = Path(plot) if plot else Path(out).with_suffix(".png")
    return path if path.suffix else path.with_name(path.name + ".png")


def check_writable(path, option: str) -> None:
    """Refuse an output path that cannot be written, before a run rather than after it: the file is
    opened for appending (and removed again if it did not exist), the only check that also holds
    for root, read-only mounts and pseudo file systems."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; accepted: a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(path.parent)!r} is a file, not a folder")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {str(path)!r} is not writable ({err.strerror or err})") from None
    if not existed:
        path.unlink(missing_ok=True)


def check_folder(path, option: str) -> None:
    """Refuse a folder option (``--save``, ``--cache-dir``) that names an existing file."""
    from pathlib import Path

    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file; accepted: a folder (created if missing)")


def write_atomic(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to disk, then a
    rename: an interrupted write leaves the previous file whole (or none), never half of the new one,
    and no temporary file behind. Creates the folder. Returns the path.

    ``data``: text, bytes, or a function that writes into the binary file object it is given
    (``lambda f: torch.save(state, f)``)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_outputs(result: dict, out: str, plot: str | None, plot_fn, out_console) -> None:
    """Write the JSON to ``out`` (atomically: a result file it replaces is never left half
    written) and, unless ``plot == 'none'``, the PNG (default: next to the JSON)."""
    import json

    path = write_atomic(out, json.dumps(result, indent=1))
    written = [str(path)]
    plot_path = plot_path_for(path, plot)
    if plot_path is not None:
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
