"""``attnkit analyze SUBCOMMAND``: attention analyses of a transformers model (the shipped subject
by default), each writing a table to the terminal and, with ``--out DIR``, a JSON and a PNG.

A subcommand is a module of this package named in :data:`SUBCOMMANDS` that exposes

- ``add_parser(sub) -> argparse.ArgumentParser``: adds its subparser to ``sub`` (the
  ``attnkit analyze`` subparsers), usually after ``common_arguments(p)``;
- ``run(args) -> int``: runs it (``ValueError`` for bad input: ``attnkit`` prints it and exits 2).

Adding one is one line in :data:`SUBCOMMANDS`; a module that cannot be imported (its optional
dependency missing) becomes a subcommand that says why when run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# module (in this package) -> its subcommand is named by the module's add_parser
SUBCOMMANDS = (
    "sinks_hf",  # attnkit analyze sinks
    "waad",  # attnkit analyze waad
    "patching",  # attnkit analyze patch
    "attribution",  # attnkit analyze attribution
    "crossattn",  # attnkit analyze crossattn
)

__all__ = ["SUBCOMMANDS", "add_analyze_parser", "common_arguments", "load_model", "write_results", "haystack",
           "peak_rss_mib"]


def common_arguments(p, *, seed: bool = True) -> None:
    """``--model``, ``--out``, ``--seed``, ``--tag``, ``--threads``: shared by every subcommand."""
    p.add_argument("--model", default=None,
                   help="a transformers causal LM folder (default: the shipped subject model)")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: the table only)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")
    p.add_argument("--tag", default=None, help="a suffix of the file names: analyze-NAME-TAG.json (default: none)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, an integer >= 1 (default: 1)")


def load_model(args):
    """(model in float32 eval mode on CPU, its tokenizer, the path) from ``args.model``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(args.threads, bool) or args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.model is None:
        from ...hf.subject import default_subject

        path = default_subject()
    else:
        path = Path(args.model)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {args.model!r} is not a transformers model folder (no config.json in it)")
    # float32: the analyses compare small differences of attention and logits
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, str(path) if args.model is None else args.model  # as typed: results stay portable


def haystack(corpus=None) -> bytes:
    """The held-out text of ``corpus`` (default: Python's stdlib source, as ``attnkit eval``)."""
    from ...tasks.text import load_corpus

    return load_corpus(corpus)[1]


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (None where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def write_results(args, name: str, data: dict, plots: dict) -> None:
    """``--out/analyze-<name>.json`` (with the command and provenance) and each ``plots`` entry
    ``{suffix: fn(path)}`` as ``--out/analyze-<name><suffix>.png``."""
    from ..._console import console, invoked_command, write_atomic
    from ..._meta import run_metadata

    if args.out is None:
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; accepted: a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    tag = getattr(args, "tag", None)
    if tag is not None:
        if not tag or not all(c.isalnum() or c in "-_." for c in tag):
            raise ValueError(f"--tag must be letters, digits, '-', '_' or '.', got {tag!r}")
        name = f"{name}-{tag}"
    record = {"schema": f"attnkit.analyze.{name}/1", "command": invoked_command("analyze"), **run_metadata("cpu"),
              "peak_rss_mib": peak_rss_mib(), **data}
    path = out / f"analyze-{name}.json"
    write_atomic(path, json.dumps(record, indent=1))
    console().print(f"wrote {path}")
    for suffix, plot in plots.items():
        png = out / f"analyze-{name}{suffix}.png"
        plot(png)
        console().print(f"wrote {png}")


def _missing(name: str, why: str):
    def add_parser(sub):
        p = sub.add_parser(name, help=f"not available here: {why}", prefix_chars="\0")
        p.add_argument("options", nargs="*")

        def run(args):
            raise ValueError(why)

        p.set_defaults(func=run)
        return p

    return add_parser


def add_analyze_parser(sub) -> None:
    """Add ``attnkit analyze`` and its subcommands (one per module of :data:`SUBCOMMANDS`)."""
    p = sub.add_parser("analyze", help="attention as evidence on transformers models: sinks, WAAD/FAI, head patching, attribution, cross-attention",
                       description="Attention analyses of a transformers causal LM (default: the shipped subject "
                       "model). Each subcommand prints a table and, with --out DIR, writes JSON and PNG to DIR.")
    analyses = p.add_subparsers(dest="analysis", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ImportError as err:
            _missing(name, str(err))(analyses)
            continue
        parser = module.add_parser(analyses)
        if parser is not None:  # a module's add_parser may set its own func and return nothing
            parser.set_defaults(func=module.run)
