"""The plain ViT block (the baseline LookupViT is measured against) and the pieces the vision modules share.

``ViTBlock``: pre-norm multi-head self-attention over all N patch tokens, then a GELU MLP of width
``mlp_ratio * C``::

    x = x + W_o MHSA(LN(x));   x = x + MLP(LN(x))

Forward FLOPs per image (:func:`vit_block_flops`): projections ``8 N C^2`` (q, k, v, out), MLP
``4 r N C^2``, attention core ``4 N^2 C``.

Shape legend: B batch, N patch (lookup) tokens, M compressed tokens / queries / concepts, C width,
H heads, D = C / H head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import positive_int
from ..cards import FlopCount
from ..ops import attend

__all__ = ["ViTBlock", "MLP", "vit_block_flops", "split_heads", "merge_heads", "check_tokens", "check_backend",
           "BACKENDS"]

#: ``sdpa``: attention through :func:`attnkit.ops.attend` (SDPA); ``reference``: the softmax written out
BACKENDS = ("sdpa", "reference")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def check_heads(dim, num_heads) -> int:
    positive_int(dim, "dim")
    positive_int(num_heads, "num_heads")
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    return dim // num_heads


def check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_tokens(x, dim: int, name: str = "x") -> None:
    """``x`` must be a float tensor (B, N, dim) with N >= 1."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (B, N, {dim}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, N, {dim}) with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, H, N, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)  # (B, N, C)


def softmax_attention(q, k, v, backend: str) -> torch.Tensor:
    """Full (unmasked) softmax attention (B, H, T, D) x (B, H, S, D) -> (B, H, T, D) on ``backend``."""
    return attend(q, k, v, pattern="full", backend=backend, q_offset=0)


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ViTBlock(nn.Module):
    """Pre-norm ViT block over x (B, N, C) -> (B, N, C). ``backend``: see :data:`BACKENDS`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa"):
        super().__init__()
        check_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.mlp_ratio = check_ratio(mlp_ratio, "mlp_ratio")
        self.backend = check_backend(backend)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = MLP(dim, max(1, round(dim * self.mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.out(merge_heads(softmax_attention(q, k, v, self.backend)))
        return x + self.mlp(self.norm2(x))


def vit_block_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of one :class:`ViTBlock` over ``seq`` tokens (norms and GELU not counted)."""
    dim, ratio = config["dim"], config.get("mlp_ratio", 4.0)
    hidden = max(1, round(dim * ratio))
    attention = 4.0 * batch * seq * seq * dim
    projection = 2.0 * batch * seq * dim * (4 * dim) + 2.0 * batch * seq * 2 * dim * hidden
    return FlopCount(attention_fwd=attention, projection_fwd=projection)
