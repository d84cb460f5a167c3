"""attnkit.speech.experiments runs end to end at toy sizes and writes its JSON (with the command) and PNG."""

import json

import pytest
import torch

from attnkit.speech import experiments

TINY = dict(dim=8, num_heads=2, d_state=2)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_run_scores_every_test_set_and_main_writes_files(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("matplotlib")
    result = experiments.run_train([0], models=("mambattention", "semamba"), steps=2, train_clips=4, test_clips=2,
                                   seconds=0.25, config=TINY)
    assert [r["model"] for r in result["rows"]] == ["mambattention", "semamba"]
    row = result["rows"][0]
    for name in experiments.TEST_SETS:
        assert f"{name} si_sdri" in row and torch.isfinite(torch.tensor(row[f"{name} si_sdri"]))
    # the same held-out clips for every model: the noisy inputs score the same
    assert row["unseen babble si_sdr_noisy"] == result["rows"][1]["unseen babble si_sdr_noisy"]
    assert row["parameters"] > result["rows"][1]["parameters"]  # attention adds parameters
    summary = experiments.summarise(result)
    assert [s["model"] for s in summary] == ["mambattention", "semamba"] and summary[0]["seeds"] == 1
    monkeypatch.setattr(experiments, "run_train", lambda seeds, **options: result)
    assert experiments.main(["--seeds", "0", "--models", "mambattention,semamba", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speech.json").read_text())
    assert data["command"].startswith("python -m attnkit.speech.experiments --seeds 0") and data["summary"]
    assert (tmp_path / "speech.png").stat().st_size > 0


def test_bench_rows_cover_every_card(one_thread):
    result = experiments.run_bench(seconds=0.25, repeat=1, config=TINY)
    assert [r["name"] for r in result["rows"]] == [c.name for c in experiments.CARDS]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["semamba"]["attention_flops_fwd"] == 0 < rows["mambattention"]["attention_flops_fwd"]
    assert rows["mambattention"]["parameters"] < rows["mambattention-separate"]["parameters"]
    paper = result["paper_size_flops_fwd_per_second_of_audio"]
    assert paper["mambattention"] > 100 * rows["mambattention"]["flops_fwd"]


def test_bad_arguments():
    with pytest.raises(SystemExit, match="--seeds must be comma-separated integers, got 'a'"):
        experiments.main(["--seeds", "a"])
    with pytest.raises(SystemExit, match="--models takes a comma-separated subset of"):
        experiments.main(["--models", "conformer"])
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['conformer'\]"):
        experiments.run_train([0], models=("conformer",))


def test_bench_at_the_papers_size_and_its_options():
    from attnkit.speech import experiments

    result = experiments.run_bench(paper_size=True, repeat=1, seconds=0.02)
    assert result["config"]["freq_bins"] == 201 and result["config"]["model"]["dim"] == 64
    assert [r["name"] for r in result["rows"]] == [c.name for c in experiments.CARDS]
    # the paper's size costs more than the experiment's, and attention adds to the Mamba-only FLOPs
    small = {r["name"]: r["flops_fwd"] for r in experiments.run_bench(repeat=1, seconds=0.02)["rows"]}
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["mambattention"]["flops_fwd"] > rows["semamba"]["flops_fwd"] > small["semamba"]
    with pytest.raises(SystemExit, match="apply to the bench run only"):
        experiments.main(["train", "--paper-size"])
    with pytest.raises(SystemExit, match="--batch must be a positive integer"):
        experiments.main(["bench", "--batch", "0"])
