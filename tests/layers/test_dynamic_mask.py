"""DMA: layer == the paper's rule written per row (forward, every gradient), decode == full
forward with the selection active, packed documents, A = 0 start, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.layers import DynamicMaskAttention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(keep_keys=4, num_kv_heads=2, **kwargs):
    torch.manual_seed(0)
    layer = DynamicMaskAttention(32, 4, num_kv_heads=num_kv_heads, keep_keys=keep_keys, **kwargs).double()
    with torch.no_grad():
        layer.A.normal_(0, 1.0)  # A starts at 0; a trained A makes the bias (and W_dt's gradient) matter
    return layer


def reference(layer, x):
    """Row by row: the keep_keys largest value-derived biases among keys <= i, scores + bias, softmax."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.project(x)
    q, k = layer.rope(q, k)
    delta = F.softplus(v.transpose(1, 2).reshape(B, T, Hkv * D) @ layer.dt_proj.weight.T)  # (B, T, Hkv)
    bias = layer.A * delta  # (B, T, Hkv)
    out = torch.zeros(B, H, T, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(T):
                keys = list(range(i + 1))
                if len(keys) > layer.keep_keys:
                    ordered = sorted(keys, key=lambda j: float(bias[b, j, g]), reverse=True)
                    kth = float(bias[b, ordered[layer.keep_keys - 1], g])
                    keys = [j for j in keys if float(bias[b, j, g]) >= kth]
                scores = torch.stack([q[b, h, i] @ k[b, g, j] / math.sqrt(D) + bias[b, j, g] for j in keys])
                weights = scores.softmax(0)
                out[b, h, i] = sum(w * v[b, g, j] for w, j in zip(weights, keys))
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("keep_keys, num_kv_heads", [(4, 2), (3, 4), (100, 2)])
def test_matches_rule(keep_keys, num_kv_heads):
    layer = build(keep_keys, num_kv_heads)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: reference(layer, x), x)


def test_selection_changes_the_output():
    layer = build(keep_keys=3)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    wide = build(keep_keys=100)
    assert not torch.allclose(layer(x), wide(x))
    torch.testing.assert_close(layer(x[:, :3]), wide(x[:, :3]))  # rows that see <= keep_keys keys


@pytest.mark.parametrize("chunks", [[1] * 14, [6, 1, 7], [14]])
def test_decode_equals_full_forward(chunks):
    layer = build(keep_keys=4)
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_packed_documents_equal_separate_sequences():
    layer = build(keep_keys=3)
    seqs = [torch.randn(1, n, 32, dtype=torch.float64) for n in (6, 8)]
    ids = torch.tensor([[0] * 6 + [1] * 8])
    torch.testing.assert_close(layer(torch.cat(seqs, 1), document_ids=ids), torch.cat([layer(s) for s in seqs], 1))


def test_starts_as_plain_attention():
    torch.manual_seed(0)
    layer = DynamicMaskAttention(32, 4, keep_keys=1000).double()
    assert torch.equal(layer.A, torch.zeros(4))
    from attnkit.layers import MultiHeadAttention

    plain = MultiHeadAttention(32, 4).double()
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("S,T,keep", [(700, 300, 64), (700, 65, 64), (300, 300, 299), (300, 300, 1), (2048, 2048, 512)])
def test_causal_thresholds_equal_the_generic_rule(S, T, keep):
    """The running top-k for causal rows gives the same thresholds as ranking every allowed key
    per row (the generic path, taken here through a window wider than the sequence); ties kept."""
    from attnkit import patterns as P
    from attnkit.layers.dynamic_mask import kept_key_thresholds

    bias = torch.randn(2, 3, S, generator=torch.Generator().manual_seed(S + T)).round(decimals=1)  # many ties
    fast = kept_key_thresholds(bias, P.causal(), keep, T, S - T, rows_per_chunk=128)
    generic = kept_key_thresholds(bias, P.sliding_window(10**9), keep, T, S - T)
    assert torch.equal(fast, generic)
    assert torch.isinf(fast[..., : max(0, keep - (S - T))]).all()  # rows with at most keep keys keep them all


def test_causal_thresholds_random_shapes_and_offsets():
    """Queries anywhere in the keys (q_offset below S - T), chunks down to one row, ties."""
    from attnkit import patterns as P
    from attnkit.layers.dynamic_mask import kept_key_thresholds

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        S = int(torch.randint(1, 400, (1,), generator=g))
        T = int(torch.randint(min(65, S), S + 1, (1,), generator=g))  # more than 64 rows: the rank-count path
        q_offset = int(torch.randint(0, S - T + 1, (1,), generator=g))
        keep = int(torch.randint(1, 450, (1,), generator=g))
        bias = torch.randn(2, 2, S, generator=g).round(decimals=int(torch.randint(0, 3, (1,), generator=g)))
        rows = int(torch.randint(1, 80, (1,), generator=g))
        fast = kept_key_thresholds(bias, P.causal(), keep, T, q_offset, rows_per_chunk=rows)
        assert torch.equal(fast, kept_key_thresholds(bias, P.sliding_window(10**9), keep, T, q_offset)), (S, T, q_offset, keep)


@pytest.mark.parametrize("S,T,keep,group,expect_full", [(700, 300, 160, 2, True), (300, 300, 40, 1, False),
                                                       (1100, 1100, 200, 2, True)])
def test_kept_keys_block_mask_covers_the_mask(S, T, keep, group, expect_full):
    """The closed-form block mask visits every key block holding a kept pair and calls full only
    blocks whose every pair is kept; FlexAttention's forward on it equals the reference."""
    from attnkit import patterns as P
    from attnkit.layers.dynamic_mask import _KeptKeys, kept_key_thresholds
    from attnkit.ops import attend, attend_reference

    B, Hkv = 2, 2
    H = Hkv * group
    g = torch.Generator().manual_seed(S)
    bias = torch.randn(B, Hkv, S, generator=g)
    bias[:, :, 128:256] += 10.0  # one block of strong keys: full for the later rows (they keep it whole)
    pattern = _KeptKeys(P.causal(), bias, kept_key_thresholds(bias, P.causal(), keep, T, S - T), S - T, group)
    bm = pattern.flex_block_mask(B, H, T, S, S - T, "cpu", None)
    allowed = pattern.dense(T, S, q_offset=S - T, batch=B, heads=H)
    nq, nk = -(-T // 128), -(-S // 128)
    pairs = F.pad(allowed, (0, nk * 128 - S, 0, nq * 128 - T)).view(B, H, nq, 128, nk, 128)
    real = F.pad(torch.ones(T, S, dtype=torch.bool), (0, nk * 128 - S, 0, nq * 128 - T)).view(nq, 128, nk, 128)
    visited = bm.to_dense().bool()
    full = torch.zeros_like(visited)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                full[b, h, i, bm.full_kv_indices[b, h, i, : bm.full_kv_num_blocks[b, h, i]].long()] = True
    assert not (pairs.any(-1).any(-2) & ~visited).any()
    assert not (full & ~(pairs | ~real).all(-1).all(-2)).any()
    assert full.any() == expect_full
    q, k, v = (torch.randn(B, n, L, 16, generator=g) for n, L in ((H, T), (Hkv, S), (Hkv, S)))

    def add_bias(score, b, h, q_pos, k_pos):
        return score + bias[b, h // group, k_pos]

    with torch.no_grad():
        out = attend(q, k, v, pattern=pattern, score_mod=add_bias, backend="flex")
    ref = attend_reference(q.double(), k.double(), v.double(), pattern=pattern, score_mod=add_bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(keep_keys=0), "keep_keys"), (dict(pattern="full"), "causal")])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicMaskAttention(32, 4, **kwargs)


@pytest.mark.cuda
def test_cuda_fp32_matches_reference_backend():
    """FlexAttention with the captured bias (score_mod, with gradients) and the threshold mask.
    float32, not bf16: bf16 rounding of the bias would move keys across the top-k boundary."""
    torch.manual_seed(0)
    fast = DynamicMaskAttention(256, 4, num_kv_heads=2, keep_keys=64).cuda()
    with torch.no_grad():
        fast.A.normal_(0, 1.0)
    ref = DynamicMaskAttention(256, 4, num_kv_heads=2, keep_keys=64, backend="reference").cuda().double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 300, 256, device="cuda")
    y = fast(x)
    y_ref = ref(x.double())
    assert (y.double() - y_ref).norm() / y_ref.norm() < 1e-3
    g = torch.randn_like(y_ref)
    y.backward(g.float())
    y_ref.backward(g)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert (a.grad.double() - b.grad).norm() / b.grad.norm() < 1e-3, name
