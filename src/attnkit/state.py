"""Decode-time state: what a layer keeps between calls so that feeding a sequence in pieces
gives the same outputs as one full forward.

Every state knows ``offset`` (tokens seen so far, the absolute position of the next token)
and ``nbytes()`` (memory held, reported by ``attnkit bench --mode decode``). Softmax layers
keep a :class:`KVCache`; linear-attention layers keep a :class:`RecurrentState` of fixed
size. A layer creates its own with ``layer.init_state(batch_size)``; a model keeps one per
layer. ``reset()`` makes a state what ``init_state`` built, ready for a new sequence.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

__all__ = ["State", "KVCache", "SinkWindowCache", "RecurrentState"]


class _Constant:
    """A tensor recorded as its shape and one value (a freshly built state: zeros, ``-inf``, ``-1``)."""

    def __init__(self, t: Tensor, value) -> None:
        self.shape, self.dtype, self.device, self.value = t.shape, t.dtype, t.device, value


def _snapshot(value):
    """What ``value`` is now, kept apart from later in-place changes; constant tensors compactly."""
    if isinstance(value, Tensor):
        t = value.detach()
        if t.numel() == 0 or t.is_meta:  # meta: a state built only for its shapes (layers.base.check_state)
            return _Constant(t, 0)
        flat = t.reshape(-1)
        first = flat[:1]
        same = (flat == first) | (flat.isnan() & first.isnan()) if t.is_floating_point() else flat == first
        if bool(same.all()):
            return _Constant(t, first.item())
        return t.clone()
    if isinstance(value, dict):
        snap = copy.copy(value)  # keeps a dict subclass's type (e.g. FlowState)
        snap.clear()
        snap.update({k: _snapshot(v) for k, v in value.items()})
        return snap
    if isinstance(value, (list, tuple)):
        return _same_sequence(value, [_snapshot(v) for v in value])
    return value  # numbers, None, strings; other objects are kept by reference (never deep-copied)


def _restore(snap, current=None):
    """A fresh copy of a snapshot; a tensor lands on the device and dtype that ``current``
    (the attribute's present value) has, where a state moved to its inputs' device or dtype."""
    if isinstance(snap, (_Constant, Tensor)):
        like = current if isinstance(current, Tensor) else None
        device = like.device if like is not None else snap.device
        dtype = like.dtype if like is not None else snap.dtype
        if isinstance(snap, _Constant):
            return torch.full(snap.shape, snap.value, device=device, dtype=dtype)
        return snap.to(device=device, dtype=dtype, copy=True)
    if isinstance(snap, dict):
        current = current if isinstance(current, dict) else {}
        fresh = copy.copy(snap)
        fresh.clear()
        fresh.update({k: _restore(v, current.get(k)) for k, v in snap.items()})
        return fresh
    if isinstance(snap, (list, tuple)):
        return _same_sequence(snap, [_restore(v) for v in snap])
    return snap


def _same_sequence(like, items: list):
    """``items`` as a sequence of ``like``'s type (a named tuple takes them as arguments)."""
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


class _RecordsConstruction(type):
    """Metaclass of :class:`State`: once an object's whole ``__init__`` chain has run (a
    subclass's included), record its condition, which :meth:`State.reset` restores."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj._record_constructed()
        return obj


class State(metaclass=_RecordsConstruction):
    """Base class of a layer's decode state.

    ``reset()`` returns the state to the condition it was built in, so that it serves a new
    sequence exactly as a fresh ``layer.init_state(...)`` would: every attribute a subclass
    set in ``__init__`` is restored (tensors to their built values, ``None`` stays ``None``)
    and attributes a layer added later (a convolution tail) are removed. Subclasses need no
    reset of their own; storage whose contents past ``offset`` are never read (a KV cache's
    buffers) is named in ``_storage`` and kept as it is rather than copied at construction.
    """

    #: attributes whose content is never read beyond ``offset``: not recorded, kept on reset
    _storage: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.offset = 0

    def nbytes(self) -> int:
        raise NotImplementedError

    def _record_constructed(self) -> None:
        self._constructed = {name: _snapshot(value) for name, value in vars(self).items()
                             if name != "_constructed" and name not in self._storage}

    def reset(self) -> None:
        """Forget every token seen: the state becomes what ``init_state`` built."""
        for name in list(vars(self)):
            if name != "_constructed" and name not in self._storage and name not in self._constructed:
                delattr(self, name)  # added after construction (e.g. a convolution tail)
        for name, snap in self._constructed.items():
            setattr(self, name, _restore(snap, getattr(self, name, None)))

    def visible(self, pattern, first_position: int):
        """The pattern and query offset under which this call's queries see the keys that
        :meth:`update` returned (queries start at absolute ``first_position``). A cache that
        keeps every token from position 0 returns ``(pattern, None)``: attend's default offset."""
        return pattern, None


class KVCache(State):
    """Keys and values of all tokens seen, ``[B, Hkv, S, D]`` each.

    Storage grows geometrically (or is preallocated with ``max_len``), so appending one
    token costs O(1) amortised; ``update(k, v)`` appends ``[B, Hkv, T, D]`` and returns
    views of everything cached so far.
    """

    _storage = ("_k", "_v")

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


class SinkWindowCache(State):
    """A KV cache bounded to StreamingLLM's working set: the first ``sink_tokens`` keys and
    the last ``window`` keys (``sink_tokens=0``: a sliding window).

    Memory is ``(sink_tokens + window)`` tokens per head however long the context, and so is
    a decode step's attention. Slots ``0 .. sink_tokens-1`` hold the sinks; the others are a
    ring over positions ``>= sink_tokens``. A one-token step sees every kept key (so attention
    needs no mask); a multi-token chunk gets the old keys plus its own, with their absolute
    positions, and the layer's pattern decides which pairs count
    (:class:`attnkit.patterns.AtKeyPositions`). Exact for causal sink/window patterns whose
    ``sink_tokens`` and ``window`` are at most this cache's.
    """

    _storage = ("_k", "_v")  # read only where _slot_positions says a slot is filled

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        sink_tokens: int,
        window: int,
        value_dim: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if window < 1 or sink_tokens < 0:
            raise ValueError(f"SinkWindowCache needs window >= 1 and sink_tokens >= 0, got {window} and {sink_tokens}")
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.value_dim = value_dim or head_dim
        self.sink_tokens, self.window = sink_tokens, window
        slots = sink_tokens + window
        self._k = torch.empty(batch_size, num_kv_heads, slots, head_dim, device=device, dtype=dtype)
        self._v = torch.empty(batch_size, num_kv_heads, slots, self.value_dim, device=device, dtype=dtype)
        self._slot_positions = torch.full((slots,), -1, dtype=torch.long, device=device)
        self._last_positions: Tensor | None = None

    def _slots(self, positions: Tensor) -> Tensor:
        ring = self.sink_tokens + (positions - self.sink_tokens) % self.window
        return torch.where(positions < self.sink_tokens, positions, ring)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``; return the keys and values this call's queries may need."""
        if tuple(k.shape[:2]) != (self.batch_size, self.num_kv_heads) or k.shape[3] != self.head_dim \
                or v.shape[3] != self.value_dim:
            raise ValueError(
                f"SinkWindowCache holds [B={self.batch_size}, Hkv={self.num_kv_heads}, S, D={self.head_dim}/{self.value_dim}], "
                f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        if k.dtype != self._k.dtype or k.device != self._k.device:
            self._k = self._k.to(device=k.device, dtype=k.dtype)
            self._v = self._v.to(device=v.device, dtype=v.dtype)
            self._slot_positions = self._slot_positions.to(k.device)
        T, start = k.shape[2], self.offset
        filled = min(start, self._k.shape[2])  # slots fill in order until the ring wraps
        if T == 1:
            slot = self.sink_tokens + (start - self.sink_tokens) % self.window if start >= self.sink_tokens else start
            self._k[:, :, slot : slot + 1] = k
            self._v[:, :, slot : slot + 1] = v
            self._slot_positions[slot] = start
            self.offset += 1
            self._last_positions = None  # every kept key is visible to the one query
            n = min(start + 1, self._k.shape[2])
            return self._k[:, :, :n], self._v[:, :, :n]
        positions = torch.arange(start, start + T, device=k.device)
        if filled:
            keys = torch.cat([self._k[:, :, :filled], k], dim=2)
            values = torch.cat([self._v[:, :, :filled], v], dim=2)
            self._last_positions = torch.cat([self._slot_positions[:filled], positions])
        else:  # a first chunk: positions 0 .. T-1, the plain layout
            keys, values, self._last_positions = k, v, None
        # keep the sinks among the new tokens and the last `window` of the others
        keep = (positions < self.sink_tokens) | (positions > start + T - 1 - self.window)
        kept = positions[keep]
        slots = self._slots(kept)
        self._k[:, :, slots] = k[:, :, keep]
        self._v[:, :, slots] = v[:, :, keep]
        self._slot_positions[slots] = kept
        self.offset += T
        return keys, values

    def visible(self, pattern, first_position: int):
        from . import patterns as _patterns

        if self._last_positions is None:
            if self.offset - first_position == 1:  # a one-token step: every kept key is allowed
                return _patterns.full(), None
            return pattern, None
        return _patterns.AtKeyPositions(pattern, self._last_positions), first_position

    def nbytes(self) -> int:
        kept = min(self.offset, self._k.shape[2])
        return self.batch_size * self.num_kv_heads * (self.head_dim + self.value_dim) * self._k.element_size() * kept


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
