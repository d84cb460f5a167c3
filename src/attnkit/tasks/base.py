"""The task protocol the ``compare`` harness trains on."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Task", "masked_accuracy"]


class Task:
    """A source of training batches and an evaluation.

    ``train_batch(batch_size, generator) -> (inputs [B, T], targets [B, T])`` with target
    ``-100`` where no loss is taken; ``evaluate(model, device) -> dict`` whose entry
    ``metric`` is the headline number (``higher_is_better`` says which way is good).
    """

    name: str = "task"
    metric: str = "accuracy"
    higher_is_better: bool = True
    vocab_size: int
    seq_len: int

    def config(self) -> dict:
        raise NotImplementedError

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def evaluate(self, model, device, *, batch_size: int = 64) -> dict:
        raise NotImplementedError


@torch.no_grad()
def masked_accuracy(model, inputs: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, counted) of argmax predictions where ``targets != -100``."""
    logits = model(inputs)
    keep = targets != -100
    correct = (logits.argmax(-1) == targets) & keep
    return int(correct.sum()), int(keep.sum())
