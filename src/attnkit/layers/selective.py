"""Selective Self-Attention (SSA): temperature scaling of queries and values.

Selective Attention: Enhancing Transformer through Principled Context Control (Zhang et
al., NeurIPS 2024, arXiv 2411.12892). Official code: umich-sota/selective_attention.

Each query is scaled by a temperature that depends on the token and on its position, and
each value by a token temperature, so that a query can make its softmax spikier or flatter
and a value can be suppressed. ``form="attnkit"`` (default)::

    tau_q(x_i, i) = 1 + sigmoid(alpha_h) * log(i)  +  tanh(u_h . gelu(q_ih))     (i 1-indexed)
    tau_v(x_j)    = 1 + tanh(w_h . gelu(v_jh))
    o_i = sum_j softmax_j( tau_q(x_i, i) q_i . k_j / sqrt(D) ) tau_v(x_j) v_j

``form="official"``, exactly what the official code runs (``lit_gpt/gpt_2_PTS.py``,
``lit_gpt/model_finetune_att.py``): one scalar ``beta`` per layer, no token or value terms::

    tau_q(i) = 1 + exp(-exp(beta)) * log(i)                     (beta starts at 1.5)
    o_i = sum_j softmax_j( tau_q(i) q_i . k_j / sqrt(D) ) v_j

Which part comes from where:

- the paper: a query temperature that depends on the query token and on its position
  (``log`` of the position, against attention dilution in long contexts), a value
  temperature that lets a token be suppressed, and weight sharing that keeps the new
  parameters under 0.5%;
- the official code: only the position term, as one scalar per layer (above);
- attnkit's ``form="attnkit"``: its own parametrisation of the paper's three temperatures,
  each per head: the position scale ``sigmoid(alpha_h)``, and the token terms
  ``tanh(u_h . gelu(q))`` and ``tanh(w_h . gelu(v))``, which reuse the query and value
  projections (weight sharing: only ``u, w [H, D]`` and ``alpha [H]`` are new, under 0.5%
  of the layer's parameters). No official code computes these token terms.

Keys are not scaled. What differs from :class:`~attnkit.layers.MultiHeadAttention`: q (and
v) are multiplied by their temperatures before RoPE (a scalar per query, so the same as
scaling the scores); softmax attention itself is unchanged and runs through
``attnkit.attend``. ``u`` and ``w`` start at zero, so at initialisation only the position
term acts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cards import Card, FlopCount
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["SelectiveAttention", "selective_temperatures", "SELECTIVE_FORMS"]

SELECTIVE_FORMS = ("attnkit", "official")


def selective_temperatures(q: Tensor, v: Tensor, positions: Tensor, u: Tensor, w: Tensor,
                           alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``tau_q [B, H, T, 1]`` and ``tau_v [B, Hkv, T, 1]`` from q ``[B, H, T, D]``, v
    ``[B, Hkv, T, D]`` and 0-indexed ``positions [B|1, T]``."""
    position_term = torch.log1p(positions.to(q.dtype))[:, None, :, None]  # log(i), i = position + 1
    tau_q = 1 + torch.sigmoid(alpha)[None, :, None, None] * position_term
    tau_q = tau_q + torch.tanh((F.gelu(q) * u[None, :, None, :]).sum(-1, keepdim=True))
    tau_v = 1 + torch.tanh((F.gelu(v) * w[None, :, None, :]).sum(-1, keepdim=True))
    return tau_q, tau_v


def official_position_temperature(positions: Tensor, beta: Tensor, dtype) -> Tensor:
    """The official code's ``1 + exp(-exp(beta)) * log(i)``, ``[B|1, 1, T, 1]``, from 0-indexed
    ``positions [B|1, T]`` and the layer's scalar ``beta``."""
    return 1 + torch.exp(-torch.exp(beta.to(dtype))) * torch.log1p(positions.to(dtype))[:, None, :, None]


class SelectiveAttention(MultiHeadAttention):
    """Multi-head attention with SSA's query and value temperatures.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention`.
        form: ``"attnkit"`` (default: per-head position, query-token and value-token
            temperatures) or ``"official"`` (the official code's one position temperature per
            layer); see the module docstring.
        position_init: initial ``alpha`` for ``"attnkit"`` (default -2: ``sigmoid(-2) = 0.12``
            of ``log(i)`` per query), initial ``beta`` for ``"official"`` (default 1.5, the
            official pre-training value: ``exp(-exp(1.5)) = 0.011``).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import SelectiveAttention
        >>> layer = SelectiveAttention(256, 8)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, form: str = "attnkit",
                 position_init: float | None = None, **options):
        if form not in SELECTIVE_FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, SELECTIVE_FORMS))}, got {form!r}")
        if position_init is not None and (isinstance(position_init, bool) or not isinstance(position_init, (int, float))):
            raise ValueError(f"position_init must be a number or None, got {position_init!r}")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        self.form = form
        if form == "official":
            self.position_beta = nn.Parameter(torch.tensor(1.5 if position_init is None else float(position_init)))
            return
        self.query_token = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # u
        self.value_token = nn.Parameter(torch.zeros(self.num_kv_heads, self.head_dim))  # w
        init = -2.0 if position_init is None else float(position_init)
        self.position_scale = nn.Parameter(torch.full((num_heads,), init))  # alpha

    def adjust(self, x, q, k, v, positions, state):
        if self.form == "official":
            return q * official_position_temperature(positions, self.position_beta, q.dtype), k, v
        tau_q, tau_v = selective_temperatures(q, v, positions, self.query_token, self.value_token, self.position_scale)
        return q * tau_q, k, v * tau_v


def selective_flops(batch, seq, config) -> FlopCount:
    base = multi_head_flops(batch, seq, config)
    _, heads, kv, head_dim = head_shape(config)
    if config.get("form", "attnkit") == "official":
        extra = 1.0 * batch * seq * heads * head_dim  # scaling of q
    else:
        extra = 4.0 * batch * seq * (heads + kv) * head_dim  # gelu-dot and scaling of q and v
    return FlopCount(attention_fwd=base.attention_fwd, projection_fwd=base.projection_fwd + extra)


CARDS = (
    Card(
        name="selective",
        title="Selective Attention: Enhancing Transformer through Principled Context Control",
        arxiv="2411.12892",
        family="score",
        layer=SelectiveAttention,
        flops=selective_flops,
        summary="query temperature (token + log-position) and value temperature, per head; form='official' for the "
                "official code's one log-position temperature per layer; softmax unchanged",
    ),
)
