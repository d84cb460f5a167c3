"""Argument checks shared by constructors: one wording for every ``ValueError``."""

from __future__ import annotations

__all__ = ["positive_int", "head_dim_of", "parse_value", "parse_device"]


def positive_int(value, name: str) -> int:
    """``value`` if it is a positive int (bools excluded), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def head_dim_of(dim: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or ``dim // num_heads`` when it is None (dim must then divide evenly)."""
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; pass head_dim explicitly")
        return dim // num_heads
    return positive_int(head_dim, "head_dim")


def parse_value(text: str):
    """A command-line ``key=value`` value: ``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` / ``"false"``
    (any case) -> True / False, anything else unchanged. (``rope=False`` used to stay the string
    ``"False"``, which is truthy: the option was silently on.)"""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def parse_device(text: str, option: str = "--device"):
    """``text`` as a ``torch.device`` that exists here (cpu, cuda, cuda:N), else a ValueError naming ``option``."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown {option} {text!r}; accepted: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported {option} {text!r}; accepted: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {text} was asked for, but PyTorch sees no CUDA device here; use {option} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{option} {text!r}: this machine has {count} CUDA device(s), accepted: cuda:0 to cuda:{count - 1}")
    return device
