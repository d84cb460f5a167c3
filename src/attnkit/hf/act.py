"""ACT, the Attention Calibration Technique (Yu et al., "Unveiling and Harnessing Hidden Attention
Sinks: Enhancing Large Language Models without Training through Attention Calibration",
arXiv 2406.15765, ICML 2024).

Attention sinks are not only the first token: inside the input, some tokens (often delimiters
such as ``\\n`` or ``:``) draw far more attention than their meaning warrants, and in some heads
that hurts. ACT, input-adaptively at inference:

1. **finds the sinks** of a head from its own attention matrix: key ``j`` is a sink when the mean
   attention it receives from the queries that see it exceeds ``threshold``
   (``sum_i a_ij / #{i : i sees j} > threshold``; official: 0.1); the row's first real token is
   never one (ACT keeps the initial sink, which the model needs);
2. **calibrates**: in the heads calibration chose, every query keeps ``beta`` (official: 0.4) of
   the weight it gave the sinks, and the freed ``(1 - beta)`` share goes to the other keys in
   proportion to their weights (the row still sums to 1; the first token takes its share too).
   A row that holds weight only on sinks stays as it is.

No sink found in a head's matrix leaves that head's weights exactly as they were (the hook
returns its input), and no head chosen leaves the model bit-identical.

**Choosing heads** (:func:`fit_act`): each candidate head alone gets ACT; the heads whose
calibration score rises by more than ``margin`` are kept (optionally only the ``top`` best). The
official calibration does the same over layers 2..L-2 (``scripts/calibration.sh``: one run per
head, a head kept when its accuracy beats the baseline).

Deviations from the official code (GATECH-EIC/ACT, ``atten_process_cal``/``atten_process_eval``):
the official drops the first sink it detects (``indices[1:]``, in practice position 0) where this
excludes the row's first real token by position (the same on an unpadded prompt with a sink at
position 0; exact under left padding); the official forces the first query row to ``[1, 0, ...]``,
which it already is under causal masking. Sinks are detected from the queries of the call at hand
(the whole prompt at prefill, the paper's setting); a decode step (one query) detects from that
one row, where the official code would not run (it calibrates single forward passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .steer import HeadView, Modifier, Steer, check_heads

__all__ = ["ACTModifier", "ACT", "find_sinks", "calibrate", "fit_act"]


def _unit(value, name: str, *, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise ValueError(f"ACT: {name} must be a number in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")
    return float(value)


def find_sinks(probs: Tensor, allowed: Tensor, first: Tensor, threshold: float) -> Tensor:
    """Boolean ``[B, h, 1, S']``: the keys whose mean received weight over the queries that see them
    exceeds ``threshold``, the first real token excluded. ``probs`` ``[B, h, t, S']`` (rows sum to
    1 over allowed keys), ``allowed`` ``[B, 1|h, t, S']``, ``first`` ``[B, 1, 1, S']``."""
    seen_by = allowed.to(probs.dtype).sum(2, keepdim=True)  # [B, 1|h, 1, S']
    mean = probs.sum(2, keepdim=True) / seen_by.clamp(min=1)
    return (mean > threshold) & (seen_by > 0) & ~first


def calibrate(probs: Tensor, sinks: Tensor, beta: float) -> Tensor:
    """ACT's redistribution: ``beta`` of each row's weight on ``sinks`` stays, the rest goes to the
    other keys in proportion to their weights; rows without weight elsewhere are unchanged.
    ``probs`` ``[B, h, t, S']``, ``sinks`` boolean broadcastable to it."""
    on_sinks = probs * sinks
    others = probs - on_sinks
    freed = (1.0 - beta) * on_sinks.sum(-1, keepdim=True)
    rest = others.sum(-1, keepdim=True)
    share = torch.where(rest > 0, freed / rest.clamp(min=torch.finfo(probs.dtype).tiny), torch.zeros_like(rest))
    out = beta * on_sinks + others * (1.0 + share)
    return torch.where(rest > 0, out, probs)


class ACTModifier(Modifier):
    """ACT on the ``selected`` (layer, query head) pairs (``weights`` hook)."""

    def __init__(self, selected=(), beta: float = 0.4, threshold: float = 0.1):
        self.beta = _unit(beta, "beta")
        self.threshold = _unit(threshold, "threshold", open_low=True)
        self.selected = tuple(sorted({tuple(int(x) for x in p) for p in selected})) if selected else ()

    def heads(self, num_layers, num_heads):
        return check_heads(self.selected, num_layers, num_heads, owner="ACT")

    def weights(self, probs: Tensor, view: HeadView) -> Tensor:
        sinks = find_sinks(probs, view.allowed, view.first_token(), self.threshold)
        if not bool(sinks.any()):
            return probs  # nothing found: this head's weights as they were
        return calibrate(probs, sinks, self.beta)


@dataclass
class ACT(Steer):
    """ACT as a named policy: ``attnkit.hf.apply(model, "act", heads=[(3, 1), (5, 0)], beta=0.4)``.

    ``heads``: the (layer, query head) pairs calibrated (default none: bit-identical); ``beta`` in
    [0, 1] the share of sink weight kept; ``threshold`` in (0, 1] the mean received weight above
    which a key is a sink. :func:`fit_act` chooses the heads."""

    modifier: Modifier = field(default=None, init=False, repr=False, compare=False)
    heads: tuple = ()
    beta: float = 0.4
    threshold: float = 0.1
    name: ClassVar[str] = "act"

    def __post_init__(self):
        pairs = []
        for p in self.heads:
            try:
                pairs.append(tuple(int(x) for x in p))
                if len(pairs[-1]) != 2:
                    raise TypeError
            except (TypeError, ValueError):
                raise ValueError(f"ACT: a head must be a (layer, query head) pair of ints, got {p!r}") from None
        self.modifier = ACTModifier(pairs, self.beta, self.threshold)
        super().__post_init__()


def fit_act(model, calibration, *, mode: str = "accuracy", beta: float = 0.4, threshold: float = 0.1,
            candidates=None, margin: float = 0.0, top: int | None = None) -> tuple[ACT, dict]:
    """Choose ACT's heads on ``calibration`` (a :class:`~attnkit.hf.zerotuning.Choices`, scored by
    ``mode``, or a callable ``model -> score``, higher better): each candidate head alone gets ACT;
    keep those whose score beats the base by more than ``margin`` (the ``top`` best if given; ties
    in head order). Returns ``(policy, report)`` with the base score and the per-head gain ``[L, H]``
    (NaN where not tried)."""
    from .zerotuning import _score_with, calibration_score, candidate_heads

    evaluate = calibration_score(calibration, mode)
    ACTModifier((), beta, threshold)  # check the options before the runs
    L, H, pairs = candidate_heads(model, candidates, "fit_act")
    base = _score_with(model, ACT(), evaluate)
    gain = torch.full((L, H), float("nan"), dtype=torch.float64)
    for pair in pairs:
        gain[pair] = _score_with(model, ACT(heads=(pair,), beta=beta, threshold=threshold), evaluate) - base
    kept = sorted((p for p in pairs if gain[p] > margin), key=lambda p: -float(gain[p]))
    if top is not None:
        kept = kept[: int(top)]
    policy = ACT(heads=tuple(sorted(kept)), beta=beta, threshold=threshold)
    return policy, {"base": base, "gain": gain, "heads": sorted(kept), "beta": beta, "threshold": threshold}
