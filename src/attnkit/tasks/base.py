"""The task protocol the ``compare`` harness trains on."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Task", "masked_accuracy", "number_tuple", "summarise_seeds", "whole_number"]


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


def whole_number(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (bools excluded) that is at least ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        accepted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def number_tuple(value, name: str, kind=int) -> tuple:
    """A tuple of numbers from a tuple, a list, one number or a ``"/"``-separated string
    (``"2/4/8"``: the command line's form, where commas already separate the options)."""
    items = value.split("/") if isinstance(value, str) else value if isinstance(value, (tuple, list)) else [value]
    out = []
    for item in items:
        try:
            number = kind(item.strip()) if isinstance(item, str) else item
        except ValueError:
            number = item
        if isinstance(number, bool) or not isinstance(number, (int, float) if kind is float else int):
            what = "numbers" if kind is float else "integers"
            raise ValueError(f"{name} must be {what} (a list, or separated by '/', e.g. 2/4/8), got {value!r}")
        out.append(kind(number))
    if not out:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return tuple(out)


def summarise_seeds(rows: list[dict], key: str) -> list[dict]:
    """Per value of ``rows[i][key]`` (a model, probe, ...), in first-seen order: ``seeds`` (how many
    rows) and the mean, ``_min`` and ``_max`` over those rows of every numeric field but ``seed``.
    The seed summary of the experiment scripts (``attnkit.vision.experiments``, ``attnkit.speech.experiments``)."""
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        mine = [r for r in rows if r[key] == name]
        summary = {key: name, "seeds": len(mine)}
        for field, value in mine[0].items():
            if isinstance(value, (int, float)) and field != "seed":
                values = torch.tensor([float(r[field]) for r in mine], dtype=torch.float64)
                summary[field] = float(values.mean())
                summary[field + "_min"], summary[field + "_max"] = float(values.min()), float(values.max())
        out.append(summary)
    return out
