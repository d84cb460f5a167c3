"""Sigmoid attention: element-wise sigmoid weights instead of a softmax over the row.

    out[b, h, i] = sum_j  sigmoid(scale * q_i . k_j + bias) v_j           (normalize=False)
    out[b, h, i] = sum_j  sigmoid(s_ij) v_j / sum_j sigmoid(s_ij)           (normalize=True)

over the keys the pattern allows. Sources: Theory, Analysis, and Best Practices for Sigmoid
Self-Attention (Ramapuram et al., arXiv 2409.04431), which uses ``bias = -log(n)`` with n the
training length; When Attention Sink Emerges in Language Models (Gu et al., arXiv
2410.10781), which trains it without bias, with and without the row normalisation.

Fast paths. On CUDA, full and causal attention in bf16/fp16 run through Triton kernels of
our own (``backend="triton"``, :mod:`attnkit.ops.sigmoid.sigmoid_triton`): no softmax means no
running maximum and no row statistics, so the kernels are plain tiled sums. Every other
case: ``log sigmoid`` as a score modifier turns softmax into the normalised form,
``softmax_j(log sigmoid(s_ij)) = sigmoid(s_ij) / sum_j sigmoid(s_ij)``, and the row's
log-sum-exp is ``log sum_j sigmoid(s_ij)``; so

    sigmoid attention = attend(score_mod=logsigmoid) * exp(lse)

runs on :func:`attnkit.attend` (compiled FlexAttention on CUDA) with every pattern, GQA,
decode offsets and gradients, and needs no kernel of its own. ``sigmoid_attend_reference``
is the math above, materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import patterns as _patterns
from ..softmax.dispatch import _check_scale, _validate, attend

__all__ = ["sigmoid_attend", "sigmoid_attend_reference", "choose_sigmoid_backend", "SIGMOID_BACKENDS"]

SIGMOID_BACKENDS = ("auto", "reference", "flex", "triton")


def sigmoid_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern=None,
    bias: float = 0.0,
    normalize: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    q_offset: int | None = None,
) -> Tensor:
    """Sigmoid attention. q ``[B, Hq, T, D]``, k ``[B, Hkv, S, D]``, v ``[B, Hkv, S, Dv]`` ->
    ``[B, Hq, T, Dv]``. ``bias`` is added to the scaled scores (``-log(n)`` in 2409.04431);
    ``normalize`` divides each row by its sum of weights. Rows with no allowed key are zeros.

    ``backend``: ``reference`` (materialised scores), ``triton`` (the kernels; full or
    causal, not normalised), ``flex`` (through :func:`attnkit.attend` with a log-sigmoid score
    modifier; on CPU that call runs attend's reference, as FlexAttention has no CPU backward)
    or ``auto`` (triton where it applies on CUDA in bf16/fp16, else flex).
    """
    _validate(q, k, v)
    if backend not in SIGMOID_BACKENDS:
        raise ValueError(f"sigmoid_attend backend must be one of {', '.join(SIGMOID_BACKENDS)}, got {backend!r} "
                         "(SDPA has no sigmoid)")
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
        raise ValueError(f"bias must be a finite float, got {bias!r}")
    _check_scale(scale)
    if backend == "reference":
        return sigmoid_attend_reference(q, k, v, pattern=pattern, bias=bias, normalize=normalize, scale=scale,
                                        q_offset=q_offset)
    bias = float(bias)
    pattern = _patterns.resolve(pattern)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    q_offset = S - T if q_offset is None else q_offset
    if backend == "triton" and not _kernel_fits(q, v, pattern, normalize):
        raise ValueError("backend='triton' serves full or causal patterns, normalize=False and equal q/v head "
                         "dims of 16..256 (a power of two); use backend='flex' or 'auto'")
    if backend == "auto":
        backend = choose_sigmoid_backend(q, v, pattern, normalize)
    if backend == "triton":
        from .sigmoid_triton import sigmoid_attention_triton

        return sigmoid_attention_triton(q, k, v, scale=D**-0.5 if scale is None else scale, bias=bias,
                                        causal=pattern.kind == "causal", q_offset=q_offset)

    def log_sigmoid(score, b, h, q_pos, k_pos):
        return F.logsigmoid(score + bias)

    out, lse = attend(q, k, v, pattern=pattern, score_mod=log_sigmoid, scale=scale, return_lse=True,
                      backend=backend, q_offset=q_offset)
    if normalize:
        return out
    # lse = log sum_j sigmoid(s_ij); -inf on empty rows, whose output is already zero
    return out * lse.exp().to(out.dtype).unsqueeze(-1)


def _kernel_fits(q: Tensor, v: Tensor, pattern, normalize: bool) -> bool:
    return (pattern.kind in ("full", "causal") and not normalize and v.shape[3] == q.shape[3]
            and q.shape[3] in (16, 32, 64, 128, 256))


def choose_sigmoid_backend(q: Tensor, v: Tensor, pattern, normalize: bool = False) -> str:
    """The backend ``auto`` picks: the Triton kernels on CUDA in bf16/fp16 where they apply;
    otherwise FlexAttention on CUDA and attend's own choice (the reference) on CPU."""
    pattern = _patterns.resolve(pattern)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _kernel_fits(q, v, pattern, normalize):
        return "triton"
    return "flex" if q.is_cuda else "auto"


def sigmoid_attend_reference(q, k, v, *, pattern=None, bias: float = 0.0, normalize: bool = False,
                             scale: float | None = None, q_offset: int | None = None) -> Tensor:
    """The math, materialising ``[B, Hq, T, S]`` weights (float64 for float64 inputs)."""
    pattern = _patterns.resolve(pattern)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_offset = S - T if q_offset is None else q_offset
    scale = D**-0.5 if scale is None else scale
    group = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.repeat_interleave(group, dim=1).to(compute)  # (B, Hq, S, D)
    v = v.repeat_interleave(group, dim=1).to(compute)
    scores = torch.einsum("bhtd,bhsd->bhts", q.to(compute), k) * scale + bias  # (B, Hq, T, S)
    mask = pattern.dense(T, S, q_offset=q_offset, batch=B, heads=Hq, device=q.device)
    # in log space: sigmoid(s) underflows to 0 below s ~ -745 (float64), and a normalised row
    # whose every weight underflowed would divide 0 by 0; its weights are a softmax of log sigmoid
    log_weights = F.logsigmoid(scores).masked_fill(~mask, float("-inf"))
    if normalize:
        row_has_key = log_weights.detach().amax(dim=-1, keepdim=True) != float("-inf")  # (B, Hq, T, 1); NaN stays NaN
        weights = torch.softmax(log_weights.masked_fill(~row_has_key, 0.0), dim=-1).masked_fill(~row_has_key, 0.0)
    else:
        weights = log_weights.exp()
    return torch.einsum("bhts,bhsd->bhtd", weights, v).to(q.dtype)
