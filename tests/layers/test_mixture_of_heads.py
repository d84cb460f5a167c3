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


def _gathered_rows(picked: torch.Tensor) -> torch.Tensor:
    """The MoH layout: each (b, h)'s picked positions in order, -1 padding at the end."""
    counts = picked.sum(-1)
    M = int(counts.max())
    order = torch.argsort((~picked).to(torch.int8), dim=-1, stable=True)[..., :M]
    return torch.where(torch.arange(M) < counts[..., None], order, torch.full_like(order, -1))


@pytest.mark.parametrize("block", [None, 16, (32, 16)])
def test_query_positions_block_mask_closed_form(block):
    """The closed-form FlexAttention block mask has exactly create_block_mask's partial and full
    blocks for MoH's sorted rows, and gives the same attention for unsorted rows too."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    B, H, T = 2, 3, 200
    rows = _gathered_rows(torch.rand(B, H, T) < 0.55)
    M = rows.shape[-1]
    pattern = AtQueryPositions(causal(), rows)
    ours = pattern.flex_block_mask(B, H, M, T, 0, "cpu", block)
    ref = create_block_mask(pattern.mask_mod(0), B, H, M, T, device="cpu", **({"BLOCK_SIZE": block} if block else {}))
    for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
        assert torch.equal(a, b)
    assert ours.full_kv_num_blocks.sum() > 0 or block is None  # small blocks: some blocks are full
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())
    unsorted = AtQueryPositions(causal(), torch.randint(-1, T, (B, H, 40)))
    q, k, v = torch.randn(B, H, 40, 16), torch.randn(B, H, T, 16), torch.randn(B, H, T, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=unsorted.flex_block_mask(B, H, 40, T, 0, "cpu", block))
    dense = unsorted.dense(40, T, q_offset=0, batch=B, heads=H)
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~dense, float("-inf")).softmax(-1).nan_to_num()
    torch.testing.assert_close(out, scores @ v, atol=1e-5, rtol=1e-5)


def test_query_positions_block_mask_only_for_causal():
    rows = torch.tensor([[[0, 3, -1]]])
    from attnkit.patterns import sliding_window

    assert AtQueryPositions(sliding_window(2), rows).flex_block_mask(1, 1, 3, 5, 0, "cpu", None) is None
    assert AtQueryPositions(causal(), rows).flex_block_mask(1, 1, 3, 5, 1, "cpu", None) is None  # offset rows


def test_flex_path_matches_formula():
    """The selected-heads path through FlexAttention (the CUDA path; eager on CPU, forward only)
    with the closed-form block mask."""
    import warnings

    layer = build(backend="flex").float()
    x = torch.randn(2, 40, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(layer(x), formula(layer, x), atol=1e-5, rtol=1e-4)
