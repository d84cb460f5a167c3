"""Probes over frozen features against float64 references of the official math (efficient probing's
``poolings/ep.py``, the standard attentive probe), parameter and FLOP counts, bad inputs."""

import pytest
import torch

from attnkit.vision import CARDS, AttentiveProbe, EfficientProbe, LinearProbe, probe_parameters
from attnkit.vision.probing import attentive_probe_reference, efficient_probe_reference, probe_flops


def _grads(out, inputs):
    g = torch.randn_like(out)
    return torch.autograd.grad((out * g).sum(), inputs), g


@pytest.mark.parametrize("num_queries,d_out", [(1, 1), (4, 1), (8, 2)])
def test_efficient_probe_matches_the_official_math(num_queries, d_out):
    torch.manual_seed(0)
    probe = EfficientProbe(32, num_queries=num_queries, d_out=d_out, num_classes=5).double()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    out = probe.pool(x)
    ref = efficient_probe_reference(x, probe.queries, probe.v.weight, num_queries)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x, probe.queries, probe.v.weight]
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b)


def test_efficient_probe_holdout_one_query_is_attention_with_identity_query_key():
    # official EP, M = 1, d_out = 1: one head, keys are the features, scale C^-1/2, values W_v x
    torch.manual_seed(1)
    probe = EfficientProbe(16, num_queries=1).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    weights = torch.softmax(x @ probe.queries[0] / 4.0, dim=-1)  # (B, N)
    expected = torch.einsum("bn,bnc->bc", weights, x @ probe.v.weight.T)
    torch.testing.assert_close(probe.pool(x), expected)
    assert probe.attention(x).shape == (2, 1, 7)


def test_efficient_probe_queries_read_disjoint_channels():
    # query m's output channels depend only on its own slice of W_v: zeroing another query's slice
    # leaves them unchanged
    torch.manual_seed(2)
    probe = EfficientProbe(16, num_queries=4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    before = probe.pool(x)
    with torch.no_grad():
        probe.v.weight[4:8] = 0
    after = probe.pool(x)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    torch.testing.assert_close(after[:, 8:], before[:, 8:])
    assert after[:, 4:8].abs().max() == 0


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_attentive_probe_matches_reference(backend):
    torch.manual_seed(3)
    probe = AttentiveProbe(32, 4, num_classes=5, num_queries=2, backend=backend).double()
    x = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    w = {n: getattr(probe, n).weight for n in "qkvo"} | {"b" + n: getattr(probe, n).bias for n in "qkvo"}
    out, ref = probe.pool(x), attentive_probe_reference(x, probe.query[0], w, 4)
    torch.testing.assert_close(out, ref)
    params = [x, probe.query, *w.values()]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b)


def test_parameter_counts_follow_the_paper():
    C, K, M = 64, 4, 8
    assert probe_parameters(LinearProbe(C, num_classes=K)) == C * K + K
    assert probe_parameters(AttentiveProbe(C, 4, num_classes=K)) == C + 4 * (C * C + C) + C * K + K
    assert probe_parameters(EfficientProbe(C, num_classes=K, num_queries=M)) == M * C + C * C + C * K + K
    assert probe_parameters(EfficientProbe(C, num_classes=K, num_queries=M, d_out=2)) == M * C + C * C // 2 + C // 2 * K + K
    ep = probe_flops(1, 64, {"dim": C, "num_classes": K, "probe": "efficient", "num_queries": M}).fwd
    ap = probe_flops(1, 64, {"dim": C, "num_classes": K, "probe": "attentive"}).fwd
    assert ep < ap


def test_probes_classify_and_cards_build():
    x = torch.randn(4, 10, 32)
    for card in CARDS:
        if card.family != "pooling":
            continue
        probe = card.build(32, 1 if card.name == "efficient-probe" else 4, num_classes=3)
        assert probe(x).shape == (4, 3)


BAD = [
    (lambda: EfficientProbe(32, num_queries=3), "dim // d_out must be a whole multiple of num_queries"),
    (lambda: EfficientProbe(32, d_out=5), "dim // d_out must be a whole multiple of num_queries"),
    (lambda: EfficientProbe(32, num_heads=4), "EfficientProbe attends with one head"),
    (lambda: EfficientProbe(32, num_queries=0), "num_queries must be a positive integer, got 0"),
    (lambda: AttentiveProbe(30, 4), "dim=30 is not divisible by num_heads=4"),
    (lambda: AttentiveProbe(32, 4, backend="flex"), "backend must be one of sdpa, reference, got 'flex'"),
    (lambda: LinearProbe(32, num_classes=0), "num_classes must be a positive integer, got 0"),
    (lambda: LinearProbe(32)(torch.randn(2, 32)), r"x must have shape \(B, N, 32\)"),
    (lambda: EfficientProbe(32)(torch.randn(2, 5, 16)), r"x must have shape \(B, N, 32\)"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        make()
