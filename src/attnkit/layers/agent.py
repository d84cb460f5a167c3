"""Agent Attention (Agent Attention: On the Integration of Softmax and Linear Attention; Han
et al., arXiv 2312.08874; official code LeapLabTHU/Agent-Attention).

A small set of ``n`` agent tokens stands between queries and keys::

    A    = pool(Q)                                               n agents per head (B, H, n, D)
    V_A  = softmax(A K^T * s + B1) V                              stage 1: agents aggregate
    O    = softmax(Q A^T * s + B2) V_A  +  DWC(V)                 stage 2: agents broadcast

with ``s = D^-0.5``, position biases ``B1 [H, n, N]`` and ``B2 [H, N, n]`` and a depthwise
3x3 convolution of V on the token grid added back. Cost ``O(N n D)``: linear in the number
of tokens N.

:class:`AgentAttention` is the paper's bidirectional layer for image tokens on an
``h x w`` grid (``grid_size``; without it the sequence is a ``1 x N`` grid). Agents are the
queries average-pooled to ``sqrt(n) x sqrt(n)`` (``1 x n`` for a sequence). The biases
follow the official decomposition, ``B1 = interp(an) + ah + aw`` and ``B2 = interp(na) +
ha + wa``; here every term is stored at a 7-point base resolution and interpolated to the
grid, so one layer serves any grid (the official code sizes ``ah, aw, ha, wa`` to one
window). Both stages are small (one axis is the n agents), so they are materialised (:func:`agent_attend`).

:class:`CausalAgentAttention` is attnkit's own causal variant for language modelling
(construction stated here, not from the paper). Pooling queries would let a token see
the future, so the ``n`` agents are learned per-head vectors. Stage 1 is a softmax over
the *prefix* of keys, so agent values change with the position::

    V_A(t)_a = sum_{j<=t} exp(s a_a . k_j) v_j / Z_a(t),    Z_a(t) = sum_{j<=t} exp(s a_a . k_j)
    o_t      = sum_a softmax_a(s q_t . a_a + b2_a) V_A(t)_a  +  causal depthwise conv_3(V)_t

(No stage-1 bias: without a grid, a per-agent constant would cancel in the prefix softmax.)
Stage-1 scores are soft-capped, ``s -> cap * tanh(s / cap)`` (``score_cap``, default 30, as
Gemma 2 caps logits): the linear form below needs one stabiliser per agent for the whole
call, and with scores bounded to ``[-cap, cap]`` no weight underflows (``e^-60`` is far
inside float32 and bf16 range). Without the cap, training on MQAR hit NaN at step 690.
Writing ``phi_k(j)_a = exp(s a_a . k_j - m_a)`` and ``phi_q(t)_a = softmax_a(...) /
Z_a(t)`` gives ``o_t = sum_{j<=t} (phi_q(t) . phi_k(j)) v_j``: causal linear attention with
an n-dimensional feature map, run on :func:`attnkit.ops.linear.lightning.lightning_attend` with
zero decay. ``m_a`` is a detached stabiliser (the running maximum of the agent's scores),
which cancels exactly. Decode state per head: ``[n, D]`` + ``[n]`` + ``[n]`` plus the conv
tail: constant in the context length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops.linear.lightning import lightning_attend
from ..ops.linear.prefix_sum import prefix_sum
from ..state import RecurrentState
from .base import AttentionLayer, check_input
from .multi_head import head_shape

__all__ = ["AgentAttention", "CausalAgentAttention", "agent_attend", "agent_attend_reference"]

BASE = 7  # resolution the position biases are stored at


def agent_attend(q, k, v, agents, bias1, bias2, scale, *, compute_dtype=None):
    """Two-stage agent attention with materialised scores: q ``[B, H, N, D]``, k, v
    ``[B, H, S, D]``, agents ``[B, H, n, D]``, bias1 ``[H, n, S]``, bias2 ``[H, N, n]``.

    One axis of both score matrices is the n agents, so they are small (``N x n``): plain
    matmuls and softmax beat a fused kernel built for long key axes, and the biases get
    their gradients without a scatter. (Measured on the H200 at 128k tokens, fwd+bwd:
    FlexAttention with the bias as a captured score modifier 1.9 s; attend's materialised
    path with an indexed bias 2.3 s, its backward a scatter-add; this form: see
    ``benchmarks/results/h200/linear-agent-fwdbwd.json``.) ``compute_dtype`` defaults to float32
    (float64 for float64 inputs); the result is in q's dtype."""
    dtype = q.dtype
    acc = compute_dtype or torch.promote_types(dtype, torch.float32)
    q, k, v, agents, bias1, bias2 = (t.to(acc) for t in (q, k, v, agents, bias1, bias2))
    agent_v = torch.softmax(agents @ k.transpose(-1, -2) * scale + bias1, dim=-1) @ v  # (B, H, n, D)
    return (torch.softmax(q @ agents.transpose(-1, -2) * scale + bias2, dim=-1) @ agent_v).to(dtype)


def agent_attend_reference(q, k, v, agents, bias1, bias2, scale):
    """:func:`agent_attend` in float64."""
    return agent_attend(q, k, v, agents, bias1, bias2, scale, compute_dtype=torch.float64)


def interpolation_matrix(out_size: int, in_size: int, like: Tensor) -> Tensor:
    """``[out_size, in_size]`` weights of 1-d linear resizing with ``align_corners=False``
    (what ``F.interpolate(mode="linear")`` computes), so resizing is a matmul."""
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    weights[torch.arange(out_size), lo] += 1 - frac
    weights[torch.arange(out_size), hi] += frac
    return weights.to(device=like.device, dtype=like.dtype)


def pooling_matrix(grid: tuple[int, int], pool: tuple[int, int], like: Tensor) -> Tensor:
    """Adaptive average pooling of an ``h x w`` grid to ``ph x pw`` cells as a matrix
    ``[ph*pw, h*w]`` (cell i covers rows ``floor(i h / ph) .. ceil((i+1) h / ph)``, as
    ``adaptive_avg_pool2d``). A matmul instead of the pooling kernel, whose CUDA backward
    fails on long ``1 x N`` grids."""
    def axis(size: int, cells: int) -> Tensor:
        i = torch.arange(cells)
        start, end = (i * size) // cells, -((-(i + 1) * size) // cells)
        pos = torch.arange(size)
        member = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])
        return member.to(like.dtype) / (end - start).to(like.dtype)[:, None]

    return torch.kron(axis(grid[0], pool[0]), axis(grid[1], pool[1])).to(like.device)


class AgentAttention(AttentionLayer):
    """Bidirectional Agent Attention on an ``h x w`` token grid (the paper's vision layer).

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        agent_num: n agents (a square number when ``grid_size`` is given; default 49).
        grid_size: ``(h, w)`` with ``h * w = N`` tokens, or ``None``: a ``1 x N`` grid.
        bias: biases in the projections.
        backend: ``auto`` (materialised ``N x n`` scores in float32, :func:`agent_attend`)
            or ``reference`` (the same in float64).

    Shapes: ``x [B, N, C] -> [B, N, C]``. No decode (every token sees every token).

    Example::

        >>> import torch
        >>> from attnkit.layers import AgentAttention
        >>> layer = AgentAttention(128, 4, agent_num=16, grid_size=(14, 14))
        >>> layer(torch.randn(2, 196, 128)).shape
        torch.Size([2, 196, 128])
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, agent_num: int = 49,
                 grid_size: tuple[int, int] | None = None, bias: bool = True, backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(agent_num, "agent_num")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if grid_size is not None:
            if len(grid_size) != 2 or any(not isinstance(g, int) or g < 1 for g in grid_size):
                raise ValueError(f"grid_size must be two positive ints (h, w), got {grid_size!r}")
            if math.isqrt(agent_num) ** 2 != agent_num:
                raise ValueError(f"agent_num must be a square number on a 2-d grid (agents pool to sqrt(n) x sqrt(n)), "
                                 f"got {agent_num}")
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.agent_num, self.grid_size, self.backend = agent_num, grid_size, backend
        H, n, inner = num_heads, agent_num, num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.dwc = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        # agent -> token biases (B1) and token -> agent biases (B2), at the base resolution
        self.an_bias = nn.Parameter(torch.randn(H, n, BASE, BASE) * 0.02)
        self.ah_bias = nn.Parameter(torch.randn(H, n, BASE) * 0.02)
        self.aw_bias = nn.Parameter(torch.randn(H, n, BASE) * 0.02)
        self.na_bias = nn.Parameter(torch.randn(H, n, BASE, BASE) * 0.02)
        self.ha_bias = nn.Parameter(torch.randn(H, n, BASE) * 0.02)
        self.wa_bias = nn.Parameter(torch.randn(H, n, BASE) * 0.02)

    def _grid(self, N: int) -> tuple[int, int]:
        if self.grid_size is None:
            return 1, N
        h, w = self.grid_size
        if h * w != N:
            raise ValueError(f"x has N={N} tokens but grid_size={self.grid_size} holds {h * w}")
        return h, w

    def biases(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """``B1 [H, n, h*w]`` and ``B2 [H, h*w, n]`` at grid ``(h, w)``: the base-resolution
        terms resized (bilinear / linear, as ``F.interpolate`` with ``align_corners=False``)."""
        rows, cols = interpolation_matrix(h, BASE, self.an_bias), interpolation_matrix(w, BASE, self.an_bias)

        def full(grid, row_bias, col_bias):  # (H, n, h, w); matmuls: F.interpolate's CUDA backward
            g = rows @ grid @ cols.T  # piles atomics onto 7 outputs and took seconds at 128k tokens
            return (g + (row_bias @ rows.T)[..., :, None] + (col_bias @ cols.T)[..., None, :]).flatten(2)

        b1 = full(self.an_bias, self.ah_bias, self.aw_bias)
        b2 = full(self.na_bias, self.ha_bias, self.wa_bias).transpose(1, 2)
        return b1, b2

    def parts(self, x: Tensor):
        """q, k, v ``[B, H, N, D]``, agents ``[B, H, n, D]``, biases, the DWC term ``[B, N, H*D]``."""
        B, N, _ = x.shape
        h, w = self._grid(N)
        H, D, n = self.num_heads, self.head_dim, self.agent_num
        qkv = self.qkv_proj(x)  # (B, N, 3*H*D)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        pool = (1, n) if self.grid_size is None else (math.isqrt(n),) * 2
        agents = (pooling_matrix((h, w), pool, x) @ qkv[..., : H * D]).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        v_grid = qkv[..., 2 * H * D :].transpose(1, 2).reshape(B, H * D, h, w)
        local = self.dwc(v_grid).reshape(B, H * D, N).transpose(1, 2)
        return q, k, v, agents, *self.biases(h, w), local

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self)
        if state is not None:
            raise ValueError("AgentAttention is bidirectional and does not decode; use CausalAgentAttention")
        if document_ids is not None:
            raise ValueError("AgentAttention does not take document_ids")
        B, N, _ = x.shape
        q, k, v, agents, b1, b2, local = self.parts(x)
        scale = self.head_dim ** -0.5
        if self.backend == "reference":
            o = agent_attend_reference(q, k, v, agents, b1, b2, scale)
        else:
            o = agent_attend(q, k, v, agents, b1, b2, scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1) + local)


class CausalAgentAttention(AttentionLayer):
    """Causal Agent Attention for language modelling (attnkit's construction; module doc).

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        agent_num: n learned agents per head (default 16).
        conv_size: width of the causal depthwise convolution on V (default 3).
        score_cap: soft cap of the stage-1 scores (default 30).
        bias: biases in the projections.
        backend: ``auto`` | ``reference`` (materialised prefix softmax) | ``chunked`` |
            ``recurrent`` | ``triton`` (the linear-attention path).

    Shapes: ``x [B, T, C] -> [B, T, C]``; decode state per head ``[n, D]`` plus ``2n``
    floats and the last ``conv_size - 1`` values.
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, agent_num: int = 16,
                 conv_size: int = 3, score_cap: float = 30.0, bias: bool = False, backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(agent_num, "agent_num")
        positive_int(conv_size, "conv_size")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if backend not in ("auto", "reference", "chunked", "recurrent", "triton"):
            raise ValueError(f"backend must be one of auto, reference, chunked, recurrent, triton, got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        if not score_cap > 0:
            raise ValueError(f"score_cap must be > 0, got {score_cap}")
        self.agent_num, self.conv_size, self.backend, self.score_cap = agent_num, conv_size, backend, score_cap
        H, n, inner = num_heads, agent_num, num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.agents = nn.Parameter(torch.randn(H, n, head_dim) * head_dim ** -0.5)
        # stage 2's per-agent bias b2; stage 1 has none: a per-agent constant added to every
        # key's score cancels in the prefix softmax (its gradient is exactly zero)
        self.agent_query_bias = nn.Parameter(torch.zeros(H, n))
        self.dwc = nn.Conv1d(inner, inner, kernel_size=conv_size, groups=inner)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> RecurrentState:
        weight = self.o_proj.weight
        device = device or weight.device
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        H, n, D = self.num_heads, self.agent_num, self.head_dim
        return RecurrentState(kv=torch.zeros(batch_size, H, n, D, device=device, dtype=acc),
                              z=torch.zeros(batch_size, H, n, device=device, dtype=acc),
                              m=torch.full((batch_size, H, n), float("-inf"), device=device, dtype=acc),
                              tail=torch.zeros(batch_size, self.conv_size - 1, H * D, device=device, dtype=weight.dtype))

    def _local(self, v_flat: Tensor, state: RecurrentState | None) -> Tensor:
        """Causal depthwise conv over time of ``v [B, T, H*D]`` (left-padded by the tail)."""
        K = self.conv_size
        if state is None:
            padded = F.pad(v_flat, (0, 0, K - 1, 0))
        else:
            padded = torch.cat([state["tail"].to(v_flat.dtype), v_flat], dim=1)
            state["tail"] = padded[:, padded.shape[1] - (K - 1):]
        return self.dwc(padded.transpose(1, 2)).transpose(1, 2)

    def reference_core(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The two stages as written (prefix softmax materialised ``[n, T, T]``), float64."""
        dtype = q.dtype
        q, k, v = q.double(), k.double(), v.double()
        A = self.agents.double()[None]  # (1, H, n, D)
        scale, T = self.head_dim ** -0.5, q.shape[2]
        s1 = self.score_cap * torch.tanh((A @ k.transpose(-1, -2)) * scale / self.score_cap)  # (B, H, n, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (t, j): j <= t
        w1 = torch.softmax(s1[:, :, :, None, :].masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, n, T, T)
        agent_v = w1 @ v[:, :, None]  # (B, H, n, T, D): V_A(t)
        p = torch.softmax((q @ A.transpose(-1, -2)) * scale + self.agent_query_bias.double()[None, :, None], -1)  # (B, H, T, n)
        return torch.einsum("bhtn,bhntd->bhtd", p, agent_v).to(dtype)

    def forward(self, x: Tensor, state: RecurrentState | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError("CausalAgentAttention does not take document_ids (its agents sum over the prefix)")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv_proj(x)
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        local = self._local(qkv[..., 2 * H * D :], state)
        if self.backend == "reference" and state is None:
            o = self.reference_core(q, k, v)
        else:
            o = self._linear_core(q, k, v, state)
        if state is not None:
            state.offset += T
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D) + local)

    def _linear_core(self, q: Tensor, k: Tensor, v: Tensor, state: RecurrentState | None) -> Tensor:
        acc = torch.promote_types(q.dtype, torch.float32)
        scale = self.head_dim ** -0.5
        A = self.agents.to(acc)
        s1 = self.score_cap * torch.tanh((k.to(acc) @ A.transpose(-1, -2)) * scale / self.score_cap)  # (B, H, T, n)
        m = s1.detach().amax(dim=2)  # (B, H, n)
        kv0 = z0 = None
        if state is not None:
            m = torch.maximum(m, state["m"])
            shrink = torch.exp(state["m"] - m).nan_to_num(0.0)  # exp(-inf) before the first token
            kv0, z0 = state["kv"] * shrink[..., None], state["z"] * shrink
        phi_k = torch.exp(s1 - m[:, :, None])  # (B, H, T, n)
        z = prefix_sum(phi_k) + (0 if z0 is None else z0[:, :, None])
        p = torch.softmax((q.to(acc) @ A.transpose(-1, -2)) * scale + self.agent_query_bias.to(acc)[None, :, None], -1)
        phi_q = p / z  # (B, H, T, n)
        backend = "chunked" if self.backend == "reference" else self.backend
        slopes = torch.zeros(self.num_heads, device=q.device, dtype=acc)
        dt = q.dtype
        o, kv = lightning_attend(phi_q.to(dt), phi_k.to(dt), v, slopes, initial_state=kv0, backend=backend)
        if state is not None:
            state["kv"], state["z"], state["m"] = kv.to(state["kv"].dtype), z[:, :, -1], m
        return o


def agent_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: two stages of ``4*N*n*D`` each per head; projections q, k, v, o and the DWC."""
    dim, heads, _, head_dim = head_shape(config)
    n = config.get("agent_num", 49)
    inner = heads * head_dim
    core = 8.0 * batch * heads * seq * n * head_dim
    return FlopCount(attention_fwd=core, projection_fwd=batch * seq * (8.0 * dim * inner + 18.0 * inner))


def causal_agent_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: agent scores ``4*T*n*D`` plus the chunked linear attention with feature dim n."""
    dim, heads, _, head_dim = head_shape(config)
    n = config.get("agent_num", 16)
    inner = heads * head_dim
    core = batch * heads * seq * (4.0 * n * head_dim + 2.0 * 64 * (n + head_dim) + 4.0 * n * head_dim)
    return FlopCount(attention_fwd=core, projection_fwd=batch * seq * (8.0 * dim * inner + 2.0 * 3 * inner))


CARDS = (
    Card(
        name="agent",
        title="Agent Attention: On the Integration of Softmax and Linear Attention",
        arxiv="2312.08874",
        family="linear",
        layer=AgentAttention,
        flops=agent_flops,
        defaults={"agent_num": 16},
        capabilities=Capabilities(causal=False, decode=False, varlen=False, backends=("reference", "materialised")),
        summary="bidirectional: agents pooled from queries aggregate, then broadcast; + depthwise conv on V",
    ),
    Card(
        name="agent-causal",
        title="Agent Attention: On the Integration of Softmax and Linear Attention",
        arxiv="2312.08874",
        family="linear",
        layer=CausalAgentAttention,
        flops=causal_agent_flops,
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "chunked", "recurrent", "triton")),
        summary="attnkit's causal variant: learned agents, prefix-softmax stage 1 as linear attention; O(1) decode state",
    ),
)
