"""Flow-Attention layer (Flowformer: Linearizing Transformers with Conservation Flows; Wu et
al., arXiv 2202.06258).

    q, k, v = sigmoid(x W_q), sigmoid(x W_k), x W_v                       (B, H, T, D)
    o       = flow_attend(q, k, v)            incoming/outgoing flows, conservation,
                                              competition over sources, allocation to sinks
    y       = W_o o

What differs from multi-head attention: no softmax over keys (competition is a softmax
over the *sources'* conserved flow, allocation a sigmoid of the sinks'); cost linear in T;
the causal version decodes through fixed-size running sums
(:class:`attnkit.ops.linear.flow.FlowState`). The math and its reference are in
:mod:`attnkit.ops.linear.flow`. ``causal=False`` is the paper's bidirectional version (no decode).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops.linear.flow import FLOW_BACKENDS, FlowState, flow_attend
from ..state import State
from .base import AttentionLayer, check_input
from .multi_head import head_shape

__all__ = ["FlowAttention"]


class _FlowDecodeState(State):
    def __init__(self, sums: FlowState):
        super().__init__()
        self.sums = sums

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values() if isinstance(t, Tensor))


class FlowAttention(AttentionLayer):
    """Flow-Attention: linear attention normalised by flow conservation.

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        causal: prefix-sum version for language modelling (default) or bidirectional.
        eps: added to every entry of the flow dot products (official 1e-6).
        clamp: bound of the conserved source flow before the competition (official 1.0).
        bias: biases in the projections (the official code has them).
        backend: ``auto`` | ``reference`` | ``chunked`` | ``recurrent`` | ``triton``
            (:func:`attnkit.ops.linear.flow.flow_attend`).

    Shapes: ``x [B, T, C] -> [B, T, C]``; causal decode state: ``4*D + 1`` floats plus one
    ``[D, D]`` matrix per head, whatever the context length.

    Example::

        >>> import torch
        >>> from attnkit.layers import FlowAttention
        >>> layer = FlowAttention(256, 8)
        >>> layer(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, causal: bool = True,
                 eps: float = 1e-6, clamp: float = 1.0, bias: bool = True, backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if backend not in FLOW_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(FLOW_BACKENDS)}, got {backend!r}")
        if not eps > 0 or not clamp > 0:
            raise ValueError(f"eps and clamp must be > 0, got eps={eps}, clamp={clamp}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.causal, self.eps, self.clamp, self.backend = causal, eps, clamp, backend
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> State:
        if not self.causal:
            raise ValueError("bidirectional FlowAttention (causal=False) does not decode")
        weight = self.o_proj.weight
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return _FlowDecodeState(FlowState.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim,
                                                device=device or weight.device, dtype=acc))

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError("FlowAttention does not take document_ids (its flows sum over the whole sequence)")
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = flow_attend(torch.sigmoid(q), torch.sigmoid(k), v, causal=self.causal, eps=self.eps, clamp=self.clamp,
                        state=None if state is None else state.sums, backend=self.backend)
        if state is not None:
            state.offset += T
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def flow_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: the prefix product as chunked linear attention (blocks of 64: ``4*64*D`` per
    token within a block, ``4*D*D`` through the state) plus ``~12*D`` for the flows."""
    dim, heads, _, head_dim = head_shape(config)
    inner = heads * head_dim
    core = batch * heads * seq * (4.0 * 64 * head_dim + 4.0 * head_dim * head_dim + 12.0 * head_dim)
    return FlopCount(attention_fwd=core, projection_fwd=batch * seq * 8.0 * dim * inner)


CARDS = (
    Card(
        name="flow",
        title="Flowformer: Linearizing Transformers with Conservation Flows",
        arxiv="2202.06258",
        family="linear",
        layer=FlowAttention,
        flops=flow_flops,
        capabilities=Capabilities(varlen=False, backends=("reference", "chunked", "recurrent", "triton")),
        summary="linear attention with flow conservation: source competition, sink allocation; O(1) decode state",
    ),
)
