"""Triton kernels for Lightning attention (forward and backward), chunk-parallel.

The math is :mod:`attnkit.ops.lightning`'s block form with chunks of ``BT = 64`` tokens.
Instead of one program walking the whole sequence (Lightning Attention-2's kernel), the
work is split so that most of it runs in parallel over chunks:

  forward   1. ``_state_fwd``  grid (D/BK, E/BV, B*H): walk the chunks once, store the state
               entering every chunk, ``h_n [D, E]``  (S <- lambda^L S + (lambda^(L-1-j) K)^T V)
            2. ``_out_fwd``    grid (E/BV, chunks, B*H): per chunk, in parallel,
               ``O = diag(lambda^(i+1)) Q h_n + ((Q K^T) * M) V``
  backward  3. ``_state_bwd``  grid (D/BK, E/BV, B*H): walk the chunks backwards, store the
               gradient of the state leaving every chunk, ``dh_{n+1}``
               (dS <- lambda^L dS + (lambda^(i+1) Q)^T dO)
            4. ``_dqk_bwd``    grid (D/BK, chunks, B*H):
               ``dQ = diag(lambda^(i+1)) dO h_n^T + ((dO V^T) * M) K``,
               ``dK = diag(lambda^(L-1-j)) V dh_{n+1}^T + ((dO V^T) * M)^T Q``
            5. ``_dv_bwd``     grid (E/BV, chunks, B*H):
               ``dV = diag(lambda^(L-1-j)) K dh_{n+1} + ((Q K^T) * M)^T dO``

``M_ij = lambda^(i-j)`` for ``i >= j`` inside a chunk; every decay is ``exp(-s * d)`` with
``d >= 0``; products run on tensor cores in the input dtype with float32 accumulation; the
per-chunk states are kept in the input dtype (what the tensor cores read anyway). Slopes
get no gradient here (the layer's are a fixed schedule). On CPU the kernels run through
triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["available", "lightning_attention_triton"]

CHUNK = 64


def available() -> bool:
    return triton is not None


def _configs(warps, stages):
    return [triton.Config({}, num_warps=w, num_stages=st) for w in warps for st in stages]


if triton is not None:
    # the state walks are sequential over chunks: pipelining the next chunk's loads matters;
    # the per-chunk kernels are wide and short
    _WALK = dict(configs=_configs((4, 8), (1, 2, 3)), key=["D", "E", "NT"])
    _CHUNK = dict(configs=_configs((4, 8), (1, 2)), key=["D", "E"])

    @triton.jit
    def _rows(ptr, t, T, cols, width):
        """Load rows ``t`` (masked past ``T``) and columns ``cols`` of a ``[T, width]`` matrix."""
        return tl.load(ptr + t[:, None] * width + cols[None, :], mask=t[:, None] < T, other=0.0)

    @triton.jit
    def _decay_mask(s, ot):
        dist = ot[:, None] - ot[None, :]
        return tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)

    @triton.jit
    def _state_fwd(k, v, h, h0, ht, slopes, T, NT, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
        i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ok, ov, ot = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
        tile = ok[:, None] * E + ov[None, :]
        state = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            state += tl.load(h0 + i_bh * D * E + tile)
        k, v = k + i_bh * T * D, v + i_bh * T * E
        for n in range(NT):
            tl.store(h + (i_bh * NT + n) * D * E + tile, state.to(h.dtype.element_ty))
            t = n * BT + ot
            L = tl.minimum(T - n * BT, BT)
            kc = _rows(k, t, T, ok, D)
            vc = _rows(v, t, T, ov, E)
            k_decay = tl.where(ot < L, tl.exp(-s * (L - 1 - ot).to(tl.float32)), 0.0)
            state = state * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans((kc * k_decay[:, None]).to(vc.dtype)), vc)
        if STORE_HT:
            tl.store(ht + i_bh * D * E + tile, state)

    @triton.jit
    def _out_fwd(q, k, v, h, o, slopes, T, NT, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ot, ov = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
        t = i_t * BT + ot
        q, k, v, o = q + i_bh * T * D, k + i_bh * T * D, v + i_bh * T * E, o + i_bh * T * E
        h = h + (i_bh * NT + i_t) * D * E
        acc_o = tl.zeros([BT, BV], dtype=tl.float32)
        scores = tl.zeros([BT, BT], dtype=tl.float32)
        for kb in range(0, D, BK):
            ok = kb + tl.arange(0, BK)
            qc = _rows(q, t, T, ok, D)
            acc_o += tl.dot(qc, tl.load(h + ok[:, None] * E + ov[None, :]))
            scores += tl.dot(qc, tl.trans(_rows(k, t, T, ok, D)))
        vc = _rows(v, t, T, ov, E)
        out = acc_o * tl.exp(-s * (ot + 1).to(tl.float32))[:, None]
        out += tl.dot((scores * _decay_mask(s, ot)).to(vc.dtype), vc)
        tl.store(o + t[:, None] * E + ov[None, :], out.to(o.dtype.element_ty), mask=t[:, None] < T)

    @triton.jit
    def _state_bwd(q, do, dh, dht, dh0, slopes, T, NT, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
        i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ok, ov, ot = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
        tile = ok[:, None] * E + ov[None, :]
        grad = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            grad += tl.load(dht + i_bh * D * E + tile)
        q, do = q + i_bh * T * D, do + i_bh * T * E
        for i in range(NT):
            n = NT - 1 - i
            tl.store(dh + (i_bh * NT + n) * D * E + tile, grad.to(dh.dtype.element_ty))
            t = n * BT + ot
            L = tl.minimum(T - n * BT, BT)
            qc = _rows(q, t, T, ok, D)
            doc = _rows(do, t, T, ov, E)
            q_decay = tl.where(ot < L, tl.exp(-s * (ot + 1).to(tl.float32)), 0.0)
            grad = grad * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans((qc * q_decay[:, None]).to(doc.dtype)), doc)
        if STORE_DH0:
            tl.store(dh0 + i_bh * D * E + tile, grad)

    @triton.jit
    def _dqk_bwd(q, k, v, do, h, dh, dq, dk, slopes, T, NT, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ot, ok = tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
        t = i_t * BT + ot
        L = tl.minimum(T - i_t * BT, BT)
        q, k, v, do = q + i_bh * T * D, k + i_bh * T * D, v + i_bh * T * E, do + i_bh * T * E
        h, dh = h + (i_bh * NT + i_t) * D * E, dh + (i_bh * NT + i_t) * D * E
        dov = tl.zeros([BT, BT], dtype=tl.float32)  # do_i . v_j
        acc_q = tl.zeros([BT, BK], dtype=tl.float32)
        acc_k = tl.zeros([BT, BK], dtype=tl.float32)
        for vb in range(0, E, BV):
            ov = vb + tl.arange(0, BV)
            doc = _rows(do, t, T, ov, E)
            vc = _rows(v, t, T, ov, E)
            tile = ok[:, None] * E + ov[None, :]
            dov += tl.dot(doc, tl.trans(vc))
            acc_q += tl.dot(doc, tl.trans(tl.load(h + tile)))
            acc_k += tl.dot(vc, tl.trans(tl.load(dh + tile)))
        qc = _rows(q, t, T, ok, D)
        kc = _rows(k, t, T, ok, D)
        ds = (dov * _decay_mask(s, ot)).to(qc.dtype)
        grad_q = acc_q * tl.exp(-s * (ot + 1).to(tl.float32))[:, None] + tl.dot(ds, kc)
        k_decay = tl.where(ot < L, tl.exp(-s * (L - 1 - ot).to(tl.float32)), 0.0)
        grad_k = acc_k * k_decay[:, None] + tl.dot(tl.trans(ds), qc)
        out = t[:, None] * D + ok[None, :]
        tl.store(dq + i_bh * T * D + out, grad_q.to(dq.dtype.element_ty), mask=t[:, None] < T)
        tl.store(dk + i_bh * T * D + out, grad_k.to(dk.dtype.element_ty), mask=t[:, None] < T)

    @triton.jit
    def _dv_bwd(q, k, do, dh, dv, slopes, T, NT, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ot, ov = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
        t = i_t * BT + ot
        L = tl.minimum(T - i_t * BT, BT)
        q, k, do = q + i_bh * T * D, k + i_bh * T * D, do + i_bh * T * E
        dh = dh + (i_bh * NT + i_t) * D * E
        scores = tl.zeros([BT, BT], dtype=tl.float32)
        acc_v = tl.zeros([BT, BV], dtype=tl.float32)
        for kb in range(0, D, BK):
            ok = kb + tl.arange(0, BK)
            kc = _rows(k, t, T, ok, D)
            scores += tl.dot(_rows(q, t, T, ok, D), tl.trans(kc))
            acc_v += tl.dot(kc, tl.load(dh + ok[:, None] * E + ov[None, :]))
        doc = _rows(do, t, T, ov, E)
        k_decay = tl.where(ot < L, tl.exp(-s * (L - 1 - ot).to(tl.float32)), 0.0)
        grad_v = acc_v * k_decay[:, None] + tl.dot(tl.trans((scores * _decay_mask(s, ot)).to(doc.dtype)), doc)
        tl.store(dv + i_bh * T * E + t[:, None] * E + ov[None, :], grad_v.to(dv.dtype.element_ty), mask=t[:, None] < T)


if triton is not None:
    # autotuned on the GPU; the interpreter has no benchmark driver, it runs the kernels as they are
    if os.environ.get("TRITON_INTERPRET") != "1":
        _state_fwd, _state_bwd = (triton.autotune(**_WALK)(k) for k in (_state_fwd, _state_bwd))
        _out_fwd, _dqk_bwd, _dv_bwd = (triton.autotune(**_CHUNK)(k) for k in (_out_fwd, _dqk_bwd, _dv_bwd))


def _blocks(D: int, E: int) -> tuple[int, int]:
    return min(64, D), min(64, E)


class _Lightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, h0):
        B, H, T, D = q.shape
        E = v.shape[-1]
        BK, BV = _blocks(D, E)
        NT = triton.cdiv(T, CHUNK)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slopes = slopes.to(torch.float32).contiguous()
        states = torch.empty(B * H, NT, D, E, device=q.device, dtype=q.dtype)
        final = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
        use_h0 = h0 is not None
        h0c = h0.to(torch.float32).contiguous() if use_h0 else final
        _state_fwd[(D // BK, E // BV, B * H)](k, v, states, h0c, final, slopes, T, NT, H, D, E, CHUNK, BK, BV,
                                               use_h0, True)
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        _out_fwd[(E // BV, NT, B * H)](q, k, v, states, o, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        ctx.save_for_backward(q, k, v, slopes, states)
        ctx.use_h0 = use_h0
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, slopes, states = ctx.saved_tensors
        B, H, T, D = q.shape
        E = v.shape[-1]
        BK, BV = _blocks(D, E)
        NT = states.shape[1]
        do = do.contiguous()
        grads = torch.empty_like(states)
        dh0 = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
        use_dht = dfinal is not None
        dht = dfinal.to(torch.float32).contiguous() if use_dht else dh0
        _state_bwd[(D // BK, E // BV, B * H)](q, do, grads, dht, dh0, slopes, T, NT, H, D, E, CHUNK, BK, BV,
                                               use_dht, ctx.use_h0)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dqk_bwd[(D // BK, NT, B * H)](q, k, v, do, states, grads, dq, dk, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        _dv_bwd[(E // BV, NT, B * H)](q, k, do, grads, dv, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        return dq, dk, dv, None, (dh0 if ctx.use_h0 else None)


def lightning_attention_triton(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *,
                               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(o [B, H, T, E], final state [B, H, D, E] float32)``; head dims 16..128 (powers of
    two). Differentiable in q, k, v and the initial state."""
    if triton is None:
        raise ValueError("lightning_attention_triton needs triton; use lightning_attend(backend='chunked')")
    D, E = q.shape[-1], v.shape[-1]
    if D not in (16, 32, 64, 128) or E not in (16, 32, 64, 128):
        raise ValueError(f"the Triton Lightning kernels take head dims 16, 32, 64 or 128, got D={D}, E={E}")
    return _Lightning.apply(q, k, v, slopes, initial_state)
