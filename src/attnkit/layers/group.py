"""Chronos-2 group attention: attention across the series of a group at each time step.

Chronos-2: From Univariate to Universal Forecasting (Ansari et al., Amazon, October 2025;
code: amazon-science/chronos-forecasting). A batch holds several series; ``group_ids [B]`` says which series belong
together (the variates of one multivariate series, or targets with their covariates). At
every time step each series attends to the series of its own group::

    o[b, t] = sum_{b' : group(b') = group(b)} softmax_{b'}( q[b, t] . k[b', t] * scale ) v[b', t]

with ``scale = 1`` (the official code's unscaled, T5-style scores) and no position
embedding (a group has no order). Chronos-2 alternates it with ordinary time attention:
:class:`Chronos2Attention` is that pair, time attention then group attention, each
pre-normed with its own residual. What differs from
:class:`~attnkit.layers.MultiHeadAttention`: the attention runs along the batch axis; time
steps never mix, so decoding needs no cache for it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops import BACKENDS, attend
from ..state import State
from .base import AttentionLayer, check_input
from .multi_head import MultiHeadAttention, multi_head_flops

__all__ = ["GroupAttention", "Chronos2Attention"]


class _Steps(State):
    def nbytes(self) -> int:
        return 0


def check_group_ids(group_ids, batch: int, device) -> Tensor:
    if group_ids is None:
        return torch.arange(batch, device=device)  # every series its own group
    if not isinstance(group_ids, Tensor) or group_ids.shape != (batch,) or group_ids.is_floating_point():
        got = tuple(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise ValueError(f"group_ids must be an integer tensor [B] = [{batch}], got {got}")
    return group_ids.to(device)


class GroupAttention(AttentionLayer):
    """Attention across the batch items of one group, at each time step.

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        scale: score scale (default 1.0, unscaled as in Chronos-2; ``None``: ``D ** -0.5``).
        bias: biases in the projections.
        backend: ``attend`` backend.

    Forward: ``x [B, T, C]``, ``group_ids [B]`` (default: each item alone) -> ``[B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import GroupAttention
        >>> layer = GroupAttention(64, 4)
        >>> layer(torch.randn(6, 10, 64), group_ids=torch.tensor([0, 0, 0, 1, 1, 2])).shape
        torch.Size([6, 10, 64])
    """

    accepts_group_ids = True

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, scale: float | None = 1.0,
                 bias: bool = False, backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ValueError(f"scale must be a positive float or None, got {scale!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.scale, self.backend = scale, backend
        self.qkv_proj = nn.Linear(dim, 3 * num_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> State:
        return _Steps()

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None,
                group_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        B, T, _ = x.shape
        groups = check_group_ids(group_ids, B, x.device)
        H, D = self.num_heads, self.head_dim
        # time becomes the batch axis and the series the sequence axis
        q, k, v = self.qkv_proj(x).view(B, T, 3, H, D).permute(2, 1, 3, 0, 4)  # 3 x (T, H, B, D)
        pattern = _patterns.documents(groups[None].expand(T, B))
        # the group axis is short (a few series): SDPA with a dense [B, B] mask per step costs
        # nothing, while FlexAttention's kernel launch failed on the H200 ("CUDA driver error:
        # invalid argument") once time steps x heads reached 65536 (T = 4096, H = 16)
        backend = "sdpa" if self.backend == "auto" else self.backend
        out = attend(q, k, v, pattern=pattern, scale=self.scale, backend=backend)  # (T, H, B, D)
        if state is not None:
            state.offset += T
        return self.o_proj(out.permute(2, 0, 1, 3).reshape(B, T, H * D))


class Chronos2Attention(AttentionLayer):
    """Chronos-2's pair: time attention (RoPE, causal here) then group attention, each with
    RMSNorm and a residual. Returns the update ``h - x`` so that a pre-norm residual block
    (``x + layer(norm(x))``) applies it as is.

    Args:
        dim, num_heads: width and heads of both attentions.
        pattern: the time attention's pattern (default ``"causal"``).
        scale: score scale of both (default 1.0, unscaled as in the official code).
        backend: ``attend`` backend of both.
    """

    accepts_group_ids = True

    def __init__(self, dim: int, num_heads: int, *, pattern="causal", scale: float | None = 1.0,
                 backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.time = _UnscaledTime(dim, num_heads, pattern=pattern, scale=scale, backend=backend)
        self.group = GroupAttention(dim, num_heads, scale=scale, backend=backend)
        self.time_norm = nn.RMSNorm(dim)
        self.group_norm = nn.RMSNorm(dim)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> State:
        return self.time.init_state(batch_size, max_len=max_len, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None,
                group_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        h = x + self.time(self.time_norm(x), state, document_ids=document_ids)
        h = h + self.group(self.group_norm(h), group_ids=group_ids)
        return h - x


class _UnscaledTime(MultiHeadAttention):
    """Time attention with a chosen score scale (Chronos-2's is 1)."""

    def __init__(self, dim, num_heads, *, scale, **options):
        super().__init__(dim, num_heads, **options)
        self.scale = scale

    def core(self, q, k, v, pattern, q_offset):
        return attend(q, k, v, pattern=pattern, scale=self.scale, backend=self.backend, q_offset=q_offset)


def group_flops(batch, seq, config) -> FlopCount:
    """Per time step, attention among the B series (all in one group in the count: the worst case)."""
    dim, heads = config["dim"], config["num_heads"]
    inner = heads * (config.get("head_dim") or dim // heads)
    return FlopCount(attention_fwd=4.0 * seq * heads * batch * batch * (inner // heads),
                     projection_fwd=2.0 * batch * seq * dim * 4 * inner)


def chronos2_flops(batch, seq, config) -> FlopCount:
    time = multi_head_flops(batch, seq, {"dim": config["dim"], "num_heads": config["num_heads"],
                                         "pattern": config.get("pattern", "causal")})
    group = group_flops(batch, seq, config)
    return FlopCount(attention_fwd=time.attention_fwd + group.attention_fwd,
                     projection_fwd=time.projection_fwd + group.projection_fwd)


CARDS = (
    Card(
        name="chronos2-group",
        title="Chronos-2: From Univariate to Universal Forecasting",
        arxiv=None,
        family="pattern",
        layer=GroupAttention,
        flops=group_flops,
        capabilities=Capabilities(causal=True, bidirectional=True, decode=True, varlen=False),
        summary="attention across the series of a group at each time step (no mixing over time)",
    ),
    Card(
        name="chronos2",
        title="Chronos-2: From Univariate to Universal Forecasting",
        arxiv=None,
        family="pattern",
        layer=Chronos2Attention,
        flops=chronos2_flops,
        capabilities=Capabilities(varlen=True),
        summary="time attention then group attention (unscaled scores), as a Chronos-2 encoder block pair",
    ),
)
