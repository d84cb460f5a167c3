"""Write ``benchmarks/results/README.md`` from the result files under it (run after adding results).

The README is generated, not edited: one section per device folder (``h200/``, ``cpu/``), in it one
table per ``attnkit bench`` file grouped by suite (``dense``, ``patterns``, ... then the default
bench and other runs), the ``attnkit compare`` and MQAR seed-sweep files, the question scripts'
files and the CUDA test log's summary; each file with the command that made it (its JSON's
``command``) and its plot. Hand-written context lives in ``findings.md`` beside the results and is
copied in as it is. ``tests/bench/test_results_readme.py`` checks that the committed README is
this script's output on the committed files.

    python benchmarks/results_readme.py                  # rewrite benchmarks/results/README.md
    python benchmarks/results_readme.py --check          # exit 1 when the README is out of date
    python benchmarks/results_readme.py --root DIR --stdout
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # this checkout's attnkit (its suites, its formatting), not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attnkit.bench.harness import fmt_bytes  # one formatting of sizes for the bench table and this README

ROOT = Path(__file__).resolve().parent / "results"
DEVICES = {"h200": "H200", "cpu": "CPU (this project's 2-core machine)"}
SUITE_ORDER = ("dense", "patterns", "linear", "heads", "sigmoid", "decode", "bench")
#: scripts renamed since their older files were made: the name in a file's command -> the script now
RENAMED = {"moh_core.py": "moh_core_speedup.py", "dma_core.py": "dma_core_speedup.py",
           "flex_blocks.py": "flex_block_shape.py", "flex_fwd_tiles.py": "flex_tile_choice.py",
           "flex_options.py": "flex_kernel_options.py", "picked_profile.py": "picked_causal_profile.py",
           "rows_safe_check.py": "flex_rows_safe.py"}
#: the commands of older files that did not record theirs (path under the results folder -> command)
LEGACY_COMMANDS = {"h200/flex-rows-safe.json": "python benchmarks/rows_safe_check.py --seq 32768 --out h200-rows-safe.json"}
NOISY_NOTE = "`*` noisy: a rerun may differ by more than ~25 %."


# -- reading ---------------------------------------------------------------------------------------
class Unreadable(ValueError):
    """A result file the README cannot be made from (not JSON, empty, or not the shape its schema says):
    reported by name instead of a traceback, or of a row that hides it among the other files."""


def load(path: Path) -> dict | list | None:
    """A result file's JSON; a bench run that left only its JSON-lines stream (stopped, or killed by a
    timeout) is read back from it as an incomplete result. Raises :class:`Unreadable` for a file that
    is empty or not JSON (a stream's last line cut off by the kill is dropped: the cells before it stand)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise Unreadable(f"{path.name}: cannot be read ({err})") from None
    if not text.strip():
        raise Unreadable(f"{path.name}: is empty")
    if path.suffix == ".jsonl":
        raw = [line for line in text.splitlines() if line.strip()]
        lines = []
        for i, line in enumerate(raw, 1):
            try:
                lines.append(json.loads(line))
            except ValueError as err:
                if i == len(raw) and i > 1 and not text.endswith("\n"):
                    break  # the line being written when the run was killed
                raise Unreadable(f"{path.name}: line {i} is not JSON ({err})") from None
        if not isinstance(lines[0], dict) or not isinstance(lines[0].get("header"), dict):
            raise Unreadable(f"{path.name}: its first line is not a bench stream's header ({{\"header\": {{...}}}})")
        if not all(isinstance(c, dict) for c in lines[1:]):
            raise Unreadable(f"{path.name}: a cell line is not a JSON object")
        return {**lines[0]["header"], "cells": lines[1:], "complete": False, "stream_only": True}
    try:
        return json.loads(text)
    except ValueError as err:
        raise Unreadable(f"{path.name}: is not valid JSON ({err})") from None


def is_bench(data) -> bool:
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("attnkit.bench/")


def suite_of(stem: str, data: dict) -> str:
    """The suite a bench file belongs to: recorded in the JSON (``--suite``), else its name's prefix."""
    if data.get("suite"):
        return data["suite"]
    for name in SUITE_ORDER:
        if stem == name or stem.startswith(name + "-"):
            return name
    return "other"


# -- formatting ------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)




def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def seq_label(seq: int) -> str:
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, leaving out the columns that are "-" in every row (after the first column)."""
    keep = [0] + [i for i in range(1, len(header)) if any(r[i] != "-" for r in rows)]
    out = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "|".join(" --- " for _ in keep) + "|"]
    out += ["| " + " | ".join(r[i].replace("|", "\\|") for i in keep) + " |" for r in rows]
    return out


def code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def command_of(data) -> str | None:
    return data.get("command") if isinstance(data, dict) else None


def provenance(data: dict) -> str:
    bits = []
    if data.get("created"):
        bits.append(str(data["created"])[:10])
    git = data.get("git")
    commit = data.get("git_commit") or (git.get("commit") if isinstance(git, dict) else git)
    if commit:
        bits.append(f"commit {str(commit)[:7]}")
    if data.get("code_hash"):
        bits.append(f"code {data['code_hash']}")
    return ", ".join(bits)


# -- bench tables ----------------------------------------------------------------------------------
def row_key(cell: dict) -> tuple[str, str, str]:
    return cell["kind"], cell["name"], cell.get("pattern") or ""


def row_title(cell: dict) -> str:
    pattern = cell.get("pattern") or ""
    name = cell["name"] + (f" {pattern}" if pattern and pattern != "causal" else "")
    return name if cell["kind"] == "layer" else f"[op] {name}"


def bench_table(data: dict) -> list[str]:
    """One line per row: its speedup over the run's dense reference at every length, and at the
    longest length its latency, speedup over dense cuDNN, FLOP reduction, realised share, tokens/s
    and memory (decode: the state's bytes)."""
    cells = data.get("cells", [])
    if not cells:
        return ["(no cells)"]
    cfg = data.get("config", {})
    decode = cfg.get("mode") == "decode"
    seqs = sorted({c["seq"] for c in cells})
    longest = seqs[-1]
    by_row: dict[tuple, dict[int, dict]] = {}
    for c in cells:
        by_row.setdefault(row_key(c), {})[c["seq"]] = c
    cudnn = {c["seq"]: c for c in cells if c["name"] == "dense-sdpa-cudnn" and c["status"] == "ok"}
    at = seq_label(longest)
    header = ["row", "backend", *[f"speedup {seq_label(s)}" for s in seqs], f"ms {at}", f"vs cuDNN {at}",
              f"FLOP red. {at}", f"realised {at}", f"realised vs flex {at}", f"tokens/s {at}",
              f"state {at}" if decode else f"memory {at}"]
    rows, noisy = [], False
    for per_seq in by_row.values():
        first = next(iter(per_seq.values()))
        line = [row_title(first), "-"]
        for s in seqs:
            c = per_seq.get(s)
            if c is None:
                line.append("-")
            elif c["status"] != "ok":
                line.append(c["status"])
            else:
                star = "*" if c.get("noisy") else ""
                noisy |= bool(star)
                line.append(fmt(c.get("speedup_vs_dense")) + star)
        c = per_seq.get(longest)
        if c is None or c["status"] != "ok":
            line += [c["status"] if c else "-"] + ["-"] * 6
            line[1] = (c or first).get("backend") or "-"
            rows.append(line)
            continue
        line[1] = c.get("backend") or "-"
        ms = c["latency_ms"]["median"]
        ref = cudnn.get(longest)
        vs_cudnn = ref["latency_ms"]["median"] / ms if ref and c["kind"] == "op" else None
        tokens = c["batch"] * (1 if decode else c["seq"]) / (ms * 1e-3)
        memory = c.get("state_bytes") if decode else c.get("peak_memory_bytes")
        line += [fmt(ms, ".3f"), fmt(vs_cudnn), fmt(c.get("flop_reduction")), fmt(c.get("realised_fraction")),
                 fmt(c.get("realised_fraction_vs_flex")), fmt_rate(tokens), fmt_bytes(memory)]
        rows.append(line)
    out = table(header, rows)
    if noisy:
        out += ["", NOISY_NOTE]
    return out


def bench_summary(data: dict) -> str:
    cfg = data.get("config", {})
    device = (data.get("device") or {}).get("name", "?")
    batch = cfg.get("batch")
    shape = f"C={cfg.get('dim')}, H={cfg.get('heads')}, D={cfg.get('head_dim')}"
    if cfg.get("kv_heads"):
        shape += f", KV heads={cfg['kv_heads']}"
    bits = [cfg.get("mode", "?"), device, cfg.get("dtype", "?"), shape, f"batch {batch}"]
    if cfg.get("pattern", "causal") != "causal":
        bits.append(f"pattern {cfg['pattern']}")
    if cfg.get("timing", "latency") != "latency":
        bits.append(f"{cfg['timing']} timing")
    if cfg.get("compile"):
        bits.append("compiled")
    return " · ".join(str(b) for b in bits)


# -- other files -----------------------------------------------------------------------------------
def compare_table(data: dict) -> list[str]:
    task = data.get("task", {})
    metric = task.get("metric", "metric")
    rows = [[r["mechanism"], fmt(r.get("metric"), ".3f"), f"{r.get('params', 0):,}", str(r.get("steps", "-")),
             fmt_rate(r.get("tokens_per_s")), r.get("status") or "ok"] for r in data.get("runs", [])]
    better = "higher" if task.get("higher_is_better", True) else "lower"
    return table(["mechanism", f"{metric} ({better} is better)", "parameters", "steps", "train tokens/s", "status"], rows)


def sweep_table(data: dict) -> list[str]:
    rows = []
    for recipe, entry in data.get("recipes", {}).items():
        for mechanism, s in (entry.get("summary") or {}).items():
            at = next((k for k in s if k.startswith("at_least_")), None)
            rows.append([recipe, mechanism, str(s.get("seeds_done", "-")), fmt(s.get("min"), ".3f"),
                         fmt(s.get("mean"), ".3f"), fmt(s.get("max"), ".3f"),
                         f"{s[at]} (>= {at[len('at_least_'):]})" if at else "-"])
    return table(["recipe", "mechanism", "seeds", "min", "mean", "max", "seeds at threshold"], rows)


def script_question(command: str | None) -> str:
    """The question a benchmarks/ script answers: the first sentence of its docstring, and the
    script's name now where it was renamed since the command ran."""
    m = re.search(r"benchmarks/(\w+\.py)", command or "")
    if not m:
        return "-"
    name = RENAMED.get(m.group(1), m.group(1))
    path = Path(__file__).resolve().parent / name
    if not path.exists():
        return "-"
    doc = re.match(r'\s*(?:#.*\n)*\s*"""(.*?)(?:\n\n|""")', path.read_text(), re.S)
    if not doc:
        return "-"
    text = " ".join(doc.group(1).split())
    sentence = re.match(r"(.*?[.?])(\s|$)", text)
    question = sentence.group(1) if sentence else text
    return question + (f" (script now `benchmarks/{name}`)" if name != m.group(1) else "")


def pytest_summary(path: Path) -> tuple[str, str]:
    lines = path.read_text(errors="replace").splitlines()
    head = next((line[2:] for line in lines if line.startswith("# commit")), "")
    result = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "no summary line")
    return head, result


# -- the README ------------------------------------------------------------------------------------
def companions(path: Path, root: Path) -> str:
    """Links to the files beside a result that share its name (plot, log, stream, profile)."""
    links = [f"[{p.suffix[1:]}]({p.relative_to(root).as_posix()})" for p in sorted(path.parent.glob(path.stem + ".*"))
             if p != path and p.suffix in (".png", ".log", ".txt", ".jsonl")]
    return (" · " + " · ".join(links)) if links else ""


def section_bench(files: list[tuple[Path, dict]], root: Path) -> list[str]:
    from attnkit.bench.suites import SUITES

    out = []
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path, data in files:
        groups.setdefault(suite_of(path.stem, data), []).append((path, data))
    for suite in [*SUITE_ORDER, "other"]:
        if suite not in groups:
            continue
        if suite in SUITES:
            out += [f"### {suite}", "", SUITES[suite].measures[0].upper() + SUITES[suite].measures[1:] + ": "
                    f"`attnkit bench --suite {suite}` (on the GPU `benchmarks/gpu.sh {suite}`, which writes "
                    f"`{suite}-MODE.json`).", ""]
        elif suite == "bench":
            out += ["### bench (the default run and other runs)", "", "The default run measures every registered "
                    "mechanism and op at the default sizes (`attnkit bench`; on the GPU `benchmarks/gpu.sh bench`, or "
                    "its parts `bench-layers-a`, `bench-layers-b`, `bench-ops`); `benchmarks/gpu.sh bench-args NAME "
                    "ARGS...` runs any other rows.", ""]
        else:
            out += ["### other bench runs", ""]
        for path, data in groups[suite]:
            rel = path.relative_to(root).as_posix()
            state = ""
            if data.get("stream_only"):
                state = " **(incomplete: only the cells streamed before it stopped)**"
            elif data.get("complete") is False:
                stopped = (data.get("stopped") or {}).get("message", "")
                state = f" **(stopped: {stopped})**"
            out += [f"#### [{path.name}]({rel}){companions(path, root)}{state}", "",
                    f"{bench_summary(data)} · {provenance(data)}", "", code(command_of(data) or "(no command recorded)"),
                    "", *bench_table(data), ""]
    return out


def _guarded(path: Path, root: Path, data, fn) -> list[str]:
    """``fn()``'s lines, or :class:`Unreadable` naming the file when its JSON lacks what its schema promises."""
    try:
        return fn()
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        schema = data.get("schema", "?") if isinstance(data, dict) else "?"
        raise Unreadable(f"{path.relative_to(root).as_posix()}: not a readable {schema} result "
                         f"({type(err).__name__}: {err})") from None


def render(root: Path = ROOT) -> str:
    """The README's text. Raises :class:`Unreadable` listing every result file it cannot be made from."""
    out = ["# Benchmark results", "",
           "<!-- Generated by `python benchmarks/results_readme.py` from the files in this folder: edit "
           "`findings.md` or the generator, not this file. -->", "",
           "Each table is one result file, with the command that wrote it. How to read the bench tables:",
           "- **speedup**: the median of per-round ratios against the run's dense reference, timed interleaved with "
           "the row (`mha` for layers, dense causal SDPA `dense-sdpa` for `[op]` rows); at each sequence length.",
           "- **vs cuDNN**: dense causal cuDNN attention's median latency over the row's, in the same run.",
           "- **FLOP red.**: the dense reference's FLOPs over the row's; **realised**: speedup / FLOP reduction "
           "(1.0 = the row is as much faster as it does less work); **realised vs flex**: the same against dense "
           "causal FlexAttention, the patterned rows' own kernel.",
           "- **tokens/s**: batch x sequence length / latency (training tokens/s in `fwdbwd`; decode: tokens "
           "generated per second); **memory**: peak allocated above the inputs; **state**: a decode state's bytes.",
           "- Ratios are comparable within one file; runs on different days moved by 5-12 %.", "",
           "Reproduce on a CUDA machine with `benchmarks/gpu.sh SUITE` (logs and JSON to `h200/`), anywhere with "
           "`attnkit bench --suite SUITE [--device cuda]`.", ""]
    from attnkit.bench.suites import SUITES

    out += ["## Suites", ""]
    out += table(["suite", "measures", "modes", "command"],
                 [[s.name, s.measures, ", ".join(s.modes), f"`attnkit bench --suite {s.name} --device cuda`"]
                  for s in SUITES.values()])
    out.append("")
    findings = root / "findings.md"
    if findings.exists():
        out += ["## Findings", "", findings.read_text().strip(), ""]
    order = list(DEVICES)
    problems: list[str] = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()),
                         key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name)):
        out += [f"## {DEVICES.get(folder.name, folder.name)} (`{folder.name}/`)", ""]
        bench, compare, sweeps, scripts = [], [], [], []
        tests = folder / "pytest-cuda.log"
        if tests.exists():
            head, result = pytest_summary(tests)
            out += [f"CUDA test suite ([pytest-cuda.log]({tests.relative_to(root).as_posix()}), "
                    f"`benchmarks/gpu.sh tests`): **{result}**" + (f" ({head})" if head else ""), ""]
        for path in sorted(folder.iterdir()):
            if path.suffix == ".jsonl" and (path.with_suffix(".json")).exists():
                continue  # the stream of a finished run: its JSON has every cell
            if path.suffix not in (".json", ".jsonl", ".txt") or (
                    path.suffix == ".txt" and path.with_suffix(".json").exists()):
                continue
            try:
                data = load(path) if path.suffix != ".txt" else None
            except Unreadable as err:
                problems.append(f"{folder.name}/{err}")
                continue
            # each file's lines are made once here, so that a file lacking what its schema promises is
            # named (Unreadable) instead of stopping the README with a KeyError deep in a table
            if is_bench(data):
                group, check = bench, lambda d: [hash(suite_of(path.stem, d)), bench_summary(d), provenance(d), *bench_table(d),
                                                 str((d.get("stopped") or {}).get("message", ""))]
            elif isinstance(data, dict) and str(data.get("schema", "")).startswith("attnkit.compare/"):
                group, check = compare, lambda d: [provenance(d), str(d.get("task", {}).get("task")), *compare_table(d)]
            elif isinstance(data, dict) and str(data.get("schema", "")).startswith("attnkit.mqar-seed-sweep/"):
                group, check = sweeps, lambda d: [provenance(d), *sweep_table(d)]
            else:
                group, check = scripts, lambda d: [provenance(d)] if isinstance(d, dict) else []
            try:
                _guarded(path, root, data, lambda: check(data))
            except Unreadable as err:
                problems.append(str(err))
                continue
            group.append((path, data))
        out += section_bench(bench, root)
        if compare:
            out += ["### compare (training quality)", "",
                    "`attnkit compare`: small models trained alike, one per mechanism; one seed per run.", ""]
            for path, data in compare:
                out += [f"#### [{path.name}]({path.relative_to(root).as_posix()}){companions(path, root)}", "",
                        f"task {data.get('task', {}).get('task', '?')} · {provenance(data)}", "",
                        code(command_of(data) or "-"), "", *compare_table(data), ""]
        if sweeps:
            out += ["### MQAR seed sweeps", "", "`benchmarks/mqar_seed_sweep.py`: per-seed MQAR accuracy under "
                    "candidate training recipes.", ""]
            for path, data in sweeps:
                out += [f"#### [{path.name}]({path.relative_to(root).as_posix()})", "", provenance(data), "",
                        code(command_of(data) or "-"), "", *sweep_table(data), ""]
        if scripts:
            out += ["### Question scripts and other files", "",
                    "Files written by the scripts in `benchmarks/` (one script per question) and by other commands; "
                    "read the file for its numbers.", ""]
            rows = []
            for path, data in scripts:
                command = command_of(data) or LEGACY_COMMANDS.get(path.relative_to(root).as_posix())
                if command is None and path.suffix == ".txt":
                    command = next((line[2:] for line in path.read_text().splitlines() if line.startswith("# ")), None)
                link = f"[{path.name}]({path.relative_to(root).as_posix()}){companions(path, root)}"
                rows.append([link, script_question(command), code(command) if command else "-",
                             (provenance(data) if isinstance(data, dict) else "") or "-"])
            out += table(["file", "question", "command", "made"], rows)
            out.append("")
    if problems:
        raise Unreadable("\n".join(problems))
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the results folder (default: benchmarks/results)")
    p.add_argument("--stdout", action="store_true", help="print the README instead of writing it")
    p.add_argument("--check", action="store_true", help="exit 1 when ROOT/README.md differs from the output")
    a = p.parse_args(argv)
    if not a.root.is_dir():
        print(f"--root {str(a.root)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        text = render(a.root)
    except Unreadable as err:
        lines = str(err).splitlines()
        print(f"results_readme: {len(lines)} result file(s) under {a.root} cannot be read; fix or remove them "
              "(the README was not written):\n" + "\n".join(f"  {line}" for line in lines), file=sys.stderr)
        return 2
    readme = a.root / "README.md"
    if a.check:
        same = readme.exists() and readme.read_text() == text
        print(f"{readme}: {'up to date' if same else 'out of date: run python benchmarks/results_readme.py'}")
        return 0 if same else 1
    if a.stdout:
        sys.stdout.write(text)
    else:
        partial = readme.with_name(f".{readme.name}.partial")  # never a half-written README
        partial.write_text(text)
        partial.replace(readme)
        print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
