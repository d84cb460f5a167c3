"""Multi-head attention and its key/value-sharing variants (MHA, GQA, MQA).

- MHA: Attention Is All You Need (Vaswani et al., arXiv 1706.03762).
- MQA: Fast Transformer Decoding: One Write-Head is All You Need (Shazeer, arXiv 1911.02150).
- GQA: GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints (Ainslie et al., arXiv 2305.13245).

Forward, with H query heads and Hkv key/value heads (H % Hkv == 0)::

    q = x W_q  -> [B, H, T, D]      k = x W_k, v = x W_v -> [B, Hkv, T, D]
    q, k = RoPE(norm(q)), RoPE(norm(k))           (norm: optional qk RMSNorm)
    o_h = softmax(q_h k_{g(h)}^T / sqrt(D) + pattern mask) v_{g(h)},  g(h) = h // (H / Hkv)
    y = concat_h(o_h) W_o

MHA is Hkv = H, MQA is Hkv = 1, GQA anything between. The KV cache holds Hkv heads, so
decoding memory scales with Hkv / H.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import head_dim_of, positive_int
from ..cards import Card, FlopCount, dense_attention_flops
from ..ops import BACKENDS, attend
from ..rope import RotaryEmbedding, positions_from_documents
from ..state import KVCache, SinkWindowCache
from .base import AttentionLayer, check_input

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(AttentionLayer):
    """Softmax attention with ``num_kv_heads`` shared key/value heads.

    Args:
        dim: model width C.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (default H: MHA; 1: MQA; a divisor of H: GQA).
        head_dim: D (default C // H).
        pattern: ``"causal"`` (default), ``"full"`` or an :class:`attnkit.patterns.Pattern`.
        rope: rotary position embeddings on q and k (default True).
        rope_base: RoPE frequency base.
        qk_norm: RMSNorm on each head's q and k before RoPE.
        bias: biases in the projections.
        dropout: dropout on the output projection (training only).
        backend: ``attend`` backend (``auto``, ``reference``, ``sdpa``, ``flex``, ``cudnn``: the last for sliding
            window and sink + window in prefill and training only).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import MultiHeadAttention
        >>> layer = MultiHeadAttention(256, num_heads=8, num_kv_heads=2)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        pattern="causal",
        rope: bool = True,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        num_kv_heads = positive_int(num_heads if num_kv_heads is None else num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
                f"(accepted num_kv_heads: divisors of {num_heads})"
            )
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if rope and head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim, got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.pattern = _patterns.resolve(pattern)
        self.backend = backend
        self.qkv_proj = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.dropout = nn.Dropout(dropout)

    def init_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None):
        """A :class:`KVCache`, or a bounded :class:`SinkWindowCache` when the pattern is a
        sliding window or sink + window (decode memory then stays flat in context length)."""
        if self.pattern.kind == "full":
            raise ValueError("decoding needs a causal pattern; this layer was built with pattern='full' (bidirectional)")
        param = self.qkv_proj.weight
        device, dtype = device or param.device, dtype or param.dtype
        value_dim = self.head_dim + self.extra_value_channels
        if isinstance(self.pattern, (_patterns.SlidingWindow, _patterns.SinkWindow)):
            sinks = getattr(self.pattern, "sink_tokens", 0)
            return SinkWindowCache(batch_size, self.num_kv_heads, self.head_dim, sink_tokens=sinks,
                                   window=self.pattern.window, value_dim=value_dim, device=device, dtype=dtype)
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, value_dim=value_dim, max_len=max_len,
                       device=device, dtype=dtype)

    def project(self, x: Tensor, state=None) -> tuple[Tensor, Tensor, Tensor]:
        """x ``[B, T, C]`` -> q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]`` (before RoPE).
        ``state`` is the decode state, for variants whose projections look back in time."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    #: channels a subclass appends to the cached values (DMA caches its key bias there)
    extra_value_channels = 0

    def adjust(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, state) -> tuple[Tensor, Tensor, Tensor]:
        """Hook for variants: change q, k, v (before RoPE) given the input and the absolute
        positions ``[B|1, T]`` of this call's tokens. Plain attention returns them unchanged."""
        return q, k, v

    def core(self, q: Tensor, k: Tensor, v: Tensor, pattern, q_offset: int | None) -> Tensor:
        """Hook for variants: the attention of ``q [B, H, T, D]`` over the visible keys."""
        return attend(q, k, v, pattern=pattern, backend=self.backend, q_offset=q_offset)

    def weights_from_scores(self, scores: Tensor, mask: Tensor) -> Tensor:
        """Attention weights from scaled scores ``[B, H, T, S]`` and the pattern mask (softmax here)."""
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """The weights this layer puts on each key, materialised: ``x [B, T, C] -> [B, H, T, T]``
        (for analysis, e.g. attention sinks; the forward never builds them)."""
        check_input(x, self.dim, self)
        B, T, _ = x.shape
        q, k, v = self.project(x)
        positions = torch.arange(T, device=x.device)[None]
        q, k, v = self.adjust(x, q, k, v, positions, None)
        if self.rope is not None:
            q, k = self.rope(q, k)
        k = k.repeat_interleave(self.num_heads // k.shape[1], dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, T, T)
        mask = self.pattern.dense(T, T, batch=B, heads=self.num_heads, device=x.device)
        return self.weights_from_scores(scores, mask)

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        B, T, _ = x.shape
        q, k, v = self.project(x, state)
        pattern, positions = with_documents(self.pattern, document_ids, state, B, T)
        offset = 0
        if state is not None:
            if pattern.kind == "full":
                raise ValueError("decoding needs a causal pattern; this layer was built with pattern='full'")
            offset = state.offset
        token_positions = positions if positions is not None else torch.arange(offset, offset + T, device=x.device)[None]
        q, k, v = self.adjust(x, q, k, v, token_positions, state)
        q, k, v, pattern, q_offset = rotate_and_cache(self.rope, q, k, v, pattern, state, offset, positions)
        out = self.core(q, k, v, pattern, q_offset)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.dropout(self.o_proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, pattern={self.pattern!r}, backend={self.backend!r}"
        )


def rotate_and_cache(rope, q: Tensor, k: Tensor, v: Tensor, pattern, state, offset: int,
                     positions: Tensor | None = None):
    """The step between projecting and attending, shared by the softmax layers: RoPE (if
    ``rope``) at the tokens' positions, then the decode cache (if ``state``). Returns
    ``(q, k, v, pattern, q_offset)`` for ``attend``: with a state, ``k, v`` are the whole cache
    and ``pattern, q_offset`` what the new queries may see of it; without one, ``q_offset`` is
    ``None``."""
    if rope is not None:
        q, k = rope(q, k, offset=offset, positions=positions)
    q_offset = None
    if state is not None:
        k, v = state.update(k, v)
        pattern, q_offset = state.visible(pattern, offset)
    return q, k, v, pattern, q_offset


def with_documents(pattern, document_ids: Tensor | None, state, batch: int, seq: int):
    """``(pattern, positions)`` for packed sequences: ``pattern`` restricted to each token's own
    document and RoPE positions restarting at every document; ``(pattern, None)`` without
    ``document_ids``. Packed sequences are a training/prefill feature: no decode state."""
    if document_ids is None:
        return pattern, None
    if state is not None:
        raise ValueError("document_ids (packed sequences) cannot be combined with a decode state")
    if tuple(document_ids.shape) != (batch, seq):
        raise ValueError(f"document_ids must have shape [B, T] = [{batch}, {seq}], got {tuple(document_ids.shape)}")
    return _patterns.documents(document_ids) & pattern, positions_from_documents(document_ids)


# -- registry cards ---------------------------------------------------------------------------
def head_shape(config: dict) -> tuple[int, int, int, int]:
    """``(dim, num_heads, num_kv_heads, head_dim)`` of a layer config, with the layers' defaults
    (kv heads = heads, head dim = dim // heads): what the FLOP models read."""
    dim, heads = config["dim"], config["num_heads"]
    return dim, heads, config.get("num_kv_heads") or heads, config.get("head_dim") or dim // heads


def multi_head_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Projections ``2*B*T*C*(H + 2*Hkv)*D + 2*B*T*H*D*C``; core ``4*B*H*pairs*D``."""
    dim, heads, kv_heads, head_dim = head_shape(config)
    projection = 2.0 * batch * seq * dim * (heads + 2 * kv_heads) * head_dim + 2.0 * batch * seq * heads * head_dim * dim
    core = dense_attention_flops(batch, seq, num_heads=heads, head_dim=head_dim, pattern=config.get("pattern", "causal"))
    return FlopCount(attention_fwd=core, projection_fwd=projection)


def _gqa_kv_heads(dim: int, num_heads: int) -> int:
    """GQA default: a quarter of the query heads (the largest divisor of H not above H/4)."""
    target = max(1, num_heads // 4)
    return max(d for d in range(1, target + 1) if num_heads % d == 0)


CARDS = (
    Card(
        name="mha",
        title="Attention Is All You Need",
        arxiv="1706.03762",
        family="baseline",
        layer=MultiHeadAttention,
        flops=multi_head_flops,
        summary="dense softmax attention, one K/V head per query head",
    ),
    Card(
        name="gqa",
        title="GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
        arxiv="2305.13245",
        family="baseline",
        layer=MultiHeadAttention,
        flops=multi_head_flops,
        defaults={"num_kv_heads": _gqa_kv_heads},
        summary="query heads share K/V heads in groups (default Hkv = H/4)",
    ),
    Card(
        name="mqa",
        title="Fast Transformer Decoding: One Write-Head is All You Need",
        arxiv="1911.02150",
        family="baseline",
        layer=MultiHeadAttention,
        flops=multi_head_flops,
        defaults={"num_kv_heads": 1},
        summary="all query heads share one K/V head",
    ),
)
