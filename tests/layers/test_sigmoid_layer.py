"""SigmoidAttention: the materialised weights (analysis) agree with the forward."""

import torch

import attnkit


def test_attention_weights_reproduce_the_forward_even_when_weights_underflow():
    """Normalised weights from attention_weights, applied to the values, give the forward's
    output; with a score bias so negative that every sigmoid underflows (they used to be 0)."""
    torch.manual_seed(0)
    layer = attnkit.build("sigmoid", dim=32, num_heads=4, normalize=True, score_bias=-300.0, backend="reference",
                          rope=False).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    weights = layer.attention_weights(x)  # (B, H, T, T)
    weights = weights.double()  # materialised in float32
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    _, _, v = layer.project(x)
    out = (weights @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(layer.o_proj(out), layer(x), atol=1e-5, rtol=1e-5)
