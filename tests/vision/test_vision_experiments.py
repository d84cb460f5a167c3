"""attnkit.vision.experiments runs end to end at toy sizes and writes its JSON and PNG."""

import json

import pytest

from attnkit.vision import experiments


def test_runs_summarise_and_write(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    small = dict(steps=2, train=32, test=16)
    look = experiments.run_lookupvit([0], dim=16, depth=1, **small)
    assert [r["model"] for r in look["rows"]] == ["vit", "lookupvit"]
    assert look["rows"][1]["flops_per_image"] < look["rows"][0]["flops_per_image"]
    probes = experiments.run_probing([0], dim=32, **small)
    params = {r["probe"]: r["parameters"] for r in probes["rows"]}
    assert params["linear"] < params["efficient-d_out2"] < params["efficient"] < params["attentive"]
    cct = experiments.run_cct([0], dim=16, **small)
    row = cct["rows"][1]
    assert row["head"] == "cct" and row["chance_mass"] > 0 and row["ratio_to_chance"] > 0
    summary = experiments.summarise(cct, "head")
    assert [s["head"] for s in summary] == ["mean-linear", "cct"] and summary[0]["seeds"] == 1
    monkeypatch.setattr(experiments, "run_probing", lambda seeds, **o: experiments.RUNS["probing"](seeds, dim=32, **small))
    monkeypatch.setitem(experiments.RUNS, "probing", lambda seeds, **o: probes)
    assert experiments.main(["probing", "--seeds", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "vision-probing.json").read_text())
    assert data["command"].startswith("python -m attnkit.vision.experiments probing") and data["summary"]
    assert (tmp_path / "vision-probing.png").stat().st_size > 0


def test_bench_rows_cover_every_card():
    result = experiments.run_bench(batch=1, tokens=16, dim=32, heads=4, repeat=1)
    assert [r["name"] for r in result["rows"]] == [c.name for c in experiments.CARDS]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["lookupvit"]["flops_fwd"] < rows["vit-block"]["flops_fwd"] * 2  # at 16 tokens the gain is small


def test_bad_seeds():
    with pytest.raises(SystemExit, match="--seeds must be comma-separated integers, got 'a,b'"):
        experiments.main(["cct", "--seeds", "a,b"])


def test_bench_over_several_token_counts_writes_rows_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert experiments.main(["bench", "--tokens", "16,64", "--batch", "1", "--dim", "32", "--heads", "4",
                             "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "vision-bench.json").read_text())
    assert data["config"]["tokens"] == [16, 64] and data["config"]["device"] == "cpu"
    assert [(r["name"], r["tokens"]) for r in data["rows"]] == [(c.name, n) for n in (16, 64) for c in experiments.CARDS]
    flops = {(r["name"], r["tokens"]): r["flops_fwd"] for r in data["rows"]}
    # LookupViT's saving grows with the number of patch tokens (its heavy part is on M compressed tokens)
    assert flops["lookupvit", 64] / flops["vit-block", 64] < flops["lookupvit", 16] / flops["vit-block", 16]
    assert (tmp_path / "vision-bench.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--tokens", "16,x"], "--tokens must be comma-separated positive integers"),
    (["--tokens", "0"], "--tokens must be comma-separated positive integers"),
    (["--dim", "30", "--heads", "4"], "--dim (30) must be divisible by --heads (4)"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_bench_bad_options(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        experiments.main(["bench", *argv, "--out", str(tmp_path)])
