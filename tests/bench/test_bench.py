"""attnkit bench: JSON schema, interleaved timing, derived numbers, faults, bad options, an end-to-end CLI run."""

import json
import math

import pytest
import torch

from attnkit.bench import BenchConfig, parse_pattern, run_bench
from attnkit.bench import harness
from attnkit.bench.harness import Cell, _interleave, _sample, _summarise, _Timed
from attnkit.cli import main

CELL_KEYS = {"name", "kind", "family", "pattern", "seq", "batch", "status", "message", "backend", "latency_ms", "dense_latency_ms",
             "speedup_vs_dense", "speedup_p10", "speedup_p90", "noise", "noisy", "peak_memory_bytes", "flops", "tflops",
             "peak_tflops", "pct_peak", "flop_reduction", "realised_fraction", "speedup_vs_dense_flex",
             "realised_fraction_vs_flex", "state_bytes", "setup_s", "elapsed_s"}


def tiny(**kwargs):
    cfg = dict(mechanisms=["mha", "mqa"], ops=["dense-sdpa", "attend", "reference"], seqs=[16, 32], batch=1, dim=32,
               heads=4, head_dim=8, dtype="float32", device="cpu", mode="fwd", repeat=2, warmup=1, max_time=0.05)
    cfg.update(kwargs)
    return BenchConfig(**cfg)


def test_result_schema_and_cells():
    result = run_bench(tiny(), command="attnkit bench --test")
    assert result["schema"] == "attnkit.bench/2"
    assert {"command", "created", "complete", "stopped", "git_commit", "device", "versions", "config", "timer", "peak",
            "suite", "cells"} <= set(result)
    assert result["suite"] is None
    assert result["complete"] is True and result["stopped"] is None
    assert result["versions"]["torch"] == torch.__version__ and "triton" in result["versions"]
    assert "cpu_model" in result["device"] and result["device"]["name"]
    # run from a git checkout here: the commit is recorded (null only outside one)
    assert result["git_commit"] is None or len(result["git_commit"]) == 40
    assert result["peak"]["source"] == "measured beside each cell"
    assert all(c["peak_tflops"] == result["peak"]["tflops"] > 0 for c in result["cells"])
    assert len(result["cells"]) == 2 * (2 + 3)
    for cell in result["cells"]:
        assert set(cell) == CELL_KEYS
        assert cell["status"] == "ok", cell
        # where the run's time went: setup (build, compile, warm-up) is part of the cell's wall time
        assert 0 < cell["setup_s"] < cell["elapsed_s"]
        lat = cell["latency_ms"]
        assert lat["samples"] >= 2 and lat["min"] <= lat["median"] <= lat["max"]
        assert cell["flops"] > 0 and cell["tflops"] > 0 and cell["peak_tflops"] > 0
        assert cell["speedup_p10"] <= cell["speedup_vs_dense"] <= cell["speedup_p90"]
        assert isinstance(cell["noisy"], bool) and cell["noise"] >= 0
    json.dumps(result)  # serialisable
    assert {c["family"] for c in result["cells"]} == {"baseline", "op"}
    mha = [c for c in result["cells"] if c["name"] == "mha"]
    assert all(c["speedup_vs_dense"] == 1.0 and c["flop_reduction"] == 1.0 for c in mha)
    mqa = next(c for c in result["cells"] if c["name"] == "mqa" and c["seq"] == 16)
    assert mqa["dense_latency_ms"] > 0  # the interleaved mha samples
    # MQA's FLOP reduction over MHA comes from its smaller K/V projections only
    assert mqa["flop_reduction"] == pytest.approx(
        (2 * 16 * 32 * (4 + 8) * 8 + 2 * 16 * 32 * 32 + 4 * 4 * 136 * 8) / (2 * 16 * 32 * (4 + 2) * 8 + 2 * 16 * 32 * 32 + 4 * 4 * 136 * 8)
    )


def test_speedup_is_the_median_of_interleaved_ratios_by_hand():
    """The speedup comes from the pairs (reference, row) of the same round; noise from the ratios' band."""
    cell = Cell("gqa", "layer", 8, 1, flops=1e9)
    # the machine slows down 10x in round 3: the paired ratio is still 2
    timed = _Timed(row=[1.0, 1.0, 10.0, 1.0, 1.0], ref=[2.0, 2.0, 20.0, 2.0, 2.0], peak_tflops=[0.5, 2.0, 1.0, 1.0, 1.0])
    _summarise(cell, timed, is_reference=False, ref_flops=4e9, peak_tflops=2.0)
    assert cell.speedup_vs_dense == 2.0 and cell.speedup_p10 == cell.speedup_p90 == 2.0
    assert cell.noise == 0.0 and cell.noisy is False
    assert cell.dense_latency_ms == 2.0 and cell.latency_ms["median"] == 1.0
    assert cell.flop_reduction == 4.0 and cell.realised_fraction == 0.5
    assert cell.tflops == pytest.approx(1.0) and cell.peak_tflops == 2.0 and cell.pct_peak == pytest.approx(50.0)
    # ratios spread 1x-3x over 5 rounds: a rerun could easily differ by 25 %, flagged
    noisy = Cell("gqa", "layer", 8, 1, flops=1e9)
    _summarise(noisy, _Timed([1.0] * 5, [1.0, 1.5, 2.0, 2.5, 3.0], []), is_reference=False, ref_flops=None, peak_tflops=None)
    assert noisy.noisy is True and noisy.noise > harness.NOISE_LIMIT and noisy.pct_peak is None
    ref = Cell("mha", "layer", 8, 1, flops=4e9)
    _summarise(ref, _Timed([2.0, 2.1, 2.0], [], []), is_reference=True, ref_flops=None, peak_tflops=None)
    assert ref.speedup_vs_dense == 1.0 and ref.dense_latency_ms == 2.0
    few = Cell("gqa", "layer", 8, 1)
    _summarise(few, _Timed([1.0, 1.0], [2.0, 2.0], []), is_reference=False, ref_flops=None, peak_tflops=None)
    assert few.noisy is True  # two rounds cannot estimate their noise


class _Peak:
    measured = True

    def __init__(self, log):
        self.log = log

    def sample(self):
        self.log.append("peak")
        return 1.0


def test_interleave_alternates_pairs_and_stops():
    log = []
    timed = _interleave(lambda: log.append("row"), lambda: log.append("ref"), _Peak(log), torch.device("cpu"), burst=1,
                        min_rounds=3, max_time=60.0, max_rounds=3)
    # ABBA: reference first in even rounds, row first in odd rounds; a peak matmul in the first round and every third
    assert log == ["ref", "row", "peak", "row", "ref", "ref", "row", "peak"]
    assert len(timed.row) == len(timed.ref) == 3 and len(timed.peak_tflops) == 2
    # the time cap ends sampling once the minimum is in, however noisy the samples are
    import random

    timed = _interleave(lambda: [0] * random.randint(1, 20000), None, _Peak([]), torch.device("cpu"), burst=1,
                        min_rounds=4, max_time=0.0)
    assert len(timed.row) == 4 and timed.ref == []


def test_interleave_stops_a_slow_cell_before_its_minimum_rounds():
    """A cell whose calls are slow stops at SLOW_ROUNDS rounds once SLOW_BUDGET x max_time has
    passed (the default CUDA run's slowest cells took minutes each at 20 rounds)."""
    import time

    slow = lambda: time.sleep(0.02)  # noqa: E731
    timed = _interleave(slow, slow, _Peak([]), torch.device("cpu"), burst=1, min_rounds=20, max_time=0.01)
    assert len(timed.row) == len(timed.ref) == harness.SLOW_ROUNDS
    # a fast cell still takes its minimum rounds within the same budget
    timed = _interleave(lambda: None, None, _Peak([]), torch.device("cpu"), burst=1, min_rounds=20, max_time=0.01)
    assert len(timed.row) >= 20


@pytest.mark.parametrize("mode, mha_builds", [("fwd", 2 + 2), ("decode", 2 + 2 * 2)])
def test_dense_reference_is_shared_by_the_cells_of_a_length(monkeypatch, mode, mha_builds):
    """Built and warmed once per sequence length (the mha row itself is timed alone); decode
    builds one per cell, since every timed step grows its state."""
    built = []
    real = harness._layer_work

    def counting(name, *args, **kwargs):
        built.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(harness, "_layer_work", counting)
    result = run_bench(tiny(mechanisms=["mha", "mqa", "gqa"], ops=[], mode=mode))
    assert built.count("mha") == mha_builds
    assert all(c["dense_latency_ms"] > 0 for c in result["cells"])


def test_threads_are_set_for_the_run_and_restored():
    before = torch.get_num_threads()
    result = run_bench(tiny(mechanisms=["mha"], ops=[], seqs=[16], threads=1))
    assert result["device"]["torch_threads"] == 1 and result["config"]["threads"] == 1
    assert torch.get_num_threads() == before
    assert result["device"]["load_average"] is None or len(result["device"]["load_average"]) == 3


def test_more_threads_than_cores_is_refused(monkeypatch):
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 4)
    with pytest.raises(ValueError, match=r"--threads 5 is more than this machine's 4 CPU cores; accepted: 1..4"):
        run_bench(tiny(mechanisms=["mha"], ops=[], seqs=[16], threads=5))


def test_throughput_timing_queues_a_burst_per_sample():
    """timing='throughput': each sample is the mean over THROUGHPUT_BURST back-to-back calls;
    latency: one call per sample. The config records the choice."""
    calls = []
    assert _sample(lambda: calls.append(1), torch.device("cpu"), burst=harness.THROUGHPUT_BURST) >= 0
    assert len(calls) == harness.THROUGHPUT_BURST
    result = run_bench(tiny(mechanisms=["mha"], ops=["attend"], seqs=[16], timing="throughput"))
    assert result["config"]["timing"] == "throughput"
    assert all(c["status"] == "ok" and c["latency_ms"]["samples"] >= 2 for c in result["cells"])


def test_decode_mode_reports_state_bytes():
    result = run_bench(tiny(mode="decode", ops=[], seqs=[8]))
    cells = {c["name"]: c for c in result["cells"]}
    # the state holding exactly the 8 prefilled tokens: k and v, fp32
    assert cells["mha"]["state_bytes"] == 8 * 2 * 4 * 8 * 4
    assert cells["mqa"]["state_bytes"] == 8 * 2 * 1 * 8 * 4
    assert cells["mqa"]["speedup_vs_dense"] > 0


def test_unsupported_cells_are_reported_not_raised():
    result = run_bench(tiny(mechanisms=[], ops=["flex", "dense-sdpa-cudnn"], mode="fwdbwd", seqs=[16]))
    assert [c["status"] for c in result["cells"]] == ["unsupported", "unsupported"]


def test_fixed_mixing_is_built_long_enough_for_the_cell():
    """fixed-mixing's learned position table defaults to 2048 positions; the bench builds it with
    max_len >= seq (plus the decoded tokens in decode mode) instead of failing at seq 2049+."""
    card = harness.registry.get("fixed-mixing")
    assert harness._layer_options(card, tiny(), 4096)["max_len"] == 4096
    decode = tiny(mode="decode", warmup=2)
    assert harness._layer_options(card, decode, 4096)["max_len"] >= 4096 + 2 + harness.MAX_SAMPLES
    result = run_bench(tiny(mechanisms=["fixed-mixing"], ops=[], seqs=[2050], dim=16, heads=2, head_dim=8, repeat=1,
                            warmup=0, max_time=0.01))
    assert result["cells"][0]["status"] == "ok", result["cells"][0]["message"]


def test_a_shape_a_layer_refuses_is_unsupported(monkeypatch):
    """A ValueError from a layer (the project's error for inputs it cannot serve) marks the cell
    unsupported with the layer's reason; the run goes on."""
    from attnkit.layers.multi_head import MultiHeadAttention

    card = harness.registry.get("mqa")
    original = card.layer.forward

    def forward(self, x, *args, **kwargs):
        if self.num_kv_heads == 1:
            raise ValueError(f"sequence length {x.shape[1]} is beyond this layer")
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "forward", forward)
    result = run_bench(tiny(ops=[], seqs=[16]))
    cells = {c["name"]: c for c in result["cells"]}
    assert cells["mqa"]["status"] == "unsupported" and "beyond this layer" in cells["mqa"]["message"]
    assert cells["mha"]["status"] == "ok"


def test_meta_preflight_finds_a_refused_shape_before_launching(monkeypatch):
    """On CUDA each layer first runs on the meta device at the cell's shape: its own ValueError
    is reported (unsupported) before anything is launched; failures meta cannot run say nothing."""
    from attnkit.layers.multi_head import MultiHeadAttention

    card = harness.registry.get("mqa")
    cfg = tiny()
    assert harness._meta_preflight(card, cfg, 64, {"head_dim": 8}, torch.float32) is None
    original = MultiHeadAttention.forward

    def forward(self, x, *args, **kwargs):
        if x.shape[1] > 32:
            raise ValueError(f"T={x.shape[1]} is beyond this layer")
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "forward", forward)
    assert harness._meta_preflight(card, cfg, 64, {"head_dim": 8}, torch.float32) == "T=64 is beyond this layer"
    monkeypatch.setattr(MultiHeadAttention, "forward", lambda self, x, *a, **k: x.sum().item())
    assert harness._meta_preflight(card, cfg, 64, {"head_dim": 8}, torch.float32) is None  # .item() on meta


def test_kv_heads_give_gqa_shaped_op_rows():
    """--kv-heads: the op rows run a GQA-shaped core (SQA's attention cost); FLOPs follow the query heads."""
    full = run_bench(tiny(mechanisms=[], ops=["dense-sdpa", "attend", "reference", "sigmoid"], seqs=[32]))
    gqa = run_bench(tiny(mechanisms=[], ops=["dense-sdpa", "attend", "reference", "sigmoid"], seqs=[32], kv_heads=1))
    by_name = {c["name"]: c for c in gqa["cells"]}
    assert [by_name[n]["status"] for n in ("dense-sdpa", "attend", "reference")] == ["ok"] * 3
    assert by_name["sigmoid"]["status"] == "unsupported" and "--kv-heads" in by_name["sigmoid"]["message"]
    assert by_name["attend"]["flops"] == next(c["flops"] for c in full["cells"] if c["name"] == "attend")
    assert gqa["config"]["kv_heads"] == 1


def _raise_on(monkeypatch, message):
    """Make the ``reference`` op row raise ``RuntimeError(message)`` when called."""
    def broken(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(harness, "attend_reference", broken)


ILLEGAL = "CUDA error: an illegal memory access was encountered"


def test_context_fault_stops_the_run_keeping_finished_cells(tmp_path, monkeypatch, capsys):
    _raise_on(monkeypatch, ILLEGAL)
    out = tmp_path / "r.json"
    code = main(["bench", "--mechanisms", "mha", "--ops", "dense-sdpa,reference,attend", "--seq", "16,32", "--dim", "32",
                 "--heads", "4", "--repeat", "1", "--warmup", "0", "--max-time", "0.01", "--out", str(out), "--plot", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "stopped at cell reference @ 16 (op)" in err and "illegal memory access" in err
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines[0]["header"]["schema"] == "attnkit.bench/2"
    streamed = [(c["name"], c["seq"], c["status"]) for c in lines[1:]]
    assert streamed == [("mha", 16, "ok"), ("dense-sdpa", 16, "ok"), ("reference", 16, "error")]
    assert "CUDA context fault" in lines[-1]["message"]
    result = json.loads(out.read_text())  # the partial JSON holds the same cells, and says where it stopped
    assert result["complete"] is False and result["stopped"]["cell"] == "reference @ 16 (op)"
    assert [(c["name"], c["seq"], c["status"]) for c in result["cells"]] == streamed


def test_context_fault_in_the_dense_reference_names_it(monkeypatch):
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kwargs):
        if q.shape[1] != k.shape[1]:  # the mqa row itself runs; its mha reference faults
            return real(q, k, v, **kwargs)
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    seen = []
    result = run_bench(tiny(mechanisms=["mqa", "gqa"], ops=[], seqs=[16]), on_cell=seen.append)
    assert result["stopped"]["cell"] == "mqa @ 16 (layer)" and "dense reference mha" in result["stopped"]["message"]
    assert [c["name"] for c in seen] == ["mqa"]


def test_a_normal_error_in_one_cell_does_not_stop_the_run(monkeypatch):
    _raise_on(monkeypatch, "something else went wrong")
    seen = []
    result = run_bench(tiny(mechanisms=["mha"], ops=["dense-sdpa", "reference", "attend"]), on_cell=seen.append)
    assert result["complete"] is True and result["stopped"] is None
    status = {(c["name"], c["seq"]): c["status"] for c in result["cells"]}
    assert status[("reference", 16)] == status[("reference", 32)] == "error"
    assert status[("attend", 16)] == status[("attend", 32)] == status[("mha", 32)] == "ok"
    assert len(seen) == len(result["cells"]) == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mechanisms=["nope"]), "unknown mechanism 'nope'; registered: mha"),
        (dict(ops=["triton"]), "unknown op"),
        (dict(mode="train"), "unknown --mode"),
        (dict(dtype="int8"), "unknown --dtype"),
        (dict(pattern="window:x"), "unknown --pattern"),
        (dict(seqs=[0]), "--seq values must be a positive integer, got 0"),
        (dict(seqs=[]), "--seq is empty"),
        (dict(kv_heads=3), "--kv-heads must be a positive divisor of --heads 4"),
        (dict(timing="wall"), "unknown --timing 'wall'; accepted: latency, throughput"),
        (dict(repeat=0), "--repeat must be a positive integer, got 0"),
        (dict(repeat=1000), "--repeat must be at most 100"),
        (dict(warmup=-1), "--warmup must be an integer >= 0, got -1"),
        (dict(batch=0), "--batch must be a positive integer, got 0"),
        (dict(batch=-2), "--batch must be a positive integer, got -2"),
        (dict(heads=0), "--heads must be a positive integer, got 0"),
        (dict(dim=0), "--dim must be a positive integer, got 0"),
        (dict(head_dim=0), "--head-dim must be a positive integer, got 0"),
        (dict(max_time=0.0), "--max-time must be a positive number of seconds, got 0.0"),
        (dict(max_time=math.inf), "--max-time must be a positive"),
        (dict(mechanisms=[], ops=[]), "nothing to measure"),
        (dict(pattern="window:8,window:8"), "--pattern names window:8 more than once"),
        (dict(pattern="window:8,,sink:1:8"), "has an empty item"),
        (dict(pattern="full,window:8"), "mixes 'full' with other patterns"),
        # one pattern spelled two ways was measured twice under two labels
        (dict(pattern="window:016, window:16"), "--pattern names window:16 more than once"),
        # the pattern's own check did not say which option it was about
        (dict(pattern="window:0"), "--pattern 'window:0': window must be a positive integer, got 0"),
        # no row computes a pattern: it was recorded (config, plot, README) as if measured
        (dict(ops=["dense-sdpa"], pattern="window:8"), "--pattern 'window:8' applies to the op rows flex, attend"),
        (dict(ops=[], pattern="sink:2:8"), r"none is measured \(--ops none\)"),
        (dict(ops=["lightning"], pattern="full"), "applies to the op rows"),
        (dict(ops=[], kv_heads=2), "--kv-heads 2 shapes the op rows, and none is measured"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_bench(tiny(**kwargs))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--repeat", "0"], "--repeat must be a positive integer, got 0"),
        (["--heads", "0"], "--heads must be a positive integer, got 0"),
        (["--dim", "0"], "--dim must be a positive integer, got 0"),
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--batch", "-1"], "--batch must be a positive integer, got -1"),
        (["--head-dim", "0"], "--head-dim must be a positive integer, got 0"),
        (["--kv-heads", "0"], "--kv-heads must be a positive divisor"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["--max-time", "-1"], "--max-time must be a positive number"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--seq", ","], "--seq is empty"),
        (["--mechanisms", "none", "--ops", "none"], "nothing to measure"),
        (["--out", "/proc/attnkit-bench.json"], "is not writable"),
        (["--out", "{tmp}"], "is a directory"),
        (["--plot", "{tmp}/r.json"], "would overwrite the results"),
        (["--plot", "/proc/x.png"], "--plot '/proc/x.png' is not writable"),
    ],
)
def test_bad_cli_options_are_refused_before_running(argv, match, tmp_path, capsys, monkeypatch):
    """Every option is checked up front (exit 2, a clear message), not defaulted and not found after the run."""
    monkeypatch.setattr(harness, "_run_cell", lambda *a, **k: pytest.fail("a cell ran despite a bad option"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = ["bench", "--mechanisms", "mha", "--ops", "none", "--seq", "16", "--out", str(tmp_path / "r.json")]
    assert main(base + argv) == 2
    assert match in capsys.readouterr().err


def test_every_option_help_names_its_default(capsys):
    from attnkit.cli import build_parser

    with pytest.raises(SystemExit) as exit_:  # the help renders (a bare % in a help string breaks it)
        main(["bench", "--help"])
    assert exit_.value.code == 0 and "--max-time" in capsys.readouterr().out

    parser = build_parser()
    bench = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "bench")[1]
    for action in bench._actions:
        if action.dest == "help":
            continue
        assert "default" in (action.help or ""), f"--{action.dest} help has no default: {action.help!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        run_bench(tiny(device="cuda"))


def test_peak_is_the_best_matmul_of_the_run(monkeypatch):
    """One matmul timed once (in a busy moment) made "% of peak" exceed 100: the denominator is
    the best of the samples taken beside every cell."""
    peak = harness._Peak(torch.device("cpu"), torch.float32)
    times = iter([4.0, 1.0, 2.0])
    monkeypatch.setattr(harness, "_sample", lambda fn, device, burst=1: next(times))
    got = [peak.sample() for _ in range(3)]
    assert peak.best == max(got) == got[1] and peak.describe()["tflops"] == got[1]


def test_vendor_peak_on_known_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert harness._vendor_peak(cuda, torch.bfloat16) == 989.4
    assert harness._vendor_peak(cuda, torch.float32) is None  # measured beside the cells instead
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert harness._vendor_peak(cuda, torch.float16) == 756.0
    assert harness._vendor_peak(torch.device("cpu"), torch.bfloat16) is None


def test_context_fault_messages():
    for text in (ILLEGAL, "CUDA error: device-side assert triggered", "CUDA driver error: unknown error",
                 "Triton Error [CUDA]: an illegal memory access was encountered"):
        assert harness.is_context_fault(RuntimeError(text))
    assert not harness.is_context_fault(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not harness.is_context_fault(ValueError("x must be a tensor"))


def test_parse_pattern():
    assert parse_pattern("window:16").window == 16
    p = parse_pattern("sink:4:16")
    assert (p.sink_tokens, p.window) == (4, 16)
    with pytest.raises(ValueError, match="window"):
        parse_pattern("window:0")


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "--mechanisms", "gqa", "--ops", "attend", "--seq", "16", "--dim", "32", "--heads", "4",
                 "--repeat", "1", "--warmup", "0", "--max-time", "0.01", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [c["name"] for c in result["cells"]] == ["gqa", "attend"]
    assert result["config"]["repeat"] == 1 and result["config"]["max_time"] == 0.01
    assert result["config"]["threads"] == 1  # the CPU default
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["name"] for line in lines[1:]] == ["gqa", "attend"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "gqa" in capsys.readouterr().out
    assert main(["bench", "--mechanisms", "nope", "--out", str(out)]) == 2
    assert "registered: mha" in capsys.readouterr().err


def test_plot_groups_rows_by_family(tmp_path):
    """Many rows of several families, noisy and failed cells: one panel per family, a PNG is written."""
    from attnkit.bench.plot import _families, plot_bench

    cells = []
    for family, names in {"baseline": ["mha", "gqa"], "pattern": ["s2", "streaming", "dma"], "op": ["dense-sdpa"]}.items():
        for name in names:
            for i, seq in enumerate((256, 512, 1024)):
                ok = not (name == "dma" and seq == 1024)
                cells.append({"name": name, "kind": "op" if family == "op" else "layer", "family": family, "seq": seq,
                              "status": "ok" if ok else "error", "message": "" if ok else "boom",
                              "speedup_vs_dense": 1.0 + i if ok else None, "noisy": name == "s2" and seq == 512,
                              "dense_latency_ms": 1.0 + seq / 256, "peak_memory_bytes": 1000 * (i + 1),
                              "state_bytes": None})
    result = {"config": {"mode": "fwd", "dtype": "float32", "dim": 32, "heads": 4, "head_dim": 8, "batch": 1,
                         "pattern": "causal"}, "device": {"name": "cpu"}, "peak": {"source": "measured"},
                "git_commit": None, "cells": cells}
    assert list(_families(cells)) == ["baseline", "pattern", "op"]
    plot_bench(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_exits_nonzero_when_no_cell_was_measured(tmp_path, capsys, monkeypatch):
    args = ["bench", "--mechanisms", "gqa", "--ops", "none", "--seq", "16", "--dim", "32", "--heads", "4",
            "--repeat", "1", "--warmup", "0", "--max-time", "0.01", "--plot", "none", "--out", str(tmp_path / "r.json")]
    monkeypatch.setattr(harness, "_layer_work", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken row")))
    assert main(args) == 1
    assert "no cell was measured (statuses: error)" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["cells"][0]["status"] == "error"


def test_cli_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "mha" in text and "1706.03762" in text



def test_small_flex_tiles_are_on_during_the_run_only(monkeypatch):
    """``--small-flex-tiles`` turns the opt-in FlexAttention backward tile on for the run and off after it."""
    from attnkit.ops.softmax import flex as attention_module

    seen = []
    real = harness._run_bench

    def spy(*args, **kwargs):
        seen.append(attention_module.flex_small_blocks(torch.device("cuda"), training=True))
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "_run_bench", spy)
    for flag in (True, False):
        cfg = harness.BenchConfig(mechanisms=["mha"], ops=[], seqs=[16], batch=1, dim=32, heads=4, head_dim=8,
                                  dtype="float32", device="cpu", repeat=1, warmup=0, small_flex_tiles=flag)
        harness.run_bench(cfg)
        assert not attention_module.flex_small_blocks(torch.device("cuda"), training=True)
    assert seen == [True, False]


@pytest.mark.parametrize("args", [["--seq", "16,16"], ["--seq", "16,,32"], ["--mechanisms", "mha,mha"],
                                  ["--ops", "dense-sdpa,dense-sdpa"]])
def test_repeated_or_empty_list_items_are_refused(args, capsys):
    try:
        code = main(["bench", "--mechanisms", "mha", "--ops", "none", "--seq", "16", *args, "--plot", "none"])
    except SystemExit as exit:  # argparse's own refusal of a malformed list
        code = exit.code
    assert code == 2
    assert args[0] in capsys.readouterr().err


def test_several_patterns_measure_the_patterned_rows_once_per_pattern():
    """--pattern a,b: flex/attend/reference once per pattern (each cell records it, its FLOPs follow
    it), the dense rows and layers once per length."""
    cfg = tiny(mechanisms=["mha"], ops=["dense-sdpa", "attend", "reference"], seqs=[32], pattern="window:8,sink:2:8")
    assert harness.count_cells(cfg) == 1 + 1 + 2 * 2
    result = run_bench(cfg)
    rows = [(c["name"], c["pattern"]) for c in result["cells"]]
    assert rows == [("mha", ""), ("dense-sdpa", ""), ("attend", "window:8"), ("attend", "sink:2:8"),
                    ("reference", "window:8"), ("reference", "sink:2:8")]
    assert all(c["status"] == "ok" for c in result["cells"]), result["cells"]
    flops = {(c["name"], c["pattern"]): c["flops"] for c in result["cells"]}
    dense = flops[("dense-sdpa", "")]
    # a window of 8 keys (sink 2 + window 8: up to 10) over 32 causal rows: fewer FLOPs than dense, the sink's more
    assert flops[("attend", "window:8")] < flops[("attend", "sink:2:8")] < dense
    assert flops[("attend", "window:8")] == flops[("reference", "window:8")]
    assert harness.Cell(name="attend", kind="op", seq=32, batch=1, pattern="window:8").label == "attend [window:8] @ 32 (op)"


def test_every_suite_runs_on_cpu_at_tiny_sizes(tmp_path):
    """Each --suite preset builds a valid configuration on CPU and runs (tiny sizes given beside it
    override the suite's); the JSON records the suite, the rows are the suite's."""
    from attnkit.bench.suites import SUITES

    for name, suite in SUITES.items():
        out = tmp_path / f"{name}.json"
        code = main(["bench", "--suite", name, "--seq", "32", "--dim", "32", "--heads", "4", "--repeat", "1",
                     "--warmup", "0", "--max-time", "0.01", "--plot", "none", "--out", str(out)])
        assert code == 0, name
        result = json.loads(out.read_text())
        assert result["suite"] == name and result["config"]["mode"] == suite.modes[0]
        assert [c["name"] for c in result["cells"] if c["kind"] == "layer"] == suite.options["mechanisms"]
        ops = [o for o in suite.options["ops"] if not o.startswith("dense-sdpa-") and o != "fla-lightning"]
        assert list(dict.fromkeys(c["name"] for c in result["cells"] if c["kind"] == "op")) == ops
        assert result["config"]["pattern"] == suite.options.get("pattern", "causal")
        bad = [c for c in result["cells"] if c["status"] not in ("ok", "unsupported")]
        assert not bad, (name, bad)


def test_suite_values_and_overrides():
    """A suite replaces the device's defaults (its CUDA sizes on CUDA, its CPU ones on CPU); options
    given beside it win; the CPU run leaves out the CUDA-only rows."""
    from attnkit.bench.cli import make_config
    from attnkit.cli import build_parser

    parse = lambda *argv: make_config(build_parser().parse_args(["bench", *argv]))  # noqa: E731
    cuda = parse("--suite", "patterns", "--device", "cuda")
    assert cuda.seqs == [32768, 131072] and cuda.mode == "fwdbwd" and cuda.repeat == 10 and cuda.dtype == "bfloat16"
    assert cuda.patterns == ["window:1024", "sink:4:1024", "s2:64:16:16"] and "dense-sdpa-cudnn" in cuda.ops
    cpu = parse("--suite", "patterns")
    assert cpu.seqs == [2048, 4096] and cpu.dtype == "float32" and "dense-sdpa-cudnn" not in cpu.ops
    mine = parse("--suite", "patterns", "--mode", "fwd", "--seq", "64", "--pattern", "window:16", "--ops", "attend")
    assert (mine.mode, mine.seqs, mine.pattern, mine.ops) == ("fwd", [64], "window:16", ["attend"])
    assert parse("--suite", "decode", "--device", "cuda").batch == 1
    # the suite's patterns with no patterned row left: the run is causal, and says so (was recorded as patterned)
    assert parse("--suite", "patterns", "--ops", "none").pattern == "causal"
    assert parse("--suite", "patterns", "--ops", "dense-sdpa,attend").pattern == "window:1024,sink:4:1024,s2:64:16:16"
    assert parse().mode == "fwd" and parse().pattern == "causal"  # no suite: the plain defaults


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--suite", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--suite" in err and "'nope'" in err and "patterns" in err


def test_suite_given_twice_is_refused(capsys):
    """`--suite dense --suite heads` ran heads alone (argparse keeps the last value) while the
    recorded command names both: refused instead."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--suite", "dense", "--suite", "heads", "--seq", "32"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--suite" in err and "'dense'" in err and "'heads'" in err and "twice" in err


def test_plot_end_labels_stay_inside_their_panel():
    """Rows within a few % of each other (here at one length) get their end labels spread apart; the
    spread put them above and below the y range, outside the panel, and tight_layout then squeezed
    every panel of the figure into a strip. The y range now takes the labels in."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnkit.bench.plot import _log_y, _row_lines

    rows = {name: [{"seq": 64, "status": "ok", "speedup_vs_dense": s, "noisy": False}]
            for name, s in (("s2", 1.03), ("streaming", 0.96), ("sliding-window", 0.90))}
    fig, ax = plt.subplots()
    try:
        _row_lines(ax, rows, lambda c: c["speedup_vs_dense"], None)
        ax.axhline(1.0)
        _log_y(ax)
        low, high = ax.get_ylim()
        labels = [a.xyann[1] for a in ax.texts]
        assert len(labels) == 3 and all(low <= y <= high for y in labels), (low, high, labels)
    finally:
        plt.close(fig)


def test_config_records_the_patterns_as_the_cells_name_them():
    """`--pattern " window:08, sink:2:8"` measured window:8 and sink:2:8 (the cells' labels) while the
    JSON's config kept the typed text, blanks and leading zero included."""
    result = run_bench(tiny(mechanisms=[], ops=["attend"], seqs=[16], repeat=1, warmup=0, pattern=" window:08, sink:2:8"))
    assert result["config"]["pattern"] == "window:8,sink:2:8"
    assert [c["pattern"] for c in result["cells"]] == ["window:8", "sink:2:8"]
