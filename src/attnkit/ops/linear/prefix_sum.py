"""Inclusive prefix sums in two levels, for the causal running sums of Flow and Agent attention."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prefix_sum"]


def prefix_sum(x: Tensor, dim: int = 2, chunk: int = 64) -> Tensor:
    """Inclusive cumulative sum along ``dim``, computed in two levels (within blocks of
    ``chunk``, then over the block totals, recursively). Same values as ``x.cumsum(dim)``;
    on CUDA a long scan along a non-innermost dim runs one sequential thread per column,
    which made Flow's and Agent's prefix sums grow faster than linearly with T."""
    n = x.shape[dim]
    if n <= chunk:
        return x.cumsum(dim)
    x = x.movedim(dim, -2)  # (..., n, F)
    pad = (-n) % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    blocks = x.unflatten(-2, (-1, chunk))  # (..., N, chunk, F)
    local = blocks.cumsum(-2)
    totals = local[..., -1, :]  # (..., N, F)
    carry = prefix_sum(totals, dim=-2, chunk=chunk) - totals  # exclusive prefix of the block totals
    out = (local + carry[..., None, :]).flatten(-3, -2)[..., :n, :]
    return out.movedim(-2, dim)
