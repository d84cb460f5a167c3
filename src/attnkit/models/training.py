"""What training a model of attnkit's needs beyond the model: the learning-rate schedule shared
by ``attnkit compare`` and ``attnkit train-subject`` (both train DecoderLMs; they sit at levels
that may not import each other, so the schedule lives here, beside the model)."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, lr: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``floor * lr`` at step
    ``steps`` (and held there after it). ``step`` counts from 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
