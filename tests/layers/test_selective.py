"""Selective attention: layer == the formula written out (forward, all gradients), the
official form == the official code's formula in float64, decode == full forward, packed
documents restart positions, parameter budget, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.layers import SelectiveAttention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    layer = SelectiveAttention(32, 4, **kwargs).double()
    with torch.no_grad():  # non-zero token terms so that every parameter matters
        layer.query_token.normal_(0, 0.5)
        layer.value_token.normal_(0, 0.5)
        layer.position_scale.normal_(0, 1.0)
    return layer


def reference(layer, x):
    """SSA by the formula: scores tau_q(i) q_i.k_j / sqrt(D), causal softmax, values tau_v(j) v_j."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.project(x)
    q, k = layer.rope(q, k)
    out = torch.zeros(B, H, T, D, dtype=x.dtype)
    for h in range(H):
        g = h // (H // Hkv)
        for i in range(T):
            tau_q = 1 + torch.sigmoid(layer.position_scale[h]) * math.log(i + 1)
            tau_q = tau_q + torch.tanh(F.gelu(layer.project(x)[0][:, h, i]) @ layer.query_token[h])  # [B]
            scores = (q[:, h, i, None, :] * k[:, g, : i + 1]).sum(-1) * tau_q[:, None] / math.sqrt(D)  # [B, i+1]
            tau_v = 1 + torch.tanh(F.gelu(layer.project(x)[2][:, g, : i + 1]) @ layer.value_token[g])  # [B, i+1]
            out[:, h, i] = (scores.softmax(-1)[..., None] * tau_v[..., None] * v[:, g, : i + 1]).sum(1)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_matches_formula(num_kv_heads):
    layer = build(num_kv_heads=num_kv_heads)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: reference(layer, x), x)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 7], [3, 1, 8]])
def test_decode_equals_full_forward(chunks):
    layer = build(num_kv_heads=2)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_packed_documents_restart_positions():
    layer = build()
    seqs = [torch.randn(1, n, 32, dtype=torch.float64) for n in (4, 7)]
    ids = torch.tensor([[0] * 4 + [1] * 7])
    packed = layer(torch.cat(seqs, dim=1), document_ids=ids)
    torch.testing.assert_close(packed, torch.cat([layer(s) for s in seqs], dim=1))


def test_extra_parameters_under_half_a_percent():
    layer = SelectiveAttention(2048, 16)
    extra = sum(p.numel() for n, p in layer.named_parameters() if n in ("query_token", "value_token", "position_scale"))
    assert extra / sum(p.numel() for p in layer.parameters()) < 0.005


def official_formula(layer, x):
    """The official PTS attention (umich-sota/selective_attention, ``gpt_2_PTS.py``), float64:
    ``att = q.k / sqrt(D) * (1 + exp(-exp(beta)) * log(i))`` with ``i = 1..T`` the query's row,
    causal mask, softmax, ``att @ v``; nothing else is scaled."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.project(x)
    q, k = layer.rope(q, k)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    row = torch.arange(1, T + 1, dtype=torch.float64)[:, None]  # (T, 1)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = att * (1 + torch.exp(-torch.exp(layer.position_beta)) * torch.log(row))
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
    out = att.softmax(-1) @ v  # (B, H, T, D)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_official_form_matches_the_official_formula(num_kv_heads):
    torch.manual_seed(0)
    layer = SelectiveAttention(32, 4, num_kv_heads=num_kv_heads, form="official").double()
    assert float(layer.position_beta) == 1.5
    with torch.no_grad():
        layer.position_beta.fill_(-0.5)  # a temperature far from 1, so that a wrong form shows
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: official_formula(layer, x), x)
    new = {n for n, _ in layer.named_parameters()} - {n for n, _ in SelectiveAttention(32, 4).named_parameters()}
    assert [n for n, _ in layer.named_parameters() if n in ("query_token", "value_token", "position_scale")] == []
    assert new == {"position_beta"} and layer.position_beta.shape == ()


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 6]])
def test_official_form_decode_equals_full_forward(chunks):
    torch.manual_seed(0)
    layer = SelectiveAttention(32, 4, num_kv_heads=2, form="official", position_init=-0.5).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="form must be one of"):
        SelectiveAttention(32, 4, form="paper")
    with pytest.raises(ValueError, match="position_init"):
        SelectiveAttention(32, 4, position_init="1.5")
    with pytest.raises(ValueError, match="num_kv_heads"):
        SelectiveAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="width"):
        SelectiveAttention(32, 4)(torch.randn(1, 3, 16))
