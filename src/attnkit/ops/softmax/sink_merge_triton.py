"""The sink keys of StreamingLLM's pattern, merged into a band's attention by log-sum-exp.

``sink_window(n, W)`` lets query ``i`` see keys ``j <= i`` with ``i - j < W`` (a band) or
``j < n`` (the sinks). A band kernel (cuDNN's, :mod:`attnkit.ops.softmax.cudnn_band`) computes the
band part ``(o_band, lse_band)``; the sinks that lie outside the band (``i - j >= W``) are
few keys per row, so one pass over the rows adds them:

    s_ij = scale * q_i . k_j  (j < n, i - j >= W)       lse_i = logaddexp(lse_band_i, logsumexp_j s_ij)
    o_i  = exp(lse_band_i - lse_i) o_band_i + sum_j exp(s_ij - lse_i) v_j

Backward (the ring-attention identity): with the merged ``o`` and ``lse``, every kept key's
weight is ``p_ij = exp(s_ij - lse_i)`` and ``ds_ij = p_ij (do_i . v_j - do_i . o_i)`` whichever
part the key belongs to. So the band kernel's own backward, given the *merged* output and
lse, returns the band keys' exact gradients, and this module adds the sinks':

    dq_i += scale sum_j ds_ij k_j     dk_j = scale sum_i ds_ij q_i     dv_j = sum_i p_ij do_i

Shapes: q, o, do, dq ``[B, H, T, D]``; k_sink, v_sink ``[B, Hkv, n, D]`` (GQA: ``H % Hkv == 0``);
lse ``[B, H, T, 1]`` float32. Any strides whose last one is 1. Runs on CUDA, and on CPU under
``TRITON_INTERPRET=1`` (how the tests check it).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["available", "MAX_SINKS", "sink_merge_forward", "sink_merge_backward"]

MAX_SINKS = 64
_BLOCK_M = 64


def available() -> bool:
    return triton is not None


if triton is not None:
    # float32 inputs (the tests) multiply in full precision, not TF32; bf16/fp16 inputs ignore this
    PRECISION = tl.constexpr("ieee")

    @triton.jit
    def _sink_scores(Q, K, b, h, hk, rows, cols, offs_d, sqb, sqh, sqt, skb, skh, skt, T, scale, window, n_sink):
        """The rows' scores against the sinks outside their band (``-inf`` elsewhere), and q, k."""
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skt + offs_d[None, :], mask=cols[:, None] < n_sink, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = (cols[None, :] < n_sink) & (rows[:, None] - cols[None, :] >= window) & (rows[:, None] < T)
        return tl.where(keep, s, float("-inf")), q, k

    @triton.jit
    def _sink_fwd_kernel(Q, K, V, OB, LB, O, L,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sbb, sbh, sbt, sob, soh, sot,
                         slb, slh, slt, sLb, sLh, sLt,
                         H, T, group, scale, window, n_sink,
                         BLOCK_M: tl.constexpr, NS: tl.constexpr, D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // group
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, NS)
        offs_d = tl.arange(0, D)
        rmask = rows < T
        s, q, k = _sink_scores(Q, K, b, h, hk, rows, cols, offs_d, sqb, sqh, sqt, skb, skh, skt, T, scale, window,
                               n_sink)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + offs_d[None, :], mask=cols[:, None] < n_sink, other=0.0)
        lb = tl.load(LB + b * slb + h * slh + rows * slt, mask=rmask, other=0.0)
        m = tl.maximum(lb, tl.max(s, 1))
        lse = m + tl.log(tl.exp(lb - m) + tl.sum(tl.exp(s - m[:, None]), 1))
        ob = tl.load(OB + b * sbb + h * sbh + rows[:, None] * sbt + offs_d[None, :], mask=rmask[:, None], other=0.0)
        p = tl.exp(s - lse[:, None])
        acc = ob.to(tl.float32) * tl.exp(lb - lse)[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=rmask[:, None])
        tl.store(L + b * sLb + h * sLh + rows * sLt, lse, mask=rmask)

    @triton.jit
    def _sink_bwd_kernel(Q, K, V, O, DO, L, DQ, DK, DV,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
                         slb, slh, slt, sgb, sgh, sgt,
                         H, Hkv, T, group, scale, window, n_sink,
                         BLOCK_M: tl.constexpr, NS: tl.constexpr, D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // group
        if pid_m * BLOCK_M + BLOCK_M - 1 >= window:  # rows before the window's length keep their sinks in the band
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = tl.arange(0, NS)
            offs_d = tl.arange(0, D)
            rmask = rows < T
            s, q, k = _sink_scores(Q, K, b, h, hk, rows, cols, offs_d, sqb, sqh, sqt, skb, skh, skt, T, scale,
                                   window, n_sink)
            v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + offs_d[None, :], mask=cols[:, None] < n_sink,
                        other=0.0)
            lse = tl.load(L + b * slb + h * slh + rows * slt, mask=rmask, other=0.0)
            p = tl.exp(s - lse[:, None])
            o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], mask=rmask[:, None], other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=rmask[:, None], other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq_ptr = DQ + b * sgb + h * sgh + rows[:, None] * sgt + offs_d[None, :]
            dq = tl.load(dq_ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
            tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            acc = (b * Hkv + hk) * NS * D + cols[:, None] * D + offs_d[None, :]
            tl.atomic_add(DK + acc, dk, mask=cols[:, None] < n_sink)
            tl.atomic_add(DV + acc, dv, mask=cols[:, None] < n_sink)


def _sinks_block(n_sink: int) -> int:
    return max(16, triton.next_power_of_2(n_sink))


def _check(q: Tensor, k_sink: Tensor, n_sink: int) -> None:
    if triton is None:
        raise ValueError("the sink merge needs triton (pip install triton)")
    if not 1 <= n_sink <= MAX_SINKS:
        raise ValueError(f"sink_tokens must be between 1 and {MAX_SINKS} for the sink merge, got {n_sink}")
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        raise ValueError(f"the sink merge takes head dims 16, 32, 64 or 128, got {D}")


def sink_merge_forward(q: Tensor, k_sink: Tensor, v_sink: Tensor, o_band: Tensor, lse_band: Tensor, window: int,
                       scale: float) -> tuple[Tensor, Tensor]:
    """``(o, lse)`` of the band plus the sinks outside it; ``o`` has ``o_band``'s layout."""
    B, H, T, D = q.shape
    Hkv, n_sink = k_sink.shape[1], k_sink.shape[2]
    _check(q, k_sink, n_sink)
    out = torch.empty_like(o_band)
    lse = torch.empty(B, H, T, 1, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, _BLOCK_M), B * H)
    _sink_fwd_kernel[grid](q, k_sink, v_sink, o_band, lse_band, out, lse,
                           *q.stride()[:3], *k_sink.stride()[:3], *v_sink.stride()[:3], *o_band.stride()[:3],
                           *out.stride()[:3], *lse_band.stride()[:3], *lse.stride()[:3],
                           H, T, H // Hkv, float(scale), int(window), n_sink,
                           BLOCK_M=_BLOCK_M, NS=_sinks_block(n_sink), D=D)
    return out, lse


def sink_merge_backward(q: Tensor, k_sink: Tensor, v_sink: Tensor, out: Tensor, grad_out: Tensor, lse: Tensor,
                        dq: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """Adds the sinks' share of ``dq`` into ``dq`` (in place); returns their ``dk, dv`` in float32."""
    B, H, T, D = q.shape
    Hkv, n_sink = k_sink.shape[1], k_sink.shape[2]
    _check(q, k_sink, n_sink)
    ns = _sinks_block(n_sink)
    dk = torch.zeros(B, Hkv, ns, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    grid = (triton.cdiv(T, _BLOCK_M), B * H)
    _sink_bwd_kernel[grid](q, k_sink, v_sink, out, grad_out, lse, dq, dk, dv,
                           *q.stride()[:3], *k_sink.stride()[:3], *v_sink.stride()[:3], *out.stride()[:3],
                           *grad_out.stride()[:3], *lse.stride()[:3], *dq.stride()[:3],
                           H, Hkv, T, H // Hkv, float(scale), int(window), n_sink,
                           BLOCK_M=_BLOCK_M, NS=ns, D=D)
    return dk[:, :, :n_sink], dv[:, :, :n_sink]
