"""SQA: Sparse Query Attention, fewer query heads than the model's head count.

Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query
Heads Reduction (Filipek, arXiv 2510.01817).

GQA/MQA share key/value heads, which shrinks the KV cache but not the attention FLOPs;
SQA instead keeps only ``Hq < H`` query heads (and ``Hkv <= Hq`` key/value heads) while the
head dim stays ``D = C / H``::

    q = x W_q -> [B, Hq, T, D]     k, v = x W_k, x W_v -> [B, Hkv, T, D]      D = C / H
    o = concat_{h < Hq} softmax(q_h k_g(h)^T / sqrt(D)) v_g(h)                 [B, T, Hq*D]
    y = o W_o                                                                 W_o: Hq*D -> C

Attention-core FLOPs scale with ``Hq / H``; the KV cache with ``Hkv / H``. What differs from
:class:`~attnkit.layers.MultiHeadAttention`: only the head counts (it is multi-head
attention with ``Hq`` heads of width ``C / H``). Presets (cards): ``sqa`` (H/2 query, H/4
KV heads), ``ssqa`` (H/2, H/2), ``xsqa`` (H/4, H/4), ``xsmqa`` (H/4, 1).
"""

from __future__ import annotations

from .._checks import positive_int
from ..cards import Card
from .multi_head import MultiHeadAttention, multi_head_flops

__all__ = ["SparseQueryAttention"]


class SparseQueryAttention(MultiHeadAttention):
    """Multi-head attention with ``num_query_heads`` query heads of width ``dim // num_heads``.

    Args:
        dim: width C.
        num_heads: the model's head count H (sets the head dim C / H).
        num_query_heads: Hq <= H (default H / 2).
        num_kv_heads: Hkv, a divisor of Hq (default Hq / 2, at least 1).
        pattern, rope, rope_base, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import SparseQueryAttention
        >>> layer = SparseQueryAttention(256, 8, num_query_heads=4, num_kv_heads=2)   # SQA
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_query_heads: int | None = None, num_kv_heads: int | None = None,
                 **options):
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if "head_dim" in options:
            raise ValueError("SparseQueryAttention's head dim is dim // num_heads; head_dim is not accepted")
        num_query_heads = positive_int(max(1, num_heads // 2) if num_query_heads is None else num_query_heads,
                                       "num_query_heads")
        if num_query_heads > num_heads:
            raise ValueError(f"num_query_heads={num_query_heads} must be <= num_heads={num_heads}")
        num_kv_heads = positive_int(max(1, num_query_heads // 2) if num_kv_heads is None else num_kv_heads,
                                    "num_kv_heads")
        super().__init__(dim, num_query_heads, num_kv_heads, head_dim=dim // num_heads, **options)
        self.model_heads = num_heads

    def extra_repr(self) -> str:
        return f"model heads={self.model_heads}, " + super().extra_repr()


def sqa_flops(batch, seq, config):
    dim, heads = config["dim"], config["num_heads"]
    hq = config.get("num_query_heads") or max(1, heads // 2)
    hkv = config.get("num_kv_heads") or max(1, hq // 2)
    return multi_head_flops(batch, seq, {**config, "num_heads": hq, "num_kv_heads": hkv, "head_dim": dim // heads})


_TITLE = "Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query Heads Reduction"
CARDS = tuple(
    Card(name=name, title=_TITLE, arxiv="2510.01817", family="heads", layer=SparseQueryAttention,
         flops=sqa_flops, defaults={"num_query_heads": q, "num_kv_heads": kv},
         summary=f"sparse query attention: {summary}, head dim C/H")
    for name, q, kv, summary in (
        ("sqa", lambda c, h: max(1, h // 2), lambda c, h: max(1, h // 4), "H/2 query heads, H/4 K/V heads"),
        ("ssqa", lambda c, h: max(1, h // 2), lambda c, h: max(1, h // 2), "symmetric: H/2 query and K/V heads"),
        ("xsqa", lambda c, h: max(1, h // 4), lambda c, h: max(1, h // 4), "extreme: H/4 query and K/V heads"),
        ("xsmqa", lambda c, h: max(1, h // 4), 1, "extreme + MQA: H/4 query heads, one K/V head"),
    )
)
