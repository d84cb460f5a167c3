"""Rotary position embeddings (RoFormer, arXiv 2104.09864), the one copy every layer uses.

Rotate-half convention (GPT-NeoX / Llama): the head dim is split into two halves
``(x1, x2)`` and each pair ``(x1_i, x2_i)`` is rotated by ``position * base^(-2i/D)``.
Positions are absolute: a decode step passes ``offset`` (tokens already seen), packed
sequences pass per-token ``positions`` that restart at each document.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rotary", "positions_from_documents"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[B, H, T, D]``; cos/sin broadcastable to ``[B, 1, T, D/2]``."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE for head dim ``head_dim`` (even) with frequency base ``base``.

    ``forward(q, k, offset=0, positions=None)`` returns rotated ``(q, k)``, both
    ``[B, H, T, D]``; ``positions`` ``[B, T]`` (or ``[T]``) overrides ``offset``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"RoPE needs an even positive head_dim, got {head_dim}")
        if base <= 0:
            raise ValueError(f"rope base must be positive, got {base}")
        self.head_dim = head_dim
        self.base = float(base)
        # no buffer: a module-wide .to(bfloat16) would round the frequencies; they are
        # recomputed per call (D/2 numbers), in float64 for float64 inputs

    def angles(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions ``[B, T]`` -> cos, sin ``[B, 1, T, D/2]`` in ``dtype`` (float32 or float64)."""
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float64) / self.head_dim
        inv_freq = (self.base ** -exponent).to(dtype)
        freqs = positions.to(dtype)[..., None] * inv_freq  # (B, T, D/2)
        return freqs.cos()[:, None], freqs.sin()[:, None]

    def forward(self, q: Tensor, k: Tensor, offset: int = 0, positions: Tensor | None = None):
        T = q.shape[2]
        if positions is None:
            positions = torch.arange(offset, offset + T, device=q.device)[None]
        elif positions.dim() == 1:
            positions = positions[None]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = self.angles(positions.to(q.device), dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


def positions_from_documents(document_ids: Tensor) -> Tensor:
    """Per-token positions ``[B, T]`` that restart at 0 where the document id changes."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx
