"""The k-th largest value of every prefix of a sequence, for many sequences at once.

    kth_largest(values, k, seen)[r, i] = the k-th largest of values[r, :seen[i]]
                                         (-inf where seen[i] <= k: the row keeps everything)

DMA (:mod:`attnkit.layers.dynamic_mask`) needs it per query row: a row that sees keys
``0..p`` keeps the ``keep`` keys of largest bias, so its threshold is the ``keep``-th largest
bias of the prefix. A top-k per row costs ``O(T S)``; here it is ``O(S log S)`` per sequence:

1. rank the values (largest first), so the answer is the ``(k-1)``-th smallest rank in the prefix;
2. build a wavelet matrix over the ranks: for each bit from the top, the level's bit of every
   entry, prefix counts of its zeros, then a stable partition (zeros first) for the next level;
3. walk every query down the levels: its range ``[lo, hi)`` either stays among the zeros
   (when they hold more than ``k`` entries) or moves to the ones, fixing one bit of the rank.

Step 3 is one Triton kernel on CUDA (one program per block of rows, ~log2 S pairs of loads per
row); elsewhere it runs as tensor ops, one level at a time. Values: any float dtype; ties keep
their value, so the result equals a per-row top-k exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["kth_largest_of_prefixes"]

_BLOCK = 256


if triton is not None:

    @triton.jit
    def _walk_kernel(ZEROS, TOTALS, VALUES, SEEN, OUT, S, T, k, LEVELS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = rows < T
        seen = tl.load(SEEN + rows, mask=live, other=0)
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = seen.to(tl.int64)
        want = tl.zeros([BLOCK], dtype=tl.int64) + (k - 1)
        rank = tl.zeros([BLOCK], dtype=tl.int64)
        zeros_row = ZEROS + r.to(tl.int64) * LEVELS * (S + 1)
        for level in tl.static_range(LEVELS):
            base = zeros_row + level * (S + 1)
            zeros_lo = tl.load(base + lo, mask=live, other=0).to(tl.int64)
            zeros_hi = tl.load(base + hi, mask=live, other=0).to(tl.int64)
            total = tl.load(TOTALS + r * LEVELS + level).to(tl.int64)
            in_zeros = zeros_hi - zeros_lo
            one = want >= in_zeros
            want = tl.where(one, want - in_zeros, want)
            rank = tl.where(one, rank + (1 << (LEVELS - 1 - level)), rank)
            lo = tl.where(one, total + lo - zeros_lo, zeros_lo)
            hi = tl.where(one, total + hi - zeros_hi, zeros_hi)
        kth = tl.load(VALUES + r.to(tl.int64) * S + tl.minimum(rank, S - 1), mask=live, other=0.0)
        out = tl.where(seen > k, kth, float("-inf"))
        tl.store(OUT + r.to(tl.int64) * T + rows, out.to(OUT.dtype.element_ty), mask=live)


def _wavelet(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sorted values, zeros [R, L, S + 1] int32, totals [R, L] int32)`` of each row's ranks."""
    R, S = values.shape
    order = torch.argsort(values, dim=-1, descending=True, stable=True)  # largest first
    position = torch.arange(S, device=values.device)
    cur = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))  # each entry's rank
    levels = max(1, (S - 1).bit_length())
    zeros = torch.empty(R, levels, S + 1, dtype=torch.int32, device=values.device)
    for level in range(levels):
        ones = (cur >> (levels - 1 - level)) & 1
        counts = F.pad((1 - ones).cumsum(-1), (1, 0))  # zeros among the first n entries, n = 0..S
        zeros[:, level] = counts
        dest = torch.where(ones.bool(), counts[:, -1:] + position - counts[:, :-1], counts[:, :-1])
        cur = torch.empty_like(cur).scatter_(-1, dest, cur)  # zeros first, order kept
    return values.gather(-1, order), zeros, zeros[:, :, -1].contiguous()


def _walk_torch(sorted_values, zeros, totals, seen, k):
    R, levels = totals.shape
    lo = torch.zeros(R, seen.numel(), dtype=torch.int64, device=seen.device)
    hi = seen.expand_as(lo).clone()
    want = torch.full_like(lo, k - 1)
    rank = torch.zeros_like(lo)
    for level in range(levels):
        counts = zeros[:, level].long()
        zeros_lo, zeros_hi = counts.gather(-1, lo), counts.gather(-1, hi)
        in_zeros = zeros_hi - zeros_lo
        one = want >= in_zeros
        want = torch.where(one, want - in_zeros, want)
        rank |= one.long() << (levels - 1 - level)
        total = totals[:, level : level + 1].long()
        lo = torch.where(one, total + lo - zeros_lo, zeros_lo)
        hi = torch.where(one, total + hi - zeros_hi, zeros_hi)
    kth = sorted_values.gather(-1, rank.clamp(max=sorted_values.shape[-1] - 1))  # rows seeing <= k: masked next
    return torch.where(seen > k, kth, torch.full_like(kth, float("-inf")))


def kth_largest_of_prefixes(values: Tensor, k: int, seen: Tensor, *, backend: str = "auto") -> Tensor:
    """values ``[R, S]``, ``seen`` ``[T]`` (each query's prefix length, 1..S) -> ``[R, T]``.

    ``backend``: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch``, or ``auto``
    (triton on CUDA when installed)."""
    if values.dim() != 2 or seen.dim() != 1:
        raise ValueError(f"values must be [R, S] and seen [T], got {tuple(values.shape)} and {tuple(seen.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if (triton is not None and values.is_cuda) else "torch"
    if backend == "triton" and triton is None:
        raise ValueError("backend='triton' needs triton installed; use backend='torch'")
    S = values.shape[-1]
    seen = seen.to(device=values.device, dtype=torch.int64).clamp(1, S)
    sorted_values, zeros, totals = _wavelet(values)
    if backend == "torch":
        return _walk_torch(sorted_values, zeros, totals, seen, k)
    R, T = values.shape[0], seen.numel()
    out = torch.empty(R, T, dtype=values.dtype, device=values.device)
    _walk_kernel[(triton.cdiv(T, _BLOCK), R)](zeros, totals, sorted_values.contiguous(), seen, out, S, T, k,
                                            LEVELS=zeros.shape[1], BLOCK=_BLOCK)
    return out
