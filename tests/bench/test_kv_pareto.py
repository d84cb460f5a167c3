"""benchmarks/kv_pareto.py: issue 23's Pareto chart from attnkit eval records."""

import json

import pytest


def _module():
    from conftest import load_script

    return load_script("kv_pareto")


def _row(name, label, acc, kv):
    return {"name": name, "label": label, "mean_accuracy": {"passkey": {"2048": acc}},
            "lengths": {"2048": {"kv_bytes": kv}}}


def test_points_are_normalised_by_any_records_full_row(tmp_path):
    mod = _module()
    a = {"command": "eval a", "methods": [_row("full", "full", 1.0, 1000), _row("streaming", "streaming:window=8", 0.2, 100)]}
    b = {"command": "eval b", "methods": [_row("h2o", "h2o:budget=64", 0.6, 250)]}
    rows = mod.points([a, b])
    got = {r["label"]: (r["accuracy"], r["kv_vs_full"]) for r in rows}
    assert got == {"full": (1.0, 1.0), "streaming:window=8": (0.2, 0.1), "h2o:budget=64": (0.6, 0.25)}
    files = []
    for name, rec in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(rec))
        files.append(str(tmp_path / name))
    assert mod.main([*files, "--out", str(tmp_path / "out" / "pareto")]) == 0
    written = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert written["command"].startswith("python benchmarks/kv_pareto.py") and len(written["points"]) == 3
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_a_record_set_without_full_is_refused(tmp_path):
    mod = _module()
    (tmp_path / "b.json").write_text(json.dumps({"methods": [_row("h2o", "h2o", 0.6, 250)]}))
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "b.json"), "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="no record has a 'full' row at length 2048"):
        mod.points([{"methods": [_row("h2o", "h2o", 0.6, 250)]}])
