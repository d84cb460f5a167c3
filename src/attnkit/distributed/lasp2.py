"""LASP-2: sequence parallelism for linear attention by one all-gather of the states.

LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid (Sun et al., arXiv
2502.07563). For Lightning attention (:mod:`attnkit.ops.linear.lightning`: per-head decay
``lambda = exp(-s)``), with the sequence split contiguously over W ranks of T tokens each:

1. each rank runs its chunk from a zero state: the local output ``O_r^loc`` and the chunk's state
   ``M_r = sum_j lambda^(T-1-j) k_j^T v_j`` (``[B, H, D, E]``);
2. **one all-gather** of the W states (``B * H * D * E`` numbers per rank, whatever T);
3. each rank combines the states before it in sequence order, decay-aware:
   ``P_r = sum_{j < r} lambda^(T (r-1-j)) M_j + lambda^(T r) S0`` (``S0`` an initial state);
4. ``O_r = O_r^loc + diag(lambda^(i+1)) Q_r P_r`` (``i`` the local position), the chunk's output
   as if the whole prefix had been run before it; the final state of the sequence (every rank
   returns it) is ``lambda^T P_{W-1} + M_{W-1}``.

The backward is autograd's through the same steps; the all-gather's backward sums the states'
gradients over the ranks (a reduce-scatter), so it too moves ``D x E`` per rank and head. It is a
collective: every rank must backpropagate through its output (rank 0's output depends on the
gathered states with weight zero for that reason). The
paper's LASP-2 masks a causal linear attention without decay as the special case ``s = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.linear.lightning import lightning_attend
from .ring import _SENT, _check_same_shapes, _group_info

__all__ = ["lasp2_lightning", "lasp2_bytes"]


def lasp2_lightning(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, group=None, initial_state: Tensor | None = None,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Lightning attention of a sequence split contiguously over the ranks of ``group``.

    Args:
        q, k: ``[B, H, T, D]``, v: ``[B, H, T, E]``: this rank's chunk (:func:`shard`, contiguous).
        slopes: ``[H]``, the decay slopes (``lambda = exp(-slope)``), the same on every rank.
        initial_state: ``[B, H, D, E]``, the state before the sequence (the same on every rank).
        backend: the local op's (:func:`attnkit.ops.linear.lightning.lightning_attend`).

    Returns:
        ``(out [B, H, T, E], final state [B, H, D, E])``: this rank's share of the output of
        ``lightning_attend`` on the whole sequence, and the whole sequence's final state.
    """
    from torch.distributed.nn.functional import all_gather

    world, rank = _group_info(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"lasp2_lightning: {name} must be a rank-4 tensor [B, H, T, D], got {got}")
    _check_same_shapes([q, k, v], group, "lasp2_lightning")
    out_local, state = lightning_attend(q, k, v, slopes, backend=backend)  # from a zero state: M_r
    acc = state.dtype
    states = all_gather(state.contiguous(), group=group)  # W x [B, H, D, E]
    _SENT[0] += (world - 1) * state.numel() * state.element_size()  # a ring all-gather's traffic per rank
    T = q.shape[2]
    s = slopes.to(device=q.device, dtype=acc)[None, :, None, None]  # [1, H, 1, 1]
    chunk = torch.exp(-s * T)  # lambda^T: one rank's chunk of decay
    prefix = None if initial_state is None else initial_state.to(acc)
    for j in range(rank):  # P_r, in sequence order
        prefix = states[j] if prefix is None else chunk * prefix + states[j]
    final = prefix
    for j in range(rank, world):
        final = states[j] if final is None else chunk * final + states[j]
    if prefix is None:
        # rank 0 without an initial state has no prefix; its output still depends on the gathered states
        # (times zero), so that every rank's backward reaches the all-gather's backward, a collective that
        # would otherwise wait forever on the ranks that do use them
        prefix = states[0] * 0
    i = torch.arange(T, device=q.device, dtype=acc)
    q_decay = torch.exp(-s * (i + 1)[None, None, :, None])  # [1, H, T, 1]: lambda^(i+1)
    out = out_local.to(acc) + (q.to(acc) * q_decay) @ prefix
    return out.to(q.dtype), final


def lasp2_bytes(state_shape, dtype: torch.dtype = torch.float32, world: int = 2, backward: bool = False) -> int:
    """Bytes one rank sends in :func:`lasp2_lightning`: its state in the all-gather (gloo and NCCL
    ring all-gathers send each rank's share ``W - 1`` times in total across the ring, ``(W - 1) x``
    the state per rank); backward the same again for the states' gradients. Independent of T."""
    n = 1
    for d in state_shape:
        n *= d
    size = n * torch.empty((), dtype=dtype).element_size()
    return (world - 1) * size * (2 if backward else 1)
