"""SQA: the layer against the formula (Hq heads of width C/H; forward, every gradient), the
presets' head counts and FLOPs, KV-cache size, bad inputs."""

import math

import pytest
import torch

import attnkit
from attnkit.layers import SparseQueryAttention

from layer_checks import assert_forward_and_grads_match


def reference(layer, x):
    B, T, C = x.shape
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, C // layer.model_heads
    w = layer.qkv_proj.weight
    q = (x @ w[: Hq * D].T).view(B, T, Hq, D)
    k = (x @ w[Hq * D : (Hq + Hkv) * D].T).view(B, T, Hkv, D)
    v = (x @ w[(Hq + Hkv) * D :].T).view(B, T, Hkv, D).transpose(1, 2)
    q, k = layer.rope(q.transpose(1, 2), k.transpose(1, 2))
    out = []
    for h in range(Hq):
        g = h // (Hq // Hkv)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out.append(scores.softmax(-1) @ v[:, g])
    return torch.cat(out, dim=-1) @ layer.o_proj.weight.T


@pytest.mark.parametrize("hq, hkv", [(4, 2), (4, 4), (2, 2), (2, 1)])
def test_matches_formula(hq, hkv):
    torch.manual_seed(0)
    layer = SparseQueryAttention(64, 8, num_query_heads=hq, num_kv_heads=hkv).double()
    assert layer.head_dim == 8 and layer.o_proj.in_features == hq * 8
    assert_forward_and_grads_match(layer, lambda x: reference(layer, x), torch.randn(2, 9, 64, dtype=torch.float64))


@pytest.mark.parametrize("name, hq, hkv", [("sqa", 8, 4), ("ssqa", 8, 8), ("xsqa", 4, 4), ("xsmqa", 4, 1)])
def test_presets(name, hq, hkv):
    layer = attnkit.build(name, dim=256, num_heads=16)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (hq, hkv, 16)
    mha = attnkit.get("mha").flop_count(1, 4096, 256, 16)
    sqa = attnkit.get(name).flop_count(1, 4096, 256, 16)
    assert sqa.attention_fwd == pytest.approx(mha.attention_fwd * hq / 16)  # core FLOPs scale with Hq / H
    state = layer.init_state(1)
    layer(torch.randn(1, 5, 256), state)
    assert state.nbytes() == 5 * 2 * hkv * 16 * 4  # the cache scales with Hkv


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_query_heads=16), "must be <= num_heads"),
    (dict(num_query_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=4), "head_dim is not accepted"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseQueryAttention(64, 8, **kwargs)
