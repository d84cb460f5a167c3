"""MoH: Mixture-of-Head attention (heads as experts, routed per token).

MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al., arXiv 2410.11842;
official code SkyworkAI/MoH). The first ``shared_heads`` heads are always active; each token
picks ``active_heads`` of the other (routed) heads, and the head outputs are weighted before
the output projection::

    a      = softmax(W_r x)                                  over the R routed heads
    g_r,i  = 2 alpha_2 * k * a_i / sum_{j in topk(a)} a_j     for i in topk(a), else 0
    g_s,i  = 2 alpha_1 * S * softmax(W_s x)_i                 shared heads (S of them)
    [alpha_1, alpha_2] = softmax(W_h x)
    y      = W_o concat_i(g_i * head_i(x))

(with no shared heads the routed gates are used alone; a single shared head has gate 1).
Load balance over the routed heads, as in the official code: ``L_b = R * sum_i f_i P_i``
with ``f_i`` the fraction of tokens that picked head i and ``P_i`` its mean router
probability; the layer exposes ``aux_loss = balance_weight * L_b`` after each training
forward, which ``attnkit compare`` adds to the loss.

Fast path: a routed head is computed only for the tokens that picked it. On CUDA with the
cuDNN frontend (``backend="auto"``, prefill and training) the picked rows run through
:func:`attnkit.ops.softmax.picked_causal.picked_causal_attention`: a dyadic split of the positions
into unmasked rectangles that cuDNN's fused attention computes at its full rate, merged by
log-sum-exp. Otherwise, per (batch item, head) the picked tokens are gathered (sorted by position) into ``M`` query rows, ``M`` the
largest count, and attend to all keys through :class:`attnkit.patterns.AtQueryPositions`:
with half of the routed heads active the attention core of those heads does about half the
work. Their FlexAttention block mask is built from the gathered positions in closed form
(:meth:`attnkit.patterns.AtQueryPositions.flex_block_mask`), not by evaluating the mask over
every (row, key) pair. The reference path computes every head and multiplies by the gates (the unpicked
heads' gates are zero, so both are exact). Decoding caches every head's keys and values (a
later token may pick any head). Under ``torch.compile`` the routed heads take the gathered
path with every token as a candidate row (``M = T``, the others padding), since ``M`` and the
cuDNN split's plan are read from the data; the values are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import patterns as _patterns
from ..cards import Capabilities, Card, FlopCount, dense_attention_flops
from ..ops import attend
from ..ops.softmax import picked_causal as _picked
from .multi_head import MultiHeadAttention, head_shape

__all__ = ["MixtureOfHeadsAttention"]

# run the shared heads on a side stream while the routed heads' split runs (CUDA, cuDNN split only)
OVERLAP_SHARED_HEADS = True
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]



class MixtureOfHeadsAttention(MultiHeadAttention):
    """Multi-head attention whose heads are experts: shared heads plus top-k routed heads.

    Args:
        dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, bias, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (causal).
        shared_heads: always-active heads (default H // 4).
        active_heads: routed heads each token picks (default half of the routed heads).
        balance_weight: weight of the load-balance loss in ``aux_loss`` (default 0.01).
        sparse: compute routed heads only for the tokens that picked them (default True;
            ``False`` computes all heads and masks, as the reference does).

    After a forward in training mode ``layer.aux_loss`` holds the weighted load-balance loss
    and ``layer.last_routing`` the routed heads' selection mask ``[B, T, R]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import MixtureOfHeadsAttention
        >>> layer = MixtureOfHeadsAttention(256, 8, shared_heads=2, active_heads=3)
        >>> y = layer(torch.randn(2, 16, 256)); float(layer.aux_loss) > 0
        True
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, shared_heads: int | None = None,
                 active_heads: int | None = None, balance_weight: float = 0.01, sparse: bool = True, **options):
        if options.get("pattern", "causal") != "causal":
            raise ValueError("MixtureOfHeadsAttention is causal (its selected-heads path gathers causal query rows)")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        shared = num_heads // 4 if shared_heads is None else shared_heads
        if not isinstance(shared, int) or not 0 <= shared < num_heads:
            raise ValueError(f"shared_heads must be an int in [0, num_heads={num_heads}), got {shared_heads!r}")
        routed = num_heads - shared
        active = max(1, routed // 2) if active_heads is None else active_heads
        if not isinstance(active, int) or not 1 <= active <= routed:
            raise ValueError(f"active_heads must be an int in [1, routed heads = {routed}], got {active_heads!r}")
        if balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {balance_weight}")
        self.shared_heads, self.routed_heads, self.active_heads = shared, routed, active
        self.balance_weight, self.sparse = balance_weight, sparse
        self.router = nn.Linear(dim, routed, bias=False)  # W_r
        self.shared_router = nn.Linear(dim, shared, bias=False) if shared > 1 else None  # W_s
        self.group_router = nn.Linear(dim, 2, bias=False) if shared > 0 else None  # W_h
        self.aux_loss: Tensor | None = None
        self.last_routing: Tensor | None = None
        self._gates: Tensor | None = None

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token head gates ``[B, T, H]`` and the routed heads' selection mask ``[B, T, R]``;
        sets ``aux_loss`` in training mode."""
        wide = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(self.router(x).to(wide), dim=-1)  # (B, T, R)
        top = probs.topk(self.active_heads, dim=-1).indices
        chosen = torch.zeros_like(probs).scatter_(-1, top, 1.0)
        routed = probs * chosen
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(routed.dtype).eps) * self.active_heads
        if self.shared_heads:
            shared = (torch.softmax(self.shared_router(x).to(wide), -1) * self.shared_heads
                      if self.shared_router is not None else torch.ones_like(probs[..., :1]))
            mix = torch.softmax(self.group_router(x).to(wide), -1) * 2  # (B, T, 2)
            gates = torch.cat([shared * mix[..., :1], routed * mix[..., 1:]], dim=-1)
        else:
            gates = routed
        if self.training:
            f = chosen.flatten(0, 1).mean(0)  # fraction of tokens per routed head
            p = probs.flatten(0, 1).mean(0)
            self.aux_loss = self.balance_weight * self.routed_heads * (f * p).sum()
        self.last_routing = chosen.bool().detach()
        return gates.to(x.dtype), chosen.bool()

    def adjust(self, x, q, k, v, positions, state):
        self._gates = self.gates(x)  # read by core(), within this forward
        return q, k, v

    def core(self, q: Tensor, k: Tensor, v: Tensor, pattern, q_offset: int | None) -> Tensor:
        gates, chosen = self._gates
        self._gates = None
        gate_heads = gates.transpose(1, 2)[..., None]  # (B, H, T, 1)
        use_sparse = self.sparse and self.backend != "reference" and pattern.kind == "causal"
        if not use_sparse:
            return attend(q, k, v, pattern=pattern, backend=self.backend, q_offset=q_offset) * gate_heads
        B, H, T, D = q.shape
        S, group, s_heads = k.shape[2], H // k.shape[1], self.shared_heads
        q_offset = S - T if q_offset is None else q_offset
        if group > 1:  # routed heads need their own K/V
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        picked = chosen.transpose(1, 2)  # (B, R, T)
        # split, not two slices: the backward concatenates the two halves' gradients in one pass
        # (two slices would each scatter into a zero tensor of the full size, and then add)
        (q_s, q_r), (k_s, k_r), (v_s, v_r) = (t.split([s_heads, H - s_heads], dim=1) for t in (q, k, v))
        shared = lambda: attend(q_s, k_s, v_s, pattern=pattern, backend=self.backend, q_offset=q_offset)  # noqa: E731
        # under torch.compile the row count cannot be read from the data (nor the cuDNN split's plan
        # made on the host): every token becomes a candidate row (below), so the graph has fixed shapes
        compiling = torch.compiler.is_compiling()
        if (not compiling and self.backend == "auto" and q_offset == 0 and T == S
                and _picked.supports(q_r, k_r, v_r, picked)):
            # cuDNN on dense rectangles (attnkit.ops.softmax.picked_causal): about cuDNN's rate on the picked rows.
            # The shared heads run on a side stream meanwhile: they fill the GPU while the routed
            # heads' plan waits for it and while their small pieces are launched (the backward runs
            # on the same streams)
            overlap = bool(s_heads) and OVERLAP_SHARED_HEADS
            if overlap:
                main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    shared_out = shared()
                for t in (q_s, k_s, v_s):
                    t.record_stream(side)  # read there: not to be reused before it finishes
            plan = _picked.make_plan(q_r, picked, engine="cudnn")
            if s_heads and not overlap:
                shared_out = shared()
            routed_out = _picked.picked_causal_attention(q_r, k_r, v_r, picked, engine="cudnn", plan=plan)
            if overlap:
                main.wait_stream(side)
                shared_out.record_stream(main)
            return (torch.cat([shared_out, routed_out], dim=1) if s_heads else routed_out) * gate_heads
        shared_out = shared() if s_heads else None
        routed_out = torch.zeros_like(q_r)
        counts = picked.sum(-1)
        # compiled: M = T rows, those past a head's count are padding that sees no key (the same
        # values; FlexAttention skips their empty blocks, SDPA on CPU computes and discards them)
        M = T if compiling else int(counts.max())
        if M > 0:
            if q.is_cuda and not compiling:
                # FlexAttention compiles one kernel per shape, and M changes with every batch: round it
                # up (to 1/32 of T, at least 128 rows) so that training steps share a few kernels
                bucket = max(128, -(-T // 32 // 128) * 128)
                M = min(T, -(-M // bucket) * bucket)
            # picked tokens first, in position order: row i of (b, h) is the i-th token that picked h
            order = torch.argsort((~picked).to(torch.int8), dim=-1, stable=True)[..., :M]  # (B, R, M)
            valid = torch.arange(M, device=q.device) < counts[..., None]
            rows = torch.where(valid, order + q_offset, torch.full_like(order, -1))  # absolute positions, -1 padding
            index = order[..., None].expand(-1, -1, -1, D)
            gathered = attend(q_r.gather(2, index), k_r, v_r, q_offset=0, backend=self.backend,
                              pattern=_patterns.AtQueryPositions(_patterns.causal(), rows))  # (B, R, M, D)
            routed_out = routed_out.scatter(2, index, gathered * valid[..., None])
        heads = routed_out if shared_out is None else torch.cat([shared_out, routed_out], dim=1)
        return heads * gate_heads


def mixture_of_heads_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Projections as MHA plus the routers; core: the shared heads on every token, the
    routed heads on the fraction ``active / routed`` of the tokens."""
    dim, heads, kv_heads, head_dim = head_shape(config)
    shared = heads // 4 if config.get("shared_heads") is None else config["shared_heads"]
    routed = heads - shared
    active = max(1, routed // 2) if config.get("active_heads") is None else config["active_heads"]
    per_head = dense_attention_flops(batch, seq, num_heads=1, head_dim=head_dim, pattern="causal")
    core = per_head * (shared + routed * active / routed)
    projection = (2.0 * batch * seq * dim * (heads + 2 * kv_heads) * head_dim + 2.0 * batch * seq * heads * head_dim * dim
                  + 2.0 * batch * seq * dim * (routed + shared + 2))
    return FlopCount(attention_fwd=core, projection_fwd=projection)


CARDS = (
    Card(
        name="moh",
        title="MoH: Multi-Head Attention as Mixture-of-Head Attention",
        arxiv="2410.11842",
        family="sharing",
        layer=MixtureOfHeadsAttention,
        flops=mixture_of_heads_flops,
        capabilities=Capabilities(bidirectional=False),
        summary="shared heads + top-k routed heads per token, gated before W_o; load-balance aux loss",
    ),
)
