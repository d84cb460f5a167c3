"""``attnkit sinks``: attention-sink metrics of saved models (``attnkit compare --save``)."""

from __future__ import annotations


def add_sinks_parser(sub) -> None:
    p = sub.add_parser(
        "sinks",
        help="first-token attention (attention sinks) of saved models",
        description="Load models saved by 'attnkit compare --save DIR' and report, per model, the share of "
        "attention on the first token and the fraction of sink heads (arXiv 2410.10781's metric) on "
        "validation text.",
    )
    p.add_argument("models", nargs="+", help="model folders (each with config.json and model.safetensors)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: Python's stdlib source)")
    p.add_argument("--seq-len", type=int, default=256, help="window length in bytes, an integer >= 2 (default: 256)")
    p.add_argument("--windows", type=int, default=16, help="validation windows to average over, an integer >= 1 (default: 16)")
    p.add_argument("--epsilon", type=float, default=0.3, help="sink threshold on the mean first-token weight, in (0, 1) (default: 0.3)")
    p.add_argument("--out", default=None, help="JSON file (default: none, the table only)")
    p.set_defaults(func=_cmd_sinks)


def _cmd_sinks(args) -> int:
    import json
    from pathlib import Path

    import torch
    from rich.table import Table

    from .._console import console, invoked_command, write_atomic
    from ..models import DecoderLM
    from ..tasks import TextCorpus
    from .sinks import sink_report

    if args.windows < 1:
        raise ValueError(f"--windows must be an integer >= 1, got {args.windows}")
    if not 0 < args.epsilon < 1:
        raise ValueError(f"--epsilon must be in (0, 1), got {args.epsilon}")
    for folder in args.models:
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"model folder {folder!r} holds no config.json; give folders written by "
                             "'attnkit compare --save DIR' (DIR/<mechanism>)")
    task = TextCorpus(seq_len=args.seq_len, path=args.corpus)
    generator = torch.Generator().manual_seed(task.eval_seed)
    starts = torch.randint(0, len(task._val) - args.seq_len - 1, (args.windows,), generator=generator)
    tokens, _ = task._windows(task._val, starts)
    results = {}
    for folder in args.models:
        model = DecoderLM.from_pretrained(folder).eval()
        vocab = model.config.get("vocab_size", 256)
        if vocab < task.vocab_size:
            raise ValueError(f"model {folder!r} has vocab_size={vocab}, but attnkit sinks reads byte-level text "
                             f"({task.vocab_size} symbols): give models trained on text, e.g. "
                             "'attnkit compare --task text --save DIR'")
        results[Path(folder).name] = {"attention": model.config["attention"], **sink_report(model, tokens, epsilon=args.epsilon)}
    table = Table(title=f"attention sinks · {args.windows} windows of {args.seq_len} bytes · epsilon {args.epsilon}")
    for column in ("model", "first-token share", "first-token weight", "sink heads"):
        table.add_column(column, justify="left" if column == "model" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in results.items():
        table.add_row(name, fmt(r["first_token_share"]), fmt(r["first_token_weight"]), fmt(r["sink_heads"]))
    console().print(table)
    if args.out:
        from .._meta import run_metadata

        out = {"schema": "attnkit.sinks/1", "command": invoked_command("sinks"), **run_metadata("cpu"), "corpus": task.info,
               "seq_len": args.seq_len, "windows": args.windows, "models": results}
        write_atomic(args.out, json.dumps(out, indent=1))
        console().print(f"wrote {args.out}")
    return 0
