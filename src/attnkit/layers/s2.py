"""S2-Attention: heterogeneous context sharding among attention heads.

Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention
Heads (Lin et al., arXiv 2407.17678).

Every head sees its local blocks plus a strided ``1/vert_stride`` shard of the distant key
blocks, and the shards differ by head so that together the heads cover the whole context::

    block(i) = i // block_size
    head h keeps key j for query i  iff  j <= i  and  ( block(i) - block(j) < local_blocks
                                         or (block(j) + g(h)*step + offset) % vert_stride == 0 )
    g(h) = KV head of h,   step = max(1, vert_stride // H)

then plain softmax attention over the kept keys. ``step`` divides by the number of *query*
heads ``H`` even under GQA, as the official kernels do (dkernel's ``get_sparse_attn_mask``);
``head_step="kv_heads"`` divides by ``Hkv`` instead, spacing the KV heads' stripes evenly (see
:class:`attnkit.patterns.S2Strided`; the two agree for MHA, MQA and ``vert_stride < 2*Hkv``).
What differs from :class:`~attnkit.layers.MultiHeadAttention`: only the pattern
(:class:`attnkit.patterns.S2Strided`); FlexAttention runs it with blocks matched to
``block_size`` so skipped stripes cost nothing. Decoding keeps the full KV cache (the union
over heads needs every token).
"""

from __future__ import annotations

from .. import patterns as _patterns
from ..cards import Capabilities, Card
from .multi_head import MultiHeadAttention, multi_head_flops

__all__ = ["S2Attention"]


class S2Attention(MultiHeadAttention):
    """Per-head strided block-sparse attention (S2-Attention).

    Args:
        dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.
        block_size: tokens per block (default 64).
        local_blocks: most recent blocks every head sees (default 16, i.e. 1024 tokens).
        vert_stride: a head keeps one distant block in ``vert_stride`` (default 16).
        offset: shifts every head's stripes (default 0).
        dense_heads: query heads that see the whole causal context (default none).
        head_step: shift between the stripes of consecutive KV heads: ``"query_heads"``
            (default, the official ``max(1, vert_stride // num_heads)``), ``"kv_heads"``
            (``max(1, vert_stride // num_kv_heads)``: evenly spaced under GQA) or an int.

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import S2Attention
        >>> layer = S2Attention(256, 8, block_size=16, local_blocks=2, vert_stride=4)
        >>> layer(torch.randn(1, 128, 256)).shape
        torch.Size([1, 128, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, block_size: int = 64,
                 local_blocks: int = 16, vert_stride: int = 16, offset: int = 0, dense_heads=(),
                 head_step: str | int = "query_heads", **options):
        if "pattern" in options:
            raise ValueError("S2Attention sets its own pattern; pass block_size, local_blocks, vert_stride, offset")
        pattern = _patterns.s2_strided(num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=block_size,
                                       local_blocks=local_blocks, vert_stride=vert_stride, offset=offset,
                                       dense_heads=tuple(dense_heads), head_step=head_step)
        super().__init__(dim, num_heads, num_kv_heads, pattern=pattern, **options)


def s2_flops(batch, seq, config):
    pattern = _patterns.s2_strided(
        num_heads=config["num_heads"], num_kv_heads=config.get("num_kv_heads"),
        block_size=config.get("block_size", 64), local_blocks=config.get("local_blocks", 16),
        vert_stride=config.get("vert_stride", 16), offset=config.get("offset", 0),
        dense_heads=tuple(config.get("dense_heads", ())), head_step=config.get("head_step", "query_heads"),
    )
    return multi_head_flops(batch, seq, {**config, "pattern": pattern})


CARDS = (
    Card(
        name="s2",
        title="Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads",
        arxiv="2407.17678",
        family="pattern",
        layer=S2Attention,
        flops=s2_flops,
        defaults={"block_size": 64, "local_blocks": 16, "vert_stride": 16},
        capabilities=Capabilities(bidirectional=False),
        summary="per-head strided block shards (64-token blocks, 16 local, stride 16); heads cover the context together",
    ),
)
