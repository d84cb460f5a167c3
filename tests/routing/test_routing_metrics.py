"""attnkit.routing.metrics: routing fluctuation and expert load on constructed cases with known answers."""

import pytest
import torch

from attnkit.routing import expert_load, routing_fluctuation, top1_experts


def test_fluctuation_counts_the_tokens_whose_top1_expert_changed():
    # 3 layers x 2 sequences x 4 tokens; exactly 5 of the 24 (layer, token) entries change expert
    before = torch.arange(24).remainder(4).reshape(3, 2, 4)
    after = before.clone()
    for index in [(0, 0, 0), (0, 1, 3), (1, 0, 2), (2, 1, 1), (2, 1, 2)]:
        after[index] = (after[index] + 1) % 4
    assert routing_fluctuation(before, after) == pytest.approx(5 / 24)
    assert routing_fluctuation(before, before) == 0.0
    assert routing_fluctuation(before, (before + 1) % 4) == 1.0


def test_fluctuation_from_distributions_uses_the_top1_expert():
    # the distribution moves but its argmax stays for token 0; token 1's argmax flips from expert 0 to 2
    p0 = torch.tensor([[0.5, 0.3, 0.2], [0.40, 0.35, 0.25]])
    p1 = torch.tensor([[0.4, 0.35, 0.25], [0.30, 0.30, 0.40]])
    assert top1_experts(p0).tolist() == [0, 0] and top1_experts(p1).tolist() == [0, 2]
    assert routing_fluctuation(top1_experts(p0), top1_experts(p1)) == 0.5


def test_expert_load_known_cases():
    balanced = expert_load(torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4)
    assert balanced["share"] == [0.25] * 4 and balanced["max_over_mean"] == 1.0 and balanced["cv"] == 0.0
    skewed = expert_load(torch.tensor([0, 0, 0, 1]), 4)  # shares 3/4, 1/4, 0, 0
    assert skewed["share"] == [0.75, 0.25, 0.0, 0.0]
    assert skewed["max_over_mean"] == pytest.approx(3.0)
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert skewed["cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))


def test_fluctuation_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        routing_fluctuation(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensors"):
        routing_fluctuation(torch.rand(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="no probe tokens"):
        routing_fluctuation(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
