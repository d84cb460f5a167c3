"""Sigmoid attention in Triton: forward and backward kernels of our own.

    out_i = sum_{j allowed} sigmoid(scale * q_i . k_j + bias) v_j      (full or causal)

Without a softmax there is no running maximum, no rescaling and no log-sum-exp: the forward
is a plain tiled ``sum_j p_ij v_j`` and the backward needs no row statistics::

    dv_j = sum_i p_ij do_i        dp_ij = do_i . v_j        ds_ij = dp_ij p_ij (1 - p_ij)
    dq_i = scale sum_j ds_ij k_j  dk_j = scale sum_i ds_ij q_i

``dk, dv`` come from one kernel over key blocks (looping over the query heads that share a
KV head, so GQA needs no expanded copies), ``dq`` from one over query blocks. On Hopper the
forward's autotuner also times tiles loaded through TMA descriptors (``TMA_FORWARD``). Sigmoid itself
takes one MUFU op (tanh) or two accurate ones (exp, reciprocal) by the bias (``SIGMOID_FORMULA``). Queries sit at
positions ``q_offset .. q_offset + T - 1`` among keys ``0 .. S-1``. Runs on CUDA, and on
CPU under ``TRITON_INTERPRET=1`` (how the tests check it against the reference). (The interpreter
of triton 3.6 needs NumPy < 2.4, which cannot turn its size-1 arrays into loop bounds.)
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

__all__ = ["available", "sigmoid_attention_triton", "sigmoid_values"]


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _sigmoid_half(s, FAST: tl.constexpr):
        """sigmoid(2 s). ``FAST`` 1: ``(1 + tanh(s)) / 2``, one MUFU op (``tanh.approx.f32``), but
        ``1 + tanh`` cancels where sigmoid is small. ``FAST`` 2: ``1 / (1 + 2^(-2 s log2 e))``, two MUFU
        ops (``ex2.approx``, ``rcp.approx``), accurate at every value. (Measured errors:
        ``SIGMOID_FORMULA``.) ``FAST`` 0: an exact formula (the interpreter)."""
        if FAST == 1:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [s], dtype=tl.float32, is_pure=True, pack=1)
            p = 0.5 + 0.5 * t
        elif FAST == 2:
            e = tl.math.exp2(s * (-2.0 * 1.4426950408889634))  # 2^(-2 s log2 e) = e^(-2 s)
            p = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            p = 1.0 / (1.0 + tl.exp(-2.0 * s))
        return p

    @triton.jit
    def _sigmoid_values(X, Y, N, FAST: tl.constexpr, BLOCK: tl.constexpr):
        """``Y = sigmoid(X)`` through :func:`_sigmoid_half` (float32; the accuracy tests)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(Y + offs, _sigmoid_half(0.5 * x, FAST), mask=offs < N)

    @triton.jit
    def _load_rows(base, offs, stride, offs_d, n):
        """Rows ``offs`` (``[R]``) of a ``[n, D]`` matrix, zeros past ``n``."""
        return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=offs[:, None] < n, other=0.0)

    @triton.jit
    def _weights(q, k, offs_m, offs_n, S, q_offset, half_scale, half_bias,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr):
        """sigmoid(scale q.k + bias) for a (query, key) tile; zero where masked (keys past S,
        or after the query when causal) if ``MASKED``."""
        p = _sigmoid_half(tl.dot(q, tl.trans(k)) * half_scale + half_bias, FAST)
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= (offs_m[:, None] + q_offset))
            p = tl.where(keep, p, 0.0)
        return p

    @triton.jit
    def _fwd_block(acc, q, kbase, vbase, desc_k, desc_v, kv_row, sks, offs_m, offs_d, start, S, q_offset, half_scale,
                   half_bias, MASKED: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr, TMA: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        offs_n = start + tl.arange(0, BLOCK_N)
        if TMA:  # rows past S belong to the next head (or are zero past the tensor): masked in p below
            k = desc_k.load([kv_row + start, 0])
            v = desc_v.load([kv_row + start, 0])
        elif MASKED:
            k = _load_rows(kbase, offs_n, sks, offs_d, S)
            v = _load_rows(vbase, offs_n, sks, offs_d, S)
        else:
            k = tl.load(kbase + offs_n[:, None] * sks + offs_d[None, :])
            v = tl.load(vbase + offs_n[:, None] * sks + offs_d[None, :])
        p = _weights(q, k, offs_m, offs_n, S, q_offset, half_scale, half_bias, MASKED, CAUSAL, FAST)
        return acc + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _fwd(Q, K, V, O, desc_q, desc_k, desc_v, sqb, sqh, sqt, skb, skh, sks, sob, soh, sot,
             T, S, H, q_offset, scale, bias, SIZE_KEY, GROUP: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr,
             D: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # grid (query blocks, B*H), blocks start x fastest: head after head, each head's longest
        # causal rows first. (Every head's longest rows first across heads, LPT, measured 13% slower
        # at 8k: the heads running at once no longer share K and V in L2; h200-sigmoid-fwd-order.json,
        # in git at 9c8ea52)
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        if TMA:  # Hopper's tensor-memory loads through host descriptors over [B*H*T, D] / [B*Hkv*S, D]
            q = desc_q.load([bh * T + pid_m * BLOCK_M, 0])
        else:
            q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, T)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        kbase = K + b * skb + kvh * skh
        vbase = V + b * skb + kvh * skh
        kv_row = (b * (H // GROUP) + kvh) * S
        half_scale = 0.5 * scale
        half_bias = 0.5 * bias
        if CAUSAL:
            # keys before the block's first query are visible to all its rows: no mask there
            unmasked = (q_offset + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            end = q_offset + (pid_m + 1) * BLOCK_M
            if end > S:
                end = S
        else:
            unmasked = S // BLOCK_N * BLOCK_N
            end = S
        for start in tl.range(0, unmasked, BLOCK_N):
            acc = _fwd_block(acc, q, kbase, vbase, desc_k, desc_v, kv_row, sks, offs_m, offs_d, start, S, q_offset,
                             half_scale, half_bias, False, CAUSAL, FAST, TMA, BLOCK_N)
        for start in tl.range(unmasked, end, BLOCK_N):
            acc = _fwd_block(acc, q, kbase, vbase, desc_k, desc_v, kv_row, sks, offs_m, offs_d, start, S, q_offset,
                             half_scale, half_bias, True, CAUSAL, FAST, TMA, BLOCK_N)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < T)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, DK, DV, sqb, sqh, sqt, skb, skh, sks,
                  T, S, H, q_offset, scale, bias, SIZE_KEY, GROUP: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        Hkv = H // GROUP
        b = bkv // Hkv
        kvh = bkv % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = _load_rows(K + b * skb + kvh * skh, offs_n, sks, offs_d, S)
        v = _load_rows(V + b * skb + kvh * skh, offs_n, sks, offs_d, S)
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
                q = _load_rows(qbase, offs_m, sqt, offs_d, T)  # rows past T are zero, and so is their dO
                do = _load_rows(dobase, offs_m, sqt, offs_d, T)
                p = _weights(q, k, offs_m, offs_n, S, q_offset, 0.5 * scale, 0.5 * bias, True, CAUSAL, FAST)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = dp * p * (1.0 - p)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        mask = offs_n[:, None] < S
        tl.store(DK + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, DQ, sqb, sqh, sqt, skb, skh, sks,
                T, S, H, q_offset, scale, bias, SIZE_KEY, GROUP: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:  # the longest rows first
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, T)
        do = _load_rows(DO + b * sqb + h * sqh, offs_m, sqt, offs_d, T)
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
            k = _load_rows(kbase, offs_n, sks, offs_d, S)
            v = _load_rows(vbase, offs_n, sks, offs_d, S)
            p = _weights(q, k, offs_m, offs_n, S, q_offset, 0.5 * scale, 0.5 * bias, True, CAUSAL, FAST)
            ds = tl.dot(do, tl.trans(v)) * p * (1.0 - p)
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=offs_m[:, None] < T)


if triton is not None:
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    def _descriptor_blocks(nargs):
        """Autotuning pre-hook: a TMA config's tiles are its descriptors' block shapes."""
        if nargs.get("TMA"):
            nargs["desc_q"].block_shape = [nargs["BLOCK_M"], nargs["D"]]
            nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["D"]]
            nargs["desc_v"].block_shape = [nargs["BLOCK_N"], nargs["D"]]

    def _tuned(kernel, configs, loads=None):
        """Autotuned on the GPU once per (D, causal, group, power-of-two bucket of T and of S): the
        best tile at 8k is not the best at 32k. One small tile in the interpreter. ``loads`` (the
        forward only): which of ``"pointer"`` and ``"tma"`` tiles to offer; ``configs`` is then a
        ``{load: tiles}`` mapping."""
        if loads is None:
            tiles = [(*tile, None) for tile in configs]
        else:
            tiles = [(*tile, load == "tma") for load in loads for tile in configs[load]]
        if _INTERPRET:
            return kernel, {"BLOCK_M": 16, "BLOCK_N": 16, **({} if loads is None else {"TMA": "tma" in loads})}
        choices = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **({} if t is None else {"TMA": t})}, num_warps=w,
                                 num_stages=st, pre_hook=_descriptor_blocks if t else None)
                   for m, n, w, st, t in tiles]
        return triton.autotune(configs=choices, key=["D", "CAUSAL", "GROUP", "SIZE_KEY"])(kernel), {}

    # TMA tiles: the ones the H200 picked at 8k and 32k (h200-sigmoid-fwd-tma.json, in git at 9c8ea52)
    # and two more; few, since each is compiled and timed on a shape's first call
    _FWD_TILES = {"pointer": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                              (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 4)],
                  "tma": [(128, 128, 8, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 32, 4, 4)]}
    #: the forward's autotuners by the loads they may use (see TMA_FORWARD)
    _FWD_BY_LOADS = {loads: _tuned(_fwd, _FWD_TILES, loads) for loads in (("pointer",), ("tma",), ("pointer", "tma"))}
    _DKDV, _DKDV_META = _tuned(_bwd_dkdv, [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 3)])
    _DQ, _DQ_META = _tuned(_bwd_dq, [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 8, 3)])

#: How the forward loads its tiles: ``"auto"`` lets the autotuner time pointer loads against
#: Hopper's TMA descriptors (CUDA devices of compute capability 9.0 or more; pointer loads
#: elsewhere); ``True`` TMA only, ``False`` pointer loads only (the tests and benchmarks).
TMA_FORWARD: bool | str = "auto"


def _forward_loads(q: Tensor, k: Tensor, v: Tensor) -> tuple[str, ...]:
    if TMA_FORWARD not in (True, False, "auto") or isinstance(TMA_FORWARD, int) and not isinstance(TMA_FORWARD, bool):
        raise ValueError(f"attnkit.ops.sigmoid.sigmoid_triton.TMA_FORWARD must be True, False or 'auto', got {TMA_FORWARD!r}")
    if TMA_FORWARD is False:
        return ("pointer",)
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return ("pointer",)
    if any(t.data_ptr() % 16 for t in (q, k, v)):  # TMA needs 16-byte aligned bases
        return ("pointer",)
    if TMA_FORWARD is True:
        return ("tma",)
    return ("pointer", "tma") if q.is_cuda and torch.cuda.get_device_capability(q.device) >= (9, 0) else ("pointer",)


#: How the kernels compute sigmoid on CUDA: ``"tanh"``, ``(1 + tanh(x/2)) / 2`` with one MUFU op
#: (``tanh.approx.f32``), whose error is ~2^-11 *of tanh*, so ``1 + tanh`` cancels for small weights:
#: measured relative error 1.8e-4 for x in [-8, -4), up to 0.26 in [-15, -8), 1.0 below -15;
#: ``"exp"``, ``1 / (1 + 2^(-x log2 e))`` with two (``ex2.approx``, ``rcp.approx``), under 2e-6
#: everywhere, 12-17% slower forwards on the H200 (``h200/sigmoid-formula.json``); ``"auto"``
#: (default): ``tanh`` while the bias is at least :data:`TANH_MIN_BIAS`, ``exp`` below it (a -log n
#: bias puts most weights near sigmoid(bias)).
SIGMOID_FORMULA = "auto"
#: ``auto``'s threshold: with bias -log 32768 = -10.4 (and N(0, 1) scores) the tanh output's relative
#: error was 0.0040 against 0.0024 for exp (0.0027 / 0.0023 at -log 8192), both at bf16's level;
#: longer rows put more weights where tanh's error reaches 26-100%.
TANH_MIN_BIAS = -10.5
_FORMULAS = {"tanh": 1, "exp": 2}


def _formula(q: Tensor, bias: float) -> int:
    if SIGMOID_FORMULA not in ("auto", *_FORMULAS):
        raise ValueError(f"attnkit.ops.sigmoid.sigmoid_triton.SIGMOID_FORMULA must be 'auto', 'exp' or 'tanh', "
                         f"got {SIGMOID_FORMULA!r}")
    if not q.is_cuda:
        return 0
    if SIGMOID_FORMULA == "auto":
        return _FORMULAS["tanh" if bias >= TANH_MIN_BIAS else "exp"]
    return _FORMULAS[SIGMOID_FORMULA]


def sigmoid_values(x: Tensor, formula: str | None = None) -> Tensor:
    """``sigmoid(x)`` (float32, contiguous) as the kernels compute it with ``formula`` ``"exp"``
    (default) or ``"tanh"`` on CUDA (see :data:`SIGMOID_FORMULA`); exact under the interpreter."""
    if triton is None:
        raise ValueError("sigmoid_values needs the triton package")
    formula = "exp" if formula is None else formula
    if formula not in _FORMULAS:
        raise ValueError(f"formula must be 'exp' or 'tanh', got {formula!r}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 tensor, got {x.dtype}")
    y = torch.empty_like(x)
    _sigmoid_values[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), FAST=_FORMULAS[formula] if x.is_cuda else 0,
                                                     BLOCK=1024)
    return y


def _size_key(T: int, S: int) -> int:
    """The autotuning bucket of a shape: the bit lengths of T and S."""
    return T.bit_length() * 64 + S.bit_length()


def _grid(length: int, rows: int, meta_key: str, fixed: dict):
    if fixed:
        return (triton.cdiv(length, fixed[meta_key]), rows)
    return lambda meta: (triton.cdiv(length, meta[meta_key]), rows)


class _SigmoidAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, bias, causal, q_offset):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        descriptors = (None, None, None)
        loads = _forward_loads(q, k, v)
        kernel, fixed = _FWD_BY_LOADS[loads]
        if "tma" in loads:
            from triton.tools.tensor_descriptor import TensorDescriptor

            rows = fixed.get("BLOCK_M", 64)  # block shapes: set per config by _descriptor_blocks
            descriptors = tuple(TensorDescriptor.from_tensor(t.view(-1, D), [rows, D]) for t in (q, k, v))
        kernel[_grid(T, B * H, "BLOCK_M", fixed)](
            q, k, v, out, *descriptors, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2), T, S, H, q_offset, scale, bias, _size_key(T, S),
            GROUP=H // Hkv, CAUSAL=causal, FAST=_formula(q, bias), D=D, **fixed)
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
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), T, S, H, q_offset, scale, bias,
                  _size_key(T, S))
        meta = dict(GROUP=H // Hkv, CAUSAL=causal, FAST=_formula(q, bias), D=D)
        _DKDV[_grid(S, B * Hkv, "BLOCK_N", _DKDV_META)](q, k, v, dout, dk, dv, *common, **meta, **_DKDV_META)
        _DQ[_grid(T, B * H, "BLOCK_M", _DQ_META)](q, k, v, dout, dq, *common, **meta, **_DQ_META)
        return dq, dk, dv, None, None, None, None


def sigmoid_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: float, causal: bool,
                             q_offset: int) -> Tensor:
    """q ``[B, H, T, D]``, k and v ``[B, Hkv, S, D]`` (same D, a power of two >= 16) -> ``[B, H, T, D]``."""
    if triton is None:
        raise ValueError("the triton backend of sigmoid_attend needs the triton package; use backend='flex' or 'reference'")
    return _SigmoidAttention.apply(q, k, v, float(scale), float(bias), bool(causal), int(q_offset))
