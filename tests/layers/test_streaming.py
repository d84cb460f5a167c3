"""Sliding-window and streaming layers: bounded cache decode == full forward, flat memory, bad inputs."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.layers import MultiHeadAttention, SlidingWindowAttention, StreamingAttention
from attnkit.state import SinkWindowCache

from layer_checks import decode_in_chunks


def build(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "sliding":
        return SlidingWindowAttention(32, 4, window=5, **kwargs).double()
    return StreamingAttention(32, 4, sink_tokens=2, window=4, **kwargs).double()


@pytest.mark.parametrize("kind", ["sliding", "streaming"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
@pytest.mark.parametrize("chunks", [[1] * 23, [3, 1, 7, 1, 1, 10], [9, 14], [23]])
def test_bounded_decode_equals_full_forward(kind, num_kv_heads, chunks):
    layer = build(kind, num_kv_heads=num_kv_heads)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = layer(x)
    assert isinstance(layer.init_state(2), SinkWindowCache)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), full)


@pytest.mark.parametrize("kind", ["sliding", "streaming"])
def test_layer_equals_plain_attention_with_the_pattern(kind):
    layer = build(kind)
    pattern = P.sliding_window(5) if kind == "sliding" else P.sink_window(2, 4)
    plain = MultiHeadAttention(32, 4, pattern=pattern, backend="reference").double()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), plain(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_cache_memory_is_flat_in_context_length():
    layer = StreamingAttention(32, 4, sink_tokens=2, window=4)
    sizes = []
    state = layer.init_state(1)
    with torch.no_grad():
        for step in range(40):
            layer(torch.randn(1, 1, 32), state)
            sizes.append(state.nbytes())
    per_token = 2 * 4 * 8 * 4  # (k + v) * heads * head dim * fp32 bytes
    assert sizes[0] == per_token
    assert sizes[5:] == [6 * per_token] * 35  # 2 sinks + 4 window, whatever the context


def test_bad_inputs():
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(32, 4, window=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        StreamingAttention(32, 4, sink_tokens=-1)
    with pytest.raises(ValueError, match="sets its own pattern"):
        StreamingAttention(32, 4, pattern="causal")


@pytest.mark.cuda
def test_cuda_streaming_decode_equals_full_forward():
    torch.manual_seed(0)
    layer = StreamingAttention(256, 4, sink_tokens=4, window=64).cuda()
    x = torch.randn(1, 300, 256, device="cuda")
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(1)
        outs = [layer(x[:, :200], state)] + [layer(x[:, t : t + 1], state) for t in range(200, 300)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)
    assert state.nbytes() == 68 * 2 * 4 * 64 * 4
