"""benchmarks/results_readme.py: the results README is generated from the result files, and the committed
README is the generator's output on the committed files (so the two cannot drift)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen():
    from conftest import load_script

    return load_script("results_readme")


def cell(name, seq, ms, *, kind="op", pattern="", status="ok", speedup=None, flop_reduction=1.0, vs_flex=None,
         noisy=False, batch=1, memory=2**30, backend="x"):
    return {"name": name, "kind": kind, "family": "op" if kind == "op" else "baseline", "pattern": pattern, "seq": seq,
            "batch": batch, "status": status, "message": "" if status == "ok" else "out of memory", "backend": backend,
            "latency_ms": {"median": ms} if status == "ok" else {}, "speedup_vs_dense": speedup,
            "noisy": noisy, "flop_reduction": flop_reduction,
            "realised_fraction": None if speedup is None else speedup / flop_reduction,
            "realised_fraction_vs_flex": vs_flex, "peak_memory_bytes": memory, "state_bytes": None}


def bench_result(cells, *, suite="patterns", mode="fwdbwd", pattern="window:1024"):
    return {"schema": "attnkit.bench/2", "command": f"attnkit bench --suite {suite} --device cuda --mode {mode}",
            "created": "2026-12-03T10:00:00+00:00", "complete": True, "stopped": None, "git_commit": "a" * 40,
            "code_hash": "0123456789abcdef", "device": {"name": "NVIDIA H200"}, "suite": suite,
            "config": {"mode": mode, "dtype": "bfloat16", "dim": 2048, "heads": 16, "head_dim": 128,
                       "batch": "32768/seq", "pattern": pattern, "timing": "latency"},
            "cells": cells}


@pytest.fixture
def results(tmp_path):
    """A small results folder: a patterns suite file (GPU), a stopped bench part (only its stream), a test
    log, a compare file and a question script's file."""
    h200 = tmp_path / "h200"
    h200.mkdir()
    cells = [
        cell("dense-sdpa", 8192, 2.0, speedup=1.0, vs_flex=1.4, batch=4, backend="sdpa"),
        cell("dense-sdpa-cudnn", 8192, 1.9, speedup=1.05, batch=4, backend="cudnn"),
        cell("attend", 8192, 1.0, pattern="window:1024", speedup=2.0, flop_reduction=4.0, noisy=True, batch=4,
             backend="cudnn"),
        cell("dense-sdpa", 32768, 26.0, speedup=1.0, vs_flex=1.4, backend="sdpa"),
        cell("dense-sdpa-cudnn", 32768, 25.0, speedup=1.04, backend="cudnn"),
        cell("attend", 32768, 2.5, pattern="window:1024", speedup=10.4, flop_reduction=16.0, vs_flex=0.9,
             memory=3 * 2**29, backend="cudnn"),
        cell("flex", 32768, 0.0, pattern="window:1024", status="oom", backend="flex"),
    ]
    (h200 / "patterns-fwdbwd.json").write_text(json.dumps(bench_result(cells)))
    (h200 / "patterns-fwdbwd.png").write_bytes(b"png")
    header = bench_result([], suite=None, mode="fwd")
    header["command"] = "attnkit bench --device cuda --mechanisms mha --out h200/bench-cuda-fwd-ops.json"
    stream = [json.dumps({"header": header}), json.dumps(cell("mha", 2048, 4.0, kind="layer", speedup=1.0, batch=16))]
    (h200 / "bench-cuda-fwd-ops.jsonl").write_text("\n".join(stream) + "\n")
    (h200 / "pytest-cuda.log").write_text("# commit abc1234 (as the copy's git says), code hash 0f, 2026-12-03\n"
                                          "....\n1 failed, 170 passed, 5 skipped in 180.00s (0:03:00)\n")
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    compare = {"schema": "attnkit.compare/1", "command": "attnkit compare --task mqar", "created": "2026-12-01",
               "task": {"task": "mqar", "metric": "accuracy", "higher_is_better": True},
               "runs": [{"mechanism": "mha", "metric": 0.9755, "params": 262784, "steps": 1000, "tokens_per_s": 36354.4},
                        {"mechanism": "no-mixing", "metric": 0.008, "params": 200000, "steps": 1000,
                         "tokens_per_s": 50000.0, "status": "ok"}]}
    (cpu / "compare-mqar.json").write_text(json.dumps(compare))
    (h200 / "moh-core.json").write_text(json.dumps({"command": "python benchmarks/moh_core.py --seq 32768",
                                                    "rows": []}))
    (tmp_path / "findings.md").write_text("- A finding with its context.\n")
    return tmp_path


def test_a_suite_file_becomes_its_table(gen, results):
    text = gen.render(results)
    expected = "\n".join([
        "| row | backend | speedup 8k | speedup 32k | ms 32k | vs cuDNN 32k | FLOP red. 32k | realised 32k | "
        "realised vs flex 32k | tokens/s 32k | memory 32k |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| [op] dense-sdpa | sdpa | 1.00 | 1.00 | 26.000 | 0.96 | 1.00 | 1.00 | 1.40 | 1.26M | 1.0 GiB |",
        "| [op] dense-sdpa-cudnn | cudnn | 1.05 | 1.04 | 25.000 | 1.00 | 1.00 | 1.04 | - | 1.31M | 1.0 GiB |",
        "| [op] attend window:1024 | cudnn | 2.00* | 10.40 | 2.500 | 10.00 | 16.00 | 0.65 | 0.90 | 13.1M | 1.5 GiB |",
        "| [op] flex window:1024 | flex | - | oom | oom | - | - | - | - | - | - |",
        "",
        gen.NOISY_NOTE,
    ])
    assert expected in text
    # the file's heading links it and its plot; its command and provenance follow
    assert "#### [patterns-fwdbwd.json](h200/patterns-fwdbwd.json) · [png](h200/patterns-fwdbwd.png)" in text
    assert "`attnkit bench --suite patterns --device cuda --mode fwdbwd`" in text
    assert "fwdbwd · NVIDIA H200 · bfloat16 · C=2048, H=16, D=128 · batch 32768/seq · pattern window:1024 · " \
           "2026-12-03, commit aaaaaaa, code 0123456789abcdef" in text
    # sections: H200 before CPU, the suite under its own heading, the suites table and the findings
    assert text.index("## H200") < text.index("### patterns") < text.index("## CPU")
    assert "| patterns | sparse patterns" in text and "## Findings\n\n- A finding with its context." in text


def test_other_files_tests_streams_compare_and_scripts(gen, results):
    text = gen.render(results)
    assert "CUDA test suite ([pytest-cuda.log](h200/pytest-cuda.log), `benchmarks/gpu.sh tests`): " \
           "**1 failed, 170 passed, 5 skipped in 180.00s (0:03:00)** (commit abc1234 (as the copy's git says)" in text
    # a run killed before its JSON was written is read back from its stream, and says so
    assert "#### [bench-cuda-fwd-ops.jsonl](h200/bench-cuda-fwd-ops.jsonl) **(incomplete" in text
    assert "### bench (the default run and other runs)" in text and "| mha | x | 1.00 | 4.000 |" in text
    assert "| mha | 0.976 | 262,784 | 1000 | 36.4k | ok |" in text
    assert "| no-mixing | 0.008 | 200,000 | 1000 | 50k | ok |" in text
    # a question script's file: the question from the script's docstring, under its current name
    line = next(x for x in text.splitlines() if x.startswith("| [moh-core.json]"))
    assert "How much faster is Mixture-of-Head attention's core than MHA's?" in line
    assert "(script now `benchmarks/moh_core_speedup.py`)" in line and "`python benchmarks/moh_core.py --seq 32768`" in line


def test_a_stream_beside_its_json_is_a_companion_not_a_table(gen, results):
    h200 = results / "h200"
    (h200 / "patterns-fwdbwd.jsonl").write_text(json.dumps({"header": bench_result([])}) + "\n")
    text = gen.render(results)
    assert text.count("#### [patterns-fwdbwd") == 1
    assert "[jsonl](h200/patterns-fwdbwd.jsonl)" in text


def test_files_are_grouped_by_suite(gen):
    assert gen.suite_of("patterns-fwdbwd", {}) == "patterns"
    assert gen.suite_of("patterns-window-1024-fwd", {}) == "patterns"
    assert gen.suite_of("bench-cuda-fwd-layers-a", {}) == "bench"
    assert gen.suite_of("anything", {"suite": "linear"}) == "linear"  # recorded by --suite wins
    assert gen.suite_of("crash-shapes", {}) == "other"


def test_check_flags_a_stale_readme_and_the_cli_writes_it(gen, results, capsys):
    assert gen.main(["--root", str(results), "--check"]) == 1
    assert gen.main(["--root", str(results)]) == 0
    assert (results / "README.md").read_text() == gen.render(results)
    assert gen.main(["--root", str(results), "--check"]) == 0
    assert gen.main(["--root", str(results / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_committed_readme_is_the_generated_one(gen):
    """The README in benchmarks/results/ is exactly what the generator writes from the committed files:
    after adding or moving results, run `python benchmarks/results_readme.py`."""
    root = REPO / "benchmarks" / "results"
    assert (root / "README.md").read_text() == gen.render(root), "run: python benchmarks/results_readme.py"


def test_every_committed_bench_file_has_its_command(gen):
    root = REPO / "benchmarks" / "results"
    for path in sorted(root.glob("*/*.json")):
        data = gen.load(path)
        rel = path.relative_to(root).as_posix()
        assert gen.command_of(data) or rel in gen.LEGACY_COMMANDS, f"{rel} records no command"


def gpu_sh(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_script_refuses_an_unknown_case(tmp_path):
    run = gpu_sh(tmp_path, "nope")
    assert run.returncode == 2
    assert "usage: benchmarks/gpu.sh" in run.stderr and "dense patterns linear heads sigmoid decode" in run.stderr


@pytest.mark.parametrize("args, why", [
    # extra words were ignored: these ran the default bench, the whole test suite, every mode of dense
    (["bench", "--seq", "1024"], "'bench' takes no arguments, got: --seq 1024"),
    (["tests", "-k", "flex"], "'tests' takes no arguments"),
    (["dense", "fwd", "--seq", "64"], "takes at most one MODE, got: fwd --seq 64"),
    # a MODE the suite does not run was handed to attnkit only after the log file was written
    (["dense", "decode"], "'decode' is not a mode of suite dense; accepted: fwdbwd fwd"),
    # an option in NAME's place wrote $OUT/--seq.log and ran `bench 64`
    (["bench-args", "--seq", "64"], "bench-args NAME must be a file name"),
    (["bench-args", "../x"], "bench-args NAME must be a file name"),
    (["bench-args"], "bench-args needs a NAME"),
])
def test_gpu_script_refuses_bad_arguments_before_writing(tmp_path, args, why):
    out = tmp_path / "out"
    run = gpu_sh(out, *args)
    assert run.returncode == 2, run.stderr
    assert why in run.stderr and "usage: benchmarks/gpu.sh" in run.stderr
    assert not out.exists()  # nothing made: no folder, no log


def test_gpu_script_exits_with_a_failed_bench_runs_status(tmp_path):
    """The script's status was the README step's (0) after a bench run that failed; `--seq x` fails in
    attnkit's argument parsing on any machine, so this runs no bench even where CUDA is present."""
    run = gpu_sh(tmp_path, "bench-args", "probe", "--seq", "x")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "exit 2" in (tmp_path / "probe.log").read_text()


@pytest.mark.parametrize("name, content, reason", [
    ("broken.json", '{"schema": "attnkit.bench/2", "cells": [', "is not valid JSON"),
    ("empty.json", "", "is empty"),
    ("empty.jsonl", "", "is empty"),
    ("garbage.jsonl", "not json\n", "line 1 is not JSON"),
    ("header.jsonl", '{"header": 5}\n', "is not a bench stream's header"),
    ("cells.json", '{"schema": "attnkit.bench/2", "cells": [{"foo": 1}]}', "not a readable attnkit.bench/2 result"),
    ("config.json", '{"schema": "attnkit.bench/2", "config": null, "cells": []}', "not a readable attnkit.bench/2"),
    ("runs.json", '{"schema": "attnkit.compare/1", "runs": [{"x": 1}]}', "not a readable attnkit.compare/1 result"),
])
def test_an_unreadable_result_file_is_named_and_the_readme_left_alone(gen, results, capsys, name, content, reason):
    """A broken or empty JSON was listed silently among the "other files" (no command, no numbers), and a
    bench or compare file lacking a key stopped the generator with a KeyError: now each is named, with why,
    and the README is not written."""
    (results / "README.md").write_text("old\n")
    (results / "h200" / name).write_text(content)
    with pytest.raises(gen.Unreadable, match=f"h200/{name}: .*{reason}"):
        gen.render(results)
    assert gen.main(["--root", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"h200/{name}" in err and "the README was not written" in err
    assert (results / "README.md").read_text() == "old\n"


def test_a_stream_cut_off_mid_line_keeps_its_finished_cells(gen, results):
    """A run killed while writing a cell leaves a last line without its end: that line is dropped, the
    cells before it are read (the stream exists so that a killed run keeps them)."""
    path = results / "h200" / "bench-cuda-fwd-ops.jsonl"
    path.write_text(path.read_text() + '{"name": "mqa", "ki')
    data = gen.load(path)
    assert [c["name"] for c in data["cells"]] == ["mha"] and data["stream_only"]
    assert "| mha | x | 1.00 | 4.000 |" in gen.render(results)
