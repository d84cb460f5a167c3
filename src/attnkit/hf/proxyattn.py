"""ProxyAttn: block-sparse prefill guided by a few pooled "proxy" heads.

Wang et al., "ProxyAttn: Guided Sparse Attention via Representative Heads", arXiv 2509.24745
(code: github.com/wyxstriker/ProxyAttn, not reachable from here; written from the paper's
description). Training-free; prefill only (decoding attends to every key); the cache is kept.

Legend: b ``block_size``, P proxy heads, B batch, Hq query heads, T this call's queries (the
last T positions of S), I a query block and J a key block on the grid of absolute positions
(block ``pos // b``), s a row's first real position. Heads in long contexts attend to largely
the same tokens but with different sparsity, so:

1. **Proxy scores.** The query heads are split into P groups of consecutive heads (default:
   one per KV head); a proxy head's query is the mean of its group's queries and its key the
   mean of their keys. For sampled queries of each query block (every ``query_stride``-th,
   counting back from the block's last query), the proxy's softmax over all earlier keys
   (token level, causal) is summed per key block: ``importance[b, p, I, J]`` = the mean
   attention mass query block I gives key block J.
2. **Block-aware dynamic budget.** Per query head h, the sampled queries of the last query block
   attend with h's own query and key; h's budget is the smallest number ``n_h`` of key blocks,
   taken in the order of its proxy's importance, that holds a fraction ``gamma`` of h's true
   attention mass. A query block I with ``m_I`` visible key blocks (from s's block to I) keeps
   ``ceil(n_h * m_I / m_last)`` of them (``budget``, if given, replaces this by a fixed fraction
   ``ceil(budget * m_I)``; ``gamma = 1`` keeps every block).
3. **Selection and attention.** Per query head and query block: the top blocks by the proxy's
   importance, always with the diagonal block and the block of s (attention sinks). The
   attention is exact softmax over the chosen blocks (causal, padding masked): FlexAttention
   with a block mask on CUDA (attnkit's ``flex`` backend), a dense mask elsewhere.

What is ours where the paper's details could not be checked: the query sampling stride, the
proxies as plain means over consecutive heads, the budget measured on the last query block
and carried to the others in proportion to their visible blocks, and the forced sink block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import patterns as _patterns
from .._checks import positive_int
from .policies import Policy, Rule

__all__ = ["ProxyAttn", "ProxyAttnRule", "BlockSelection", "proxy_importance", "head_budgets", "select_blocks",
           "estimate", "density"]

# elements of one chunk of proxy logits [B, P, rows, S] (bounds the estimator's memory)
_CHUNK_ELEMENTS = 1 << 27


def _check(block_size, gamma, budget, proxy_heads, query_stride, owner: str) -> None:
    positive_int(block_size, f"{owner}: block_size")
    positive_int(query_stride, f"{owner}: query_stride")
    if proxy_heads is not None:
        positive_int(proxy_heads, f"{owner}: proxy_heads")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"{owner}: gamma must be a number in (0, 1] (the attention mass each head's blocks hold; "
                         f"1: every block), got {gamma!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise ValueError(f"{owner}: budget must be None (dynamic, from gamma) or a fraction in (0, 1] of the visible "
                         f"key blocks, got {budget!r}")


def _proxies(num_query_heads: int, num_kv_heads: int, proxy_heads: int | None) -> int:
    P = num_kv_heads if proxy_heads is None else proxy_heads
    if num_query_heads % P:
        raise ValueError(f"ProxyAttn: proxy_heads={proxy_heads} must divide the {num_query_heads} query heads "
                         "(each proxy pools a group of consecutive heads)")
    return P


def _sampled_queries(q_pos: Tensor, block_size: int, stride: int, S: int) -> Tensor:
    """Which of the call's queries (positions ``q_pos`` [T]) the estimator reads: every
    ``stride``-th counting back from each block's last position (``S - 1`` for the last block)."""
    block_end = torch.clamp((q_pos // block_size + 1) * block_size - 1, max=S - 1)
    return (block_end - q_pos) % stride == 0


def _proxy_keys(k: Tensor, num_query_heads: int, P: int) -> Tensor:
    """``[B, P, S, D]``: each proxy's key, the mean of the keys its query heads read (GQA: query head
    h reads KV head ``h // g``), without repeating the KV heads for every query head."""
    B, Hkv, S, D = k.shape
    per, g = num_query_heads // P, num_query_heads // Hkv
    if per >= g:  # a proxy covers whole KV heads, each read by g of its query heads: equal weights
        return k.view(B, P, Hkv // P, S, D).mean(2, dtype=torch.promote_types(k.dtype, torch.float32))
    return k.repeat_interleave(P // Hkv, dim=1)  # several proxies share one KV head


def _block_mass(logits: Tensor, pos: Tensor, start: Tensor, block_size: int) -> Tensor:
    """Softmax of ``logits [B, H, m, K]`` (keys ``0 .. K-1``, causal at ``pos [m]``, padding before
    ``start [B]``) summed per key block, without writing the probabilities: ``[B, H, m, ceil(K / b)]``."""
    B, H, m, K = logits.shape
    keys = torch.arange(K, device=logits.device)
    allowed = (keys <= pos[:, None])[None] & (keys >= start[:, None, None])  # [B, m, K]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    nk = -(-K // block_size)
    if nk * block_size != K:
        logits = torch.nn.functional.pad(logits, (0, nk * block_size - K), value=float("-inf"))
    per_block = logits.view(B, H, m, nk, block_size).logsumexp(-1)
    return (per_block - per_block.logsumexp(-1, keepdim=True)).exp().nan_to_num(0.0)  # a row with no key: 0


def proxy_importance(q: Tensor, k: Tensor, *, scale: float, start: Tensor, block_size: int,
                     proxy_heads: int | None = None, query_stride: int = 1) -> Tensor:
    """Step 1: ``importance [B, P, nQ, nK]`` (float32, float64 for float64 inputs) on the grid
    of absolute positions, ``nQ = nK = ceil(S / b)``; rows of query blocks outside the call are 0.

    q ``[B, Hq, T, D]`` (positions ``S-T .. S-1``), k ``[B, Hkv, S, D]``, start ``[B]``. The
    logits are computed in the inputs' dtype (bf16 on the GPU), the softmax in float32."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = _proxies(Hq, Hkv, proxy_heads)
    dtype = torch.promote_types(q.dtype, torch.float32)
    nK = -(-S // block_size)
    q_pos = torch.arange(S - T, S, device=q.device)
    rows = _sampled_queries(q_pos, block_size, query_stride, S).nonzero().flatten()
    qp = q[:, :, rows].reshape(B, P, Hq // P, rows.numel(), D).mean(2, dtype=dtype).to(q.dtype)  # [B, P, M, D]
    kp = _proxy_keys(k, Hq, P).to(q.dtype)  # [B, P, S, D]
    blocks_of_rows = q_pos[rows] // block_size
    importance = torch.zeros(B, P, nK, nK, dtype=dtype, device=q.device)
    counts = torch.zeros(nK, dtype=dtype, device=q.device).index_add_(
        0, blocks_of_rows, torch.ones_like(blocks_of_rows, dtype=dtype))
    step = max(1, _CHUNK_ELEMENTS // max(1, B * P * S))
    for lo in range(0, rows.numel(), step):
        hi = min(rows.numel(), lo + step)
        pos = q_pos[rows[lo:hi]]
        reach = int(pos[-1]) + 1  # the rows are in position order: later keys are masked anyway
        logits = (qp[:, :, lo:hi] @ kp[:, :, :reach].transpose(-1, -2)).to(dtype) * scale  # [B, P, m, reach]
        mass = _block_mass(logits, pos, start, block_size)
        importance[:, :, :, : mass.shape[3]].index_add_(2, blocks_of_rows[lo:hi], mass)
    return importance / counts.clamp(min=1)[:, None]


def _visible(start: Tensor, nK: int, block_size: int, device) -> tuple[Tensor, Tensor]:
    """``[B, nQ, nK]`` which key blocks a query block may use (from the row's first real block up
    to the diagonal), and their count ``[B, nQ]``."""
    blocks = torch.arange(nK, device=device)
    first = (start // block_size)[:, None, None]
    visible = (blocks[None, None, :] <= blocks[None, :, None]) & (blocks[None, None, :] >= first)
    return visible, visible.sum(-1)


def head_budgets(q: Tensor, k: Tensor, importance: Tensor, *, scale: float, start: Tensor, block_size: int,
                 gamma: float, query_stride: int = 1) -> Tensor:
    """Step 2: ``n_h [B, Hq]`` (long), the key blocks each query head needs in the last query
    block: the fewest, in its proxy's order of importance, holding ``gamma`` of the head's own
    attention mass (its sampled queries of that block, each head with its own query and key)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = importance.shape[1]
    dtype = importance.dtype
    nK = importance.shape[3]
    last = (S - 1) // block_size
    q_pos = torch.arange(S - T, S, device=q.device)
    rows = (_sampled_queries(q_pos, block_size, query_stride, S) & (q_pos // block_size == last)).nonzero().flatten()
    pos = q_pos[rows]
    g, m = Hq // Hkv, rows.numel()
    qg = q[:, :, rows].reshape(B, Hkv, g * m, D)  # GQA: a KV head's query heads share its keys
    logits = (qg @ k.transpose(-1, -2)).to(dtype).view(B, Hq, m, S) * scale  # [B, Hq, m, S]
    mass = _block_mass(logits, pos, start, block_size).mean(2)  # [B, Hq, nK]
    visible, _ = _visible(start, nK, block_size, q.device)
    order_scores = importance[:, :, last].repeat_interleave(Hq // P, dim=1)  # [B, Hq, nK]
    order_scores = order_scores.masked_fill(~visible[:, None, last], float("-inf"))
    order = order_scores.argsort(dim=-1, descending=True, stable=True)
    held = mass.gather(2, order).cumsum(-1)  # [B, Hq, nK]
    # the count that first reaches gamma of the head's mass (relative: a row's float sum is not exactly 1)
    needed = (held < gamma * held[..., -1:]).sum(-1) + 1
    return torch.minimum(needed, visible[:, last].sum(-1)[:, None])


def select_blocks(importance: Tensor, *, num_query_heads: int, start: Tensor, block_size: int, first_query_block: int,
                  needed: Tensor | None = None, budget: float | None = None) -> Tensor:
    """Step 3: ``blocks [B, Hq, nQ, nK]`` (bool), the key blocks each query head attends to per
    query block (rows before ``first_query_block`` all False). ``needed [B, Hq]`` from
    :func:`head_budgets` (carried to each block in proportion to its visible blocks) or a fixed
    fraction ``budget``; the diagonal block and the first real block are always kept."""
    B, P, nQ, nK = importance.shape
    Hq = num_query_heads
    visible, count = _visible(start, nK, block_size, importance.device)  # [B, nQ, nK], [B, nQ]
    last = nQ - 1
    if budget is not None:
        keep = torch.ceil(budget * count.to(torch.float64) - 1e-9).long()[:, None].expand(B, Hq, nQ)
    else:
        # integer arithmetic: the last block keeps exactly n_h
        last_count = count[:, None, last:].clamp(min=1)  # [B, 1, 1]
        keep = (needed[:, :, None] * count[:, None, :] + last_count - 1) // last_count
    keep = keep.clamp(min=1)
    scores = importance.repeat_interleave(Hq // P, dim=1).masked_fill(~visible[:, None], float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nK, device=order.device).expand_as(order))
    blocks = (rank < keep[..., None]) & visible[:, None]
    diagonal = torch.eye(nQ, nK, dtype=torch.bool, device=blocks.device)
    sink = torch.arange(nK, device=blocks.device) == (start // block_size)[:, None]  # [B, nK]
    blocks = blocks | ((diagonal[None] | sink[:, None, :]) & visible)[:, None]
    blocks[:, :, :first_query_block] = False
    return blocks


def estimate(q: Tensor, k: Tensor, *, scale: float | None = None, start: Tensor | None = None, block_size: int = 128,
             gamma: float = 0.95, budget: float | None = None, proxy_heads: int | None = None,
             query_stride: int = 16) -> Tensor:
    """Steps 1-3 on q ``[B, Hq, T, D]`` (the last T of S positions) and k ``[B, Hkv, S, D]``:
    the block grid ``[B, Hq, nQ, nK]`` (bool) that :class:`BlockSelection` attends with."""
    _check(block_size, gamma, budget, proxy_heads, query_stride, "ProxyAttn")
    B, S = q.shape[0], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    start = torch.zeros(B, dtype=torch.long, device=q.device) if start is None else start
    importance = proxy_importance(q, k, scale=scale, start=start, block_size=block_size, proxy_heads=proxy_heads,
                                  query_stride=query_stride)
    needed = None
    if budget is None and gamma < 1:
        needed = head_budgets(q, k, importance, scale=scale, start=start, block_size=block_size, gamma=gamma,
                              query_stride=query_stride)
    elif budget is None:
        budget = 1.0  # gamma = 1: every block
    return select_blocks(importance, num_query_heads=q.shape[1], start=start, block_size=block_size,
                         first_query_block=(S - q.shape[2]) // block_size, needed=needed, budget=budget)


class BlockSelection(_patterns.Pattern):
    """Causal attention restricted to chosen blocks: query ``i`` sees key ``j`` iff ``j <= i``,
    ``j >= start[b]`` and ``blocks[b, h, i // bs, j // bs]`` (positions absolute). On CUDA its
    FlexAttention block mask is built from the grid directly (no mask evaluation over S x S)."""

    depends_on_batch = True
    depends_on_head = True

    def __init__(self, blocks: Tensor, start: Tensor, block_size: int):
        self.blocks, self.start, self.block_size = blocks, start, block_size
        self.flex_block_size = block_size

    def allowed(self, b, h, q_pos, k_pos):
        bs = self.block_size
        return (k_pos <= q_pos) & (k_pos >= self.start[b]) & self.blocks[b, h, q_pos // bs, k_pos // bs]

    def validate(self, batch, heads, kv_len):
        B, H, _, nK = self.blocks.shape
        if (B, H) != (batch, heads) or nK != -(-kv_len // self.block_size):
            raise ValueError(f"BlockSelection of blocks {tuple(self.blocks.shape)} (block_size {self.block_size}) "
                             f"cannot serve B={batch}, H={heads}, S={kv_len}")

    def to(self, device):
        device = torch.device(device)
        if self.blocks.device == device:
            return self
        return BlockSelection(self.blocks.to(device), self.start.to(device), self.block_size)

    def flex_block_mask(self, batch, heads, q_len, kv_len, q_offset, device, block_size):
        qb, kb = _patterns.block_shape(block_size)
        if (qb, kb) != (self.block_size, self.block_size) or q_offset % qb:
            return None  # the grid does not line up: FlexAttention evaluates the mask_mod
        blocks = self.blocks[:, :, q_offset // qb: q_offset // qb + -(-q_len // qb)].to(device)
        nQ, nK = blocks.shape[2], blocks.shape[3]
        rows = torch.arange(nQ, device=device)[:, None] + q_offset // qb
        cols = torch.arange(nK, device=device)[None, :]
        # a block is "full" (no mask_mod inside) below the diagonal, after the row's start block,
        # and not cut by the end of the keys
        whole = (cols < rows) & (cols > (self.start.to(device) // kb)[:, None, None]) & ((cols + 1) * kb <= kv_len)
        full = blocks & whole[:, None]
        return _patterns.block_mask_from_blocks(blocks & ~full, full, q_len, kv_len, (qb, kb), self.mask_mod(q_offset))

    def __repr__(self):
        return f"BlockSelection(blocks={tuple(self.blocks.shape)}, block_size={self.block_size})"


def _causal_from_start(call, T: int, S: int) -> bool:
    """Whether the model's mask is what :class:`BlockSelection` assumes besides its blocks:
    causal, each row's keys from ``call.start`` (left padding), nothing else (no sliding window)."""
    if call.mask is None:
        return True
    i = torch.arange(S - T, S, device=call.mask.device)[:, None]
    j = torch.arange(S, device=call.mask.device)[None, :]
    expected = (j <= i)[None] & (j[None] >= call.start[:, None, None])  # [B, T, S]
    return call.mask.shape[1] == 1 and torch.equal(call.mask[:, 0], expected.expand(call.mask.shape[0], T, S))


@dataclass(frozen=True)
class ProxyAttnRule(Rule):
    """ProxyAttn over the full cache: a sparse prefill, full attention for calls of fewer than
    ``block_size`` queries (decoding)."""

    block_size: int = 128
    gamma: float = 0.95
    budget: float | None = None
    proxy_heads: int | None = None
    query_stride: int = 16
    evicts = False

    def __post_init__(self):
        _check(self.block_size, self.gamma, self.budget, self.proxy_heads, self.query_stride, "ProxyAttnRule")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call) -> Tensor:
        """q ``[B, n*g, T, D]``, k / v ``[B, n, S, D]`` (every position) -> ``[B, n*g, T, Dv]``."""
        from ..ops.softmax import attend

        T, S = q.shape[2], k.shape[2]
        if T < self.block_size or not call.every_position:
            return call.attend(q, k, v)  # decoding (the paper accelerates the prefill)
        blocks = estimate(q, k, scale=call.scale, start=call.start, block_size=self.block_size, gamma=self.gamma,
                          budget=self.budget, proxy_heads=self.proxy_heads, query_stride=self.query_stride)
        pattern = BlockSelection(blocks, call.start, self.block_size)
        if not _causal_from_start(call, T, S) or call.score_mod is not None or q.device.type != "cuda":
            # the model's own mask (a sliding window, padding other than on the left) is ANDed in: a dense mask
            allowed = pattern.dense(T, S, batch=q.shape[0], heads=q.shape[1], device=q.device)
            return call.attend(q, k, v, call.base() & allowed)
        backend = "flex" if call.backend == "auto" else call.backend
        return attend(q, k, v, pattern=pattern, scale=call.scale, backend=backend)


@dataclass(frozen=True)
class ProxyAttn(Policy):
    """ProxyAttn (Wang et al., arXiv 2509.24745) on every KV head of every layer.

    Args:
        block_size: the block grid (tokens per query and key block).
        gamma: the attention mass, in (0, 1], each head's chosen blocks hold in the last query
            block (the dynamic budget); 1 keeps every block.
        budget: None (dynamic, from ``gamma``) or a fixed fraction in (0, 1] of each query
            block's visible key blocks.
        proxy_heads: proxy heads P (each the mean of ``Hq / P`` consecutive query heads); None:
            one per KV head.
        query_stride: the estimator reads every ``query_stride``-th query of a block.
    """

    name = "proxyattn"
    block_size: int = 128
    gamma: float = 0.95
    budget: float | None = None
    proxy_heads: int | None = None
    query_stride: int = 16

    def __post_init__(self):
        _check(self.block_size, self.gamma, self.budget, self.proxy_heads, self.query_stride, "ProxyAttn")

    def rule(self, layer_idx, kv_head):
        return ProxyAttnRule(self.block_size, self.gamma, self.budget, self.proxy_heads, self.query_stride)


def density(blocks: Tensor, start: Tensor, block_size: int, first_query_block: int = 0) -> float:
    """The fraction of visible (causal) key blocks the selection keeps, over heads and query blocks."""
    visible, _ = _visible(start, blocks.shape[3], block_size, blocks.device)
    visible = visible[:, first_query_block:]
    return float(blocks[:, :, first_query_block:].sum()) / max(1, int(visible.sum()) * blocks.shape[1])

