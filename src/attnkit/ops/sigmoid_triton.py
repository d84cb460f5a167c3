"""Sigmoid attention in Triton: forward and backward kernels of our own.

    out_i = sum_{j allowed} sigmoid(scale * q_i . k_j + bias) v_j      (full or causal)

Without a softmax there is no running maximum, no rescaling and no log-sum-exp: the forward
is a plain tiled ``sum_j p_ij v_j`` and the backward needs no row statistics::

    dv_j = sum_i p_ij do_i        dp_ij = do_i . v_j        ds_ij = dp_ij p_ij (1 - p_ij)
    dq_i = scale sum_j ds_ij k_j  dk_j = scale sum_i ds_ij q_i

``dk, dv`` come from one kernel over key blocks (looping over the query heads that share a
KV head, so GQA needs no expanded copies), ``dq`` from one over query blocks. Queries sit at
positions ``q_offset .. q_offset + T - 1`` among keys ``0 .. S-1``. Runs on CUDA, and on
CPU under ``TRITON_INTERPRET=1`` (how the tests check it against the reference). (The interpreter
of triton 3.6 needs NumPy < 2.4, which cannot turn its size-1 arrays into loop bounds.)
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["available", "sigmoid_attention_triton"]

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _sigmoid(s):
        return 1.0 / (1.0 + tl.exp2(-s * 1.4426950408889634))

    @triton.jit
    def _fwd(Q, K, V, O, sqb, sqh, sqt, skb, skh, sks, sob, soh, sot,
             T, S, H, q_offset, scale, bias, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        end = S
        if CAUSAL:
            last = q_offset + (pid_m + 1) * BLOCK_M  # keys past the block's last query are masked anyway
            if last < S:
                end = last
        kbase = K + b * skb + kvh * skh
        vbase = V + b * skb + kvh * skh
        for start in tl.range(0, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(kbase + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(vbase + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale + bias
            p = _sigmoid(s)
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= (offs_m[:, None] + q_offset))
            p = tl.where(keep, p, 0.0)
            acc += tl.dot(p.to(v.dtype), v)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < T)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, DK, DV, sqb, sqh, sqt, skb, skh, sks,
                  T, S, H, q_offset, scale, bias, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        Hkv = H // GROUP
        b = bkv // Hkv
        kvh = bkv % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
        v = tl.load(V + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
        dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
        first = 0
        if CAUSAL:  # queries before this key block's first key see none of it
            lowest = pid_n * BLOCK_N - q_offset
            if lowest > 0:
                first = lowest // BLOCK_M * BLOCK_M
        for g in range(GROUP):
            h = kvh * GROUP + g
            qbase = Q + b * sqb + h * sqh
            dobase = DO + b * sqb + h * sqh
            for start in tl.range(first, T, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                q = tl.load(qbase + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
                do = tl.load(dobase + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale + bias  # (BLOCK_M, BLOCK_N)
                p = _sigmoid(s)
                keep = (offs_m[:, None] < T) & (offs_n[None, :] < S)
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= (offs_m[:, None] + q_offset))
                p = tl.where(keep, p, 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = dp * p * (1.0 - p)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        mask = offs_n[:, None] < S
        tl.store(DK + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, DQ, sqb, sqh, sqt, skb, skh, sks,
                T, S, H, q_offset, scale, bias, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        end = S
        if CAUSAL:
            last = q_offset + (pid_m + 1) * BLOCK_M  # keys past the block's last query are masked anyway
            if last < S:
                end = last
        kbase = K + b * skb + kvh * skh
        vbase = V + b * skb + kvh * skh
        for start in tl.range(0, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(kbase + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(vbase + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale + bias
            p = _sigmoid(s)
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= (offs_m[:, None] + q_offset))
            p = tl.where(keep, p, 0.0)
            ds = tl.dot(do, tl.trans(v)) * p * (1.0 - p)
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=offs_m[:, None] < T)


def _launch_config(device: torch.device, D: int) -> dict:
    if device.type == "cuda":
        return dict(fwd=(128, 64, 8, 3), bwd=(64, 64, 4, 2)) if D > 64 else dict(fwd=(128, 64, 4, 3), bwd=(64, 64, 4, 2))
    return dict(fwd=(16, 16, 1, 1), bwd=(16, 16, 1, 1))  # the interpreter: small tiles


class _SigmoidAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, bias, causal, q_offset):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        BM, BN, warps, stages = _launch_config(q.device, D)["fwd"]
        grid = (triton.cdiv(T, BM), B * H)
        _fwd[grid](q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   out.stride(0), out.stride(1), out.stride(2), T, S, H, q_offset, scale, bias,
                   GROUP=H // Hkv, CAUSAL=causal, D=D, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, bias, causal, q_offset)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        scale, bias, causal, q_offset = ctx.args
        dout = dout.contiguous()
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        BM, BN, warps, stages = _launch_config(q.device, D)["bwd"]
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), T, S, H, q_offset, scale, bias)
        meta = dict(GROUP=H // Hkv, CAUSAL=causal, D=D, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
        _bwd_dkdv[(triton.cdiv(S, BN), B * Hkv)](q, k, v, dout, dk, dv, *common, **meta)
        _bwd_dq[(triton.cdiv(T, BM), B * H)](q, k, v, dout, dq, *common, **meta)
        return dq, dk, dv, None, None, None, None


def sigmoid_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: float, causal: bool,
                             q_offset: int) -> Tensor:
    """q ``[B, H, T, D]``, k and v ``[B, Hkv, S, D]`` (same D, a power of two >= 16) -> ``[B, H, T, D]``."""
    if triton is None:
        raise ValueError("the triton backend of sigmoid_attend needs the triton package; use backend='flex' or 'reference'")
    return _SigmoidAttention.apply(q, k, v, float(scale), float(bias), bool(causal), int(q_offset))
