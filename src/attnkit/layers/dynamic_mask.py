"""DMA: Trainable Dynamic Mask Sparse Attention.

Trainable Dynamic Mask Sparse Attention (Shi et al., arXiv 2508.02124; official code:
SmallDoges/flash-dmattn and the Doge models).

The values decide which keys matter. Per KV head g and key j::

    delta_j   = softplus( W_dt concat_heads(v_j) )          [Hkv] per key
    bias_gj   = A_g * delta_gj                               (A initialised to 0)
    kept(i)   = the keep_keys largest bias_gj among the keys query i may see (no selection
                when it sees at most keep_keys keys; ties with the last kept value are kept)
    o_i       = sum_{j in kept(i)} softmax_j( q_i . k_j / sqrt(D) + bias_gj ) v_j

The selection uses the bias detached from the graph; gradients reach ``A`` and ``W_dt``
through the bias added to the kept scores. What differs from
:class:`~attnkit.layers.MultiHeadAttention`: a per-key additive bias (FlexAttention
``score_mod``) and a per-query top-k key mask (a ``mask_mod`` over a per-row threshold).
The bias rides in the KV cache as one extra value channel, so decoding sees the same
biases as the full forward.

Speed (H200, 32k, keep 2048, fwd+bwd of the core): FlexAttention skips a key block only where
no row of a query block keeps any of its keys. Kept keys in whole 128-key spans visit 16 of
the 128 causal blocks per query block: the whole core runs 3.4x faster than dense FlexAttention
with the bias (thresholds 4.5 ms and block mask 1.5 ms of its 16.8 ms included; the attention
alone about 5x); kept keys scattered one by one leave every block visited, and DMA is then
slower than dense attention. The per-row thresholds cost O(S log S) per head (a
wavelet matrix over the keys' ranks), not a top-k over every row
(``benchmarks/results/h200/dma-core.json``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops import attend
from ..ops.select.prefix_quantile import kth_largest_of_prefixes
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["DynamicMaskAttention", "kept_key_thresholds"]


def kept_key_thresholds(bias: Tensor, pattern, keep_keys: int, q_len: int, q_offset: int, *,
                        rows_per_chunk: int | None = None) -> Tensor:
    """Per query row, the ``keep_keys``-th largest bias among the keys the pattern allows
    (``-inf`` where the row allows at most ``keep_keys`` keys). bias ``[B, Hkv, S]`` (detached)
    -> thresholds ``[B, Hkv, T]``. A causal pattern with more than 64 rows takes every row at once
    in ``O(S log S)`` (``rows_per_chunk`` is not used); otherwise rows are processed
    ``rows_per_chunk`` at a time (default 256), each ranking all its keys."""
    B, Hkv, S = bias.shape
    if S > keep_keys and pattern.kind == "causal" and q_len > 64:  # a few rows (decoding): ranking directly is cheaper
        return _prefix_thresholds(bias, keep_keys, q_len, q_offset)
    out = bias.new_full((B, Hkv, q_len), float("-inf"))
    if S <= keep_keys:
        return out
    rows_per_chunk = rows_per_chunk or 256
    for start in range(0, q_len, rows_per_chunk):
        stop = min(q_len, start + rows_per_chunk)
        allowed = pattern.dense(stop - start, S, q_offset=q_offset + start, batch=B, device=bias.device)[:, :1]
        # allowed: (B|1, 1, rows, S); a per-head pattern is not supported by the selection
        scores = bias[:, :, None, :].masked_fill(~allowed, float("-inf"))  # (B, Hkv, rows, S)
        kth = scores.topk(keep_keys, dim=-1).values[..., -1]  # (B, Hkv, rows)
        enough = allowed.sum(-1) > keep_keys  # (B|1, 1, rows)
        out[:, :, start:stop] = torch.where(enough, kth, out[:, :, start:stop])
    return out


def _prefix_thresholds(bias: Tensor, keep: int, q_len: int, q_offset: int) -> Tensor:
    """The causal case of :func:`kept_key_thresholds`: a row that sees keys ``0..p`` keeps the
    ``keep`` largest biases of that prefix, so its threshold is the prefix's ``keep``-th largest,
    found for every row at once in ``O(S log S)`` per (batch, KV head) by
    :func:`attnkit.ops.select.prefix_quantile.kth_largest_of_prefixes` (a wavelet matrix over the ranks)."""
    B, Hkv, S = bias.shape
    seen = (torch.arange(q_len, device=bias.device) + q_offset).clamp(max=S - 1) + 1  # keys each row sees
    return kth_largest_of_prefixes(bias.reshape(B * Hkv, S), keep, seen).view(B, Hkv, q_len)


class _KeptKeys(_patterns.Pattern):
    """``base`` restricted, per (batch, KV head, query row), to keys whose bias reaches the row's threshold."""

    depends_on_batch = True
    depends_on_head = True

    def __init__(self, base, bias: Tensor, thresholds: Tensor, q_offset: int, group: int):
        self.base, self.bias, self.thresholds = base, bias, thresholds
        self.q_offset, self.group = q_offset, group

    def allowed(self, b, h, q_pos, k_pos):
        g = h // self.group
        keep = self.bias[b, g, k_pos] >= self.thresholds[b, g, q_pos - self.q_offset]
        return self.base.allowed(b, h, q_pos, k_pos) & keep

    def to(self, device):
        return _KeptKeys(self.base.to(device), self.bias.to(device), self.thresholds.to(device), self.q_offset, self.group)

    def flex_block_mask(self, batch, heads, q_len, kv_len, q_offset, device, block_size):
        """Causal base: the blocks from per-block bias and threshold extremes, O(blocks) work
        instead of evaluating the mask over every (head, row, key) (4.5 s per call at 8k on a
        2-core CPU). A key block is visited by a query block when some key is causally visible and the
        block's largest bias reaches the block's lowest threshold; it is full when every key
        is visible to every row and its smallest bias reaches the highest threshold."""
        if self.base.kind != "causal" or q_offset != self.q_offset:
            return None
        qb, kb = _patterns.block_shape(block_size)
        device = torch.device(device)
        bias, thr = self.bias.to(device), self.thresholds.to(device)
        nq, nk = -(-q_len // qb), -(-kv_len // kb)
        inf = float("inf")
        thr_low = F.pad(thr, (0, nq * qb - q_len), value=inf).view(*thr.shape[:2], nq, qb).amin(-1)
        thr_high = F.pad(thr, (0, nq * qb - q_len), value=-inf).view(*thr.shape[:2], nq, qb).amax(-1)
        bias_high = F.pad(bias, (0, nk * kb - kv_len), value=-inf).view(*bias.shape[:2], nk, kb).amax(-1)
        bias_low = F.pad(bias, (0, nk * kb - kv_len), value=inf).view(*bias.shape[:2], nk, kb).amin(-1)
        first = torch.arange(nq, device=device) * qb + q_offset  # each query block's first and last row
        last = torch.clamp(first + qb, max=q_offset + q_len) - 1
        keys = torch.arange(nk, device=device) * kb
        visible = keys <= last[:, None]  # (nq, nk): some key visible to some row
        whole = (keys + kb - 1 <= first[:, None]) & (keys + kb <= kv_len) & ((first + qb <= q_offset + q_len)[:, None])
        some = visible & (bias_high[:, :, None, :] >= thr_low[..., None])  # (B, Hkv, nq, nk)
        full = whole & (bias_low[:, :, None, :] >= thr_high[..., None])
        group = 1 if heads is None else heads // bias.shape[1]
        some, full = some.repeat_interleave(group, dim=1), full.repeat_interleave(group, dim=1)
        return _patterns.block_mask_from_blocks(some & ~full, full, q_len, kv_len, (qb, kb), self.mask_mod(q_offset))


class DynamicMaskAttention(MultiHeadAttention):
    """Dynamic Mask Attention (DMA): value-derived key bias and top-k key selection.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (the pattern must be causal-kind or a
            causal restriction; the selection runs inside it).
        keep_keys: keys each query keeps (the paper's ``keep_window_size``, default 2048).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import DynamicMaskAttention
        >>> layer = DynamicMaskAttention(256, 8, num_kv_heads=2, keep_keys=16)
        >>> layer(torch.randn(2, 40, 256)).shape
        torch.Size([2, 40, 256])
    """

    extra_value_channels = 1  # the key bias, cached beside each value

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, keep_keys: int = 2048, **options):
        super().__init__(dim, num_heads, num_kv_heads, **options)
        if self.pattern.kind == "full":
            raise ValueError("DynamicMaskAttention is causal: pattern='full' is not accepted")
        if self.pattern.depends_on_head:
            raise ValueError("DynamicMaskAttention selects keys per KV head: a per-head pattern is not accepted")
        self.keep_keys = positive_int(keep_keys, "keep_keys")
        self.dt_proj = nn.Linear(self.num_kv_heads * self.head_dim, self.num_kv_heads, bias=options.get("bias", False))
        self.A = nn.Parameter(torch.zeros(self.num_kv_heads))

    def key_bias(self, v: Tensor) -> Tensor:
        """v ``[B, Hkv, T, D]`` -> bias ``[B, Hkv, T]``."""
        B, Hkv, T, D = v.shape
        z = self.dt_proj(v.transpose(1, 2).reshape(B, T, Hkv * D))  # (B, T, Hkv)
        # softplus as logaddexp(z, 0), the same function: torch 2.13's CPU softplus backward returns
        # its gradient's strides where its traced (fake) kernel assumes the input's, which broke
        # the backward under torch.compile (a view error); logaddexp has no such mismatch
        delta = torch.logaddexp(z, torch.zeros_like(z))
        return (self.A * delta).transpose(1, 2)

    def adjust(self, x, q, k, v, positions, state):
        return q, k, torch.cat([v, self.key_bias(v).unsqueeze(-1)], dim=-1)  # (B, Hkv, T, D + 1)

    def core(self, q, k, v, pattern, q_offset):
        v, bias = v[..., :-1], v[..., -1]  # (B, Hkv, S, D), (B, Hkv, S)
        T, S = q.shape[2], k.shape[2]
        q_offset = S - T if q_offset is None else q_offset
        group = q.shape[1] // k.shape[1]
        if S > self.keep_keys:
            # a copy, not a view of the bias that score_mod differentiates, so the mask's buffers and
            # the score's share no storage inside FlexAttention (B * Hkv * S values). A precaution
            # only: the CUDA gradient error once blamed on it was the block mask's strided indices
            # (patterns.block_mask_from_blocks); the copy stays until the GPU checks it can go
            detached = bias.detach().clone()
            thresholds = kept_key_thresholds(detached, pattern, self.keep_keys, T, q_offset)
            pattern = _KeptKeys(pattern, detached, thresholds, q_offset, group)

        def add_bias(score, b, h, q_pos, k_pos):
            return score + bias[b, h // group, k_pos]

        return attend(q, k, v, pattern=pattern, score_mod=add_bias, backend=self.backend, q_offset=q_offset)


def dma_flops(batch, seq, config) -> FlopCount:
    """Kept pairs: the causal prefix up to keep_keys, then keep_keys per row."""
    base = multi_head_flops(batch, seq, config)
    _, heads, kv, head_dim = head_shape(config)
    keep = config.get("keep_keys", 2048)
    rows = torch.arange(seq, dtype=torch.float64) + 1
    pairs = float(rows.clamp(max=keep).sum())
    extra = 2.0 * batch * seq * kv * head_dim * kv
    return FlopCount(attention_fwd=4.0 * batch * heads * pairs * head_dim, projection_fwd=base.projection_fwd + extra)


CARDS = (
    Card(
        name="dma",
        title="Trainable Dynamic Mask Sparse Attention",
        arxiv="2508.02124",
        family="pattern",
        layer=DynamicMaskAttention,
        flops=dma_flops,
        defaults={"keep_keys": 2048},
        capabilities=Capabilities(bidirectional=False, backends=("reference", "flex")),
        summary="value-derived key bias A*softplus(W_dt v); each query keeps its top keep_keys keys by that bias",
    ),
)
