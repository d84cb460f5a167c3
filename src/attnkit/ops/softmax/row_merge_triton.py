"""Row gathers and log-sum-exp merges over index tables (the picked-rows split's glue).

:mod:`attnkit.ops.softmax.picked_causal` computes attention for a row in several pieces, each written
to a "slot" row of a flat buffer ``[n_slots, D]``; an index table ``idx[level, row]`` names the
row's slot in each piece (``-1``: the row has no part in that piece). Three passes:

    gather_rows(src, idx)[s]           = src[idx[s]]  (zeros where idx[s] < 0)
    sum_rows(base, src, idx)[r]        = base[r] + sum_l src[idx[l, r]]
    merge_rows(o0, l0, o, lse, idx, w) = softmax merge of the row's pieces:
        lse_r = logsumexp(l0_r, lse[idx[l, r]] ...);
        out_r = w_r * (exp(l0_r - lse_r) o0_r + sum_l exp(lse[idx[l, r]] - lse_r) o[idx[l, r]])
        (lse_r is returned as UNPICKED_LSE = 1e30 where w_r = 0: see there)

and the split's index tables themselves (:func:`level_row_counts`, :func:`level_tables`: one
launch each instead of some fifty small tensor ops; the split is otherwise CPU-bound on them).

Each reads every slot row it needs once, in float32, so the merge of ``n`` pieces is one pass
instead of ``n`` elementwise passes over the rows. ``src``/``o`` are ``[n_slots, D]`` and
``base``/``o0`` ``[n_rows, D]``, contiguous; any D (masked to the next power of two).
Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``); the ``*_torch`` twins are the
reference the tests compare with, and run anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["available", "gather_rows", "sum_rows", "merge_rows", "gather_rows_torch", "sum_rows_torch",
           "merge_rows_torch", "level_row_counts", "level_tables"]

_BLOCK_R = 32
# merge_rows' lse of a row whose weight is 0: a backward handed it weighs every key exp(s - 1e30) = 0,
# so such rows add no gradient whatever their dO (no pass to zero it)
UNPICKED_LSE = 1e30


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _gather_kernel(SRC, IDX, OUT, n, D, rows_per_head, s_head, s_row, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        live = rows < n
        idx = tl.load(IDX + rows, mask=live, other=-1).to(tl.int64)
        at = (idx // rows_per_head) * s_head + (idx % rows_per_head) * s_row
        dmask = d[None, :] < D
        x = tl.load(SRC + at[:, None] + d[None, :], mask=(idx[:, None] >= 0) & dmask, other=0.0)
        tl.store(OUT + rows.to(tl.int64)[:, None] * D + d[None, :], x, mask=live[:, None] & dmask)

    @triton.jit
    def _sum_kernel(BASE, SRC, IDX, OUT, n, n_levels, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        live = rows < n
        dmask = d[None, :] < D
        at = rows.to(tl.int64)[:, None] * D + d[None, :]
        acc = tl.load(BASE + at, mask=live[:, None] & dmask, other=0.0).to(tl.float32)
        for level in range(n_levels):
            idx = tl.load(IDX + level * n + rows, mask=live, other=-1).to(tl.int64)
            acc += tl.load(SRC + idx[:, None] * D + d[None, :], mask=(idx[:, None] >= 0) & dmask,
                           other=0.0).to(tl.float32)
        tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=live[:, None] & dmask)

    @triton.jit
    def _merge_kernel(O0, L0, O, L, IDX, W, OUT, LSE, n, n_levels, D, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        live = rows < n
        dmask = d[None, :] < D
        at = rows.to(tl.int64)[:, None] * D + d[None, :]
        m = tl.load(L0 + rows, mask=live, other=0.0)
        acc = tl.load(O0 + at, mask=live[:, None] & dmask, other=0.0).to(tl.float32)
        total = tl.full([BLOCK_R], 1.0, tl.float32)  # sum of exp(lse - m) over the pieces so far
        for level in range(n_levels):
            idx = tl.load(IDX + level * n + rows, mask=live, other=-1).to(tl.int64)
            has = idx >= 0
            lse = tl.load(L + idx, mask=has, other=float("-inf"))
            o = tl.load(O + idx[:, None] * D + d[None, :], mask=has[:, None] & dmask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, lse)
            keep = tl.exp(m - m_new)
            add = tl.exp(lse - m_new)  # 0 where the row has no piece here
            acc = acc * keep[:, None] + o * add[:, None]
            total = total * keep + add
            m = m_new
        w = tl.load(W + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(OUT + at, (acc * (w / total)[:, None]).to(OUT.dtype.element_ty), mask=live[:, None] & dmask)
        tl.store(LSE + rows, tl.where(w != 0, m + tl.log(total), 1e30), mask=live)  # 1e30: UNPICKED_LSE


    @triton.jit
    def _count_kernel(PREFIX, MOST, T, T_pad, leaf, BLOCK_S: tl.constexpr):
        """Per (head, level): the largest count of picked rows in a segment's second half -> atomic max."""
        bh = tl.program_id(0)
        level = tl.program_id(1)
        L = (2 * leaf) << level
        half = L // 2
        segments = (T - half + L - 1) // L
        base = PREFIX + bh.to(tl.int64) * (T_pad + 1)
        most = tl.zeros([BLOCK_S], tl.int32)
        for s0 in range(0, segments, BLOCK_S):
            seg = s0 + tl.arange(0, BLOCK_S)
            live = seg < segments
            start = tl.load(base + tl.minimum(seg * L + half, T_pad), mask=live, other=0)
            end = tl.load(base + tl.minimum(seg * L + L, T_pad), mask=live, other=0)
            most = tl.maximum(most, end - start)
        tl.atomic_max(MOST + level, tl.max(most, 0))

    @triton.jit
    def _table_kernel(PICK, PREFIX, PARAMS, ROW_SLOT, KEY_SLOT, SLOT_ROW, T, T_pad, leaf, n_levels,
                      BLOCK_T: tl.constexpr):
        """Each position's row slot and key slot per level, and the row slots' dense rows."""
        bh = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        live = t < T_pad
        N = tl.num_programs(1).to(tl.int64) * T_pad
        row = bh.to(tl.int64) * T_pad + t
        picked = tl.load(PICK + row, mask=live & (t < T), other=0) != 0
        before = tl.load(PREFIX + bh.to(tl.int64) * (T_pad + 1) + t, mask=live, other=0)
        for level in range(n_levels):
            L = (2 * leaf) << level
            half = L // 2
            rows = tl.load(PARAMS + level * 4)
            segments = tl.load(PARAMS + level * 4 + 1)
            q_off = tl.load(PARAMS + level * 4 + 2)
            k_off = tl.load(PARAMS + level * 4 + 3)
            seg = t // L
            r = t % L
            bottom = r >= half
            start = tl.load(PREFIX + bh.to(tl.int64) * (T_pad + 1) + tl.minimum(seg * L + half, T_pad), mask=live,
                            other=0)
            q_slot = q_off + (bh * segments + seg).to(tl.int64) * rows + (before - start)
            q_ok = picked & bottom
            tl.store(ROW_SLOT + level * N + row, tl.where(q_ok, q_slot, -1).to(tl.int32), mask=live)
            tl.store(SLOT_ROW + q_slot, row.to(tl.int32), mask=live & q_ok)
            k_ok = (~bottom) & (seg < segments) & (rows > 0)
            k_slot = k_off + (bh * segments + seg).to(tl.int64) * half + r
            tl.store(KEY_SLOT + level * N + row, tl.where(k_ok, k_slot, -1).to(tl.int32), mask=live)


def _grid(n: int):
    return (triton.cdiv(max(n, 1), _BLOCK_R),)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def gather_rows(src: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[s] = src[idx[s]]``, zeros where ``idx[s] < 0``; ``idx [n]`` int. ``src`` is ``[N, D]``
    contiguous, or ``[heads, rows, D]`` with any head and row strides (row ``i`` is
    ``src[i // rows, i % rows]``): a strided projection is read in place."""
    n, D = idx.shape[0], src.shape[-1]
    out = src.new_empty(n, D) if out is None else out
    if src.dim() == 2:
        src = src.unsqueeze(0)
    if n:
        _gather_kernel[_grid(n)](src, idx, out, n, D, src.shape[1], src.stride(0), src.stride(1), BLOCK_R=_BLOCK_R,
                                 BLOCK_D=_block_d(D))
    return out


def sum_rows(base: Tensor, src: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[r] = base[r] + sum_l src[idx[l, r]]`` (absent where ``idx < 0``), summed in float32."""
    n, D = base.shape
    out = torch.empty_like(base) if out is None else out
    if n:
        _sum_kernel[_grid(n)](base, src, idx, out, n, idx.shape[0], D, BLOCK_R=_BLOCK_R, BLOCK_D=_block_d(D))
    return out


def merge_rows(o0: Tensor, lse0: Tensor, o: Tensor, lse: Tensor, idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of every row's pieces (see the module docstring); ``(out, lse)``."""
    n, D = o0.shape
    out = torch.empty_like(o0)
    merged = torch.empty(n, dtype=torch.float32, device=o0.device)
    if n:
        _merge_kernel[_grid(n)](o0, lse0, o, lse, idx, weight, out, merged, n, idx.shape[0], D,
                                BLOCK_R=_BLOCK_R, BLOCK_D=_block_d(D))
    return out, merged


def _take(src: Tensor, idx: Tensor) -> Tensor:
    """``src[idx]`` with ``idx < 0`` (and any index into an empty ``src``) giving zeros."""
    if src.shape[0] == 0:
        return src.new_zeros(idx.shape + src.shape[1:])
    return torch.where((idx >= 0).reshape(idx.shape + (1,) * (src.dim() - 1)), src[idx.clamp_min(0).long()], 0)


def gather_rows_torch(src: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    rows = _take(src.reshape(-1, src.shape[-1]) if src.dim() == 3 else src, idx)
    return rows if out is None else out.copy_(rows)


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sum_rows_torch(base: Tensor, src: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    acc = _wide(base)
    for level in idx:
        acc = acc + _wide(gather_rows_torch(src, level))
    acc = acc.to(base.dtype)
    return acc if out is None else out.copy_(acc)


def merge_rows_torch(o0: Tensor, lse0: Tensor, o: Tensor, lse: Tensor, idx: Tensor,
                     weight: Tensor) -> tuple[Tensor, Tensor]:
    has = idx >= 0
    pieces_lse = torch.cat([_wide(lse0)[None], torch.where(has, _wide(_take(lse, idx)), float("-inf"))])
    merged = torch.where(weight != 0, torch.logsumexp(pieces_lse, 0), UNPICKED_LSE)
    w = torch.exp(pieces_lse - merged)  # [levels + 1, n]
    acc = w[0, :, None] * _wide(o0)
    for level in range(idx.shape[0]):
        acc = acc + w[level + 1, :, None] * _wide(gather_rows_torch(o, idx[level]))
    return (acc * _wide(weight)[:, None]).to(o0.dtype), merged


def level_row_counts(prefix: Tensor, T: int, leaf: int, n_levels: int) -> Tensor:
    """``[n_levels]`` int32: per level ``L = leaf * 2**(l+1)``, the largest number of picked rows in
    the second half of one segment, over heads and segments. ``prefix [BH, T_pad + 1]`` int32 holds
    the picked rows before each position."""
    most = torch.zeros(n_levels, dtype=torch.int32, device=prefix.device)
    if n_levels:
        _count_kernel[(prefix.shape[0], n_levels)](prefix, most, T, prefix.shape[1] - 1, leaf, BLOCK_S=128)
    return most


def level_tables(pick: Tensor, prefix: Tensor, params: Tensor, T: int, leaf: int, n_qslots: int):
    """``(row_slot, key_slot, slot_row)`` of the picked-rows split (see
    :func:`attnkit.ops.softmax.picked_causal._plan_torch`, the reference). ``pick [BH, T_pad]`` uint8/bool,
    ``params [levels, 4]`` int64: rows, segments, first row slot, first key slot."""
    BH, T_pad = pick.shape
    n = params.shape[0]
    row_slot = torch.empty(n, BH * T_pad, dtype=torch.int32, device=pick.device)
    key_slot = torch.empty_like(row_slot)
    slot_row = torch.full((n_qslots,), -1, dtype=torch.int32, device=pick.device)
    if n and BH * T_pad:
        block = 256
        _table_kernel[(triton.cdiv(T_pad, block), BH)](pick, prefix, params, row_slot, key_slot, slot_row, T, T_pad,
                                                       leaf, n, BLOCK_T=block)
    return row_slot, key_slot, slot_row
