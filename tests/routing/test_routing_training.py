"""attnkit.routing end to end: every router trains (the loss falls), the cards build and count FLOPs, and the
experiment's training loop, summary and plot run at toy sizes."""

import json

import pytest
import torch
import torch.nn.functional as F

from attnkit.cards import KINDS
from attnkit.routing import CARDS, RoutedLM, experiments


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops: on a loaded 2-core machine every OpenMP region of a 2-thread run waits ~10 ms for its second
    thread (the whole file took 100x longer), so these tests run on one thread and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("router", ["topk", "similarity", "attention"])
def test_tiny_training_lowers_the_loss(router):
    torch.manual_seed(0)
    model = RoutedLM(vocab_size=16, dim=32, num_layers=1, num_heads=2, num_experts=4, top_k=2, hidden=32, router=router)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    # a repeating pattern with a random phase per sequence: the next token is predictable from the current one
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]).remainder(16)
    losses = []
    for _ in range(40):
        phase = torch.randint(0, 8, (8, 1), generator=g)
        seq = pattern[(phase + torch.arange(17)) % 8]
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        (loss + 0.01 * model.aux_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_cards_build_and_their_flops_rank_the_routers():
    assert "routing" in KINDS
    assert [c.name for c in CARDS] == ["smoe-topk", "smoe-similarity", "smoe-attention"]
    x = torch.randn(2, 12, 32)
    flops = {}
    for card in CARDS:
        assert card.kind == "routing" and card.family == "routing"
        block = card.build(32, 4)
        assert block(x).shape == x.shape
        count = card.flop_count(2, 12, 32, 4)
        flops[card.config(32, 4)["router"]] = count
        assert count.fwd > 0
    # same gate and experts; the graph routers add only the token-graph mixing
    assert flops["topk"].projection_fwd == flops["similarity"].projection_fwd == flops["attention"].projection_fwd
    pairs = 12 * 13 / 2
    assert flops["similarity"].attention_fwd - flops["topk"].attention_fwd == 2 * 2 * pairs * (8 + 8)
    assert flops["attention"].attention_fwd - flops["topk"].attention_fwd == 2 * 2 * 4 * pairs * (8 + 8)
    with pytest.raises(ValueError, match="does not take option"):
        CARDS[0].build(32, 4, window=3)


def test_experiment_loop_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    task = experiments.TextCorpus(seq_len=16, path=str(corpus))
    probe, _ = experiments._windows(task, 2, seed=1)
    val = experiments._windows(task, 4, seed=2)
    rows = [experiments.train_one(r, 0, task, steps=4, batch=2, eval_every=2, probe=probe, val=val)
            for r in ("topk", "attention")]
    for row in rows:
        assert [c["step"] for c in row["curve"]] == [2, 4]
        assert 0.0 <= row["late_fluctuation"] <= 1.0 and 1.0 <= row["load_max_over_mean"] <= 8.0
        assert row["bits_per_byte"] > 0 and len(row["load_share"]) == 2
    summary = experiments.summarise(rows)
    assert [s["router"] for s in summary] == ["topk", "attention"] and summary[0]["seeds"] == 1
    result = {"task": task.config(), "config": {**experiments.MODEL, "steps": 4}, "rows": rows, "summary": summary}
    experiments.plot(result, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 0
    json.dumps(result)  # the result is plain JSON


def test_bench_options_and_sizes(tmp_path):
    import json

    from attnkit.routing import experiments

    assert experiments.main(["bench", "--batch", "1", "--seq", "16", "--dim", "16", "--heads", "2", "--tag", "t",
                             "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "routing-bench-t.json").read_text())
    assert data["config"]["seq"] == 16 and data["config"]["device"] == "cpu"
    assert [r["name"] for r in data["rows"]] == [c.name for c in experiments.CARDS]
    assert data["command"].startswith("python -m attnkit.routing.experiments bench")
    with pytest.raises(SystemExit, match="--seq must be a positive integer, got 0"):
        experiments.main(["bench", "--seq", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--dim \(30\) must be divisible by --heads \(4\)"):
        experiments.main(["bench", "--dim", "30", "--heads", "4", "--out", str(tmp_path)])
