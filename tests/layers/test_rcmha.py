"""RCMHA: layer == the formula with explicit loops (convolution, content and position terms;
forward and every gradient), decode == full forward (the conv tail), bad inputs."""

import math

import pytest
import torch

from attnkit.layers import RelativeConvAttention
import attnkit.layers.rcmha as rcmha_module
from attnkit.layers.rcmha import bias_row_chunks, sinusoid

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    layer = RelativeConvAttention(32, 4, **kwargs).double()
    with torch.no_grad():
        layer.conv.weight.normal_(0, 0.5)
        layer.content_bias.normal_(0, 0.5)
        layer.position_bias.normal_(0, 0.5)
    return layer


def reference(layer, x):
    B, T, C = x.shape
    H, Hkv, D, K = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.kernel_size
    proj = layer.qkv_proj(x)  # (B, T, ch)
    w = layer.conv.weight[:, 0]  # (ch, K)
    conv = torch.stack([sum(w[:, K - 1 - s] * proj[:, t - s] for s in range(K) if t - s >= 0) for t in range(T)], 1)
    q, k, v = conv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    r = layer.pos_proj(sinusoid(torch.arange(T), C).double()).view(T, H, D)  # r_m
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        g = h // (H // Hkv)
        for i in range(T):
            scores = torch.stack([
                ((q[:, i, h] + layer.content_bias[h]) * k[:, j, g]).sum(-1)
                + ((q[:, i, h] + layer.position_bias[h]) * r[i - j, h]).sum(-1)
                for j in range(i + 1)
            ], dim=-1) / math.sqrt(D)  # (B, i+1)
            out[:, i, h] = (scores.softmax(-1)[..., None] * v[:, : i + 1, g]).sum(1)
    return layer.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("num_kv_heads, kernel_size", [(4, 3), (2, 2), (4, 1)])
def test_matches_formula(num_kv_heads, kernel_size):
    layer = build(num_kv_heads=num_kv_heads, kernel_size=kernel_size)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: reference(layer, x), x)


@pytest.mark.parametrize("chunks", [[1] * 11, [4, 7], [2, 1, 1, 7]])
def test_decode_equals_full_forward(chunks):
    layer = build(num_kv_heads=2)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_convolution_starts_as_identity():
    torch.manual_seed(0)
    layer = RelativeConvAttention(32, 4).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    q, k, v = layer.project(x)
    q0, k0, v0 = layer.qkv_proj(x).split((32, 32, 32), dim=-1)
    torch.testing.assert_close(q, q0.view(1, 5, 4, 8).transpose(1, 2))


@pytest.mark.parametrize("kwargs, match", [(dict(rope=True), "rope"), (dict(kernel_size=0), "kernel_size"),
                                           (dict(pattern="full"), "causal")])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelativeConvAttention(32, 4, **kwargs)


@pytest.mark.parametrize("batch_heads, q_len, q_offset, kv_len, limit", [
    (64, 8192, 0, 8192, 2**30), (16, 32768, 0, 32768, 2**30), (4, 10, 0, 10, 100), (8, 7, 20, 27, 300),
    (2, 5, 0, 5, 1)])
def test_bias_row_chunks_stay_below_the_index_limit(batch_heads, q_len, q_offset, kv_len, limit):
    """The H200 crash (B=4, H=16 at 8k: one 4.3e9-element bias read past 32-bit indices): every
    chunk's causal bias fits the limit (or is a single row), and the chunks tile the rows."""
    chunks = bias_row_chunks(batch_heads, q_len, q_offset, kv_len, max_elements=limit)
    assert chunks[0][0] == 0 and chunks[-1][1] == q_len
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, stop in chunks:
        size = batch_heads * (stop - start) * min(kv_len, q_offset + stop)
        assert size <= limit or stop - start == 1
        assert size < 2**31
    assert bias_row_chunks(4 * 16, 8192, 0, 8192) != [(0, 8192)]  # the crashing shape is split


@pytest.mark.parametrize("limit", [40, 200])
def test_row_chunks_equal_the_formula(monkeypatch, limit):
    """The layer in row chunks (forced small) equals the loop formula, forward and every gradient."""
    monkeypatch.setattr(rcmha_module, "MAX_BIAS_ELEMENTS", limit)
    layer = build(num_kv_heads=2)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    assert len(bias_row_chunks(2 * 4, 8, 0, 8)) > 1
    assert_forward_and_grads_match(layer, lambda x: reference(layer, x), x)
    torch.testing.assert_close(decode_in_chunks(layer, x, [3, 5]), reference(layer, x))
