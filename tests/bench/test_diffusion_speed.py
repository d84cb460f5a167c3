"""benchmarks/diffusion_speed.py: the dry run on CPU writes its record, and the pair counts are right."""

import json

import pytest

pytest.importorskip("diffusers")


def test_dry_run_writes_every_method_with_its_pair_ratio(tmp_path):
    from conftest import load_script

    mod = load_script("diffusion_speed")
    out = tmp_path / "speed.json"
    assert mod.main(["--device", "cpu", "--tiny", "--repeat", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"plain", "shared-kv", "shared-kv+adain", "alignedgen", "freecus", "ir-diffusion"}
    # shared-kv, batch 2, 64 image + 8 text tokens: the target attends 72 + 64 keys, the reference 72, in both blocks
    assert rows["shared-kv"]["pair_ratio"] == pytest.approx((72 + 136) / (2 * 72))
    assert all(r["attention_ms"] > 0 for r in rows.values()) and "diffusion_speed.py" in record["command"]
