"""The synthetic recommendation world: determinism by seed, its generating process, and the
ranking / CTR metrics on rankings worked out by hand."""

import math

import pytest
import torch

from attnkit.tasks.recsys import RecsysWorld, auc, hit_rate_at_k, ndcg_at_k, ranks, time_buckets


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_world_is_a_function_of_its_seed_and_generator():
    a, b, c = RecsysWorld(seed=3), RecsysWorld(seed=3), RecsysWorld(seed=4)
    assert torch.equal(a.item_cluster, b.item_cluster) and torch.equal(a.successor_table, b.successor_table)
    assert not torch.equal(a.successor_table, c.successor_table)
    for make in (lambda w, g: w.next_item_data(16, 12, g), lambda w, g: w.ctr_data(16, 12, g)):
        x, y, z = make(a, _gen(1)), make(b, _gen(1)), make(a, _gen(2))
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert not all(torch.equal(x[k], z[k]) for k in x)


def test_generating_process():
    world = RecsysWorld(seed=0, transition_prob=1.0)
    items = world.next_item_data(64, 15, _gen(0))["items"]
    # with transition_prob 1 every step is one of the previous item's successors
    assert (world.successor_table[items[:, :-1]] == items[:, 1:, None]).any(-1).all()
    assert (world.successor_table != torch.arange(world.num_items)[:, None]).all()  # no self-loops
    interest = RecsysWorld(seed=0, transition_prob=0.0, interests_per_user=1)
    data = interest.next_item_data(32, 10, _gen(0))
    clusters = interest.item_cluster[data["items"]]
    assert (clusters == clusters[:, :1]).all()  # one interest, no transitions: one cluster per user
    assert torch.allclose(data["next_probs"].sum(1), torch.ones(32, dtype=torch.float64))
    ctr = RecsysWorld(seed=0).ctr_data(256, 30, _gen(5))
    assert (ctr["gaps"] > 0).all() and (ctr["gaps"][:, 1:] < ctr["gaps"][:, :-1]).all()  # oldest first
    same = ctr["history_cluster"] == ctr["candidate_cluster"][:, None]
    torch.testing.assert_close(ctr["relevance"], same.double() * torch.exp(-ctr["gaps"] / 3.0))
    logit = -1.5 + 2.0 * ctr["relevance"].sum(1)
    torch.testing.assert_close(ctr["click_prob"], torch.sigmoid(logit))


def test_time_buckets():
    gaps = torch.tensor([0.0, 0.2, 0.25, 1.0, 100.0])
    # floor(log2(1 + 4 gap)): 0, log2(1.8) -> 0, log2(2) -> 1, log2(5) -> 2, clipped to 7
    assert time_buckets(gaps, 8).tolist() == [0, 0, 1, 2, 7]


def test_ranking_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # target 2: one item above -> rank 1
                           [0.1, 0.2, 0.3, 0.4],   # target 3: rank 0
                           [0.4, 0.3, 0.2, 0.1]])  # target 3: rank 3
    targets = torch.tensor([2, 3, 3])
    assert ranks(scores, targets).tolist() == [1, 0, 3]
    assert hit_rate_at_k(scores, targets, 2) == pytest.approx(2 / 3)
    assert hit_rate_at_k(scores, targets, 4) == 1.0
    assert ndcg_at_k(scores, targets, 2) == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert ndcg_at_k(scores, targets, 4) == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(5)) / 3)
    # a tie goes to the target
    assert ranks(torch.tensor([[1.0, 1.0]]), torch.tensor([1])).tolist() == [0]


def test_auc_by_hand():
    labels = torch.tensor([1, 0, 1, 0])
    assert auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert auc(torch.tensor([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    # pairs (pos, neg): (0.9, 0.5) win, (0.9, 0.7) win, (0.6, 0.5) win, (0.6, 0.7) loss -> 3/4
    assert auc(torch.tensor([0.9, 0.5, 0.6, 0.7]), labels) == 0.75
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5  # ties count one half


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_items=1), "num_items must be an integer >= 2, got 1"),
    (dict(num_clusters=500), r"num_clusters must be at most num_items \(200\), got 500"),
    (dict(interests_per_user=11), r"interests_per_user must be at most num_clusters \(10\), got 11"),
    (dict(successor_weights=(0.5, 0.5)), "successor_weights must be 3 non-negative numbers"),
    (dict(transition_prob=1.5), r"transition_prob must be a number in \[0.0, 1.0\], got 1.5"),
    (dict(mean_gap=0), "mean_gap must be a positive finite number, got 0"),
    (dict(decay=float("inf")), "decay must be a positive finite number, got inf"),
    (dict(click_scale="2"), "click_scale must be a finite number, got '2'"),
    (dict(num_time_buckets=1), "num_time_buckets must be an integer >= 2, got 1"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
])
def test_bad_world_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecsysWorld(**kwargs)


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match=r"scores must be \[B, N\] and targets \[B\]"):
        ranks(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        hit_rate_at_k(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="auc needs both classes, got 2 positive and 0 negative"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="same number of entries, got 2 and 3"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0, 1]))
    world = RecsysWorld()
    with pytest.raises(ValueError, match="length must be an integer >= 1, got 0"):
        world.next_item_data(4, 0, _gen(0))
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        world.ctr_data(0, 5, _gen(0))
