"""Causal attention for the query rows a router picked, computed as dense rectangles.

MoH's routed heads (:class:`attnkit.layers.MixtureOfHeadsAttention`) run each head only for
the tokens that picked it. Row ``t`` of head ``h`` attends causally to every key::

    out[b, h, t] = sum_{j <= t} softmax_j(scale * q[b,h,t] . k[b,h,j]) v[b,h,j]   if picked[b, h, t]
    out[b, h, t] = 0                                                            otherwise

Gathering the picked rows leaves a mask with a different position on every row, which no
fused kernel of cuDNN's takes, and FlexAttention's kernel runs at about half of cuDNN's rate
on it (``benchmarks/results/h200/moh-core.json``, its ``flex`` path). This module splits the work into pieces
cuDNN does take, by a dyadic split of the positions:

* **leaf:** every row attends, causally, to the keys of its own ``leaf``-token block (one
  causal call over ``[B*H, T/leaf, leaf, D]``; about ``2 leaf / T`` of the work);
* **levels** ``L = 2 leaf, 4 leaf, ...`` while ``L/2 < T``: in every segment ``[sL, sL + L)``
  the picked rows of its second half attend to all keys of its first half, without a mask.
  Per level one cuDNN call over ``[B*H, segments, M_L, D] x [B*H, segments, L/2, D]``, with
  the picked rows gathered (``M_L`` the largest count, rounded up so that batches share
  graphs) and the keys read in place through strides.

Every pair ``j <= t`` lies in exactly one piece (the smallest segment holding both has ``j``
in its first half and ``t`` in its second, or both are in one leaf block). The pieces'
``(o, lse)`` are merged by log-sum-exp in one Triton pass over the rows
(:mod:`attnkit.ops.softmax.row_merge_triton`). The backward hands every piece's cuDNN backward the
*merged* output and lse (the ring-attention identity: each piece then returns its keys'
exact share of the gradients) and sums the shares per row in one pass per tensor. The leaf
computes every row; a row nobody picked gets lse = 1e30 from the merge, so its keys weigh 0 in
the leaf's backward and its dO never needs zeroing (the output's gradient is read in place).

Half the levels' work is in the first (the rows of the second half against the keys of the
first), so nearly all of it runs as large unmasked rectangles, cuDNN's fastest case. On the
H200 (bf16, 32k, 12 heads, half the rows picked) a training step takes 13.1-13.7 ms against
21.2-21.7 ms for causal SDPA over all the rows (the ideal: half); the cuDNN calls themselves
run at causal SDPA's rate, and the rest is the glue (merges, gathers, the plan: about 1.5 ms
of GPU time) and the host (``benchmarks/results/h200/picked-causal-profile.json`` and ``.txt``).

Shapes: q, k, v ``[B, H, T, D]`` (one key and value head per query head; repeat them first for
GQA), picked ``[B, H, T]`` bool; any strides. Returns ``[B, H, T, D]`` with zero rows where
nothing was picked. Engines: ``"cudnn"`` (CUDA, float16/bfloat16, the cuDNN frontend,
:mod:`attnkit.ops.softmax.cudnn_band`) and ``"torch"`` (the same split in plain tensor ops, any
device and dtype: how the CPU tests check the split, the merge and the backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cudnn_band as _cudnn
from . import row_merge_triton as _rows
from .reference import attend_reference

__all__ = ["picked_causal_attention", "make_plan", "why_unsupported", "supports", "ENGINES"]

ENGINES = ("auto", "cudnn", "torch")
# the leaf block: shorter means more levels (cuDNN calls, glue), longer means more unpicked rows computed.
# H200, 32k, a training step: 256 / 512 / 1024 took 13.60 / 13.38 / 13.28 ms (one call), 128 took 15.4 ms
LEAF = 512


def why_unsupported(q: Tensor, k: Tensor, v: Tensor, picked: Tensor, engine: str = "cudnn") -> str | None:
    """``None`` when ``engine`` can serve these inputs, else the reason (for error messages)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return (f"it takes q, k and v of one shape [B, H, T, D] (T == S, one key head per query head), got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if picked.shape != q.shape[:3] or picked.dtype != torch.bool:
        return f"picked must be a bool tensor of shape {tuple(q.shape[:3])}, got {picked.dtype} {tuple(picked.shape)}"
    if engine == "torch":
        return None
    if not _rows.available():
        return "it needs triton for the row merges"
    if q.device.type != "cuda":
        return f"the cudnn engine runs on CUDA only, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the cudnn engine takes float16 or bfloat16, got {q.dtype}"
    D = q.shape[3]
    if D % 8 or D > 128:
        return f"the cudnn engine takes a head dim that is a multiple of 8 and at most 128, got {D}"
    if not _cudnn.available(q.device):
        return ("the cuDNN frontend is not usable here (pip install nvidia-cudnn-frontend; needs compute "
                f"capability >= 8.0 and cuDNN >= 9.2, found {torch.backends.cudnn.version()})")
    return None


def supports(q: Tensor, k: Tensor, v: Tensor, picked: Tensor) -> bool:
    """Whether the cudnn engine serves these inputs."""
    return why_unsupported(q, k, v, picked, "cudnn") is None


@torch.compiler.disable  # host syncs and cuDNN graph calls: runs eagerly inside compiled models
def picked_causal_attention(q: Tensor, k: Tensor, v: Tensor, picked: Tensor, scale: float | None = None, *,
                            engine: str = "auto", leaf: int = LEAF, row_multiple: int | None = None,
                            plan=None) -> Tensor:
    """Causal attention of the picked rows only (see the module docstring); differentiable.

    Args:
        q, k, v: ``[B, H, T, D]``.
        picked: ``[B, H, T]`` bool, the rows to compute; the others come back as zeros.
        scale: score scale (default ``D ** -0.5``).
        engine: ``"auto"`` (``"cudnn"`` when it serves the inputs, else ``"torch"``), ``"cudnn"``
            or ``"torch"``.
        leaf: the causal leaf block, in tokens (a positive multiple of 8 for cuDNN).
        row_multiple: each level's gathered row count is rounded up to a multiple of this
            (default 128 for cuDNN, whose kernels take whole 128-row tiles, else 1) and of
            ``L / 128``, so that batches with slightly different routing share graphs.
        plan: the split's plan for these ``picked`` rows, from :func:`make_plan` (default: built
            here). Building it waits for the GPU once (each level's row count sizes its buffers);
            building it ahead and queueing other work before this call keeps the GPU busy then.

    Returns:
        ``[B, H, T, D]`` in q's dtype.
    """
    engine, row_multiple, kernels = _resolve(q, k, v, picked, engine, leaf, row_multiple)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, H, T, _ = q.shape
    if plan is None:
        plan = _plan(picked.reshape(B * H, T), T, leaf, row_multiple, q.dtype, kernels)
    elif not isinstance(plan, _Plan) or (plan.BH, plan.T, plan.leaf, plan.row_multiple, plan.weight.dtype) != (
            B * H, T, leaf, row_multiple, q.dtype):
        raise ValueError("plan must come from make_plan() with these picked rows, q's dtype and the same leaf and "
                         f"row_multiple (B*H={B * H}, T={T}, leaf={leaf}, row_multiple={row_multiple})")
    return _PickedCausal.apply(q, k, v, float(scale), engine, kernels, plan)


@torch.compiler.disable
def make_plan(q: Tensor, picked: Tensor, *, engine: str = "auto", leaf: int = LEAF,
              row_multiple: int | None = None):
    """The split's levels and index tables for ``picked [B, H, T]`` (q ``[B, H, T, D]`` gives the
    shape, dtype and engine), to pass to :func:`picked_causal_attention` as ``plan``. Waits for
    the GPU once (the levels' row counts size their buffers)."""
    engine, row_multiple, kernels = _resolve(q, q, q, picked, engine, leaf, row_multiple)
    B, H, T, _ = q.shape
    return _plan(picked.reshape(B * H, T), T, leaf, row_multiple, q.dtype, kernels)


def _resolve(q, k, v, picked, engine, leaf, row_multiple):
    """Validated ``(engine, row_multiple, kernels)``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(leaf, int) or leaf < 1:
        raise ValueError(f"leaf must be a positive int, got {leaf!r}")
    if row_multiple is not None and (not isinstance(row_multiple, int) or row_multiple < 1):
        raise ValueError(f"row_multiple must be a positive int or None, got {row_multiple!r}")
    if engine == "auto":
        engine = "cudnn" if why_unsupported(q, k, v, picked, "cudnn") is None else "torch"
    reason = why_unsupported(q, k, v, picked, engine)
    if reason is not None:
        raise ValueError(f"picked_causal_attention(engine={engine!r}) cannot serve these inputs: {reason}")
    if engine == "cudnn" and leaf % 8:
        raise ValueError(f"the cudnn engine needs leaf to be a multiple of 8, got {leaf}")
    if row_multiple is None:
        row_multiple = 128 if engine == "cudnn" else 1
    kernels = "triton" if (q.is_cuda and _rows.available()) else "torch"
    return engine, row_multiple, kernels


@dataclass
class _Level:
    L: int  # segment length; rows of the second half attend to the keys of the first
    segments: int
    rows: int  # gathered rows per (head, segment), padded
    q_offset: int  # first slot of this level in the row-slot buffers
    k_offset: int  # first slot of this level in the key-slot buffers


@dataclass
class _Plan:
    BH: int
    T: int
    T_pad: int
    leaf: int
    row_multiple: int
    levels: list
    n_qslots: int
    n_kslots: int
    row_slot: Tensor  # [levels, BH * T_pad] int32: each row's slot per level, -1 if none
    key_slot: Tensor  # [levels, BH * T_pad] int32: each key's slot per level, -1 if none
    slot_row: Tensor  # [n_qslots] int32: each row slot's dense row, -1 for padding
    weight: Tensor  # [BH * T_pad]: 1 on picked rows, 0 elsewhere


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _plan(picked: Tensor, T: int, leaf: int, row_multiple: int, weight_dtype: torch.dtype,
          kernels: str = "torch") -> _Plan:
    """The split's levels and index tables for ``picked [BH, T]``: Triton kernels on CUDA (a dozen
    launches), plain tensor ops elsewhere (the reference the tests compare them with)."""
    BH, dev = picked.shape[0], picked.device
    T_pad = _round_up(T, leaf)
    pick = picked.reshape(BH, T) if T_pad == T else F.pad(picked.reshape(BH, T), (0, T_pad - T))
    pick = pick.contiguous()
    weight = pick.reshape(-1).to(weight_dtype)
    sizes = []
    L = 2 * leaf
    while L // 2 < T:
        sizes.append(L)
        L *= 2
    if kernels == "triton":
        prefix = torch.zeros(BH, T_pad + 1, dtype=torch.int32, device=dev)
        torch.cumsum(pick, -1, dtype=torch.int32, out=prefix[:, 1:])
        most = _rows.level_row_counts(prefix, T, leaf, len(sizes)).tolist()  # the one host sync
        levels, n_q, n_k = _levels(sizes, most, T, BH, row_multiple)
        params = torch.tensor([[lv.rows, lv.segments, lv.q_offset, lv.k_offset] for lv in levels],
                              dtype=torch.int64).reshape(-1, 4).to(dev)
        row_slot, key_slot, slot_row = _rows.level_tables(pick.view(torch.uint8), prefix, params, T, leaf, n_q)
        return _Plan(BH, T, T_pad, leaf, row_multiple, levels, n_q, n_k, row_slot, key_slot, slot_row, weight)
    return _plan_torch(pick, sizes, T, T_pad, leaf, row_multiple, weight)


def _levels(sizes: list, most: list, T: int, BH: int, row_multiple: int) -> tuple[list, int, int]:
    levels, q_off, k_off = [], 0, 0
    for L, m in zip(sizes, most):
        rows = _round_up(m, max(row_multiple, L // 128)) if m else 0
        segments = -(-(T - L // 2) // L)  # segments whose second half starts before T
        levels.append(_Level(L, segments, rows, q_off, k_off))
        q_off += BH * segments * rows
        k_off += BH * segments * (L // 2) if rows else 0
    return levels, q_off, k_off


def _plan_torch(pick: Tensor, sizes: list, T: int, T_pad: int, leaf: int, row_multiple: int, weight: Tensor) -> _Plan:
    BH, dev = pick.shape[0], pick.device
    N, n = BH * T_pad, len(sizes)
    if n == 0:
        empty = torch.empty(0, N, dtype=torch.int32, device=dev)
        return _Plan(BH, T, T_pad, leaf, row_multiple, [], 0, 0, empty, empty, torch.empty(0, dtype=torch.int32, device=dev), weight)
    Ls = torch.tensor(sizes, device=dev)[:, None, None]  # [n, 1, 1]
    half = Ls // 2
    p = torch.arange(T_pad, device=dev)[None, None, :]
    seg, r = p // Ls, p % Ls
    bottom = r >= half
    prefix = F.pad(pick.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))  # picked rows before each position
    prefix_n = prefix.unsqueeze(0).expand(n, BH, T_pad + 1)
    start = prefix_n.gather(-1, (seg * Ls + half).clamp_max(T_pad).expand(n, BH, T_pad))
    end = prefix_n.gather(-1, (seg * Ls + Ls).clamp_max(T_pad).expand(n, BH, T_pad))
    most = (end - start).amax(dim=(1, 2)).tolist()  # the one host sync: each level's largest row count
    levels, q_off, k_off = _levels(sizes, most, T, BH, row_multiple)
    col = lambda attr: torch.tensor([getattr(lv, attr) for lv in levels], device=dev)[:, None, None]  # noqa: E731
    rows_t, segs_t, qo_t, ko_t = col("rows"), col("segments"), col("q_offset"), col("k_offset")
    bh = torch.arange(BH, device=dev)[None, :, None]
    q_valid = pick[None] & bottom
    q_slot = qo_t + (bh * segs_t + seg) * rows_t + (prefix[None, :, :T_pad] - start)
    row_slot = torch.where(q_valid, q_slot, -1)
    k_valid = ~bottom & (seg < segs_t) & (rows_t > 0)
    key_slot = torch.where(k_valid, ko_t + (bh * segs_t + seg) * half + r, -1)
    slot_row = torch.full((q_off + 1,), -1, dtype=torch.int32, device=dev)
    dense_row = (bh * T_pad + p).expand(n, BH, T_pad)
    slot_row.scatter_(0, torch.where(q_valid, row_slot, q_off).reshape(-1), dense_row.reshape(-1).to(torch.int32))
    return _Plan(BH, T, T_pad, leaf, row_multiple, levels, q_off, k_off, row_slot.reshape(n, N).to(torch.int32),
                 key_slot.reshape(n, N).to(torch.int32), slot_row[:q_off], weight)


def _dense(t: Tensor, plan: _Plan) -> Tensor:
    """``[B, H, T, D]`` -> contiguous ``[B*H, T_pad, D]`` (zero rows past T), one copy."""
    B, H, T, D = t.shape
    out = t.new_empty(B, H, plan.T_pad, D)
    out[:, :, :T].copy_(t)
    out[:, :, T:].zero_()
    return out.view(plan.BH, plan.T_pad, D)


def _as_rows(t: Tensor, plan: _Plan) -> Tensor:
    """``[B, H, T, D]`` as ``[B*H, T_pad, D]``: a view when the heads merge and no padding is needed
    (one batch item, or batch-major heads; a projection's ``[B, T, H, D]`` layout is read in place),
    else a dense copy with zero rows past T."""
    B, H, T, _ = t.shape
    if (T == plan.T_pad and t.stride(-1) == 1 and (B == 1 or t.stride(0) == H * t.stride(1))
            and _cudnn._is_readable(t)):
        return t.flatten(0, 1)
    return _dense(t, plan)


def _blocks(t: Tensor, leaf: int) -> Tensor:
    """``[BH, T_pad, D]`` -> ``[BH, T_pad / leaf, leaf, D]`` (a view)."""
    BH, T_pad, D = t.shape
    return t.view(BH, T_pad // leaf, leaf, D)


def _key_view(kc: Tensor, level: _Level) -> Tensor:
    """The first halves of a level's segments, in place: ``[B*H, segments, L/2, D]``."""
    BH, _, D = kc.shape
    s_head, s_row = kc.stride(0), kc.stride(1)
    return kc.as_strided((BH, level.segments, level.L // 2, D), (s_head, level.L * s_row, s_row, 1),
                         kc.storage_offset())


def _region(buf: Tensor, offset: int, shape: tuple) -> Tensor:
    """A level's block of a flat slot buffer (``[n_slots, D]`` or ``[n_slots]``) seen as ``shape``."""
    return buf[offset:offset + math.prod(shape[:-1])].view(*shape)


# ---- the two engines: one attention piece, forward and backward, into given buffers ----

def _torch_forward(q, k, v, scale, causal, out, stats):
    o, lse = attend_reference(q, k, v, pattern="causal" if causal else "full", scale=scale, return_lse=True)
    out.copy_(o)
    stats.copy_(lse.unsqueeze(-1))


def _torch_backward(q, k, v, out, grad_out, stats, scale, causal, dq, dk, dv):
    wide = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out, grad_out = (t.to(wide) for t in (q, k, v, out, grad_out))
    p = torch.exp(q @ k.transpose(-1, -2) * scale - stats.to(wide))
    if causal:
        T = q.shape[-2]
        p = p.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), 0.0)
    ds = p * (grad_out @ v.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    dq.copy_(scale * ds @ k)
    dk.copy_(scale * ds.transpose(-1, -2) @ q)
    dv.copy_(p.transpose(-1, -2) @ grad_out)


def _piece_forward(engine, q, k, v, scale, causal, out, stats):
    if engine == "cudnn":
        _cudnn.sdpa_forward(q, k, v, scale, ("causal",) if causal else ("full",), out=out, stats=stats)
    else:
        _torch_forward(q, k, v, scale, causal, out, stats)


def _piece_backward(engine, q, k, v, out, grad_out, stats, scale, causal, dq, dk, dv):
    if engine == "cudnn":
        _cudnn.sdpa_backward(q, k, v, out, grad_out, stats, scale, ("causal",) if causal else ("full",),
                             dq=dq, dk=dk, dv=dv)
    else:
        _torch_backward(q, k, v, out, grad_out, stats, scale, causal, dq, dk, dv)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels(name: str):
    if name == "triton":
        return _rows.gather_rows, _rows.sum_rows, _rows.merge_rows
    return _rows.gather_rows_torch, _rows.sum_rows_torch, _rows.merge_rows_torch


class _PickedCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, engine, kernels, plan):
        B, H, T, D = q.shape
        leaf = plan.leaf
        gather, _, merge = _kernels(kernels)
        qc, kc, vc = (_as_rows(t, plan) for t in (q, k, v))
        BH, T_pad, N = plan.BH, plan.T_pad, plan.BH * plan.T_pad
        blocks = (BH, T_pad // leaf, leaf, D)
        o_leaf = torch.empty(blocks, dtype=q.dtype, device=q.device)
        stats = _stats_dtype(q.dtype)
        l_leaf = torch.empty(*blocks[:3], 1, dtype=stats, device=q.device)
        _piece_forward(engine, _blocks(qc, leaf), _blocks(kc, leaf), _blocks(vc, leaf), scale, True, o_leaf, l_leaf)
        q_slots = gather(qc, plan.slot_row)
        o_slots = q.new_empty(plan.n_qslots, D)
        l_slots = torch.empty(plan.n_qslots, dtype=stats, device=q.device)
        for lv in plan.levels:
            if lv.rows:
                shape = (BH, lv.segments, lv.rows, D)
                _piece_forward(engine, _region(q_slots, lv.q_offset, shape), _key_view(kc, lv), _key_view(vc, lv),
                               scale, False, _region(o_slots, lv.q_offset, shape),
                               _region(l_slots, lv.q_offset, shape[:3] + (1,)))
        out, lse = merge(o_leaf.view(N, D), l_leaf.view(N), o_slots, l_slots, plan.row_slot, plan.weight)
        ctx.save_for_backward(qc, kc, vc, q_slots, out, lse)
        ctx.plan, ctx.scale, ctx.engine, ctx.kernels, ctx.shape = plan, scale, engine, kernels, (B, H, T, D)
        return out.view(BH, T_pad, D)[:, :T].view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out):
        qc, kc, vc, q_slots, out, lse = ctx.saved_tensors
        plan, scale, engine = ctx.plan, ctx.scale, ctx.engine
        B, H, T, D = ctx.shape
        gather, sum_rows, _ = _kernels(ctx.kernels)
        BH, T_pad, N, leaf = plan.BH, plan.T_pad, plan.BH * plan.T_pad, plan.leaf
        # rows nobody picked carry lse = 1e30 from the merge: the leaf's backward weighs their keys 0,
        # so their dO (whatever it is) adds nothing, and grad_out is read in place where it can be
        do = _as_rows(grad_out.to(qc.dtype), plan)
        blocks = (BH, T_pad // leaf, leaf, D)
        dq_leaf, dk_leaf, dv_leaf = (qc.new_empty(BH, T_pad, D) for _ in range(3))
        _piece_backward(engine, _blocks(qc, leaf), _blocks(kc, leaf), _blocks(vc, leaf), out.view(blocks),
                        _blocks(do, leaf),
                        lse.view(*blocks[:3], 1), scale, True, dq_leaf.view(blocks), dk_leaf.view(blocks),
                        dv_leaf.view(blocks))
        o_slots, do_slots = gather(out, plan.slot_row), gather(do, plan.slot_row)  # do: [BH, T_pad, D], any strides
        l_slots = _rows.gather_rows_torch(lse, plan.slot_row)  # padding rows: q = 0 and lse 0 (finite), dO = 0
        dq_slots = qc.new_empty(plan.n_qslots, D)
        dk_slots, dv_slots = qc.new_empty(plan.n_kslots, D), qc.new_empty(plan.n_kslots, D)
        for lv in plan.levels:
            if lv.rows:
                shape, kshape = (BH, lv.segments, lv.rows, D), (BH, lv.segments, lv.L // 2, D)
                _piece_backward(engine, _region(q_slots, lv.q_offset, shape), _key_view(kc, lv), _key_view(vc, lv),
                                _region(o_slots, lv.q_offset, shape), _region(do_slots, lv.q_offset, shape),
                                _region(l_slots, lv.q_offset, shape[:3] + (1,)), scale, False,
                                _region(dq_slots, lv.q_offset, shape), _region(dk_slots, lv.k_offset, kshape),
                                _region(dv_slots, lv.k_offset, kshape))
        dq = sum_rows(dq_leaf.view(N, D), dq_slots, plan.row_slot)
        dk = sum_rows(dk_leaf.view(N, D), dk_slots, plan.key_slot)
        dv = sum_rows(dv_leaf.view(N, D), dv_slots, plan.key_slot)
        unpad = lambda t: t.view(BH, T_pad, D)[:, :T].view(B, H, T, D)  # noqa: E731
        return unpad(dq), unpad(dk), unpad(dv), None, None, None, None
