"""The recsys training loops at toy sizes: they learn something (above chance) and report the
metrics and the Bayes ceiling of the world."""

import torch

from attnkit.models.recsys import MQSA, TIN
from attnkit.models.recsys.train import run_ctr, run_next_item
from attnkit.tasks.recsys import RecsysWorld


def test_next_item_loop_learns_the_chain():
    torch.manual_seed(0)
    world = RecsysWorld(seed=0, num_items=40, num_clusters=4, transition_prob=0.8)
    model = MQSA(16, 2, num_items=40, max_len=8, dropout=0.0)
    out = run_next_item(model, world, train_users=400, eval_users=300, length=8, epochs=4, lr=1e-2, ted_weight=0.1)
    assert set(out) == {"hr", "ndcg", "oracle_hr", "oracle_ndcg", "seconds"}
    assert out["hr"] > 10 / 40 + 0.1  # chance is 10 of 40 items
    assert out["ndcg"] <= out["hr"] and out["oracle_hr"] >= 0.8


def test_ctr_loop_beats_chance():
    torch.manual_seed(0)
    world = RecsysWorld(seed=0, num_items=40, num_clusters=4)
    out = run_ctr(TIN(8, num_items=40), world, train_rows=4000, eval_rows=1000, length=10, epochs=4, lr=1e-2)
    assert out["auc"] > 0.55 and out["oracle_auc"] > out["auc"] - 0.05
    assert 0 <= out["recall"] <= 1
