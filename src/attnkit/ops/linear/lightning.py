"""Lightning attention: causal linear attention with a per-head exponential decay.

TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer (Qin et
al., arXiv 2307.14995); Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models (Qin et al., arXiv 2401.04658).

With ``lambda_h = exp(-s_h)`` (``s_h >= 0`` the head's slope) and no softmax::

    o_i = sum_{j <= i} lambda^(i - j) (q_i . k_j) v_j                       (parallel form)
        = q_i S_i,   S_i = lambda S_{i-1} + k_i^T v_i,   S_{-1} = S0        (recurrent form)

so the decode state is one ``[D, E]`` matrix per head, whatever the context length. An
initial state ``S0`` adds ``lambda^(i+1) q_i S0`` to row ``i``.

The chunked form (Lightning Attention-2) splits the sequence into blocks of ``C`` tokens;
inside a block it is the masked quadratic form, across blocks it goes through the state::

    O_blk  = ((Q K^T) * M) V  +  diag(lambda^(1..C)) Q S                   (M_ij = lambda^(i-j), i >= j)
    S     <- lambda^C S  +  (diag(lambda^(C-1..0)) K)^T V

Three paths, one math: :func:`lightning_attend_reference` (materialised ``T x S`` decay
matrix, the float64 reference), :func:`lightning_attend_chunked` (the block loop in PyTorch,
any device, autograd backward), :func:`lightning_attend_recurrent` (token by token; what a
decode step runs). On CUDA :func:`lightning_attend` dispatches to the Triton kernels of
:mod:`attnkit.ops.linear.lightning_triton`. Every decay is ``exp(-s * distance)`` with a
non-negative distance, so nothing overflows however long the sequence.

Layout: q, k ``[B, H, T, D]``, v ``[B, H, T, E]``, slopes ``[H]``, state ``[B, H, D, E]``
(float32 or wider).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LIGHTNING_BACKENDS",
    "lightning_attend",
    "lightning_attend_reference",
    "lightning_attend_chunked",
    "lightning_attend_recurrent",
    "alibi_slopes",
]

LIGHTNING_BACKENDS = ("auto", "reference", "chunked", "recurrent", "triton")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.), the base of TransNormerLLM's decay schedule:
    a geometric sequence ``2^(-8/n), 2^(-16/n), ...`` for a power of two ``n``; otherwise the
    slopes of the next lower power of two followed by every other slope of the next higher."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    lower = 1 << (num_heads.bit_length() - 1)
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def _check(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, initial_state: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, H, T, D], got {got}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, T, E] with q's B, H, T = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    H = q.shape[1]
    if not isinstance(slopes, Tensor) or slopes.shape != (H,):
        got = tuple(slopes.shape) if isinstance(slopes, Tensor) else type(slopes).__name__
        raise ValueError(f"slopes must be a tensor [H] = [{H}], got {got}")
    # a check on the values is a data-dependent branch that torch.compile(fullgraph=True) cannot
    # trace; it runs eagerly (layers check their slopes at construction)
    if not torch.compiler.is_compiling() and (slopes < 0).any():
        raise ValueError("slopes must be >= 0 (lambda = exp(-slope) <= 1); a negative slope makes the state grow")
    if initial_state is not None:
        want = (q.shape[0], H, q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [B, H, D, E] = {list(want)}, got {tuple(initial_state.shape)}")


def _decays(s: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The decays of one block of ``n`` tokens, for slopes ``s [H, 1, 1]`` (in its dtype):
    ``mask [H, n, n]`` (``lambda^(i-j)`` for ``i >= j``, else 0), ``q_decay [H, n, 1]``
    (``lambda^(i+1)``: how much of the state entering the block row ``i`` sees) and ``k_decay
    [H, n, 1]`` (``lambda^(n-1-j)``: key ``j``'s weight in the state leaving the block). The
    reference takes the whole sequence as one block, the chunked path each block of ``C``."""
    i = torch.arange(n, device=s.device, dtype=s.dtype)
    dist = i[:, None] - i[None, :]  # (n, n)
    mask = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=s.dtype, device=s.device))
    return mask, torch.exp(-s * (i + 1)[None, :, None]), torch.exp(-s * (n - 1 - i)[None, :, None])


def lightning_attend_reference(q, k, v, slopes, *, initial_state=None) -> tuple[Tensor, Tensor]:
    """The parallel form, materialised: ``(o [B, H, T, E], final state [B, H, D, E])``.
    Computed in float64 whatever the inputs (returned in q's dtype; the state in float64)."""
    _check(q, k, v, slopes, initial_state)
    return _reference(q, k, v, slopes, initial_state)


def _reference(q, k, v, slopes, initial_state) -> tuple[Tensor, Tensor]:
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    s = slopes.double()[:, None, None]  # (H, 1, 1)
    decay, q_decay, k_decay = _decays(s, q.shape[2])  # the whole sequence as one block
    o = ((q @ k.transpose(-1, -2)) * decay) @ v  # (B, H, T, E)
    # final state: sum_j lambda^(T-1-j) k_j^T v_j (+ lambda^T S0)
    state = (k * k_decay).transpose(-1, -2) @ v
    if initial_state is not None:
        s0 = initial_state.double()
        o = o + q_decay * (q @ s0)
        state = state + q_decay[:, -1:] * s0
    return o.to(dtype), state


def lightning_attend_chunked(q, k, v, slopes, *, initial_state=None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The block form of Lightning Attention-2 in PyTorch: ``(o, final state)``. Products
    in q's dtype, accumulation and the state in float32 (float64 for float64 inputs)."""
    _check(q, k, v, slopes, initial_state)
    return _chunked(q, k, v, slopes, initial_state, chunk_size)


def _chunked(q, k, v, slopes, initial_state, chunk_size: int) -> tuple[Tensor, Tensor]:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, H, T, D = q.shape
    E = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = slopes.to(acc)[:, None, None]  # (H, 1, 1)
    C = min(chunk_size, T)
    intra_decay, q_decay, k_decay = _decays(s, C)
    state = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outs = []
    for start in range(0, T, C):
        n = min(C, T - start)
        qc, kc, vc = q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n]
        scores = (qc @ kc.transpose(-1, -2)).to(acc) * intra_decay[:, :n, :n]  # (B, H, n, n)
        o = scores @ vc.to(acc) + (qc.to(acc) * q_decay[:, :n]) @ state
        outs.append(o)
        # a last block of n < C tokens: its keys' decays are the last n of C's, lambda^n is q_decay's n-th
        state = q_decay[:, n - 1 : n] * state + (kc.to(acc) * k_decay[:, C - n :]).transpose(-1, -2) @ vc.to(acc)
    return torch.cat(outs, dim=2).to(q.dtype), state


def lightning_attend_recurrent(q, k, v, slopes, *, initial_state=None) -> tuple[Tensor, Tensor]:
    """Token by token through the ``[D, E]`` state: ``(o, final state)``. A decode step."""
    _check(q, k, v, slopes, initial_state)
    return _recurrent(q, k, v, slopes, initial_state)


def _recurrent(q, k, v, slopes, initial_state) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = torch.exp(-slopes.to(acc))[:, None, None]  # (H, 1, 1)
    state = torch.zeros(B, H, D, v.shape[-1], dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        kt, vt = k[:, :, t].to(acc), v[:, :, t].to(acc)
        state = lam * state + kt[..., :, None] * vt[..., None, :]  # (B, H, D, E)
        outs.append((q[:, :, t, None].to(acc) @ state))  # (B, H, 1, E)
    return torch.cat(outs, dim=2).to(q.dtype), state


def _triton_applies(q: Tensor, v: Tensor, *, half_only: bool = False) -> bool:
    """The kernels take CUDA tensors with head dims 16..128; ``auto`` sends them only bf16 /
    fp16 (their products run on tensor cores, which would round fp32 to tf32)."""
    dtypes = (torch.bfloat16, torch.float16) if half_only else (torch.bfloat16, torch.float16, torch.float32)
    return q.is_cuda and q.dtype in dtypes and q.shape[-1] in (16, 32, 64, 128) and v.shape[-1] in (16, 32, 64, 128)


def lightning_attend(q, k, v, slopes, *, initial_state=None, backend: str = "auto",
                     chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Lightning attention ``(o [B, H, T, E], final state [B, H, D, E])``.

    ``backend``: ``reference``, ``chunked`` (PyTorch blocks), ``recurrent`` (token loop),
    ``triton`` (CUDA kernels; head dims 16..128), or ``auto``: triton for CUDA bf16/fp16,
    else recurrent for a few tokens (a decode step) and chunked otherwise.
    """
    if backend not in LIGHTNING_BACKENDS:
        raise ValueError(f"lightning_attend backend must be one of {', '.join(LIGHTNING_BACKENDS)}, got {backend!r}")
    _check(q, k, v, slopes, initial_state)
    if backend == "auto":
        if _triton_applies(q, v, half_only=True):
            backend = "triton"
        else:
            backend = "recurrent" if q.shape[2] <= 4 else "chunked"
    if backend == "triton":
        if not _triton_applies(q, v):
            raise ValueError("backend='triton' needs CUDA tensors in bf16/fp16/fp32 (tf32 products) with head dims "
                             "16, 32, 64 or 128; use backend='chunked'")
        from .lightning_triton import lightning_attention_triton

        return lightning_attention_triton(q, k, v, slopes, initial_state=initial_state)
    if backend == "reference":
        return _reference(q, k, v, slopes, initial_state)
    if backend == "recurrent":
        return _recurrent(q, k, v, slopes, initial_state)
    return _chunked(q, k, v, slopes, initial_state, chunk_size)

