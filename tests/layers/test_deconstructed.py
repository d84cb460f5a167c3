"""Deconstructing-Attention variants: each against its formula (forward, every gradient),
decode == full forward, the relaxation actually holds, DecoderLM interleaving, bad inputs."""

import math

import pytest
import torch

from attnkit.layers import DistanceAttention, MultiHeadAttention, SequenceIndependentAttention, StaticEmbeddingAttention
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def causal_softmax_mix(scores, v, o_proj):
    """scores (B, H, T, T), v (B, H, T, D) -> o_proj(concat_h softmax(scores masked causal) v)."""
    B, H, T, D = v.shape
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return o_proj((weights @ v).transpose(1, 2).reshape(B, T, H * D))


def test_distance_attention_matches_formula():
    torch.manual_seed(0)
    layer = DistanceAttention(32, 4, rope=False).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)

    def reference(x):
        q, k, v = layer.project(x)
        scores = -torch.cdist(q, k).square() / (2 * math.sqrt(layer.head_dim))
        return causal_softmax_mix(scores, v, layer.o_proj)

    assert_forward_and_grads_match(layer, reference, x)


def test_fixed_mixing_matches_formula_and_ignores_the_tokens():
    torch.manual_seed(0)
    layer = SequenceIndependentAttention(32, 4, max_len=16).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)

    def reference(x):
        _, _, v = layer.project(x)
        p, s = layer.position_queries[:7].transpose(0, 1), layer.position_keys[:7].transpose(0, 1)  # (H, T, D)
        scores = (p @ s.transpose(1, 2) / math.sqrt(layer.head_dim)).expand(2, -1, -1, -1)
        return causal_softmax_mix(scores, v, layer.o_proj)

    assert_forward_and_grads_match(layer, reference, x)
    # the mixing weights are input-independent: the layer is linear in x
    a, b = torch.randn(2, 1, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(a + 2 * b), layer(a) + 2 * layer(b))


def test_static_qk_uses_embeddings_for_queries_and_keys():
    torch.manual_seed(0)
    layer = StaticEmbeddingAttention(32, 4).double()
    plain = MultiHeadAttention(32, 4).double()
    plain.load_state_dict(layer.state_dict())
    x, emb = torch.randn(2, 2, 7, 32, dtype=torch.float64)

    def reference(x):  # the layer's own weights through the plain projection
        q, k, _ = MultiHeadAttention.project(layer, emb)
        _, _, v = MultiHeadAttention.project(layer, x)
        q, k = layer.rope(q, k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
        return causal_softmax_mix(scores, v, layer.o_proj)

    assert_forward_and_grads_match(lambda x: layer(x, embeddings=emb), reference, x, params_of=layer)
    torch.testing.assert_close(layer(x), plain(x))  # alone, its input plays the embeddings


@pytest.mark.parametrize("cls", [DistanceAttention, SequenceIndependentAttention, StaticEmbeddingAttention])
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5]])
def test_decode_equals_full_forward(cls, chunks):
    torch.manual_seed(0)
    layer = cls(32, 4, num_kv_heads=2).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    kwargs = {"embeddings": torch.randn_like(x)} if cls is StaticEmbeddingAttention else {}
    if kwargs:  # decode feeds the embeddings of each chunk's tokens
        state, outs, start = layer.init_state(2), [], 0
        for n in chunks:
            outs.append(layer(x[:, start : start + n], state, embeddings=kwargs["embeddings"][:, start : start + n]))
            start += n
        torch.testing.assert_close(torch.cat(outs, 1), layer(x, **kwargs))
    else:
        torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_interleaved_in_decoder_generates_like_full_forward():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=40, dim=32, num_layers=4, num_heads=4,
                      attention=["mha", "fixed-mixing", "l2-attention", "static-qk"]).double()
    tokens = torch.randint(0, 40, (2, 10))
    state = model.init_state(2)
    stepwise = torch.cat([model(tokens[:, t : t + 1], state) for t in range(10)], dim=1)
    torch.testing.assert_close(stepwise, model(tokens))


def test_bad_inputs():
    with pytest.raises(ValueError, match="rope"):
        SequenceIndependentAttention(32, 4, rope=True)
    with pytest.raises(ValueError, match="max_len"):
        SequenceIndependentAttention(32, 4, max_len=4)(torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match="embeddings"):
        StaticEmbeddingAttention(32, 4)(torch.randn(1, 6, 32), embeddings=torch.randn(1, 5, 32))
