"""Routing measurements: fluctuation over training and expert load.

Routing fluctuation (StableMoE, arXiv 2204.08396; the measure arXiv 2505.00792 reports): on a fixed probe set
of tokens, the share whose top-1 expert differs between two consecutive evaluation points of training::

    fluctuation(t-1, t) = mean_i [ argmax_e p_i^(t-1) != argmax_e p_i^(t) ]

Example::

    >>> import torch
    >>> from attnkit.routing import routing_fluctuation
    >>> routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3]))
    0.25
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["routing_fluctuation", "expert_load", "top1_experts"]


def top1_experts(probs: Tensor) -> Tensor:
    """Each token's most probable expert: ``probs [..., E]`` -> ``[...]`` (long)."""
    return probs.argmax(-1)


def routing_fluctuation(previous: Tensor, current: Tensor) -> float:
    """Share of tokens whose top-1 expert changed: two integer tensors of the same shape (the same probe tokens)."""
    if not isinstance(previous, Tensor) or not isinstance(current, Tensor) or previous.shape != current.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (previous, current)]
        raise ValueError(f"previous and current must be tensors of one shape (the same probe tokens), got {shapes}")
    if previous.is_floating_point() or current.is_floating_point():
        raise ValueError("previous and current are expert ids (integer tensors); take top1_experts(probs) first")
    if previous.numel() == 0:
        raise ValueError("no probe tokens (empty tensors)")
    return float((previous != current).double().mean())


def expert_load(experts: Tensor, num_experts: int) -> dict:
    """Load of each expert over routing slots ``experts [..., k]``: ``share`` (list, sums to 1), ``max_over_mean``
    (1 when balanced, E when one expert takes everything) and ``cv`` (std / mean of the counts)."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).double()
    share = counts / counts.sum()
    return {"share": share.tolist(), "max_over_mean": float(share.max() * num_experts),
            "cv": float(counts.std(unbiased=False) / counts.mean())}
