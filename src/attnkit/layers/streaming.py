"""Sliding-window and streaming (attention-sink + window) attention.

- Sliding window: Longformer: The Long-Document Transformer (Beltagy et al., arXiv
  2004.05150), as used by Mistral 7B: a query at position i sees keys ``i - window < j <= i``.
- Streaming: Efficient Streaming Language Models with Attention Sinks (StreamingLLM; Xiao et
  al., arXiv 2309.17453): the first ``sink_tokens`` keys stay visible to every query beside
  the ``window`` most recent ones.

    o_i = softmax_j( q_i . k_j / sqrt(D) ,  j in sinks(i) u window(i) ) v_j

What differs from :class:`~attnkit.layers.MultiHeadAttention`: only the pattern, and the
decode state, a :class:`~attnkit.state.SinkWindowCache` of ``sink_tokens + window`` tokens
per head, so memory and per-token time stay flat however long the context. Keys keep the
RoPE phase of their original position (the model was trained that way), so decoding equals
the full forward exactly.

Speed: on CUDA with the cuDNN frontend installed (``pip install "attnkit[cudnn]"``), prefill
and training run on cuDNN's fused band attention (:mod:`attnkit.ops.softmax.cudnn_band`; the sinks
merged in by log-sum-exp); otherwise on FlexAttention. H200, training step of the core at
32k, window 1024: 2.44 ms (sink 4 + window: 2.80 ms) against 3.39 (4.79) ms on FlexAttention
and 26.4 ms for dense causal cuDNN.
"""

from __future__ import annotations

from .. import patterns as _patterns
from ..cards import Capabilities, Card
from .multi_head import MultiHeadAttention, multi_head_flops

__all__ = ["SlidingWindowAttention", "StreamingAttention"]


class SlidingWindowAttention(MultiHeadAttention):
    """Causal sliding-window attention with a bounded KV cache.

    Args:
        dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.
        window: keys a query sees, itself included (default 1024).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import SlidingWindowAttention
        >>> layer = SlidingWindowAttention(256, 8, window=64)
        >>> layer(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, window: int = 1024, **options):
        if "pattern" in options:
            raise ValueError("SlidingWindowAttention sets its own pattern; pass window= (or use MultiHeadAttention)")
        super().__init__(dim, num_heads, num_kv_heads, pattern=_patterns.sliding_window(window), **options)
        self.window = window


class StreamingAttention(MultiHeadAttention):
    """StreamingLLM attention: ``sink_tokens`` first keys plus a causal window, bounded cache.

    Args:
        dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.
        sink_tokens: initial tokens every query keeps seeing (default 4).
        window: most recent keys a query sees, itself included (default 1024).

    Shapes: ``x [B, T, C] -> [B, T, C]``.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, sink_tokens: int = 4,
                 window: int = 1024, **options):
        if "pattern" in options:
            raise ValueError("StreamingAttention sets its own pattern; pass sink_tokens= and window=")
        super().__init__(dim, num_heads, num_kv_heads, pattern=_patterns.sink_window(sink_tokens, window), **options)
        self.sink_tokens, self.window = sink_tokens, window


def _pattern_flops(pattern_of):
    def flops(batch, seq, config):
        return multi_head_flops(batch, seq, {**config, "pattern": pattern_of(config)})

    return flops


CARDS = (
    Card(
        name="sliding-window",
        title="Longformer: The Long-Document Transformer",
        arxiv="2004.05150",
        family="pattern",
        layer=SlidingWindowAttention,
        flops=_pattern_flops(lambda c: _patterns.sliding_window(c.get("window", 1024))),
        defaults={"window": 1024},
        capabilities=Capabilities(bidirectional=False, backends=("reference", "sdpa", "flex", "cudnn")),
        summary="causal sliding window (default 1024 keys); decode cache bounded to the window",
    ),
    Card(
        name="streaming",
        title="Efficient Streaming Language Models with Attention Sinks",
        arxiv="2309.17453",
        family="pattern",
        layer=StreamingAttention,
        flops=_pattern_flops(lambda c: _patterns.sink_window(c.get("sink_tokens", 4), c.get("window", 1024))),
        defaults={"sink_tokens": 4, "window": 1024},
        capabilities=Capabilities(bidirectional=False, backends=("reference", "sdpa", "flex", "cudnn")),
        summary="attention sinks + sliding window (4 + 1024); decode cache bounded to 1028 tokens",
    ),
)
