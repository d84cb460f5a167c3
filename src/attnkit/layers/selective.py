"""Selective Self-Attention (SSA): temperature scaling of queries and values.

Selective Attention: Enhancing Transformer through Principled Context Control (Zhang et
al., NeurIPS 2024, arXiv 2411.12892).

Each query is scaled by a temperature that depends on the token and on its position, and
each value by a token temperature, so that a query can make its softmax spikier or flatter
and a value can be suppressed::

    tau_q(x_i, i) = 1 + sigmoid(alpha_h) * log(i)  +  tanh(u_h . gelu(q_ih))     (i 1-indexed)
    tau_v(x_j)    = 1 + tanh(w_h . gelu(v_jh))
    o_i = sum_j softmax_j( tau_q(x_i, i) q_i . k_j / sqrt(D) ) tau_v(x_j) v_j

The token terms reuse the query and value projections (weight sharing: only ``u, w [H, D]``
and ``alpha [H]`` are new, under 0.5% of the layer's parameters). Keys are not scaled. What
differs from :class:`~attnkit.layers.MultiHeadAttention`: q and v are multiplied by their
temperatures before RoPE; softmax attention itself is unchanged and runs through
``attnkit.attend``. ``u`` and ``w`` start at zero, so at initialisation only the position
term acts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Card, FlopCount, register
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["SelectiveAttention", "selective_temperatures"]


def selective_temperatures(q: Tensor, v: Tensor, positions: Tensor, u: Tensor, w: Tensor,
                           alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``tau_q [B, H, T, 1]`` and ``tau_v [B, Hkv, T, 1]`` from q ``[B, H, T, D]``, v
    ``[B, Hkv, T, D]`` and 0-indexed ``positions [B|1, T]``."""
    position_term = torch.log1p(positions.to(q.dtype))[:, None, :, None]  # log(i), i = position + 1
    tau_q = 1 + torch.sigmoid(alpha)[None, :, None, None] * position_term
    tau_q = tau_q + torch.tanh((F.gelu(q) * u[None, :, None, :]).sum(-1, keepdim=True))
    tau_v = 1 + torch.tanh((F.gelu(v) * w[None, :, None, :]).sum(-1, keepdim=True))
    return tau_q, tau_v


class SelectiveAttention(MultiHeadAttention):
    """Multi-head attention with SSA's query and value temperatures.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.
        position_init: initial ``alpha`` (``sigmoid(-2) = 0.12`` of ``log(i)`` per query).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import SelectiveAttention
        >>> layer = SelectiveAttention(256, 8)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, position_init: float = -2.0,
                 **options):
        super().__init__(dim, num_heads, num_kv_heads, **options)
        self.query_token = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # u
        self.value_token = nn.Parameter(torch.zeros(self.num_kv_heads, self.head_dim))  # w
        self.position_scale = nn.Parameter(torch.full((num_heads,), float(position_init)))  # alpha

    def adjust(self, x, q, k, v, positions, state):
        tau_q, tau_v = selective_temperatures(q, v, positions, self.query_token, self.value_token, self.position_scale)
        return q * tau_q, k, v * tau_v


def selective_flops(batch, seq, config) -> FlopCount:
    base = multi_head_flops(batch, seq, config)
    _, heads, kv, head_dim = head_shape(config)
    extra = 4.0 * batch * seq * (heads + kv) * head_dim  # gelu-dot and scaling of q and v
    return FlopCount(attention_fwd=base.attention_fwd, projection_fwd=base.projection_fwd + extra)


register(
    Card(
        name="selective",
        title="Selective Attention: Enhancing Transformer through Principled Context Control",
        arxiv="2411.12892",
        family="score",
        layer=SelectiveAttention,
        flops=selective_flops,
        summary="query temperature (token + log-position) and value temperature; softmax unchanged",
    )
)
