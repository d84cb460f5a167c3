"""attnkit bench: JSON schema, derived numbers, errors, an end-to-end CLI run on a tiny config."""

import json

import pytest
import torch

from attnkit.bench import BenchConfig, parse_pattern, run_bench
from attnkit.bench.harness import Cell, _derive
from attnkit.cli import main

CELL_KEYS = {"name", "kind", "seq", "batch", "status", "message", "backend", "latency_ms", "peak_memory_bytes", "flops",
             "tflops", "pct_matmul_peak", "speedup_vs_dense", "flop_reduction", "realised_fraction", "speedup_vs_dense_flex",
             "realised_fraction_vs_flex", "state_bytes"}


def tiny(**kwargs):
    cfg = dict(mechanisms=["mha", "mqa"], ops=["dense-sdpa", "attend", "reference"], seqs=[16, 32], batch=1, dim=32,
               heads=4, head_dim=8, dtype="float32", device="cpu", mode="fwd", repeat=2, warmup=1)
    cfg.update(kwargs)
    return BenchConfig(**cfg)


def test_result_schema_and_cells():
    result = run_bench(tiny(), command="attnkit bench --test")
    assert result["schema"] == "attnkit.bench/1"
    assert {"command", "created", "device", "versions", "config", "matmul_tflops", "cells"} <= set(result)
    assert result["versions"]["torch"] == torch.__version__
    assert result["matmul_tflops"] > 0
    assert len(result["cells"]) == 2 * (2 + 3)
    for cell in result["cells"]:
        assert set(cell) == CELL_KEYS
        assert cell["status"] == "ok", cell
        lat = cell["latency_ms"]
        assert lat["samples"] == 2 and lat["min"] <= lat["median"] <= lat["max"]
        assert cell["flops"] > 0 and cell["tflops"] > 0
    json.dumps(result)  # serialisable
    mha = [c for c in result["cells"] if c["name"] == "mha"]
    assert all(c["speedup_vs_dense"] == 1.0 and c["flop_reduction"] == 1.0 for c in mha)
    mqa = next(c for c in result["cells"] if c["name"] == "mqa" and c["seq"] == 16)
    # MQA's FLOP reduction over MHA comes from its smaller K/V projections only
    assert mqa["flop_reduction"] == pytest.approx(
        (2 * 16 * 32 * (4 + 8) * 8 + 2 * 16 * 32 * 32 + 4 * 4 * 136 * 8) / (2 * 16 * 32 * (4 + 2) * 8 + 2 * 16 * 32 * 32 + 4 * 4 * 136 * 8)
    )


def test_derived_numbers_by_hand():
    cells = [Cell("mha", "layer", 8, 1, latency_ms={"median": 2.0}, flops=4e9),
             Cell("gqa", "layer", 8, 1, latency_ms={"median": 1.0}, flops=1e9),
             Cell("dense-sdpa", "op", 8, 1, latency_ms={"median": 4.0}, flops=8e9),
             Cell("flex", "op", 8, 1, status="oom")]
    _derive(cells, matmul_tflops=10.0)
    mha, gqa, sdpa, flex = cells
    assert mha.tflops == pytest.approx(2.0) and mha.pct_matmul_peak == pytest.approx(20.0)
    assert gqa.speedup_vs_dense == 2.0 and gqa.flop_reduction == 4.0 and gqa.realised_fraction == 0.5
    assert sdpa.speedup_vs_dense == 1.0
    assert flex.tflops is None


def test_decode_mode_reports_state_bytes():
    result = run_bench(tiny(mode="decode", ops=[], seqs=[8]))
    cells = {c["name"]: c for c in result["cells"]}
    # 8 prefill + 1 warm-up + 2 timed + 1 memory-measuring token; k and v; fp32
    assert cells["mha"]["state_bytes"] == (8 + 4) * 2 * 4 * 8 * 4
    assert cells["mqa"]["state_bytes"] == (8 + 4) * 2 * 1 * 8 * 4


def test_unsupported_cells_are_reported_not_raised():
    result = run_bench(tiny(mechanisms=[], ops=["flex", "dense-sdpa-cudnn"], mode="fwdbwd", seqs=[16]))
    assert [c["status"] for c in result["cells"]] == ["unsupported", "unsupported"]


def test_kv_heads_give_gqa_shaped_op_rows():
    """--kv-heads: the op rows run a GQA-shaped core (SQA's attention cost); FLOPs follow the query heads."""
    full = run_bench(tiny(mechanisms=[], ops=["dense-sdpa", "attend", "reference", "sigmoid"], seqs=[32]))
    gqa = run_bench(tiny(mechanisms=[], ops=["dense-sdpa", "attend", "reference", "sigmoid"], seqs=[32], kv_heads=1))
    by_name = {c["name"]: c for c in gqa["cells"]}
    assert [by_name[n]["status"] for n in ("dense-sdpa", "attend", "reference")] == ["ok"] * 3
    assert by_name["sigmoid"]["status"] == "unsupported" and "--kv-heads" in by_name["sigmoid"]["message"]
    assert by_name["attend"]["flops"] == next(c["flops"] for c in full["cells"] if c["name"] == "attend")
    assert gqa["config"]["kv_heads"] == 1


def test_throughput_timing_queues_a_burst_per_sample():
    """timing='throughput': each sample is the mean over THROUGHPUT_BURST back-to-back calls;
    latency: one call per sample. Same number of samples; the config records the choice."""
    from attnkit.bench.harness import THROUGHPUT_BURST, _time_calls

    calls = []
    times = _time_calls(lambda: calls.append(1), torch.device("cpu"), repeat=3, warmup=1, burst=THROUGHPUT_BURST)
    assert len(times) == 3 and len(calls) == 1 + 3 * THROUGHPUT_BURST
    calls.clear()
    assert len(_time_calls(lambda: calls.append(1), torch.device("cpu"), repeat=3, warmup=1)) == 3 and len(calls) == 4
    result = run_bench(tiny(mechanisms=["mha"], ops=["attend"], seqs=[16], timing="throughput"))
    assert result["config"]["timing"] == "throughput"
    assert all(c["status"] == "ok" and c["latency_ms"]["samples"] == 2 for c in result["cells"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mechanisms=["nope"]), "unknown mechanism 'nope'; registered: mha"),
        (dict(ops=["triton"]), "unknown op"),
        (dict(mode="train"), "unknown --mode"),
        (dict(dtype="int8"), "unknown --dtype"),
        (dict(pattern="window:x"), "unknown --pattern"),
        (dict(seqs=[0]), "positive"),
        (dict(kv_heads=3), "--kv-heads must be a positive divisor of --heads 4"),
        (dict(timing="wall"), "unknown --timing 'wall'; accepted: latency, throughput"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_bench(tiny(**kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        run_bench(tiny(device="cuda"))


def test_parse_pattern():
    assert parse_pattern("window:16").window == 16
    p = parse_pattern("sink:4:16")
    assert (p.sink_tokens, p.window) == (4, 16)
    with pytest.raises(ValueError, match="window"):
        parse_pattern("window:0")


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "--mechanisms", "gqa", "--ops", "attend", "--seq", "16", "--dim", "32", "--heads", "4",
                 "--repeat", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [c["name"] for c in result["cells"]] == ["gqa", "attend"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "gqa" in capsys.readouterr().out
    assert main(["bench", "--mechanisms", "nope", "--out", str(out)]) == 2
    assert "registered: mha" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "mha" in text and "1706.03762" in text
