"""Sigmoid attention as a layer.

- Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., arXiv
  2409.04431): ``sigmoid(q k^T / sqrt(D) + b) v`` with ``b = -log(n)``, n the training length,
  so that the weights of a row sum to about 1 at initialisation.
- When Attention Sink Emerges in Language Models (Gu et al., arXiv 2410.10781): sigmoid
  attention without the bias, optionally with the weights of a row normalised to sum 1;
  without normalisation no attention sink emerges.

What differs from :class:`~attnkit.layers.MultiHeadAttention`: the weights are an
element-wise sigmoid (:func:`attnkit.ops.sigmoid_attend`), not a softmax over the row. Same
projections, RoPE, patterns and KV cache.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from ..cards import Capabilities, Card
from ..ops import sigmoid_attend
from ..ops.sigmoid import SIGMOID_BACKENDS
from .multi_head import MultiHeadAttention, multi_head_flops

__all__ = ["SigmoidAttention"]


class SigmoidAttention(MultiHeadAttention):
    """``y = W_o concat_h( sigmoid(q_h k_h^T / sqrt(D) + bias) v_h )`` under the layer's pattern.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, bias, dropout, backend:
            as :class:`~attnkit.layers.MultiHeadAttention` (``backend``: auto, triton, flex or reference).
        train_length: n of the ``-log(n)`` score bias (default 2048).
        score_bias: the bias itself; overrides ``train_length`` (``0.0``: the 2410.10781 variant).
        normalize: divide each row's weights by their sum (2410.10781's normalised variant).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import SigmoidAttention
        >>> layer = SigmoidAttention(256, 8, train_length=512)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, train_length: int = 2048,
                 score_bias: float | None = None, normalize: bool = False, **options):
        backend = options.pop("backend", "auto")
        if backend not in SIGMOID_BACKENDS:
            raise ValueError(f"SigmoidAttention backend must be one of {', '.join(SIGMOID_BACKENDS)}, got {backend!r} "
                             "(SDPA has no sigmoid)")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        self.backend = backend
        if score_bias is None:
            if isinstance(train_length, bool) or not isinstance(train_length, int) or train_length < 1:
                raise ValueError(f"train_length must be a positive integer, got {train_length!r}")
            score_bias = -math.log(train_length)
        elif isinstance(score_bias, bool) or not isinstance(score_bias, (int, float)) or not math.isfinite(score_bias):
            raise ValueError(f"score_bias must be a finite float or None, got {score_bias!r}")
        self.score_bias = float(score_bias)
        self.normalize = bool(normalize)

    def core(self, q, k, v, pattern, q_offset):
        return sigmoid_attend(q, k, v, pattern=pattern, bias=self.score_bias, normalize=self.normalize,
                              backend=self.backend, q_offset=q_offset)

    def weights_from_scores(self, scores, mask):
        # in log space, as sigmoid_attend_reference: normalised rows whose every weight
        # underflows keep their (well-defined) weights; rows with no key are zeros
        log_weights = F.logsigmoid(scores + self.score_bias).masked_fill(~mask, float("-inf"))
        if self.normalize:
            return log_weights.softmax(-1).nan_to_num(0.0)
        return log_weights.exp()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, score_bias={self.score_bias:.4g}, normalize={self.normalize}"


CARDS = (
    Card(
        name="sigmoid",
        title="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
        arxiv="2409.04431",
        family="score",
        layer=SigmoidAttention,
        flops=multi_head_flops,
        capabilities=Capabilities(backends=("reference", "flex", "triton")),
        summary="sigmoid(qk/sqrt(D) - log n) weights, no softmax (n = train_length)",
    ),
    Card(
        name="sigmoid-nobias",
        title="When Attention Sink Emerges in Language Models",
        arxiv="2410.10781",
        family="score",
        layer=SigmoidAttention,
        flops=multi_head_flops,
        defaults={"score_bias": 0.0},
        capabilities=Capabilities(backends=("reference", "flex", "triton")),
        summary="sigmoid weights without bias or normalisation (no attention sink); normalize=True for the other variant",
    ),
)
