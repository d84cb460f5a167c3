"""MoH: gates as the paper's formulas, the layer == per-head formula (forward and every
gradient, router included), selected-heads path == all-heads path, decode == full
forward, load-balance loss, bad inputs."""

import pytest
import torch

from attnkit.layers import MixtureOfHeadsAttention
from attnkit.patterns import AtQueryPositions, causal

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    return MixtureOfHeadsAttention(32, 8, **{"shared_heads": 2, "active_heads": 3, **kwargs}).double()


def formula(layer, x):
    """Every head computed in full, each token's head outputs weighted by its gates."""
    B, T, _ = x.shape
    H, Hkv, D, S, k = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.shared_heads, layer.active_heads
    a = torch.softmax(layer.router(x), -1)  # (B, T, R)
    kth = a.topk(k, -1).values[..., -1:]
    kept = torch.where(a >= kth, a, torch.zeros_like(a))
    routed = kept / kept.sum(-1, keepdim=True) * k
    alpha = torch.softmax(layer.group_router(x), -1) * 2
    shared = torch.softmax(layer.shared_router(x), -1) * S
    gates = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed], -1)  # (B, T, H)
    q, kk, v = layer.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), -1)
    q, kk = layer.rope(q.view(B, T, H, D).transpose(1, 2), kk.view(B, T, Hkv, D).transpose(1, 2))
    kk = kk.repeat_interleave(H // Hkv, 1)
    v = v.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    P = (q @ kk.transpose(-1, -2) / D**0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    heads = (P @ v) * gates.transpose(1, 2)[..., None]  # (B, H, T, D)
    return layer.o_proj(heads.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("options", [{}, {"num_kv_heads": 4}, {"sparse": False}, {"backend": "reference"}])
def test_matches_formula(options):
    layer = build(**options)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: formula(layer, x), x)


def test_gate_structure():
    layer = build()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    gates, chosen = layer.gates(x)
    assert chosen.sum(-1).eq(3).all()  # k routed heads per token
    routed = gates[..., 2:]
    assert (routed[~chosen] == 0).all()
    mix = torch.softmax(layer.group_router(x), -1) * 2
    torch.testing.assert_close(routed.sum(-1), 3 * mix[..., 1])  # renormalised over the kept heads, times k
    torch.testing.assert_close(gates[..., :2].sum(-1), 2 * mix[..., 0])  # shared softmax times S


def test_load_balance_loss():
    layer = build(balance_weight=0.5).train()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    layer(x)
    probs = torch.softmax(layer.router(x), -1).flatten(0, 1)
    f = layer.last_routing.flatten(0, 1).double().mean(0)
    torch.testing.assert_close(layer.aux_loss, 0.5 * 6 * (f * probs.mean(0)).sum())
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 6], [3, 1, 6]])
def test_decode_equals_full_forward(chunks):
    layer = build(num_kv_heads=4)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_no_shared_heads_and_all_active():
    for options in ({"shared_heads": 0, "active_heads": 2}, {"shared_heads": 1, "active_heads": 7}):
        layer = build(**options)
        sparse_out = layer(torch.randn(1, 6, 32, dtype=torch.float64))
        assert sparse_out.shape == (1, 6, 32)


def test_query_positions_pattern():
    rows = torch.tensor([[[0, 3, -1]]])  # one batch item, one head: tokens 0 and 3, one padding row
    mask = AtQueryPositions(causal(), rows).dense(3, 5, q_offset=0)
    assert mask[0, 0].tolist() == [[True, False, False, False, False], [True] * 4 + [False], [False] * 5]


@pytest.mark.parametrize("kwargs, match", [(dict(shared_heads=8), "shared_heads"), (dict(active_heads=7), "active_heads"),
                                           (dict(active_heads=0), "active_heads"), (dict(balance_weight=-1.0), "balance_weight"),
                                           (dict(pattern="full"), "causal")])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfHeadsAttention(32, 8, **{"shared_heads": 2, **kwargs})
