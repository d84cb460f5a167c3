"""BAM attention experts: the fused layer == the experts one by one (forward and every
gradient, with and without shared K/V), decode == full forward, upcycling reproduces the
dense layers (one expert: exactly; E experts with a zero router: their average), bad inputs."""

import pytest
import torch

from attnkit.layers import AttentionExperts, MultiHeadAttention, upcycle_attention, upcycle_models
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    layer = AttentionExperts(32, 4, **{"num_experts": 3, **kwargs}).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("share_kv", [False, True])
def test_fused_equals_experts_one_by_one(share_kv):
    layer = build(share_kv=share_kv)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, layer.reference, x)
    assert layer.last_routing.shape == (2, 9, 3)


@pytest.mark.parametrize("share_kv", [False, True])
def test_decode_equals_full_forward(share_kv):
    layer = build(share_kv=share_kv)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, [3, 1, 6]), layer(x))
    assert layer.init_state(1).num_kv_heads == (4 if share_kv else 12)  # shared K/V: one MHA's cache


def dense_layers(n):
    torch.manual_seed(1)
    return [MultiHeadAttention(32, 4).double() for _ in range(n)]


def test_upcycle_one_expert_is_the_dense_layer():
    (dense,) = dense_layers(1)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    for share_kv in (False, True):
        torch.testing.assert_close(upcycle_attention([dense], share_kv=share_kv)(x), dense(x))


def test_upcycled_mixture_starts_as_the_average():
    dense = dense_layers(3)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    mixed = upcycle_attention(dense)
    torch.testing.assert_close(mixed(x), sum(d(x) for d in dense) / 3)
    for e, d in enumerate(dense):  # expert e holds dense layer e's weights
        w = mixed.expert_weights(e)
        torch.testing.assert_close(w["q"], d.qkv_proj.weight[:32])
        torch.testing.assert_close(w["o"], d.o_proj.weight)
    shared = upcycle_attention(dense, share_kv=True)
    torch.testing.assert_close(shared.expert_weights(0)["k"], sum(d.qkv_proj.weight[32:64] for d in dense) / 3)


def test_upcycle_models():
    torch.manual_seed(2)
    models = [DecoderLM(vocab_size=64, dim=32, num_layers=2, num_heads=4).double() for _ in range(2)]
    merged = upcycle_models(models, share_kv=True)
    assert all(isinstance(b.attn, AttentionExperts) and b.attn.num_experts == 2 for b in merged.layers)
    torch.testing.assert_close(merged.embed.weight, (models[0].embed.weight + models[1].embed.weight) / 2)
    tokens = torch.randint(0, 64, (2, 6))
    assert torch.isfinite(merged(tokens)).all()
    state = merged.init_state(2)
    torch.testing.assert_close(torch.cat([merged(tokens[:, :2], state), merged(tokens[:, 2:], state)], 1), merged(tokens))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_experts"):
        AttentionExperts(32, 4, num_experts=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionExperts(32, 4, num_kv_heads=2)
    with pytest.raises(ValueError, match="one shape"):
        upcycle_attention([MultiHeadAttention(32, 4), MultiHeadAttention(32, 4, 2)])
    with pytest.raises(ValueError, match="plain MultiHeadAttention"):
        upcycle_attention([])
    with pytest.raises(ValueError, match="at least two"):
        upcycle_models([DecoderLM(vocab_size=8, dim=32, num_layers=1, num_heads=4)])
