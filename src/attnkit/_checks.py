"""Argument checks shared by constructors: one wording for every ``ValueError``."""

from __future__ import annotations

__all__ = ["positive_int"]


def positive_int(value, name: str) -> int:
    """``value`` if it is a positive int (bools excluded), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
