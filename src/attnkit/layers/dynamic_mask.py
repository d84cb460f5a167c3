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
wavelet matrix over the keys' ranks), not a top-k over every row (``benchmarks/results/README.md``,
sessions 13 and 14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import positive_int
from ..ops import attend
from ..ops.prefix_quantile import kth_largest_of_prefixes
from ..registry import Capabilities, Card, FlopCount, register
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
    out = bias.new_full((B, Hkv, q_len), float("-inf"))
    if S <= keep_keys:
        return out
    if pattern.kind == "causal" and q_len > 64:  # a few rows (decoding): ranking their keys directly is cheaper
        return _prefix_thresholds(bias, keep_keys, q_len, q_offset, out)
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


def _prefix_thresholds(bias: Tensor, keep: int, q_len: int, q_offset: int, out: Tensor) -> Tensor:
    """The causal case of :func:`kept_key_thresholds`: a row that sees keys ``0..p`` keeps the
    ``keep`` largest biases of that prefix, so its threshold is the prefix's ``keep``-th largest,
    found for every row at once in ``O(S log S)`` per (batch, KV head) by
    :func:`attnkit.ops.prefix_quantile.kth_largest_of_prefixes` (a wavelet matrix over the ranks)."""
    B, Hkv, S = bias.shape
    seen = (torch.arange(q_len, device=bias.device) + q_offset).clamp(max=S - 1) + 1  # keys each row sees
    out.copy_(kth_largest_of_prefixes(bias.reshape(B * Hkv, S), keep, seen).view(B, Hkv, q_len))
    return out


def _kept_blocks(bias: Tensor, thr: Tensor, q_len: int, kv_len: int, q_offset: int, qb: int, kb: int):
    """``(some, full)`` ``[B, Hkv, q blocks, kv blocks]``: the (query block, key block) pairs where
    some row keeps some key, and where every row keeps every key (causal base)."""
    device = bias.device
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
    return some, full


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
        some, full = _kept_blocks(bias, thr, q_len, kv_len, q_offset, qb, kb)
        group = 1 if heads is None else heads // bias.shape[1]
        some, full = some.repeat_interleave(group, dim=1), full.repeat_interleave(group, dim=1)
        return _patterns.block_mask_from_blocks(some & ~full, full, q_len, kv_len, (qb, kb), self.mask_mod(q_offset))


class _GatheredKeys(_patterns.Pattern):
    """Row ``b'`` of the gathered layout is one query block of ``block`` rows (first row at
    absolute position ``row0[b']``) against the keys gathered for it (positions ``key_pos``,
    ``BIG`` where padded); a row keeps a gathered key that is causally visible and whose bias
    reaches the row's threshold. Used with ``q_offset = 0``: ``q_pos`` is the row in its block."""

    depends_on_batch = True
    depends_on_head = True

    def __init__(self, key_pos: Tensor, key_bias: Tensor, thresholds: Tensor, row0: Tensor, group: int):
        self.key_pos, self.key_bias, self.thresholds, self.row0, self.group = key_pos, key_bias, thresholds, row0, group

    def allowed(self, b, h, q_pos, k_pos):
        g = h // self.group
        visible = self.key_pos[b, g, k_pos] <= self.row0[b] + q_pos
        return visible & (self.key_bias[b, g, k_pos] >= self.thresholds[b, g, q_pos])

    def to(self, device):
        return _GatheredKeys(self.key_pos.to(device), self.key_bias.to(device), self.thresholds.to(device),
                             self.row0.to(device), self.group)

    def flex_block_mask(self, batch, heads, q_len, kv_len, q_offset, device, block_size):
        """One query block per gathered row; a key block is visited when it holds a gathered key,
        and full when its keys precede the block's first row and all reach its highest threshold."""
        qb, kb = _patterns.block_shape(block_size)
        if q_offset != 0 or q_len > qb:
            return None
        device = torch.device(device)
        pos, bias, thr, row0 = (t.to(device) for t in (self.key_pos, self.key_bias, self.thresholds, self.row0))
        nk = -(-kv_len // kb)
        pad = nk * kb - kv_len
        pos_blocks = F.pad(pos, (0, pad), value=_GATHER_PAD).view(*pos.shape[:2], nk, kb)
        valid = pos_blocks < _GATHER_PAD
        bias_blocks = F.pad(bias, (0, pad)).view(*pos.shape[:2], nk, kb)
        some = valid.any(-1)  # (B', Hkv, nk)
        full = (valid.all(-1) & (pos_blocks.amax(-1) <= row0[:, None, None])
                & (bias_blocks.amin(-1) >= thr.amax(-1, keepdim=True)))
        group = heads // pos.shape[1]
        some, full = (t.repeat_interleave(group, dim=1)[:, :, None, :] for t in (some, full))
        return _patterns.block_mask_from_blocks(some & ~full, full, q_len, kv_len, (qb, kb), self.mask_mod(0))


_GATHER_PAD = 1 << 40  # the position of a padding slot: after every row
GATHER_BLOCK = 128  # query rows per gathered block (FlexAttention's tile)


def gather_kept_keys(bias: Tensor, thresholds: Tensor, q_len: int, q_offset: int, block: int = GATHER_BLOCK, *,
                     count: Tensor | None = None):
    """Per (batch, KV head, block of ``block`` query rows): the positions of the keys any of its
    rows keeps, ascending. A row's threshold never falls along the rows (its prefix only grows),
    so the union is the keys up to the block's last row whose bias reaches the *first* row's
    threshold: at most ``keep + block - 1`` keys, ties aside. bias ``[B, Hkv, S]`` (detached),
    thresholds ``[B, Hkv, T]`` -> ``(positions [B, Hkv, nq, W] int64, valid [B, Hkv, nq, W])``
    with ``W`` the largest union, rounded up to a multiple of 128 (``count``: :func:`union_sizes`, if known)."""
    B, Hkv, S = bias.shape
    if count is None:
        count = union_sizes(bias, thresholds, q_len, q_offset, block)
    width = -(-max(1, int(count.max())) // 128) * 128
    positions = torch.zeros(B, Hkv, count.shape[-1], width + 1, dtype=torch.int64, device=bias.device)
    for sl, cand, keys in _union_candidates(bias, thresholds, q_len, q_offset, block):
        slot = torch.where(cand, cand.cumsum(-1, dtype=torch.int32) - 1, width).long()  # others: the spare slot
        positions[:, :, sl].scatter_(-1, slot, keys.expand_as(slot))
    return positions[..., :width].contiguous(), torch.arange(width, device=bias.device) < count[..., None]


def _union_candidates(bias: Tensor, thresholds: Tensor, q_len: int, q_offset: int, block: int):
    """``(block slice, candidates [B, Hkv, blocks, S], key positions)``, a few query blocks at a time."""
    B, Hkv, S = bias.shape
    nq = -(-q_len // block)
    first = q_offset + torch.arange(nq, device=bias.device) * block
    last = torch.clamp(first + block, max=q_offset + q_len) - 1
    t_first = thresholds[:, :, ::block]  # (B, Hkv, nq): the lowest threshold of each block
    keys = torch.arange(S, device=bias.device)
    chunk = max(1, (1 << 27) // max(1, B * Hkv * S))  # bounds the [B, Hkv, chunk, S] masks
    for start in range(0, nq, chunk):
        sl = slice(start, start + chunk)
        yield sl, (keys <= last[sl, None]) & (bias[:, :, None, :] >= t_first[:, :, sl, None]), keys


def union_sizes(bias: Tensor, thresholds: Tensor, q_len: int, q_offset: int, block: int = GATHER_BLOCK) -> Tensor:
    """How many keys each (batch, KV head, query block)'s union of kept keys holds: ``[B, Hkv, blocks]``."""
    return torch.cat([cand.sum(-1) for _, cand, _ in _union_candidates(bias, thresholds, q_len, q_offset, block)], -1)


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, thresholds: Tensor, q_offset: int,
                       backend: str = "auto", block: int = GATHER_BLOCK, kept=None) -> Tensor:
    """DMA's causal core on gathered keys: each block of ``block`` query rows attends only the
    union of its rows' kept keys (:func:`gather_kept_keys`), a dense-width problem of
    ``keep + block`` keys instead of the whole prefix, whatever the kept keys' positions.
    q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]``, bias ``[B, Hkv, S]`` (gradients flow to it and
    through the gathers to k and v), thresholds ``[B, Hkv, T]`` -> ``[B, H, T, D]``."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    positions, valid = kept if kept is not None else gather_kept_keys(bias.detach(), thresholds, T, q_offset, block)
    nq, width = positions.shape[2], positions.shape[3]

    def per_block(t, tail):  # [B, Hkv|H, nq, ...] -> [B * nq, Hkv|H, ...]
        return t.transpose(1, 2).reshape(B * nq, t.shape[1], *tail)

    flat = positions.view(B, Hkv, nq * width)
    kg = per_block(k.gather(2, flat[..., None].expand(-1, -1, -1, D)).view(B, Hkv, nq, width, D), (width, D))
    vg = per_block(v.gather(2, flat[..., None].expand(-1, -1, -1, v.shape[-1])).view(B, Hkv, nq, width, v.shape[-1]),
                   (width, v.shape[-1]))
    bg = per_block(bias.gather(2, flat).view(B, Hkv, nq, width), (width,))
    key_pos = per_block(torch.where(valid, positions, _GATHER_PAD), (width,))
    pad_rows = nq * block - T
    qg = per_block(F.pad(q, (0, 0, 0, pad_rows)).view(B, H, nq, block, D), (block, D))
    thr = F.pad(thresholds, (0, pad_rows), mode="replicate") if pad_rows else thresholds
    thr = per_block(thr.reshape(B, Hkv, nq, block), (block,))
    row0 = (q_offset + torch.arange(nq, device=q.device) * block).repeat(B)
    pattern = _GatheredKeys(key_pos, bg.detach(), thr, row0, group)

    def add_bias(score, b, h, q_pos, k_pos):
        return score + bg[b, h // group, k_pos]

    out = attend(qg, kg, vg, pattern=pattern, score_mod=add_bias, backend=backend, q_offset=0)
    return out.view(B, nq, H, block, -1).transpose(1, 2).reshape(B, H, nq * block, -1)[:, :, :T]


class DynamicMaskAttention(MultiHeadAttention):
    """Dynamic Mask Attention (DMA): value-derived key bias and top-k key selection.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (the pattern must be causal-kind or a
            causal restriction; the selection runs inside it).
        keep_keys: keys each query keeps (the paper's ``keep_window_size``, default 2048).
        sparse_path: how the kept keys are attended once a row sees more than ``keep_keys``:
            ``blocks`` (FlexAttention skips the key blocks no row of a query block keeps: fast
            when kept keys come in spans), ``gather`` (each block of 128 query rows attends the
            union of its rows' kept keys, gathered: at most ``keep_keys + 127`` keys wherever
            they lie; causal patterns only), or ``auto`` (default: ``gather`` when the gathered
            blocks are fewer than 0.8 of the key blocks ``blocks`` would visit, else ``blocks``).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import DynamicMaskAttention
        >>> layer = DynamicMaskAttention(256, 8, num_kv_heads=2, keep_keys=16)
        >>> layer(torch.randn(2, 40, 256)).shape
        torch.Size([2, 40, 256])
    """

    extra_value_channels = 1  # the key bias, cached beside each value

    SPARSE_PATHS = ("auto", "blocks", "gather")

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, keep_keys: int = 2048,
                 sparse_path: str = "auto", **options):
        if sparse_path not in self.SPARSE_PATHS:
            raise ValueError(f"sparse_path must be one of {', '.join(self.SPARSE_PATHS)}, got {sparse_path!r}")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        if sparse_path == "gather" and self.pattern.kind != "causal":
            raise ValueError(f"sparse_path='gather' needs the plain causal pattern, got {self.pattern!r}")
        self.sparse_path = sparse_path
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
        delta = F.softplus(self.dt_proj(v.transpose(1, 2).reshape(B, T, Hkv * D)))  # (B, T, Hkv)
        return (self.A * delta).transpose(1, 2)

    def adjust(self, x, q, k, v, positions, state):
        return q, k, torch.cat([v, self.key_bias(v).unsqueeze(-1)], dim=-1)  # (B, Hkv, T, D + 1)

    def core(self, q, k, v, pattern, q_offset):
        v, bias = v[..., :-1], v[..., -1]  # (B, Hkv, S, D), (B, Hkv, S)
        T, S = q.shape[2], k.shape[2]
        q_offset = S - T if q_offset is None else q_offset
        group = q.shape[1] // k.shape[1]
        if S > self.keep_keys:
            detached = bias.detach()
            thresholds = kept_key_thresholds(detached, pattern, self.keep_keys, T, q_offset)
            gather, sizes = self._gathers(pattern, detached, thresholds, T, S, q_offset)
            if gather:
                kept = gather_kept_keys(detached, thresholds, T, q_offset, count=sizes)
                return gathered_attention(q, k, v, bias, thresholds, q_offset, backend=self.backend, kept=kept)
            pattern = _KeptKeys(pattern, detached, thresholds, q_offset, group)

        def add_bias(score, b, h, q_pos, k_pos):
            return score + bias[b, h // group, k_pos]

        return attend(q, k, v, pattern=pattern, score_mod=add_bias, backend=self.backend, q_offset=q_offset)


    def _gathers(self, pattern, bias: Tensor, thresholds: Tensor, T: int, S: int, q_offset: int):
        """``(whether to gather, the union sizes when computed)``."""
        if self.sparse_path == "blocks" or pattern.kind != "causal" or T <= GATHER_BLOCK:
            return False, None  # decode steps and short chunks: nothing to gain from gathering
        if self.sparse_path == "gather":
            return True, None
        sizes = union_sizes(bias, thresholds, T, q_offset)
        width_blocks = -(-int(sizes.max()) // 128)  # key blocks per gathered query block
        some, _ = _kept_blocks(bias, thresholds, T, S, q_offset, GATHER_BLOCK, 128)
        return width_blocks * some[..., 0].numel() < 0.8 * int(some.sum()), sizes


def dma_flops(batch, seq, config) -> FlopCount:
    """Kept pairs: the causal prefix up to keep_keys, then keep_keys per row."""
    base = multi_head_flops(batch, seq, config)
    _, heads, kv, head_dim = head_shape(config)
    keep = config.get("keep_keys", 2048)
    rows = torch.arange(seq, dtype=torch.float64) + 1
    pairs = float(rows.clamp(max=keep).sum())
    extra = 2.0 * batch * seq * kv * head_dim * kv
    return FlopCount(attention_fwd=4.0 * batch * heads * pairs * head_dim, projection_fwd=base.projection_fwd + extra)


register(
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
    )
)
