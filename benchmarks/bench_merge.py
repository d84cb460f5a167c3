"""Merge the parts of one bench run into one result: one JSON and one plot.

The default ``attnkit bench --device cuda`` does not fit the GPU machine's 10 minutes per command, so
``benchmarks/gpu.sh`` runs it in parts (``bench-layers-a|b|c``, ``bench-ops``), and a part stopped
by its time limit may leave a JSON-lines stream and have its missing cells measured by a later run.
This script puts the parts back together, as the one run would have written them:

    python benchmarks/bench_merge.py --out benchmarks/results/h200/bench-cuda-fwd.json \\
        benchmarks/results/h200/bench-cuda-fwd-ops.json benchmarks/results/h200/bench-cuda-fwd-bench-layers-*.json ...

Rules (each refused with a clear error otherwise): every part was made by the same code (``code_hash``)
on the same device, dtype, mode, width, heads and timing settings; a cell (row, kind, length, pattern)
measured by more than one part is kept once, from the first part that has it (``mha`` is in every
layer part as the dense reference: the copies agree within the machine's noise, and the first is
kept). The merged JSON records the parts' commands under ``parts`` and its own command under
``command``; it is ``complete`` when every row has a cell at every length (``missing_cells`` lists
the others), whichever part measured it. The plot is ``attnkit bench``'s own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # this checkout's attnkit, not an installed copy
    sys.path.insert(0, str(_HERE.parent / "src"))


def _results_readme():
    """results_readme.py beside this script (its ``load`` reads a stopped run's .jsonl stream too), loaded
    from its file: putting benchmarks/ on sys.path would make benchmarks/kvpress shadow the kvpress package."""
    spec = importlib.util.spec_from_file_location("results_readme", _HERE / "results_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

#: config fields that must agree between parts (the others, mechanisms/ops/seqs, are what parts split)
SAME_CONFIG = ("dim", "heads", "head_dim", "dtype", "device", "mode", "repeat", "warmup", "max_time",
               "tokens_per_batch", "compile", "small_flex_tiles", "kv_heads", "timing")


def cell_key(cell: dict) -> tuple:
    return cell["name"], cell["kind"], cell["seq"], cell.get("pattern", "")


def merge(parts: list[tuple[str, dict]]) -> dict:
    """``parts``: (file name, bench result) pairs in order. Returns the merged result (without
    ``command``). Raises ``ValueError`` naming the file and the field where parts disagree."""
    if not parts:
        raise ValueError("no parts given: name the bench result files (.json, or .jsonl of a stopped run)")
    first_name, first = parts[0]
    merged = {k: v for k, v in first.items() if k not in ("cells", "command")}
    merged["config"] = dict(first["config"])
    cells: dict[tuple, dict] = {}
    mechanisms, ops, seqs = [], [], set()
    for name, part in parts:
        if part.get("schema") != first.get("schema"):
            raise ValueError(f"{name}: schema {part.get('schema')!r}, but {first_name} has {first.get('schema')!r}")
        if part.get("code_hash") != first.get("code_hash"):
            raise ValueError(f"{name}: made by code {part.get('code_hash')}, {first_name} by {first.get('code_hash')}: "
                             "parts of one run must come from the same code")
        if (part.get("device") or {}).get("name") != (first.get("device") or {}).get("name"):
            raise ValueError(f"{name}: device {part['device'].get('name')!r}, {first_name}: {first['device'].get('name')!r}")
        for field in SAME_CONFIG:
            if part["config"].get(field) != first["config"].get(field):
                raise ValueError(f"{name}: config {field}={part['config'].get(field)!r}, but {first_name} has "
                                 f"{first['config'].get(field)!r}: not parts of one run")
        for m in part["config"].get("mechanisms", []):
            mechanisms.append(m) if m not in mechanisms else None
        for o in part["config"].get("ops", []):
            ops.append(o) if o not in ops else None
        seqs.update(part["config"].get("seqs", []))
        for cell in part["cells"]:
            cells.setdefault(cell_key(cell), cell)
    merged["config"].update(mechanisms=mechanisms, ops=ops, seqs=sorted(seqs))
    merged["cells"] = sorted(cells.values(), key=lambda c: (c["seq"], c["kind"] != "layer",
                                                            (mechanisms if c["kind"] == "layer" else ops).index(c["name"])
                                                            if c["name"] in (mechanisms if c["kind"] == "layer" else ops) else 10**6))
    merged["parts"] = [{"file": name, "command": part.get("command"), "complete": part.get("complete"),
                        "cells": len(part["cells"])} for name, part in parts]
    have = {(c["kind"], c["name"], c["seq"]) for c in merged["cells"]}
    merged["missing_cells"] = [f"{n}@{s}" for s in sorted(seqs) for kind, names in (("layer", mechanisms), ("op", ops))
                               for n in names if (kind, n, s) not in have]
    # complete: every row at every length has its cell (measured, or skipped with its reason), whichever part ran it
    merged["complete"] = not merged["missing_cells"]
    merged["stopped"] = None if merged["complete"] else next(
        (part.get("stopped") for _, part in parts if part.get("stopped")), "a part stopped before its last cell")
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", type=Path, help="bench result files (.json; a stopped run's .jsonl)")
    p.add_argument("--out", type=Path, required=True, help="merged JSON (the plot goes beside it, .png)")
    p.add_argument("--plot", choices=("png", "none"), default="png")
    args = p.parse_args(argv)
    if args.out.suffix != ".json":
        p.error(f"--out must end in .json, got {args.out}")
    if not args.out.parent.is_dir():
        p.error(f"--out's folder {args.out.parent} does not exist")
    readme = _results_readme()
    parts = []
    for path in args.parts:
        try:
            result = readme.load(path)
        except readme.Unreadable as err:
            p.error(str(err))
        if not isinstance(result, dict) or "cells" not in result or "config" not in result:
            p.error(f"{path}: not an attnkit bench result (no cells/config)")
        parts.append((path.name, result))
    try:
        merged = merge(parts)
    except ValueError as err:
        p.error(str(err))
    shown = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    merged = {"command": "python benchmarks/bench_merge.py " + shlex.join(shown), **merged}
    from attnkit._console import write_atomic

    write_atomic(args.out, json.dumps(merged, indent=1) + "\n")
    written = [str(args.out)]
    if args.plot == "png":
        from attnkit.bench.plot import plot_bench

        plot_bench(merged, args.out.with_suffix(".png"))
        written.append(str(args.out.with_suffix(".png")))
    n_layer = sum(c["kind"] == "layer" for c in merged["cells"])
    print(f"{len(merged['cells'])} cells ({n_layer} layer, {len(merged['cells']) - n_layer} op) from {len(parts)} parts; "
          f"missing cells: {', '.join(merged['missing_cells']) or 'none'}; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
