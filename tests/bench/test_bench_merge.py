"""benchmarks/bench_merge.py: the parts of one bench run merge into the result the one run would have written."""

import json

import pytest


@pytest.fixture(scope="module")
def bm():
    from conftest import load_script

    return load_script("bench_merge")


def cell(name, seq, ms, kind="layer"):
    return {"name": name, "kind": kind, "seq": seq, "pattern": "", "status": "ok", "latency_ms": {"median": ms},
            "speedup_vs_dense": 1.0}


def part(mechanisms, ops, cells, *, code="c0de", complete=True, max_time=2.0):
    return {"schema": "attnkit.bench/2", "command": f"attnkit bench --mechanisms {','.join(mechanisms)}",
            "complete": complete, "stopped": None if complete else "timeout", "code_hash": code,
            "device": {"name": "NVIDIA H200"},
            "config": {"mechanisms": mechanisms, "ops": ops, "seqs": [1024, 2048], "dim": 64, "heads": 2,
                       "head_dim": 32, "dtype": "bfloat16", "device": "cuda", "mode": "fwd", "repeat": 20,
                       "warmup": 5, "max_time": max_time, "tokens_per_batch": 4096, "compile": False,
                       "small_flex_tiles": False, "kv_heads": None, "timing": "latency"},
            "cells": cells}


def test_parts_merge_with_the_shared_reference_kept_once_and_a_stopped_part_completed_by_a_later_run(bm):
    a = part(["mha", "gqa"], [], [cell("mha", s, 1.0) for s in (1024, 2048)] + [cell("gqa", s, 0.5) for s in (1024, 2048)])
    # part b stopped before its last cell; a later run measured it (and mha again, at another time)
    b = part(["mha", "sqa"], [], [cell("mha", 1024, 1.1), cell("sqa", 1024, 0.3), cell("mha", 2048, 1.2)], complete=False)
    c = part(["mha", "sqa"], [], [cell("mha", 2048, 1.3), cell("sqa", 2048, 0.4)])
    merged = bm.merge([("a.json", a), ("b.jsonl", b), ("c.json", c)])
    keys = [(x["name"], x["seq"]) for x in merged["cells"]]
    assert sorted(keys) == sorted({(n, s) for n in ("mha", "gqa", "sqa") for s in (1024, 2048)})
    assert len(keys) == len(set(keys))
    assert next(x for x in merged["cells"] if x["name"] == "mha" and x["seq"] == 2048)["latency_ms"]["median"] == 1.0
    assert merged["config"]["mechanisms"] == ["mha", "gqa", "sqa"]
    assert merged["complete"] is True and merged["missing_cells"] == []
    assert [p["file"] for p in merged["parts"]] == ["a.json", "b.jsonl", "c.json"]

    without_c = bm.merge([("a.json", a), ("b.jsonl", b)])
    assert without_c["complete"] is False and without_c["missing_cells"] == ["sqa@2048"]


@pytest.mark.parametrize("field,value,message", [("code", "other", "same code"), ("max_time", 0.5, "max_time")])
def test_parts_of_different_runs_are_refused_by_name(bm, field, value, message):
    a = part(["mha"], [], [cell("mha", 1024, 1.0)])
    b = part(["mha"], [], [cell("mha", 2048, 1.0)], **{field: value})
    with pytest.raises(ValueError, match=message) as err:
        bm.merge([("a.json", a), ("b.json", b)])
    assert "b.json" in str(err.value)


def test_main_writes_the_merged_json_with_its_command_and_refuses_a_bad_out(bm, tmp_path, capsys):
    a = part(["mha"], ["dense-sdpa"], [cell("mha", s, 1.0) for s in (1024, 2048)]
             + [cell("dense-sdpa", s, 0.2, kind="op") for s in (1024, 2048)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    out = tmp_path / "all.json"
    assert bm.main([str(tmp_path / "a.json"), "--out", str(out), "--plot", "none"]) == 0
    merged = json.loads(out.read_text())
    assert merged["command"].startswith("python benchmarks/bench_merge.py ") and merged["complete"] is True
    assert not list(tmp_path.glob(".all.json.*"))  # the temporary file of the atomic write is gone
    with pytest.raises(SystemExit) as exit_:
        bm.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "all.txt")])
    assert exit_.value.code == 2 and "--out must end in .json" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(SystemExit):
        bm.main([str(tmp_path / "empty.json"), "--out", str(out)])
    assert "empty" in capsys.readouterr().err
