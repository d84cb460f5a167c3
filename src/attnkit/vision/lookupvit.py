"""LookupViT: Compressing visual information to a limited number of tokens (arXiv 2407.12753).

Two token streams: N high-resolution *lookup* tokens ``l`` (B, N, C) and a fixed number M of
*compressed* tokens ``c`` (B, M, C), M << N (e.g. the patch grid resized to 4 x 4). The heavy
computation (self-attention, the wide MLP) runs on the M compressed tokens only; the N lookup tokens
get cross-attention and a light MLP. One block, with multi-head bidirectional cross-attention (MHBC)::

    gather    A   = (W_q LN(c)) (W_k LN(l))^T / sqrt(D)                 (B, H, M, N): logits, once
              c  += W_o softmax_N(A) (W_v LN(l))                          compressed <- lookup
    refine    c  += W_o' MHSA(LN(c));  c += MLP_{r C}(LN(c))              heavy, M tokens only
    scatter   l  += W_o'' softmax_M(A^T) (W_v' LN(c))                     lookup <- compressed, A reused
              l  += MLP_{r_l C}(LN(l))                                    light (r_l = lookup_mlp_ratio)

What differs from a ViT block: no N x N attention (the core is 4 M N C + 2 N M C + 4 M^2 C instead of
4 N^2 C), and the per-token projections and MLP on the N tokens shrink from ``(8 + 4 r) C^2`` to
``(6 + 4 r_l) C^2`` (k, v and the scatter's output projection, and the light MLP).

No official code is public (the paper is from Google DeepMind). This is written from the paper's
description: the scatter reuses the gather's logits, transposed and normalised over the M compressed
tokens (that is the "bidirectional" saving: no second query / key projection and no second q k^T);
``share_attention=False`` computes the reverse cross-attention with its own query and key projections
instead. The compressed tokens at the input come from the patch grid resized to ``sqrt(M) x sqrt(M)``
(area averaging, :func:`compress_grid`), as the paper resizes the feature map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from ..cards import FlopCount
from .vit import (MLP, ViTBlock, check_backend, check_heads, check_ratio, check_tokens, merge_heads, softmax_attention,
                  split_heads, vit_block_flops)

__all__ = ["LookupViTBlock", "lookupvit_block_flops", "bidirectional_cross_attention_reference", "compress_grid",
           "PatchClassifier"]


def compress_grid(tokens: torch.Tensor, num_compressed: int) -> torch.Tensor:
    """Lookup tokens (B, N, C) on a square grid -> (B, M, C) on a ``sqrt(M)`` square grid (area average)."""
    B, N, C = tokens.shape
    side, out = math.isqrt(N), math.isqrt(num_compressed)
    if side * side != N:
        raise ValueError(f"the lookup tokens must lie on a square grid, got N={N}")
    if out * out != num_compressed or out > side:
        raise ValueError(f"num_compressed must be a square <= N={N}, got {num_compressed!r}")
    grid = tokens.transpose(1, 2).reshape(B, C, side, side)
    return F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)  # (B, M, C)


class LookupViTBlock(nn.Module):
    """One LookupViT block: ``(lookup (B, N, C), compressed (B, M, C)) -> (lookup, compressed)``.

    Args:
        dim, num_heads: width C and heads H (the cross-attentions and the self-attention share them).
        num_compressed: M, the number of compressed tokens the block expects (checked in forward).
        mlp_ratio: the compressed tokens' MLP width ratio (the heavy MLP).
        lookup_mlp_ratio: the lookup tokens' MLP width ratio (the light MLP).
        share_attention: reuse the gather's logits for the scatter (the paper's MHBC).
        backend: ``sdpa`` or ``reference`` for the compressed tokens' self-attention (and for the
            scatter when ``share_attention=False``); the shared logits are one matmul either way.
    """

    def __init__(self, dim: int, num_heads: int, num_compressed: int = 16, mlp_ratio: float = 4.0,
                 lookup_mlp_ratio: float = 0.5, share_attention: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.head_dim = check_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_compressed = positive_int(num_compressed, "num_compressed")
        self.mlp_ratio = check_ratio(mlp_ratio, "mlp_ratio")
        self.lookup_mlp_ratio = check_ratio(lookup_mlp_ratio, "lookup_mlp_ratio")
        if not isinstance(share_attention, bool):
            raise ValueError(f"share_attention must be a bool, got {share_attention!r}")
        self.share_attention = share_attention
        self.backend = check_backend(backend)
        # gather: compressed queries, lookup keys / values
        self.norm_c1, self.norm_l1 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.gather_q, self.gather_kv, self.gather_out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        # refine: the heavy ViT block on the M compressed tokens
        self.refine = ViTBlock(dim, num_heads, mlp_ratio, backend)
        # scatter: lookup <- compressed, then the light MLP
        self.norm_c3 = nn.LayerNorm(dim)
        self.scatter_v, self.scatter_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        if not share_attention:
            self.norm_l3 = nn.LayerNorm(dim)
            self.scatter_q, self.scatter_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_l4 = nn.LayerNorm(dim)
        self.lookup_mlp = MLP(dim, max(1, round(dim * self.lookup_mlp_ratio)))

    def forward(self, lookup: torch.Tensor, compressed: torch.Tensor):
        check_tokens(lookup, self.dim, "lookup")
        check_tokens(compressed, self.dim, "compressed")
        if compressed.shape[1] != self.num_compressed:
            raise ValueError(f"compressed must hold num_compressed={self.num_compressed} tokens, "
                             f"got {compressed.shape[1]}")
        if compressed.shape[0] != lookup.shape[0]:
            raise ValueError(f"lookup and compressed must share the batch, got {lookup.shape[0]} and {compressed.shape[0]}")
        H, scale = self.num_heads, self.head_dim ** -0.5
        q = split_heads(self.gather_q(self.norm_c1(compressed)), H)  # (B, H, M, D)
        k, v = (split_heads(t, H) for t in self.gather_kv(self.norm_l1(lookup)).chunk(2, dim=-1))  # (B, H, N, D)
        logits = (q @ k.transpose(-1, -2)) * scale  # (B, H, M, N): computed once, read in both directions
        compressed = compressed + self.gather_out(merge_heads(logits.softmax(-1) @ v))
        compressed = self.refine(compressed)
        v_c = split_heads(self.scatter_v(self.norm_c3(compressed)), H)  # (B, H, M, D)
        if self.share_attention:
            scattered = logits.softmax(-2).transpose(-1, -2) @ v_c  # (B, H, N, D): normalised over M
        else:
            q_l = split_heads(self.scatter_q(self.norm_l3(lookup)), H)
            k_c = split_heads(self.scatter_k(self.norm_c3(compressed)), H)
            scattered = softmax_attention(q_l, k_c, v_c, self.backend)
        lookup = lookup + self.scatter_out(merge_heads(scattered))
        lookup = lookup + self.lookup_mlp(self.norm_l4(lookup))
        return lookup, compressed


def bidirectional_cross_attention_reference(lookup, compressed_in, compressed_mid, w: dict, num_heads: int):
    """The attention part of a block, written plainly per head (use float64): returns the gather's
    update of the compressed tokens (B, M, C), before ``W_o``, and the scatter's update of the lookup
    tokens (B, N, C), before ``W_o''``, given the LayerNormed inputs and the projection weights ``w``
    (``q, k, v, v2``: (C, C) matrices and ``bq, bk, bv, bv2`` biases; ``compressed_mid``: the
    compressed tokens after the refine step, LayerNormed)."""
    B, N, C = lookup.shape
    D = C // num_heads
    gather = torch.zeros(B, compressed_in.shape[1], C, dtype=lookup.dtype)
    scatter = torch.zeros(B, N, C, dtype=lookup.dtype)
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        q = compressed_in @ w["q"][cols].T + w["bq"][cols]
        k = lookup @ w["k"][cols].T + w["bk"][cols]
        v = lookup @ w["v"][cols].T + w["bv"][cols]
        v2 = compressed_mid @ w["v2"][cols].T + w["bv2"][cols]
        scores = torch.einsum("bmd,bnd->bmn", q, k) / math.sqrt(D)
        to_compressed = torch.exp(scores - scores.amax(-1, keepdim=True))
        to_compressed = to_compressed / to_compressed.sum(-1, keepdim=True)  # over the N lookup tokens
        to_lookup = torch.exp(scores - scores.amax(1, keepdim=True))
        to_lookup = to_lookup / to_lookup.sum(1, keepdim=True)  # over the M compressed tokens, per lookup token
        gather[..., cols] = torch.einsum("bmn,bnd->bmd", to_compressed, v)
        scatter[..., cols] = torch.einsum("bmn,bmd->bnd", to_lookup, v2)
    return gather, scatter


def lookupvit_block_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of one :class:`LookupViTBlock` with ``seq`` = N lookup tokens and
    ``config["num_compressed"]`` = M (norms, softmax and GELU not counted)."""
    C, M, N = config["dim"], config.get("num_compressed", 16), seq
    share = config.get("share_attention", True)
    heavy = vit_block_flops(batch, M, {"dim": C, "mlp_ratio": config.get("mlp_ratio", 4.0)})
    light = max(1, round(C * config.get("lookup_mlp_ratio", 0.5)))
    attention = heavy.attention_fwd + 4.0 * batch * M * N * C  # gather: q k^T and A v
    projection = heavy.projection_fwd + 2.0 * batch * C * C * (M + 2 * N + M)  # gather q, k v, out
    projection += 2.0 * batch * C * C * (M + N) + 2.0 * batch * N * 2 * C * light  # scatter v, out; light MLP
    if share:
        attention += 2.0 * batch * N * M * C  # only A^T v: the logits are reused
    else:
        attention += 4.0 * batch * N * M * C
        projection += 2.0 * batch * C * C * (N + M)  # the scatter's own q (lookup) and k (compressed)
    return FlopCount(attention_fwd=attention, projection_fwd=projection)


class PatchClassifier(nn.Module):
    """Patch tokens (B, N, token_dim) -> logits (B, classes): a linear embedding plus 2-D sine-cosine
    positions, ``depth`` blocks, a LayerNorm and mean pooling, a linear head. ``block="vit"`` stacks
    :class:`ViTBlock`; ``block="lookupvit"`` stacks :class:`LookupViTBlock` with the compressed tokens
    made by :func:`compress_grid` and pools the lookup and compressed tokens together."""

    def __init__(self, token_dim: int, grid: int, num_classes: int, dim: int = 64, num_heads: int = 4, depth: int = 2,
                 block: str = "vit", num_compressed: int = 16, mlp_ratio: float = 4.0, lookup_mlp_ratio: float = 0.5,
                 backend: str = "sdpa"):
        super().__init__()
        from ..tasks.images import sincos_positions

        if block not in ("vit", "lookupvit"):
            raise ValueError(f"block must be 'vit' or 'lookupvit', got {block!r}")
        for name, value in (("token_dim", token_dim), ("grid", grid), ("num_classes", num_classes), ("depth", depth)):
            positive_int(value, name)
        self.block, self.num_compressed, self.grid = block, num_compressed, grid
        self.embed = nn.Linear(token_dim, dim)
        self.register_buffer("positions", sincos_positions(grid, dim), persistent=False)
        if block == "vit":
            self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, mlp_ratio, backend) for _ in range(depth))
        else:
            compress_grid(torch.zeros(1, grid * grid, 1), num_compressed)  # a clear error now, not at forward
            self.blocks = nn.ModuleList(LookupViTBlock(dim, num_heads, num_compressed, mlp_ratio, lookup_mlp_ratio,
                                                       backend=backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions  # (B, N, C)
        if self.block == "vit":
            for block in self.blocks:
                x = block(x)
        else:
            c = compress_grid(x, self.num_compressed)  # (B, M, C)
            for block in self.blocks:
                x, c = block(x, c)
            x = torch.cat([x, c], dim=1)
        return self.head(self.norm(x).mean(1))
