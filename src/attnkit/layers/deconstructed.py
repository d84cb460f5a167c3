"""Deconstructing Attention: controlled relaxations of dot-product attention.

Deconstructing Attention: Investigating Design Principles for Effective Language Modeling
(Xue, Moosavi, Aletras; arXiv 2510.11602). Each variant drops one design principle of
attention and keeps the rest; all of them can be interleaved with standard layers in
:class:`~attnkit.models.DecoderLM` (``attention=["mha", "fixed-mixing", ...]``):

- no token mixing: :class:`~attnkit.layers.NoMixing` (card ``no-mixing``);
- mixing weights independent of the sequence (:class:`SequenceIndependentAttention`, card
  ``fixed-mixing``): queries and keys are learned per *position*, not computed from the
  tokens, so the weights ``softmax_j(p_i . s_j / sqrt(D))`` are the same for every input;
  only the values depend on the sequence;
- a non-dot-product similarity (:class:`DistanceAttention`, card ``l2-attention``): weights
  ``softmax_j(-||q_i - k_j||^2 / (2 sqrt(D)))``;
- queries and keys not from the current layer's hidden state
  (:class:`StaticEmbeddingAttention`, card ``static-qk``): q and k are projections of the
  token embeddings (the model's input), v of the current hidden state.

Each keeps causal masking, multi-head structure and the output projection of
:class:`~attnkit.layers.MultiHeadAttention`, and runs softmax through ``attnkit.attend``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import positive_int
from ..cards import Card, FlopCount
from ..ops import attend
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["SequenceIndependentAttention", "DistanceAttention", "StaticEmbeddingAttention"]


class SequenceIndependentAttention(MultiHeadAttention):
    """Attention whose weights depend on positions only (learned per-position queries and keys).

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (no RoPE, no qk-norm: positions are the
            queries and keys).
        max_len: positions with a learned query and key (default 2048).

    Shapes: ``x [B, T, C] -> [B, T, C]`` with ``T <= max_len``.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, max_len: int = 2048, **options):
        for flag in ("rope", "qk_norm"):
            if options.pop(flag, False):
                raise ValueError(f"SequenceIndependentAttention learns its queries and keys per position; {flag}=True is not accepted")
        super().__init__(dim, num_heads, num_kv_heads, rope=False, **options)
        self.max_len = positive_int(max_len, "max_len")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.position_queries = nn.Parameter(torch.randn(max_len, H, D) * D**-0.25)
        self.position_keys = nn.Parameter(torch.randn(max_len, Hkv, D) * D**-0.25)
        # q and k come from positions: the projection only makes values
        self.qkv_proj = nn.Linear(dim, Hkv * D, bias=options.get("bias", False))

    def project(self, x: Tensor, state=None):
        B, T, _ = x.shape
        v = self.qkv_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return None, None, v

    def adjust(self, x, q, k, v, positions, state):
        B, T = x.shape[0], x.shape[1]
        # positions never exceed offset + T - 1 (document positions restart below T): a bound known
        # without reading the tensor, so the check costs no sync and torch.compile traces it
        last = (state.offset if state is not None else 0) + T - 1
        if last >= self.max_len:
            raise ValueError(f"position {last} is beyond max_len={self.max_len} of SequenceIndependentAttention; "
                             f"build it with max_len >= the longest sequence (max_len={last + 1} here)")
        pos = positions.expand(B, T)
        q = self.position_queries[pos].transpose(1, 2).to(v.dtype)  # (B, H, T, D)
        k = self.position_keys[pos].transpose(1, 2).to(v.dtype)  # (B, Hkv, T, D)
        return q, k, v


class DistanceAttention(MultiHeadAttention):
    """Attention with a negative squared-distance similarity instead of the dot product.

    ``softmax_j(-||q_i - k_j||^2 / (2 sqrt(D)))``: the ``||q_i||^2`` term is constant along a
    row, so this equals dot-product attention with queries ``[q, 1]`` and keys
    ``[k, -||k||^2 / 2]``, which is how it runs (on any attend backend; padded to a multiple
    of 8 channels for the fused kernels).

    Args: as :class:`~attnkit.layers.MultiHeadAttention`.
    """

    def core(self, q, k, v, pattern, q_offset):
        pad = 8 - (q.shape[-1] + 1) % 8 if (q.shape[-1] + 1) % 8 else 0
        one = q.new_ones(*q.shape[:-1], 1)
        half_norm = -0.5 * k.square().sum(-1, keepdim=True)
        q_aug = torch.cat([q, one, q.new_zeros(*q.shape[:-1], pad)], dim=-1)
        k_aug = torch.cat([k, half_norm, k.new_zeros(*k.shape[:-1], pad)], dim=-1)
        return attend(q_aug, k_aug, v, pattern=pattern, backend=self.backend, q_offset=q_offset, scale=q.shape[-1] ** -0.5)


class StaticEmbeddingAttention(MultiHeadAttention):
    """Queries and keys from the token embeddings; values from the current hidden state.

    :class:`~attnkit.models.DecoderLM` passes ``embeddings`` (its input embeddings, ``[B, T, C]``)
    to this layer; called alone without them, the layer's own input plays the embeddings (it
    is then plain attention).

    Args: as :class:`~attnkit.layers.MultiHeadAttention`.
    """

    accepts_embeddings = True

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(dim, num_heads, num_kv_heads, **options)
        self._embeddings: Tensor | None = None

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None,
                embeddings: Tensor | None = None) -> Tensor:
        if embeddings is not None and embeddings.shape != x.shape:
            raise ValueError(f"embeddings must have the shape of x {tuple(x.shape)}, got {tuple(embeddings.shape)}")
        self._embeddings = embeddings
        try:
            return super().forward(x, state, document_ids=document_ids)
        finally:
            self._embeddings = None

    def project(self, x: Tensor, state=None):
        q, k, v = super().project(x, state)
        if self._embeddings is not None:
            q, k, _ = super().project(self._embeddings, state)
        return q, k, v


def _static_qk_flops(batch, seq, config) -> FlopCount:
    base = multi_head_flops(batch, seq, config)
    dim, heads, kv, head_dim = head_shape(config)
    return FlopCount(attention_fwd=base.attention_fwd,
                     projection_fwd=base.projection_fwd + 2.0 * batch * seq * dim * (heads + 2 * kv) * head_dim)


def _fixed_mixing_flops(batch, seq, config) -> FlopCount:
    base = multi_head_flops(batch, seq, config)
    dim, heads, kv, head_dim = head_shape(config)
    saved = 2.0 * batch * seq * dim * (heads + kv) * head_dim  # no q, k projections
    return FlopCount(attention_fwd=base.attention_fwd, projection_fwd=base.projection_fwd - saved)


_TITLE = "Deconstructing Attention: Investigating Design Principles for Effective Language Modeling"
CARDS = (
    Card(name="fixed-mixing", title=_TITLE, arxiv="2510.11602", family="control",
         layer=SequenceIndependentAttention, flops=_fixed_mixing_flops,
         summary="weights from learned per-position queries/keys: the same mixing for every input"),
    Card(name="l2-attention", title=_TITLE, arxiv="2510.11602", family="control", layer=DistanceAttention,
         flops=multi_head_flops, summary="softmax of negative squared distances instead of dot products"),
    Card(name="static-qk", title=_TITLE, arxiv="2510.11602", family="control", layer=StaticEmbeddingAttention,
         flops=_static_qk_flops, summary="queries/keys from the token embeddings, values from the current layer"),
)
