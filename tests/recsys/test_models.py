"""MQSA-TED, DARE and TIN: each attention part's fast path against its float64 reference (forward
and gradients), holdout checks against the official code's math (written from reading it, in
float64), the models end to end, the cards, and bad inputs."""

import math

import pytest
import torch

from attnkit import cards
from attnkit.models.recsys import (CARDS, DARE, DIN, MQSA, TIN, LQueryBlock, dare_attention, l_query_attention,
                                   l_query_attention_reference, retrieval_recall, target_attention,
                                   target_attention_reference, tin_attention, tin_attention_reference,
                                   transition_counts, transition_distillation_loss, window_mean,
                                   window_mean_reference)

F64 = torch.float64


def _leaf(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _check_grads(fast_fn, ref_fn, inputs, atol=1e-10):
    out, ref = fast_fn(*inputs), ref_fn(*inputs)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-9)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], g)
    grads_ref = torch.autograd.grad(ref, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)


def _front_padded_valid(B, T, lengths):
    return torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None]


# -- MQSA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_mean_matches_reference(window):
    torch.manual_seed(0)
    x, valid = _leaf(3, 9, 4), _front_padded_valid(3, 9, [9, 5, 1])
    _check_grads(lambda a: window_mean(a, valid, window), lambda a: window_mean_reference(a, valid, window), [x])


@pytest.mark.parametrize("num_heads", [1, 2])
def test_l_query_attention_matches_reference(num_heads):
    torch.manual_seed(1)
    q, k, v = _leaf(3, 8, 6), _leaf(3, 8, 6), _leaf(3, 8, 6)
    valid = _front_padded_valid(3, 8, [8, 4, 0])  # the last row has no valid key at all
    _check_grads(lambda *t: l_query_attention(*t, valid, num_heads),
                 lambda *t: l_query_attention_reference(*t, valid, num_heads), [q, k, v])
    assert l_query_attention(q, k, v, valid, num_heads)[2].abs().max() == 0


def _official_mqsa_attention(seq, mask, L, wq, wk, wv, num_heads):
    """The official code's long-query attention (MQSA_TED.py, block_long_query), float64, without its
    layer norms and dropout: shifted sums for the query average, key masks from all-zero rows,
    causality and padding filled with -2**32+1, softmax, query masks from all-zero query rows."""
    B, T, C = seq.shape
    seq_avg, mask_avg = seq.clone(), mask.clone()
    for l in range(1, L):
        seq_avg = seq_avg + torch.cat([torch.zeros(B, l, C, dtype=F64), seq[:, :-l]], 1)
        mask_avg = mask_avg + torch.cat([torch.zeros(B, l, 1, dtype=F64), mask[:, :-l]], 1)
    seq_avg = seq_avg / (mask_avg + 1e-24)
    Q, K, V = seq_avg @ wq, seq @ wk, seq @ wv
    split = lambda t: torch.cat(torch.split(t, C // num_heads, dim=2), dim=0)  # heads to the batch
    Q_, K_, V_ = split(Q), split(K), split(V)
    out = Q_ @ K_.transpose(1, 2) / math.sqrt(C // num_heads)
    key_masks = torch.sign(seq.abs().sum(-1)).repeat(num_heads, 1)[:, None, :].expand_as(out)
    out = torch.where(key_masks == 0, torch.full_like(out, -2.0 ** 32 + 1), out)
    tril = torch.ones(T, T, dtype=F64).tril()
    out = torch.where(tril.expand_as(out) == 0, torch.full_like(out, -2.0 ** 32 + 1), out)
    out = torch.softmax(out, -1)
    query_masks = torch.sign(seq_avg.abs().sum(-1)).repeat(num_heads, 1)[:, :, None]
    out = (out * query_masks) @ V_
    return torch.cat(torch.split(out, B, dim=0), dim=2)


def test_l_query_attention_holdout_against_official_math():
    torch.manual_seed(2)
    B, T, C, H, L = 3, 10, 8, 2, 3
    valid = _front_padded_valid(B, T, [10, 6, 2])  # the official code pads at the front
    seq = torch.randn(B, T, C, dtype=F64) * valid[..., None]
    wq, wk, wv = (torch.randn(C, C, dtype=F64) for _ in range(3))
    official = _official_mqsa_attention(seq, valid[..., None].double(), L, wq, wk, wv, H)
    ours = l_query_attention(window_mean(seq, valid, L) @ wq, seq @ wk, seq @ wv, valid, H)
    torch.testing.assert_close(ours[valid], official[valid], atol=1e-10, rtol=1e-9)


def test_block_and_model_fast_equals_reference():
    torch.manual_seed(3)
    block = LQueryBlock(8, 2, window=3).double()
    ref = LQueryBlock(8, 2, window=3, backend="reference").double()
    ref.load_state_dict(block.state_dict())
    x, valid = torch.randn(2, 7, 8, dtype=F64), _front_padded_valid(2, 7, [7, 3])
    torch.testing.assert_close(block(x, valid), ref(x, valid))
    fast = MQSA(8, 2, num_items=30, max_len=7, dropout=0.0).double()
    slow = MQSA(8, 2, num_items=30, max_len=7, dropout=0.0, backend="reference").double()
    slow.load_state_dict(fast.state_dict())
    items = torch.randint(0, 30, (2, 7))
    items[1, :3] = 30  # padding
    a, b = fast(items), slow(items)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_sasrec_is_the_short_branch_only():
    sasrec = MQSA(8, 2, num_items=20, alpha=1.0)
    assert sasrec.long_blocks is None and sasrec.short_blocks is not None
    assert MQSA(8, 2, num_items=20, alpha=0.0).short_blocks is None


def test_transition_counts_and_ted_loss():
    seqs = torch.tensor([[0, 1, 2, 1], [1, 2, 3, 3]])  # 3 = padding for num_items 3
    counts = transition_counts(seqs, 3)
    expected = torch.zeros(3, 3, dtype=F64)
    expected[0, 1], expected[1, 2], expected[2, 1] = 1, 2, 1
    torch.testing.assert_close(counts, expected)
    # the loss by hand: teacher softmax(row / max / tau), student softmax(e_h E^T sqrt(C) / tau)
    table = torch.randn(3, 4, dtype=F64)
    heads = torch.tensor([0, 1])
    tau = 0.5
    loss = transition_distillation_loss(table, heads, counts, tau)
    by_hand = 0.0
    for h in heads.tolist():
        row = counts[h] / counts[h].max()
        teacher = torch.softmax(row / tau, 0)
        student = torch.log_softmax(table[h] @ table.T * 2.0 / tau, 0)  # sqrt(C) = 2
        by_hand += -(teacher * student).sum() / 2
    torch.testing.assert_close(loss, by_hand)


# -- target attention, DARE, TIN ---------------------------------------------------------------
@pytest.mark.parametrize("num_heads", [1, 2])
def test_target_attention_matches_reference(num_heads):
    torch.manual_seed(4)
    q, k, v = _leaf(4, 6), _leaf(4, 9, 6), _leaf(4, 9, 10)  # value width differs (DARE's tables may)
    valid = torch.rand(4, 9) < 0.7
    valid[3] = False  # no history
    _check_grads(lambda *t: target_attention(*t, valid, num_heads),
                 lambda *t: target_attention_reference(*t, valid, num_heads), [q, k, v])
    assert target_attention(q, k, v, valid, num_heads)[3].abs().max() == 0


def _official_attention(q, k, v, lengths):
    """The official target attention, float64: TIN's target_attention (tin.py: dot product, sequence
    mask filled with -2**32+1, then the 1/sqrt(D) scale, softmax, weighted sum) and DARE's
    attention(attn_func='scaled_dot_product', use_time_mode='add') (the scale first, then the mask;
    identical for valid rows)."""
    scores = (q[:, None, :] * k).sum(-1)  # (B, T)
    mask = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    scores = torch.where(mask, scores, torch.full_like(scores, -2.0 ** 32 + 1)) / math.sqrt(k.shape[-1])
    return torch.softmax(scores, -1)[:, None, :].matmul(v)[:, 0]


def test_dare_attention_holdout_against_official_math():
    torch.manual_seed(5)
    lengths = torch.tensor([9, 4, 1])
    valid = torch.arange(9)[None, :] < lengths[:, None]
    qa, ka, vr = torch.randn(3, 6, dtype=F64), torch.randn(3, 9, 6, dtype=F64), torch.randn(3, 9, 12, dtype=F64)
    torch.testing.assert_close(dare_attention(qa, ka, vr, valid), _official_attention(qa, ka, vr, lengths))
    torch.testing.assert_close(dare_attention(qa, ka, vr, valid, reference=True), _official_attention(qa, ka, vr, lengths))


def test_tin_attention_holdout_against_official_math():
    torch.manual_seed(6)
    lengths = torch.tensor([7, 3])
    valid = torch.arange(7)[None, :] < lengths[:, None]
    item, target = torch.randn(2, 7, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    pos, pos_target = torch.randn(2, 7, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    # the official code: query i_emb + pos_emb, keys and values h_emb + h_pos; the MLP then sees u * i_emb
    pooled = _official_attention(target + pos_target, item + pos, item + pos, lengths)
    expected = pooled * (target + pos_target)
    torch.testing.assert_close(tin_attention(target, item, pos_target, pos, valid), expected)
    torch.testing.assert_close(tin_attention_reference(target, item, pos_target, pos, valid), expected)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_tin_attention_matches_reference(num_heads):
    torch.manual_seed(7)
    t, e, pt, pe = _leaf(3, 8), _leaf(3, 5, 8), _leaf(3, 8), _leaf(3, 5, 8)
    valid = torch.rand(3, 5) < 0.8
    valid[:, 0] = True
    _check_grads(lambda *x: tin_attention(*x, valid, num_heads), lambda *x: tin_attention_reference(*x, valid, num_heads),
                 [t, e, pt, pe])


@pytest.mark.parametrize("cls, kwargs", [(DARE, {}), (DARE, {"decoupled": False}), (TIN, {}),
                                         (DARE, {"num_heads": 2, "attention_dim": 4})])
def test_ctr_models_fast_equals_reference(cls, kwargs):
    torch.manual_seed(8)
    fast = cls(8, num_items=20, num_time_buckets=5, **kwargs).double()
    slow = cls(8, num_items=20, num_time_buckets=5, backend="reference", **kwargs).double()
    slow.load_state_dict(fast.state_dict())
    hist, buckets, cand = torch.randint(0, 20, (4, 6)), torch.randint(0, 5, (4, 6)), torch.randint(0, 20, (4,))
    valid = torch.rand(4, 6) < 0.7
    a, b = fast(hist, buckets, cand, valid), slow(hist, buckets, cand, valid)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_dare_tables_are_decoupled_or_shared():
    dare, shared = DARE(8, num_items=10), DARE(8, num_items=10, decoupled=False)
    assert dare.attn_item is not dare.repr_item and shared.attn_item is shared.repr_item
    assert sum(p.numel() for p in dare.parameters()) > sum(p.numel() for p in shared.parameters())
    # decoupled: the representation table gets no gradient through the attention weights only
    hist, buckets, cand = torch.randint(0, 10, (2, 5)), torch.randint(0, 8, (2, 5)), torch.randint(0, 10, (2,))
    w = dare.attention_weights(hist, buckets, cand)
    assert w.shape == (2, 5) and torch.allclose(w.sum(1), torch.ones(2))


def test_retrieval_recall_by_hand():
    relevance = torch.tensor([[0.9, 0.0, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0], [0.2, 0.3, 0.0, 0.0]])
    weights = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0.1, 0.6, 0.2, 0.1]])
    # row 0: true top-2 {0, 2}, learned top-2 {0, 1} -> 1/2; row 1 skipped (nothing relevant);
    # row 2: true top-2 {1, 0}, learned top-2 {1, 2} -> 1/2
    assert retrieval_recall(weights, relevance, 2) == pytest.approx(0.5)
    assert retrieval_recall(weights, relevance, 4) == pytest.approx((1.0 + 1.0) / 2)


def test_din_weights_are_unnormalised_and_masked():
    din = DIN(8, num_items=10)
    hist, buckets, cand = torch.randint(0, 10, (2, 5)), torch.zeros(2, 5, dtype=torch.long), torch.randint(0, 10, (2,))
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    w = din.attention_weights(hist, buckets, cand, valid)
    assert (w[1, 2:] == 0).all() and not torch.allclose(w[0].sum(), torch.tensor(1.0))


# -- cards ---------------------------------------------------------------------------------------
def test_cards():
    assert "recsys" in cards.KINDS
    assert [c.name for c in CARDS] == ["mqsa-ted", "sasrec", "dare", "dare-shared", "tin", "din"]
    assert all(c.kind == "recsys" and c.family == "recsys" for c in CARDS)
    for card in CARDS:
        model = card.build(8, 1, num_items=12)
        assert card.flop_count(2, 10, 8, 1, num_items=12).fwd > 0
        if isinstance(model, MQSA):
            assert model(torch.randint(0, 12, (2, 5))).shape == (2, 5, 12)
        else:
            out = model(torch.randint(0, 12, (2, 5)), torch.randint(0, 8, (2, 5)), torch.randint(0, 12, (2,)))
            assert out.shape == (2,)
    assert CARDS[0].build(8, 1, num_items=12).alpha == 0.5 and CARDS[1].build(8, 1, num_items=12).alpha == 1.0
    with pytest.raises(ValueError, match=r"dare does not take option\(s\) \['window'\]"):
        CARDS[2].build(8, 1, window=3)


# -- bad inputs ----------------------------------------------------------------------------------
BAD_BUILDS = [
    (lambda: MQSA(8, 3), "num_heads must be a positive integer dividing dim=8, got 3"),
    (lambda: MQSA(8, 2, window=0), r"window must be an integer >= 1 \(the number of items pooled"),
    (lambda: MQSA(8, 2, alpha=1.5), r"alpha must be a number in \[0, 1\]"),
    (lambda: MQSA(8, 2, num_items=0), "num_items must be a positive integer, got 0"),
    (lambda: LQueryBlock(8, 2, backend="flex"), "backend must be 'sdpa' or 'reference', got 'flex'"),
    (lambda: DARE(8, decoupled=False, attention_dim=4), r"attention_dim must equal dim \(8\) when decoupled=False"),
    (lambda: DARE(8, decoupled="yes"), "decoupled must be True or False, got 'yes'"),
    (lambda: DARE(8, 3), "num_heads must divide dim=8 and attention_dim=8, got 3"),
    (lambda: TIN(8, 3), "num_heads must divide dim=8, got 3"),
    (lambda: TIN(8, num_time_buckets=0), "num_time_buckets must be a positive integer, got 0"),
    (lambda: DIN(8, 2), r"num_heads must be 1 \(DIN's activation unit"),
    (lambda: DIN(8, use_time=1), "use_time must be True or False, got 1"),
]


@pytest.mark.parametrize("build, match", BAD_BUILDS, ids=[m[:30] for _, m in BAD_BUILDS])
def test_bad_options(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_call_inputs():
    mqsa = MQSA(8, 2, num_items=10, max_len=6)
    with pytest.raises(ValueError, match=r"items must be an integer tensor \[B, T\], got torch.float32"):
        mqsa(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="items has 7 positions, more than max_len=6"):
        mqsa(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"items must lie in \[0, 10\] \(10 = padding\), got values in \[0, 11\]"):
        mqsa(torch.tensor([[0, 11]]))
    tin = TIN(8, num_items=10, num_time_buckets=4)
    hist, buckets, cand = torch.randint(0, 10, (2, 5)), torch.randint(0, 4, (2, 5)), torch.randint(0, 10, (2,))
    with pytest.raises(ValueError, match=r"buckets must lie in \[0, 3\], got values in \[0, 4\]"):
        tin(hist, buckets.clone().fill_(4).index_fill_(1, torch.tensor([0]), 0), cand)
    with pytest.raises(ValueError, match=r"candidate must be \[B\] = \[2\], got \(3,\)"):
        tin(hist, buckets, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="buckets must be an integer tensor shaped like history"):
        tin(hist, buckets[:, :3], cand)
    with pytest.raises(ValueError, match="valid must be a bool tensor shaped like history"):
        tin(hist, buckets, cand, torch.ones(2, 5))
    q, k = torch.randn(2, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="query must be \\[B, D\\], keys and values \\[B, T, D\\]"):
        target_attention(q, k[0], k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match keys"):
        target_attention(torch.randn(2, 3), k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[B, T\] = \(2, 5\)"):
        target_attention(q, k, k, torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_heads must be a positive integer dividing the key width 4"):
        target_attention(q, k, k, torch.ones(2, 5, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="target_time must be shaped like target"):
        tin_attention(q, k, q[:, :2], k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries, keys and values must all be"):
        l_query_attention(k, k, k[:, :3], torch.ones(2, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="tau must be a positive number, got 0"):
        transition_distillation_loss(torch.randn(3, 4), torch.tensor([0]), torch.zeros(3, 3), 0)
    with pytest.raises(ValueError, match=r"counts must be \[N, N\] with N = 3 items"):
        transition_distillation_loss(torch.randn(3, 4), torch.tensor([0]), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="query, keys and values must share one dtype, got torch.float64"):
        target_attention(q.double(), k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"sequences must lie in \[0, 10\] \(10 = padding\), got values in \[0, 12\]"):
        transition_counts(torch.tensor([[0, 12]]), 10)
    with pytest.raises(ValueError, match="sequences must be an integer tensor"):
        transition_counts(torch.zeros(2, 3), 10)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\], got 5"):
        retrieval_recall(torch.zeros(2, 4), torch.zeros(2, 4), 5)


def test_din_flops_count_its_activation_unit():
    din, tin = CARDS[5], CARDS[4]
    assert din.flop_count(2, 10, 8, 1).attention_fwd == 2.0 * 2 * 10 * (4 * 8 * 36 + 36) + 2.0 * 2 * 10 * 8
    assert din.flop_count(2, 10, 8, 1).attention_fwd > 10 * tin.flop_count(2, 10, 8, 1).attention_fwd
