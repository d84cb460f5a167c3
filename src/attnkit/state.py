"""Decode-time state: what a layer keeps between calls so that feeding a sequence in pieces
gives the same outputs as one full forward.

Every state knows ``offset`` (tokens seen so far, the absolute position of the next token)
and ``nbytes()`` (memory held, reported by ``attnkit bench --mode decode``). Softmax layers
keep a :class:`KVCache`; linear-attention layers keep a :class:`RecurrentState` of fixed
size. A layer creates its own with ``layer.init_state(batch_size)``; a model keeps one per
layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["State", "KVCache", "RecurrentState"]


class State:
    """Base class of a layer's decode state."""

    def __init__(self) -> None:
        self.offset = 0

    def nbytes(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        self.offset = 0


class KVCache(State):
    """Keys and values of all tokens seen, ``[B, Hkv, S, D]`` each.

    Storage grows geometrically (or is preallocated with ``max_len``), so appending one
    token costs O(1) amortised; ``update(k, v)`` appends ``[B, Hkv, T, D]`` and returns
    views of everything cached so far.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        max_len: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_dim = value_dim or head_dim
        self.max_len = max_len
        capacity = max_len or 256
        self._k = torch.empty(batch_size, num_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self._v = torch.empty(batch_size, num_kv_heads, capacity, self.value_dim, device=device, dtype=dtype)

    @property
    def keys(self) -> Tensor:
        return self._k[:, :, : self.offset]

    @property
    def values(self) -> Tensor:
        return self._v[:, :, : self.offset]

    def _grow(self, needed: int) -> None:
        capacity = self._k.shape[2]
        if needed <= capacity:
            return
        if self.max_len is not None:
            raise ValueError(f"KVCache is full: max_len={self.max_len}, asked to hold {needed} tokens")
        new_capacity = max(needed, 2 * capacity)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], new_capacity, old.shape[3])
            new[:, :, : self.offset] = old[:, :, : self.offset]
            setattr(self, name, new)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``; return all keys and values so far."""
        expected = (self.batch_size, self.num_kv_heads)
        if tuple(k.shape[:2]) != expected or k.shape[3] != self.head_dim or v.shape[3] != self.value_dim:
            raise ValueError(
                f"KVCache holds [B={self.batch_size}, Hkv={self.num_kv_heads}, S, D={self.head_dim}/{self.value_dim}], "
                f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        T = k.shape[2]
        if k.dtype != self._k.dtype or k.device != self._k.device:
            self._k = self._k.to(device=k.device, dtype=k.dtype)
            self._v = self._v.to(device=v.device, dtype=v.dtype)
        self._grow(self.offset + T)
        self._k[:, :, self.offset : self.offset + T] = k
        self._v[:, :, self.offset : self.offset + T] = v
        self.offset += T
        return self.keys, self.values

    def nbytes(self) -> int:
        """Bytes of the cached tokens (not of spare capacity)."""
        per_token = self.batch_size * self.num_kv_heads * (self.head_dim + self.value_dim) * self._k.element_size()
        return per_token * self.offset


class RecurrentState(State):
    """A fixed-size state (linear attention, convolution tails): named tensors."""

    def __init__(self, **tensors: Tensor) -> None:
        super().__init__()
        self.tensors: dict[str, Tensor] = dict(tensors)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
