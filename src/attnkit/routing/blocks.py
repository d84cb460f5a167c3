"""The MoE-Transformer block the routers live in, a small language model of those blocks, and their FLOP models.

:class:`RoutedBlock` is the paper's (S)MoE-Attention block (arXiv 2505.00792, section 3), pre-norm::

    h = x + MHA(RMSNorm(x))              attention matrix A_h = softmax(q_h k_h^T / sqrt(D) + mask)
    y = h + SMoE(RMSNorm(h))             router: topk | similarity | attention (the latter reads A)

The attention-aware router gets the block's own attention as :class:`~attnkit.routing.AttentionInputs`
(q and k after RoPE, and the pattern), captured from :class:`attnkit.layers.MultiHeadAttention`'s ``core``
hook, so the attention is recomputed inside :func:`attnkit.ops.attend` rather than materialised.

:class:`RoutedLM` stacks these blocks into a byte-level decoder (tied embeddings), the model of
:mod:`attnkit.routing.experiments`.

Example::

    >>> import torch
    >>> from attnkit.routing import RoutedBlock, RoutedLM
    >>> RoutedBlock(64, 4, router="attention")(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
    >>> lm = RoutedLM(vocab_size=256, dim=32, num_layers=2, num_heads=2, router="similarity")
    >>> lm(torch.randint(0, 256, (2, 12))).shape, lm.aux_loss().shape
    (torch.Size([2, 12, 256]), torch.Size([]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import positive_int
from ..cards import FlopCount, dense_attention_flops
from ..layers import MultiHeadAttention
from ..layers.base import check_input
from .smoe import AttentionInputs, SparseMoE

__all__ = ["RoutedBlock", "RoutedLM", "routed_block_flops", "smoe_flops"]


class _AttentionWithInputs(MultiHeadAttention):
    """Multi-head attention that keeps the q, k (after RoPE) and pattern of its last call for the router."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_inputs = False
        self.last_inputs: AttentionInputs | None = None

    def core(self, q: Tensor, k: Tensor, v: Tensor, pattern, q_offset: int | None) -> Tensor:
        if self.keep_inputs:
            self.last_inputs = AttentionInputs(q, k, pattern, None)
        return super().core(q, k, v, pattern, q_offset)


class RoutedBlock(nn.Module):
    """Pre-norm attention + sparse MoE feed-forward block ``x [B, T, C] -> [B, T, C]``.

    Args:
        dim: C. num_heads: H of the attention.
        num_experts: E. top_k: k. hidden: expert hidden width (default 2C).
        router: ``"topk"``, ``"similarity"`` or ``"attention"`` (see :class:`~attnkit.routing.SparseMoE`).
        pattern: the attention pattern, ``"causal"`` (default) or ``"full"``; the similarity router's
            token graph follows it (causal or not).
        **router_options: the router's options (``temperature``, ``similarity``, ...).

    After a forward, :attr:`moe` holds ``aux_loss`` and ``last_routing``.
    """

    def __init__(self, dim: int, num_heads: int, num_experts: int = 8, top_k: int = 2, *, hidden: int | None = None,
                 router: str = "topk", pattern="causal", **router_options) -> None:
        super().__init__()
        positive_int(dim, "dim")
        if pattern not in ("causal", "full"):
            raise ValueError(f"pattern must be 'causal' or 'full', got {pattern!r}")
        if router == "similarity":
            router_options.setdefault("causal", pattern == "causal")
        self.dim = dim
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = _AttentionWithInputs(dim, num_heads, pattern=pattern, backend="auto")
        self.moe_norm = nn.RMSNorm(dim, eps=1e-6)
        self.moe = SparseMoE(dim, num_experts, top_k, hidden=hidden, router=router, **router_options)
        self.attn.keep_inputs = self.moe.needs_attention

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.dim, self)
        h = x + self.attn(self.attn_norm(x))
        attention = self.attn.last_inputs if self.moe.needs_attention else None
        self.attn.last_inputs = None  # the router consumed them; do not keep the graph alive
        return h + self.moe(self.moe_norm(h), attention)


class RoutedLM(nn.Module):
    """Decoder LM of :class:`RoutedBlock` s: ``tokens [B, T] -> logits [B, T, V]`` (tied embeddings).

    :meth:`aux_loss` sums the blocks' load-balancing losses of the last forward; :meth:`routings` lists
    their :class:`~attnkit.routing.Routing` s (one per block).
    """

    def __init__(self, vocab_size: int = 256, dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_experts: int = 8, top_k: int = 2, *, hidden: int | None = None, router: str = "topk",
                 **router_options) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers)):
            positive_int(value, name)
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(RoutedBlock(dim, num_heads, num_experts, top_k, hidden=hidden, router=router,
                                                **router_options) for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [B, T], got {got}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    def aux_loss(self) -> Tensor:
        return torch.stack([b.moe.aux_loss for b in self.blocks]).sum()

    def routings(self) -> list:
        return [b.moe.last_routing for b in self.blocks]


# -- FLOP models ------------------------------------------------------------------------------------------
def smoe_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of one :class:`~attnkit.routing.SparseMoE` call (matmuls only).

    ``projection_fwd``: gate ``2NCE`` + experts ``k * 2N * 2CF`` (+ ``2NC * 2r`` for a learned similarity);
    ``attention_fwd`` (the token-graph mixing, through ``attend``): similarity ``2 B pairs (r + E)`` with
    ``r`` the similarity rank (E for ``"router"``); attention-aware ``2 B H pairs (D + E)`` (the preceding
    layer's scores recomputed per head, then the mixing); 0 for top-k. ``pairs``: T(T+1)/2 causal, T^2 full."""
    dim, experts, top_k = config["dim"], config.get("num_experts", 8), config.get("top_k", 2)
    hidden = config.get("hidden") or 2 * dim
    router = config.get("router", "topk")
    tokens = batch * seq
    projection = 2.0 * tokens * dim * experts + top_k * 2.0 * tokens * 2 * dim * hidden
    pairs = _patterns.resolve(config.get("pattern", "causal")).pairs(seq, seq)
    core = 0.0
    if router == "similarity":
        learned = config.get("similarity", "router") == "learned"
        rank = (config.get("similarity_dim") or min(dim, 64)) if learned else experts
        projection += 2.0 * tokens * dim * 2 * rank if learned else 0.0
        core = 2.0 * batch * pairs * (rank + experts)
    elif router == "attention":
        heads = config["num_heads"]
        head_dim = dim // heads
        core = 2.0 * batch * heads * pairs * (head_dim + experts)
    return FlopCount(attention_fwd=core, projection_fwd=projection)


def routed_block_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """:class:`RoutedBlock`: multi-head attention (``8NC^2`` projections, ``4 B H pairs D`` core) + the SMoE."""
    dim, heads = config["dim"], config["num_heads"]
    pattern = config.get("pattern", "causal")
    attn_core = dense_attention_flops(batch, seq, num_heads=heads, head_dim=dim // heads, pattern=pattern)
    moe = smoe_flops(batch, seq, config)
    return FlopCount(attention_fwd=attn_core + moe.attention_fwd,
                     projection_fwd=8.0 * batch * seq * dim * dim + moe.projection_fwd)
