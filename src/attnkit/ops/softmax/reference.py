"""``attend_reference``: the math of :func:`attnkit.attend`, written plainly (scores materialised,
masked, softmaxed); any dtype, float64 included, and a backward everywhere. The ground truth
every fast path is tested against, and the fallback of the SDPA path for non-finite inputs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ... import patterns as _patterns

__all__ = ["attend_reference", "ScoreMod"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _modified_scores(score_mod, scores: Tensor, *index: Tensor) -> Tensor:
    """``score_mod(scores, b, h, q_pos, k_pos)``, checked: a tensor that broadcasts to the scores' shape."""
    out = score_mod(scores, *index)
    if not isinstance(out, Tensor):
        raise ValueError(f"score_mod must return a tensor of scores (the modified score), got {type(out).__name__} "
                         f"{out!r}; for a constant use torch.full_like(score, value)")
    try:
        shape = torch.broadcast_shapes(out.shape, scores.shape)
    except RuntimeError:
        shape = None
    if shape != scores.shape:
        raise ValueError(f"score_mod must return scores shaped like its input {tuple(scores.shape)}, got "
                         f"{tuple(out.shape)}")
    return out.expand(scores.shape)


def attend_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    q_offset: int | None = None,
):
    """The math, written plainly: materialise scores, mask, softmax, weighted sum of values."""
    pattern = _patterns.resolve(pattern)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q_offset is None:
        q_offset = S - T
    if scale is None:
        scale = D**-0.5
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    v = v.repeat_interleave(group, dim=1)  # (B, Hq, S, Dv)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhtd,bhsd->bhts", q.to(compute_dtype), k.to(compute_dtype)) * scale  # (B, Hq, T, S)
    device = q.device
    if score_mod is not None:
        b = torch.arange(B, device=device)[:, None, None, None]
        h = torch.arange(Hq, device=device)[None, :, None, None]
        qi = torch.arange(T, device=device)[None, None, :, None] + q_offset
        ki = torch.arange(S, device=device)[None, None, None, :]
        scores = _modified_scores(score_mod, scores, b, h, qi, ki)
    mask = pattern.dense(T, S, q_offset=q_offset, batch=B, heads=Hq, device=device)
    scores = scores.masked_fill(~mask, float("-inf"))  # (NaN or inf scores of masked pairs go too)
    # A row is empty when the pattern allows no key or score_mod gave -inf to all it allows:
    # its scores become constants so that softmax stays finite, and its weights are zeroed.
    # "!= -inf", not "> -inf": a NaN score must reach the output as NaN (as in SDPA and flex), not
    # mark its row empty and hide a diverging model behind zeros
    row_has_key = scores.detach().amax(dim=-1, keepdim=True) != float("-inf")  # (B, H, T, 1)
    scores = scores.masked_fill(~row_has_key, 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).masked_fill(~row_has_key, 0.0)
    out = torch.einsum("bhts,bhsd->bhtd", probs, v.to(compute_dtype)).to(q.dtype)
    if not return_lse:
        return out
    lse = lse.masked_fill(~row_has_key[..., 0], float("-inf"))
    return out, lse
