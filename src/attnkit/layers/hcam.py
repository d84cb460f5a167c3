"""HCAM: hierarchical chunk attention memory.

Towards mental time travel: a hierarchical memory for reinforcement learning agents (Lampinen,
Chan, Banino, Hill, arXiv 2105.14039). Official JAX code: deepmind/deepmind-research,
``hierarchical_transformer_memory/hierarchical_attention/htm_attention.py``; this file is
written from the paper and that code's math.

The past is cut into chunks of ``chunk_size`` tokens, each summarised by the mean of its keys.
A query first attends coarsely to the summaries, keeps the ``top_k`` most relevant chunks,
then attends in detail within each of them; the detailed results are summed with the
coarse weights (a softmax over the kept chunks' scores only, as in the official code)::

    s_c   = mean_{j in chunk c} k_j                                   summary key    (D,)
    r_tc  = q_t . s_c / sqrt(D),  c < t // chunk_size                coarse scores, completed chunks only
    K_t   = top_k_c(r_tc) u {current chunk}
    w_tc  = softmax_{c in K_t}(r_tc)
    o_t   = sum_{c in K_t} w_tc  softmax_{j in c}(q_t . k_j / sqrt(D)) v_j

The official module serves an agent whose recent past sits in a separate local memory; as a
causal sequence layer HCAM needs the current, unfinished chunk too, so here it is always one
of the attended chunks: its keys up to the query itself (causal), its summary the mean of
those keys, its coarse score taking part in the softmax with the others. Until a chunk has
been completed a query therefore attends causally within its own chunk. What differs from
the official module: the coarse and the detailed attention share each head's q and k (the
official projects the summaries and the query separately for the coarse step, one head), no
positional encodings (the official adds sinusoids within a memory chunk), and the chunk
contents are not stopped from receiving gradients (they are the layer's own keys here, not
stored past states).

Cost per query: ``S / chunk_size`` summary scores plus ``(top_k + 1) * chunk_size`` keys, so a
forward is ``O(T * (T / chunk_size + (top_k + 1) * chunk_size) * D)`` instead of ``O(T^2 D)``.
The decode state is a :class:`~attnkit.state.KVCache` of every token (the chunk memory).
:func:`hcam_attend` reaches this cost by copying each query's chunks (a gather); while the
keys number at most ``8 * (top_k + 1) * chunk_size`` it scores every key instead and gives the
chunks not kept a weight of 0 (the same result; on CPU 30x faster at 256 keys, 2.4x at 2048).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..state import KVCache
from .base import AttentionLayer, check_input
from .multi_head import head_shape

__all__ = ["HCAMAttention", "hcam_attend", "hcam_attend_reference", "HCAM_BACKENDS"]

HCAM_BACKENDS = ("blocked", "reference")
_GATHER_BUDGET = 2**24  # numbers held per query block on CPU (64 MiB in float32); 16x that on a GPU


def _budget(t: Tensor) -> int:
    return _GATHER_BUDGET * (1 if t.device.type == "cpu" else 16)


def _check(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, q_offset: int | None) -> int:
    positive_int(chunk_size, "chunk_size")
    positive_int(top_k, "top_k")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor [B, H, T|S, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, T, D], k [B, H, S, D] and v [B, H, S, Dv] must agree on B, H (and S, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    T, S = q.shape[2], k.shape[2]
    q_offset = S - T if q_offset is None else q_offset
    if not 0 <= q_offset <= S - T:
        raise ValueError(f"q_offset must lie in 0..S-T = 0..{S - T} (queries see keys up to their own position), "
                         f"got {q_offset}")
    return q_offset


def hcam_attend(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, top_k: int, q_offset: int | None = None,
                query_block: int | None = None, dense: bool | None = None) -> Tensor:
    """HCAM's causal attention (module docstring), in blocks of queries.

    Args:
        q: ``[B, H, T, D]``, the queries at absolute positions ``q_offset .. q_offset + T - 1``.
        k: ``[B, H, S, D]``, v: ``[B, H, S, Dv]``, the keys at positions ``0 .. S - 1``.
        chunk_size: tokens per memory chunk. top_k: completed chunks each query reads in detail.
        q_offset: position of the first query (default ``S - T``: the newest tokens).
        query_block: queries handled at once (default: what keeps the gathered keys and values
            of a block near 2^24 numbers in all on CPU, 2^28 on a GPU, batch and heads included;
            the dense path: its scores); memory per block is
            ``B * H * query_block * (top_k + 1) * chunk_size * (D + Dv)``.
        dense: read the kept chunks through one score matrix of the block's queries against
            every key (a weight of 0 on the chunks not kept) instead of copying each query's
            ``(top_k + 1) * chunk_size`` keys; the same result, cheaper while the keys number no
            more than ``8 * (top_k + 1) * chunk_size``. ``None`` (default): that rule decides.

    Returns ``[B, H, T, Dv]``.
    """
    q_offset = _check(q, k, v, chunk_size, top_k, q_offset)
    B, H, T, D = q.shape
    S, L, Dv = k.shape[2], chunk_size, v.shape[3]
    scale = D**-0.5
    chunks, complete = math.ceil(S / L), S // L
    pad = chunks * L - S
    if pad:
        k = torch.cat([k, k.new_zeros(B, H, pad, D)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, pad, Dv)], dim=2)
    keys, values = k.reshape(B, H, chunks, L * D), v.reshape(B, H, chunks, L * Dv)  # k from a permute: not viewable
    summaries = k[:, :, : complete * L].reshape(B, H, complete, L, D).mean(3)  # (B, H, N, D)
    kept = min(top_k, complete)
    if dense is None:
        dense = chunks * L <= 8 * (kept + 1) * L  # measured on CPU: dense 2.4x faster at 2048 keys, chunk 64, top_k 4
    if dense:
        return _hcam_dense(q, k, v, summaries, L, kept, q_offset, query_block)
    if query_block is None:  # per query, (kept + 1) chunks of keys and values are copied for every batch row and head
        query_block = max(1, _budget(q) // (B * H * (kept + 1) * L * (D + Dv)))
    outs = []
    for start in range(0, T, query_block):
        qb = q[:, :, start : start + query_block]
        n = qb.shape[2]
        positions = torch.arange(q_offset + start, q_offset + start + n, device=q.device)
        current = positions // L  # (n,)
        in_current = (current[:, None] * L + torch.arange(L, device=q.device)) <= positions[:, None]  # (n, L)
        if kept:
            coarse = (qb @ summaries.transpose(-1, -2)) * scale  # (B, H, n, N)
            done = torch.arange(complete, device=q.device)[None, :] < current[:, None]
            coarse = coarse.masked_fill(~done, float("-inf"))
            scores, chosen = coarse.topk(kept, dim=-1)  # (B, H, n, kept)
        else:
            scores = qb.new_zeros(B, H, n, 0)
            chosen = torch.zeros(B, H, n, 0, dtype=torch.long, device=q.device)
        chosen = torch.cat([chosen, current.expand(B, H, n)[..., None]], dim=-1)  # (B, H, n, kept + 1)
        # whole chunks as rows of a [B*H*chunks, L*D] table: index_select copies rows (gather with an
        # index expanded over L*D reads it element by element, ~7x slower on CPU)
        rows = (chosen + torch.arange(B * H, device=q.device).view(B, H, 1, 1) * chunks).reshape(-1)
        detail_keys = keys.reshape(B * H * chunks, L * D).index_select(0, rows).view(B, H, n, kept + 1, L, D)
        detail_values = values.reshape(B * H * chunks, L * Dv).index_select(0, rows).view(B, H, n, kept + 1, L, Dv)
        mask = torch.ones(n, kept + 1, L, dtype=torch.bool, device=q.device)
        mask[:, -1] = in_current  # the current chunk: causal
        current_summary = (detail_keys[:, :, :, -1] * in_current[..., None]).sum(-2) / in_current.sum(-1)[:, None]
        current_score = (qb * current_summary).sum(-1, keepdim=True) * scale  # (B, H, n, 1)
        weights = torch.cat([scores, current_score], dim=-1).softmax(-1)  # (B, H, n, kept + 1)
        detail = torch.einsum("bhnd,bhnkld->bhnkl", qb, detail_keys) * scale
        detail = detail.masked_fill(~mask, float("-inf")).softmax(-1)
        read = torch.einsum("bhnkl,bhnkld->bhnkd", detail, detail_values)
        outs.append((weights[..., None] * read).sum(-2))
    return torch.cat(outs, dim=2)


def _hcam_dense(q, k, v, summaries, L: int, kept: int, q_offset: int, query_block: int | None) -> Tensor:
    """:func:`hcam_attend` through scores against every key: ``k, v`` padded to whole chunks."""
    B, H, T, D = q.shape
    S, chunks, complete = k.shape[2], k.shape[2] // L, summaries.shape[2]
    scale = D**-0.5
    # the mean of each chunk's keys up to every position: the current chunk's summary
    running = k.view(B, H, chunks, L, D).cumsum(3) / torch.arange(1, L + 1, device=k.device, dtype=k.dtype)[:, None]
    running = running.reshape(B, H, S, D)
    if query_block is None:  # scores, weights and mask of a block: about 4 numbers per query and key
        query_block = max(1, _budget(q) // (4 * B * H * S))
    outs = []
    for start in range(0, T, query_block):
        qb = q[:, :, start : start + query_block]
        n = qb.shape[2]
        positions = torch.arange(q_offset + start, q_offset + start + n, device=q.device)
        current = positions // L  # (n,)
        current_score = (qb * running[:, :, positions]).sum(-1, keepdim=True) * scale  # (B, H, n, 1)
        if kept:
            coarse = (qb @ summaries.transpose(-1, -2)) * scale  # (B, H, n, N)
            done = torch.arange(complete, device=q.device)[None, :] < current[:, None]
            scores, chosen = coarse.masked_fill(~done, float("-inf")).topk(kept, dim=-1)
            scores = torch.cat([scores, current_score], dim=-1)
        else:
            scores, chosen = current_score, current.new_zeros(B, H, n, 0)
        chosen = torch.cat([chosen, current.expand(B, H, n)[..., None]], dim=-1)  # (B, H, n, kept + 1)
        # scatter_add, not scatter: where fewer chunks are done than top_k, topk returns -inf scores (weight 0)
        # at arbitrary indices, which can repeat the current chunk's; scatter's order among repeated indices is
        # undefined on CUDA (the 0 could overwrite the current chunk's weight: HCAM was wrong on the H200),
        # while adding the 0 is exact
        weights = qb.new_zeros(B, H, n, chunks).scatter_add(-1, chosen, scores.softmax(-1))  # 0 off the kept chunks
        detail = (qb @ k.transpose(-1, -2) * scale).view(B, H, n, chunks, L)
        key_chunk = torch.arange(chunks, device=q.device)[:, None]
        future = (key_chunk * L + torch.arange(L, device=q.device) > positions[:, None, None]) & (
            key_chunk == current[:, None, None])  # (n, chunks, L): the current chunk after the query
        detail = detail.masked_fill(future, float("-inf")).softmax(-1) * weights[..., None]
        outs.append(detail.view(B, H, n, S) @ v)
    return torch.cat(outs, dim=2)


def hcam_attend_reference(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, top_k: int,
                          q_offset: int | None = None) -> Tensor:
    """The same math query by query, every step materialised (float64 for tests)."""
    q_offset = _check(q, k, v, chunk_size, top_k, q_offset)
    B, H, T, D = q.shape
    L, scale = chunk_size, D**-0.5
    out = q.new_zeros(B, H, T, v.shape[3])
    for b in range(B):
        for h in range(H):
            for t in range(T):
                position = q_offset + t
                current = position // L
                query = q[b, h, t]
                spans = [(c * L, (c + 1) * L) for c in range(current)]
                coarse = torch.stack([query @ k[b, h, lo:hi].mean(0) * scale for lo, hi in spans]) if spans else None
                picked = []
                if spans:
                    order = torch.argsort(coarse, descending=True, stable=True)[: min(top_k, len(spans))]
                    picked = [(coarse[i], spans[i]) for i in order.tolist()]
                own = (current * L, position + 1)
                picked.append((query @ k[b, h, own[0] : own[1]].mean(0) * scale, own))
                weights = torch.stack([score for score, _ in picked]).softmax(0)
                for weight, (lo, hi) in zip(weights, (span for _, span in picked)):
                    attention = (k[b, h, lo:hi] @ query * scale).softmax(0)
                    out[b, h, t] = out[b, h, t] + weight * (attention @ v[b, h, lo:hi])
    return out


class HCAMAttention(AttentionLayer):
    """Causal hierarchical chunk attention (HCAM).

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        chunk_size: tokens per memory chunk.
        top_k: completed chunks each query reads in detail (besides its own chunk).
        max_seq_len: optional: the longest sequence the layer will see; then ``top_k`` may not exceed
            the chunks such a sequence completes before its last token (``(max_seq_len - 1) // chunk_size``).
        bias: biases in the projections.
        backend: ``"blocked"`` (:func:`hcam_attend`) or ``"reference"`` (:func:`hcam_attend_reference`).

    Shapes: ``x [B, T, C] -> [B, T, C]``; decode state: a KV cache of every token.

    Example::

        >>> import torch
        >>> from attnkit.layers import HCAMAttention
        >>> layer = HCAMAttention(64, 4, chunk_size=8, top_k=2)
        >>> layer(torch.randn(2, 50, 64)).shape
        torch.Size([2, 50, 64])
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, chunk_size: int = 64,
                 top_k: int = 4, max_seq_len: int | None = None, bias: bool = False, backend: str = "blocked") -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(chunk_size, "chunk_size")
        positive_int(top_k, "top_k")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if max_seq_len is not None:
            positive_int(max_seq_len, "max_seq_len")
            most = (max_seq_len - 1) // chunk_size
            if top_k > most:
                raise ValueError(f"top_k={top_k} is more chunks than a sequence of max_seq_len={max_seq_len} completes with "
                                 f"chunk_size={chunk_size} (at most {most}); accepted: top_k <= {most}, or a smaller "
                                 "chunk_size")
        if backend not in HCAM_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(HCAM_BACKENDS)}, got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.chunk_size, self.top_k, self.max_seq_len, self.backend = chunk_size, top_k, max_seq_len, backend
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        param = self.o_proj.weight
        return KVCache(batch_size, self.num_heads, self.head_dim, max_len=max_len,
                       device=device if device is not None else param.device, dtype=dtype or param.dtype)

    def forward(self, x: Tensor, state: KVCache | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError("HCAMAttention does not take document_ids (its chunks would span documents); run each "
                             "document as its own sequence")
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if state is not None:
            k, v = state.update(k, v)
        attend = hcam_attend_reference if self.backend == "reference" else hcam_attend
        o = attend(q, k, v, chunk_size=self.chunk_size, top_k=self.top_k)  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}, "
                f"top_k={self.top_k}, backend={self.backend!r}")


def hcam_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: per query, ``2 D`` per completed chunk's summary score (``T / chunk`` of them on
    average ``T / 2 chunk``), and ``4 D`` per key of the ``top_k + 1`` chunks read in detail;
    projections: q, k, v and the output."""
    dim, heads, _, head_dim = head_shape(config)
    chunk, top_k = config.get("chunk_size", 64), config.get("top_k", 4)
    coarse = 2.0 * head_dim * seq / (2 * chunk)
    detail = 4.0 * head_dim * min(seq, (top_k + 1) * chunk)
    core = batch * heads * seq * (coarse + detail)
    inner = heads * head_dim
    return FlopCount(attention_fwd=core, projection_fwd=batch * seq * (2.0 * dim * 3 * inner + 2.0 * inner * dim))


CARDS = (
    Card(
        name="hcam",
        title="Towards mental time travel: a hierarchical memory for reinforcement learning agents",
        arxiv="2105.14039",
        family="memory",
        layer=HCAMAttention,
        flops=hcam_flops,
        defaults={"chunk_size": 64, "top_k": 4},
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "blocked")),
        summary="chunked memory: coarse attention over chunk summaries (mean keys) picks the top-k chunks, detailed "
                "attention within them, weighted by the coarse scores; the current chunk causally",
    ),
)
