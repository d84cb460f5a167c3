"""The layer protocol shared by every mechanism.

A layer maps ``x [B, T, C] -> y [B, T, C]``. Optional keyword arguments:

- ``state``: the layer's decode state from ``layer.init_state(batch_size)``; the layer
  reads it, appends this call's tokens and advances ``state.offset``. Feeding a sequence
  token by token (or in chunks) through one state gives the same outputs as one call.
- ``document_ids [B, T]``: packed sequences; tokens attend only within their document
  and positions restart at each document.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..state import State

__all__ = ["AttentionLayer", "check_input"]


def check_input(x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [B, T, C], got {got}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has width C={x.shape[-1]} but the layer was built with dim={dim}")
    if x.shape[1] == 0:
        raise ValueError("x has no tokens (T=0)")


class AttentionLayer(nn.Module):
    """Base class: ``forward(x, state=None, *, document_ids=None)`` and ``init_state``."""

    dim: int

    def init_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> State:
        raise NotImplementedError(f"{type(self).__name__} does not decode")

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError
