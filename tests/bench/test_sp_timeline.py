"""benchmarks/sp_timeline.py: the dry run writes the simulated timelines, consistent with their parts."""

import json

import pytest


def test_dry_run_rows_add_up(tmp_path):
    from conftest import load_script

    mod = load_script("sp_timeline")
    out = tmp_path / "sp.json"
    assert mod.main(["--device", "cpu", "--tiny", "--world", "2", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["world"] for r in rows] == [2, 4]
    for r in rows:
        assert r["lasp2_ms"] == pytest.approx(r["lightning_chunk_ms"] + r["lasp2_allgather_ms"] + r["lasp2_prefix_ms"])
        assert r["ring_ms"] >= r["world"] * min(r["softmax_full_block_ms"] / 2, r["softmax_causal_block_ms"]) * 0.999
        # a ring shard: k and v of 2 heads x T tokens x 16 dims in float32
        assert r["kv_shard_bytes"] == 2 * 2 * r["tokens_per_rank"] * 16 * 4
    with pytest.raises(SystemExit):
        mod.main(["--device", "cpu", "--tiny", "--world", "3"])  # 4096 tokens do not split into 6 chunks
