"""Triton kernels for Lightning attention (forward and backward), chunk-parallel.

The math is :mod:`attnkit.ops.linear.lightning`'s block form with chunks of ``BT = 64`` tokens.
Instead of one program walking the whole sequence (Lightning Attention-2's kernel), the
work is split so that most of it runs in parallel over chunks, and the one sequential part,
the walk of the state over the chunks, runs in parallel over *segments* of chunks:

  forward   1. ``_state_walk`` grid (D/BK, E/BV, B*H*G), only if G > 1: each of the G
               segments walks its chunks from a zero state and keeps only the state leaving
               the segment (S <- lambda^L S + (lambda^(L-1-j) K)^T V)
            2. ``_carry_walk`` grid (D/BK, E/BV, B*H), only if G > 1: walks the G segments,
               ``C_0 = S_0``, ``C_{g+1} = lambda^(len g) C_g + end_g``: the true state entering
               every segment (the last step gives the final state)
            3. ``_state_walk`` grid (D/BK, E/BV, B*H*G): each segment walks again from its true
               state ``C_g``, now storing the state entering every chunk, ``h_n [D, E]``
            4. ``_out_fwd``    grid (E/BV, chunks, B*H): per chunk, in parallel,
               ``O = diag(lambda^(i+1)) Q h_n + ((Q K^T) * M) V``
  backward  5.-7. the same three steps backwards in time (``REVERSE``): per segment the local gradient of
               the state entering it, the carries over segments in reverse, then every
               segment's walk from its true carry storing the gradient of the state leaving
               every chunk, ``dh_{n+1}`` (dS <- lambda^L dS + (lambda^(i+1) Q)^T dO)
            8. ``_dqk_bwd``    grid (D/BK, chunks, B*H):
               ``dQ = diag(lambda^(i+1)) dO h_n^T + ((dO V^T) * M) K``,
               ``dK = diag(lambda^(L-1-j)) V dh_{n+1}^T + ((dO V^T) * M)^T Q``
            9. ``_dv_bwd``     grid (E/BV, chunks, B*H):
               ``dV = diag(lambda^(L-1-j)) K dh_{n+1} + ((Q K^T) * M)^T dO``

The segments are for a batch of few long sequences: with one walk per (batch, head, tile)
there are only B*H*4 walk programs, each walking T/64 chunks one after the other, so the
walk's latency, not the GPU's throughput, sets the time (the default splits only then: see
``_segments``). Walking each segment twice (once for its end, once from its true start)
costs one more read of K and V (or Q and dO) and keeps the per-chunk kernels free of any
correction; a first version that stored segment-local states and added the decayed carry
in every per-chunk kernel made the backward slower than one walk (the carries are float32
reads beside every state read).

``M_ij = lambda^(i-j)`` for ``i >= j`` inside a chunk; every decay is ``exp(-s * d)`` with
``d >= 0``; products run on tensor cores in the input dtype with float32 accumulation; the
per-chunk states are kept in the input dtype (what the tensor cores read anyway), the
segment carries in float32. Slopes get no gradient here (the layer's are a fixed schedule).
On CPU the kernels run through triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check them (with short segments forced through ``segment_chunks``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..._checks import positive_int

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

__all__ = ["available", "lightning_attention_triton"]

CHUNK = 64
WALKS_PER_SM = 4  # walk programs per SM that the segment count aims for
MIN_SEGMENT = 32  # chunks: shorter segments spend more on the second walk and the carries than they save


def available() -> bool:
    return triton is not None


def _configs(warps, stages):
    return [triton.Config({}, num_warps=w, num_stages=st) for w in warps for st in stages]


if triton is not None:
    # the state walks are sequential over chunks: pipelining the next chunk's loads matters;
    # the per-chunk kernels are wide and short
    _WALK = dict(configs=_configs((4, 8), (1, 2, 3)), key=["D", "E", "SEG", "STORE", "REVERSE"])
    _CHUNK = dict(configs=_configs((4, 8), (1, 2)), key=["D", "E"])
    _CARRY = dict(configs=_configs((4,), (1, 2)), key=["D", "E"])

    @triton.jit
    def _rows(ptr, t, T, cols, width):
        """Load rows ``t`` (masked past ``T``) and columns ``cols`` of a ``[T, width]`` matrix."""
        return tl.load(ptr + t[:, None] * width + cols[None, :], mask=t[:, None] < T, other=0.0)

    @triton.jit
    def _decay_mask(s, ot):
        dist = ot[:, None] - ot[None, :]
        return tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)

    @triton.jit
    def _key_decay(s, ot, L):
        """``exp(-s (L-1-t))`` for the ``L`` tokens of a chunk, 0 past them: key ``t``'s weight in
        the state leaving the chunk (the forward walk, ``dK`` and ``dV``)."""
        return tl.where(ot < L, tl.exp(-s * (L - 1 - ot).to(tl.float32)), 0.0)

    @triton.jit
    def _state_walk(a, b, h, init, ends, slopes, T, NT, SEG, G, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_INIT: tl.constexpr,
                    STORE: tl.constexpr, STORE_END: tl.constexpr, REVERSE: tl.constexpr):
        """Walk segment g's chunks from ``init[b*h, g]`` (or zero), accumulating
        ``value = value * exp(-s L) + sum_t decay_t a_t^T b_t`` chunk by chunk; store the value
        at every chunk boundary it crosses if ``STORE`` and the one it ends with if ``STORE_END``.

        Forward in time (``a, b = k, v``, decay ``exp(-s (L-1-t))``): the state entering each
        chunk, then the state leaving the segment. Backward in time with ``REVERSE`` (``a, b = q,
        dO``, decay ``exp(-s (t+1))``): the gradient of the state leaving each chunk, then of the
        one entering the segment."""
        i_k, i_v, i_bhg = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_bh, g = i_bhg // G, i_bhg % G
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ok, ov, ot = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
        tile = ok[:, None] * E + ov[None, :]
        value = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_INIT:
            value += tl.load(init + i_bhg * D * E + tile)
        a, b = a + i_bh * T * D, b + i_bh * T * E
        n0 = g * SEG
        n_end = tl.minimum(n0 + SEG, NT)
        for i in range(n_end - n0):
            if REVERSE:
                n = n_end - 1 - i
            else:
                n = n0 + i
            if STORE:
                tl.store(h + (i_bh * NT + n) * D * E + tile, value.to(h.dtype.element_ty))
            t = n * BT + ot
            L = tl.minimum(T - n * BT, BT)
            ac = _rows(a, t, T, ok, D)
            bc = _rows(b, t, T, ov, E)
            if REVERSE:
                decay = tl.where(ot < L, tl.exp(-s * (ot + 1).to(tl.float32)), 0.0)
            else:
                decay = _key_decay(s, ot, L)
            value = value * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans((ac * decay[:, None]).to(bc.dtype)), bc)
        if STORE_END:
            tl.store(ends + i_bhg * D * E + tile, value)

    @triton.jit
    def _carry_walk(ends, carry, last, first, slopes, T, SEG_T, G, H: tl.constexpr, D: tl.constexpr,
                    E: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_FIRST: tl.constexpr,
                    REVERSE: tl.constexpr):
        """``carry[g]``: the true value entering segment g (from ``first`` and the segments
        before it; going backward in time with ``REVERSE``); ``last``: the value after all G."""
        i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        s = tl.load(slopes + i_bh % H).to(tl.float32)
        ok, ov = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        tile = ok[:, None] * E + ov[None, :]
        c = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_FIRST:
            c += tl.load(first + i_bh * D * E + tile)
        for i in range(G):
            if REVERSE:
                g = G - 1 - i
            else:
                g = i
            tl.store(carry + (i_bh * G + g) * D * E + tile, c)
            length = tl.minimum(T - g * SEG_T, SEG_T)
            c = c * tl.exp(-s * length.to(tl.float32)) + tl.load(ends + (i_bh * G + g) * D * E + tile)
        tl.store(last + i_bh * D * E + tile, c)

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
        k_decay = _key_decay(s, ot, L)
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
        k_decay = _key_decay(s, ot, L)
        grad_v = acc_v * k_decay[:, None] + tl.dot(tl.trans((scores * _decay_mask(s, ot)).to(doc.dtype)), doc)
        tl.store(dv + i_bh * T * E + t[:, None] * E + ov[None, :], grad_v.to(dv.dtype.element_ty), mask=t[:, None] < T)


if triton is not None:
    # autotuned on the GPU; the interpreter has no benchmark driver, it runs the kernels as they are
    if os.environ.get("TRITON_INTERPRET") != "1":
        _state_walk = triton.autotune(**_WALK)(_state_walk)
        _carry_walk = triton.autotune(**_CARRY)(_carry_walk)
        _out_fwd, _dqk_bwd, _dv_bwd = (triton.autotune(**_CHUNK)(k) for k in (_out_fwd, _dqk_bwd, _dv_bwd))


def _blocks(D: int, E: int) -> tuple[int, int]:
    return min(64, D), min(64, E)


def _segments(NT: int, walks: int, device: torch.device, segment_chunks: int | None) -> tuple[int, int]:
    """``(SEG, G)``: chunks per segment and the number of segments. By default one segment
    unless the walks (``walks`` programs per segment) would leave more than half of the SMs
    idle; then enough segments for about ``WALKS_PER_SM`` walk programs per SM, none shorter
    than ``MIN_SEGMENT`` chunks. (Measured on the H200, B = 1, 16 heads: 9 segments take
    forward + backward at 128k from 5.46 to 5.04 ms; at 8k with B = 4, where 256 walks
    already run, 3 segments made it slower, 1.22 -> 1.52 ms.)"""
    if segment_chunks is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = math.ceil(WALKS_PER_SM * sms / walks) if 2 * walks <= sms else 1
        segment_chunks = math.ceil(NT / max(1, min(wanted, NT // MIN_SEGMENT)))
    seg = max(1, min(segment_chunks, NT))
    return seg, math.ceil(NT / seg)


def _walk(a, b, out, init, slopes, T, NT, SEG, G, shape, blocks, reverse):
    """Run the state walk (``_state_walk``; backward in time with ``reverse``) over the chunks
    in G segments; returns the value after the whole walk (float32 ``[B, H, D, E]``: the final
    state, or the gradient of the initial one). ``init``: the value the walk starts from
    (``[B, H, D, E]``) or None for zero."""
    B, H, D, E = shape
    BK, BV = blocks
    tiles = (D // BK, E // BV)
    ends = torch.empty(B * H, G, D, E, device=a.device, dtype=torch.float32)
    if G == 1:
        first = init if init is not None else ends
        _state_walk[(*tiles, B * H)](a, b, out, first, ends, slopes, T, NT, SEG, G, H, D, E, CHUNK, BK, BV,
                                     init is not None, True, True, reverse)
        return ends.view(B, H, D, E)
    _state_walk[(*tiles, B * H * G)](a, b, out, ends, ends, slopes, T, NT, SEG, G, H, D, E, CHUNK, BK, BV,
                                     False, False, True, reverse)
    carry, last = torch.empty_like(ends), torch.empty(B, H, D, E, device=a.device, dtype=torch.float32)
    _carry_walk[(*tiles, B * H)](ends, carry, last, init if init is not None else ends, slopes, T, SEG * CHUNK, G,
                                 H, D, E, BK, BV, init is not None, reverse)
    _state_walk[(*tiles, B * H * G)](a, b, out, carry, ends, slopes, T, NT, SEG, G, H, D, E, CHUNK, BK, BV,
                                     True, True, False, reverse)
    return last


class _Lightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, h0, segment_chunks):
        B, H, T, D = q.shape
        E = v.shape[-1]
        BK, BV = _blocks(D, E)
        NT = triton.cdiv(T, CHUNK)
        SEG, G = _segments(NT, B * H * (D // BK) * (E // BV), q.device, segment_chunks)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slopes = slopes.to(torch.float32).contiguous()
        states = torch.empty(B * H, NT, D, E, device=q.device, dtype=q.dtype)
        init = h0.to(torch.float32).contiguous() if h0 is not None else None
        final = _walk(k, v, states, init, slopes, T, NT, SEG, G, (B, H, D, E), (BK, BV), reverse=False)
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        _out_fwd[(E // BV, NT, B * H)](q, k, v, states, o, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        ctx.save_for_backward(q, k, v, slopes, states)
        ctx.use_h0, ctx.segments = h0 is not None, (SEG, G)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, slopes, states = ctx.saved_tensors
        B, H, T, D = q.shape
        E = v.shape[-1]
        BK, BV = _blocks(D, E)
        NT = states.shape[1]
        SEG, G = ctx.segments
        do = do.contiguous()
        grads = torch.empty_like(states)
        init = dfinal.to(torch.float32).contiguous() if dfinal is not None else None
        dh0 = _walk(q, do, grads, init, slopes, T, NT, SEG, G, (B, H, D, E), (BK, BV), reverse=True)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dqk_bwd[(D // BK, NT, B * H)](q, k, v, do, states, grads, dq, dk, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        _dv_bwd[(E // BV, NT, B * H)](q, k, do, grads, dv, slopes, T, NT, H, D, E, CHUNK, BK, BV)
        return dq, dk, dv, None, (dh0 if ctx.use_h0 else None), None


def lightning_attention_triton(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *,
                               initial_state: Tensor | None = None,
                               segment_chunks: int | None = None) -> tuple[Tensor, Tensor]:
    """``(o [B, H, T, E], final state [B, H, D, E] float32)``; head dims 16..128 (powers of
    two). Differentiable in q, k, v and the initial state.

    ``segment_chunks``: chunks (of 64 tokens) per segment of the parallel state walk; by
    default chosen from the GPU's SM count and ``B * H`` (one segment when the batch already
    fills the GPU). The result does not depend on it beyond rounding."""
    if triton is None:
        raise ValueError("lightning_attention_triton needs triton; use lightning_attend(backend='chunked')")
    D, E = q.shape[-1], v.shape[-1]
    if D not in (16, 32, 64, 128) or E not in (16, 32, 64, 128):
        raise ValueError(f"the Triton Lightning kernels take head dims 16, 32, 64 or 128, got D={D}, E={E}")
    if segment_chunks is not None:
        positive_int(segment_chunks, "segment_chunks")
    return _Lightning.apply(q, k, v, slopes, initial_state, segment_chunks)
