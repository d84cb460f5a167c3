"""``attend``: exact softmax attention behind one call, with a pattern and a score modifier.

    out[b, h, i] = sum_j softmax_j( score_mod(scale * q[b,h,i] . k[b,g(h),j]) masked by pattern ) v[b,g(h),j]

with ``g(h) = h // (Hq // Hkv)`` (GQA / MQA broadcast). Shapes: q ``[B, Hq, T, D]``,
k ``[B, Hkv, S, D]``, v ``[B, Hkv, S, Dv]`` -> out ``[B, Hq, T, Dv]`` and, with
``return_lse=True``, the log-sum-exp of the kept scores ``[B, Hq, T]`` (float32, or
float64 for float64 inputs). A query row with no allowed key returns zeros and an
lse of ``-inf``.

Backends
--------
``reference``  the math, materialising the ``[B, Hq, T, S]`` scores; any dtype (float64 too),
               trains everywhere. The ground truth every fast path is tested against.
``sdpa``       ``torch.nn.functional.scaled_dot_product_attention``; fused kernels for plain
               full/causal, a dense boolean mask otherwise. No ``score_mod``, no lse.
``flex``       FlexAttention with a block mask cached per (pattern, shape); compiled on CUDA.
               Serves every pattern, ``score_mod`` and lse; no backward on CPU.
``cudnn``      cuDNN's fused attention on a diagonal band (:mod:`attnkit.ops.softmax.cudnn_band`): the
               sliding window, and sink + window (sinks merged by log-sum-exp), for prefill and
               training, float16/bfloat16, through the optional cuDNN frontend
               (``pip install nvidia-cudnn-frontend``).
``auto``       CUDA: SDPA for plain full/causal, cuDNN for a plain sliding window or sink + window
               when the frontend is installed, FlexAttention otherwise. CPU: SDPA, or the
               reference when ``score_mod`` or the lse is asked for (FlexAttention has no CPU
               backward in torch 2.13, and the CPU reference costs the same as its forward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import patterns as _patterns
from . import cudnn_band as _cudnn_band
from .flex import _attend_flex, _needs_grad
from .reference import ScoreMod, attend_reference
from .sdpa import _attend_sdpa

__all__ = ["attend", "BACKENDS", "choose_backend"]

BACKENDS = ("auto", "reference", "sdpa", "flex", "cudnn")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "[B, Hq, T, D]" if name == "q" else "[B, Hkv, S, D]"
            raise ValueError(f"{name} must have rank 4 {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Hkv, S]")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: q has D={D}, k has D={k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} (GQA/MQA)")
    if T == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q has T={T}, k has S={k.shape[2]}")
    if B == 0:
        raise ValueError(f"empty batch: q, k, v have B=0 (shape {tuple(q.shape)}); attention needs B >= 1")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1, got D={D} (q, k) and Dv={v.shape[3]} (v)")


def _check_scale(scale) -> None:
    """``scale`` must be None or a finite real number (a NaN or infinite scale makes every score NaN)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (default D ** -0.5), got {scale!r}")


def _key_mask(key_mask, q: Tensor, k: Tensor) -> Tensor | None:
    """``key_mask`` as a boolean ``[B, S]`` on q's device (True: a real key), or None."""
    if key_mask is None:
        return None
    B, S = k.shape[0], k.shape[2]
    accepted = ("accepted: a boolean tensor [B, S] (True = the key may be attended), Hugging Face's integer "
                "attention_mask [B, S] of 0 / 1, or an integer tensor [B] of valid lengths (keys at positions "
                ">= length are padding)")
    if not isinstance(key_mask, Tensor):
        raise ValueError(f"key_mask must be a tensor or None, got {type(key_mask).__name__}; {accepted}")
    if key_mask.device.type == "meta" and q.device.type != "meta":
        raise ValueError(f"key_mask is on the meta device (no values) but q is on {q.device}; {accepted}")
    # values can be checked unless traced or shape-only (meta tensors hold none)
    checkable = not torch.compiler.is_compiling() and q.device.type != "meta"
    if tuple(key_mask.shape) == (B, S) and not (key_mask.dtype == torch.bool or key_mask.is_floating_point()
                                    or key_mask.is_complex()):
        # Hugging Face's attention_mask: integers, 1 = a real token, 0 = padding
        if checkable and bool(((key_mask != 0) & (key_mask != 1)).any()):
            raise ValueError(f"key_mask is an integer tensor [B, S] holding values other than 0 and 1; {accepted}")
        key_mask = key_mask != 0
    if key_mask.dtype == torch.bool:
        if tuple(key_mask.shape) != (B, S):
            raise ValueError(f"key_mask is a boolean tensor of shape {tuple(key_mask.shape)} but the keys need "
                             f"[B, S] = [{B}, {S}]; {accepted}")
        return key_mask.to(q.device)
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise ValueError(f"key_mask has dtype {key_mask.dtype}; {accepted}")
    if tuple(key_mask.shape) != (B,):
        raise ValueError(f"key_mask holds integer lengths of shape {tuple(key_mask.shape)} but the batch needs "
                         f"[B] = [{B}]; {accepted}")
    lengths = key_mask.to(q.device)
    if checkable and bool(((lengths < 0) | (lengths > S)).any()):
        raise ValueError(f"key_mask lengths must lie in 0..S={S}, got {key_mask.tolist()}")
    return torch.arange(S, device=q.device) < lengths[:, None]


def _meta_outputs(q: Tensor, v: Tensor, return_lse: bool):
    """Outputs of the right shapes on the meta device (a model built there, for shape inference):
    no kernel runs on tensors without values; the argument checks above have run as on any device."""
    B, Hq, T, _ = q.shape
    out = q.new_empty(B, Hq, T, v.shape[3])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (out, q.new_empty(B, Hq, T, dtype=lse_dtype)) if return_lse else out


def _padded_plain(pattern) -> bool:
    """``base & KeyPadding`` with a plain full or causal base: SDPA's masked kernels serve it."""
    return (isinstance(pattern, _patterns.And) and isinstance(pattern.right, _patterns.KeyPadding)
            and pattern.left.kind in ("full", "causal"))


def choose_backend(q: Tensor, k: Tensor, v: Tensor, pattern, score_mod, return_lse: bool, q_offset: int) -> str:
    """The backend ``auto`` picks for these inputs (exposed so benchmarks can report it)."""
    T, S = q.shape[2], k.shape[2]
    plain = score_mod is None and not return_lse
    if q.device.type == "cuda":
        if plain and (pattern.kind == "full" or (pattern.kind == "causal" and q_offset == S - T)):
            return "sdpa"
        if plain and _padded_plain(pattern) and q.dtype != torch.float64:
            # padded batches (Hugging Face's attention_mask): one boolean [B, 1, T, S] mask for
            # SDPA's masked kernel, instead of a FlexAttention block mask rebuilt for every new mask
            return "sdpa"
        if plain and _cudnn_band.supports(q, k, v, pattern, q_offset=q_offset):
            return "cudnn"
        if q.dtype == torch.float64:
            return "reference"
        return "flex"
    return "sdpa" if plain else "reference"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    q_offset: int | None = None,
    key_mask: Tensor | None = None,
):
    """Exact softmax attention. See the module docstring for the math and the backends.

    Args:
        q: ``[B, Hq, T, D]``. k: ``[B, Hkv, S, D]``. v: ``[B, Hkv, S, Dv]``; ``Hq % Hkv == 0``.
        pattern: ``None`` (full), ``"full"``, ``"causal"`` or an :class:`attnkit.patterns.Pattern`.
        score_mod: FlexAttention-style ``score_mod(score, b, h, q_pos, k_pos)`` applied to the
            scaled scores before masking; ``q_pos`` is the query's absolute position.
        scale: multiplies ``q . k``; default ``D ** -0.5``.
        return_lse: also return the log-sum-exp per query row ``[B, Hq, T]``.
        backend: one of ``auto``, ``reference``, ``sdpa``, ``flex``, ``cudnn``.
        q_offset: absolute position of the first query; default ``S - T`` (queries are the
            newest tokens, as in a decode step).
        key_mask: padding of the keys, on every backend but ``cudnn``: a boolean ``[B, S]``
            (True: a real key, so left padding works), Hugging Face's integer ``attention_mask``
            ``[B, S]`` of 0 / 1 (1: a real key), or integer valid lengths ``[B]`` (keys at positions ``>= length`` are
            padding). It narrows ``pattern`` (``pattern & patterns.key_padding(mask)``); a row
            left with no key returns zeros. ``None`` (default): no padding.

    Returns:
        ``out [B, Hq, T, Dv]`` or ``(out, lse)``.

    Example::

        >>> import torch, attnkit
        >>> q = torch.randn(2, 8, 100, 64); k = v = torch.randn(2, 2, 100, 64)
        >>> attnkit.attend(q, k, v, pattern="causal").shape
        torch.Size([2, 8, 100, 64])
    """
    _validate(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    pattern = _patterns.resolve(pattern)
    B, Hq, T, D = q.shape
    S = k.shape[2]
    valid = _key_mask(key_mask, q, k)
    if valid is not None:
        pattern = pattern & _patterns.KeyPadding(valid)
    pattern.validate(B, Hq, S)
    if q_offset is None:
        q_offset = S - T
    elif isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"q_offset must be an int or None, got {q_offset!r}")
    _check_scale(scale)
    # scale=None goes through as None: every backend defaults to D ** -0.5 itself, and the
    # compiled FlexAttention kernel is then the same one a direct flex_attention call gets
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"score_mod must be callable(score, b, h, q_pos, k_pos) or None, got {type(score_mod).__name__}")

    if backend == "auto":
        backend = choose_backend(q, k, v, pattern, score_mod, return_lse, q_offset)

    if backend == "reference":
        if q.device.type == "meta":
            return _meta_outputs(q, v, return_lse)
        return attend_reference(
            q, k, v, pattern=pattern, score_mod=score_mod, scale=scale, return_lse=return_lse, q_offset=q_offset
        )
    if backend == "sdpa":
        if score_mod is not None:
            raise ValueError("backend='sdpa' cannot apply a score_mod; use backend='flex' (or 'reference', or 'auto')")
        if return_lse:
            raise ValueError("backend='sdpa' does not return the log-sum-exp; use backend='flex' (or 'reference', or 'auto')")
        if q.device.type == "meta":
            return _meta_outputs(q, v, return_lse)
        return _attend_sdpa(q, k, v, pattern, scale, q_offset)
    if backend == "cudnn":
        if valid is not None:
            raise ValueError("backend='cudnn' takes no key_mask (its band kernels have no padding); "
                             "use backend='auto', 'sdpa' or 'flex'")
        reason = _cudnn_band.why_unsupported(q, k, v, pattern, score_mod, return_lse, q_offset)
        if reason is not None:
            raise ValueError(f"backend='cudnn' cannot serve these inputs: {reason}; use backend='auto' or 'flex'")
        return _cudnn_band.run(q, k, v, pattern.window, scale, getattr(pattern, "sink_tokens", 0))
    # flex
    if q.device.type == "cpu" and _needs_grad(q, k, v):
        raise ValueError(
            "backend='flex' has no backward on CPU (FlexAttention raises in torch); "
            "use backend='sdpa' or 'reference' for training on CPU, or 'auto'"
        )
    if q.device.type == "meta":
        return _meta_outputs(q, v, return_lse)
    return _attend_flex(q, k, v, pattern, score_mod, scale, return_lse, q_offset)
