"""Policies: what each KV head of each layer keeps and how its queries attend.

A policy is a small dataclass. ``plan(layer_idx, num_kv_heads)`` splits a layer's KV heads into
groups, each with one rule:

- ``None``: full causal attention over every cached key (the model's own attention);
- :class:`SinkWindow`: StreamingLLM's working set (arXiv 2309.17453): the first ``sink`` tokens
  of the sequence (its first non-padding tokens) and the last ``window`` tokens.

Query heads follow their KV head (GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
The head-wise cache (:class:`attnkit.hf.HeadwiseCache`) stores each group on its own, so a
sink + window group holds ``sink + window`` tokens per head however long the context.

Built-in policies: :class:`Full`, :class:`Streaming` (every head sink + window) and
:class:`Headwise` (DuoAttention, arXiv 2410.10819: per (layer, KV head) a choice between full
attention, "retrieval heads", and sink + window, "streaming heads").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .._checks import positive_int

__all__ = ["SinkWindow", "Group", "Policy", "Full", "Streaming", "Headwise", "METHODS", "resolve"]


def _sink_count(value, owner: str) -> int:
    # 0 is allowed: a pure sliding window, StreamingLLM's "no sink" ablation
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: sink must be a non-negative integer (0: no sink tokens), got {value!r}")
    return value


def _table_rows(table) -> tuple:
    """``full_heads`` as rows of Python bools: a boolean tensor or numpy array ``[L, H]``, or nested
    sequences of bools (Python, numpy or 0-d boolean tensors). Anything else raises ``ValueError``."""
    accepted = "accepted: a boolean tensor or numpy array [num_layers, num_kv_heads], or nested lists of bools"
    if type(table).__module__ == "numpy" and hasattr(table, "dtype"):
        if table.ndim != 2 or table.dtype != bool:
            raise ValueError(f"Headwise: full_heads is a numpy array of dtype {table.dtype} shape "
                             f"{tuple(table.shape)}; {accepted}")
        return tuple(tuple(bool(x) for x in row) for row in table.tolist())
    if isinstance(table, Tensor):
        if table.dim() != 2 or table.dtype != torch.bool:
            raise ValueError(f"Headwise: full_heads must be a boolean tensor [num_layers, num_kv_heads], "
                             f"got dtype {table.dtype} shape {tuple(table.shape)}")
        if table.device.type == "meta":
            raise ValueError("Headwise: full_heads is a tensor on the meta device, which holds no values; "
                             f"{accepted}")
        return tuple(tuple(bool(x) for x in row) for row in table.tolist())

    def is_bool(x):
        if isinstance(x, Tensor):
            return x.dim() == 0 and x.dtype == torch.bool and x.device.type != "meta"
        return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ == "bool")

    def is_row(r):
        return isinstance(r, (list, tuple)) or (isinstance(r, Tensor) and r.dim() == 1) or (
            type(r).__module__ == "numpy" and getattr(r, "ndim", None) == 1)

    if isinstance(table, (list, tuple)) and table and all(is_row(r) for r in table):
        if not all(is_bool(x) for r in table for x in r):
            raise ValueError(f"Headwise: full_heads must hold booleans (True = full head), got {table!r}"[:300])
        return tuple(tuple(bool(x) for x in r) for r in table)
    got = repr(table) if isinstance(table, (list, tuple)) else type(table).__name__
    raise ValueError(f"Headwise: full_heads must be [num_layers, num_kv_heads] booleans, got {got[:80]}; {accepted}")


@dataclass(frozen=True)
class SinkWindow:
    """Keep the first ``sink`` real tokens (``sink >= 0``) and the last ``window`` tokens (the
    query's own included).

    A query at position ``i`` of a row whose first non-padding token is at ``start`` sees key
    ``j`` iff ``j <= i`` and (``i - j < window`` or ``j - start < sink``)."""

    sink: int
    window: int

    def __post_init__(self):
        _sink_count(self.sink, "SinkWindow")
        positive_int(self.window, "SinkWindow: window")

    @property
    def budget(self) -> int:
        """Tokens a head keeps once the context is longer than ``sink + window``."""
        return self.sink + self.window

    def allowed(self, q_pos: Tensor, k_pos: Tensor, start: Tensor) -> Tensor:
        """Boolean, broadcast over ``q_pos``, ``k_pos`` and ``start`` (the row's first real position)."""
        return (k_pos <= q_pos) & ((q_pos - k_pos < self.window) | (k_pos - start < self.sink))

    def keep(self, k_pos: Tensor, start: Tensor, last: int) -> Tensor:
        """Which cached keys at ``k_pos`` any later query (position > ``last``) can still see."""
        return (k_pos >= start) & ((k_pos - start < self.sink) | (k_pos > last - self.window))


@dataclass(frozen=True)
class Group:
    """KV heads ``kv_heads`` (sorted indices into the layer's KV heads) attending by ``rule``."""

    kv_heads: tuple[int, ...]
    rule: SinkWindow | None


class Policy:
    """Base class: subclasses are dataclasses and implement :meth:`rule`.

    ``rule(layer_idx, kv_head) -> SinkWindow | None`` decides one KV head; :meth:`plan` groups
    a layer's heads by rule. ``check(num_layers, num_kv_heads)`` raises ``ValueError`` when a
    policy built for another model cannot serve this one (``apply`` calls it)."""

    name: str = ""

    def rule(self, layer_idx: int, kv_head: int) -> SinkWindow | None:
        """What KV head ``kv_head`` of layer ``layer_idx`` keeps: ``None`` for every token (full
        attention) or a :class:`SinkWindow`. The method a policy of your own implements."""
        raise NotImplementedError(f"{type(self).__name__} must implement rule(layer_idx, kv_head) -> SinkWindow | None")

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ``ValueError`` if this policy cannot serve a model of this shape."""

    def plan(self, layer_idx: int, num_kv_heads: int) -> tuple[Group, ...]:
        """The layer's KV heads grouped by rule, full heads first."""
        by_rule: dict = {}
        for h in range(num_kv_heads):
            rule = self.rule(layer_idx, h)
            if rule is not None and not isinstance(rule, SinkWindow):
                raise ValueError(f"{type(self).__name__}.rule({layer_idx}, {h}) returned {rule!r}; accepted: None "
                                 "(full attention) or an attnkit.hf.SinkWindow(sink, window)")
            by_rule.setdefault(rule, []).append(h)
        order = sorted(by_rule, key=lambda r: (r is not None, 0 if r is None else r.budget))
        return tuple(Group(tuple(by_rule[r]), r) for r in order)

    @property
    def evicts(self) -> bool:
        """Whether some head keeps fewer than all tokens (the head-wise cache saves memory)."""
        return True


@dataclass(frozen=True)
class Full(Policy):
    """Every head attends to every cached key: the model's own attention, through ``attnkit.attend``."""

    name = "full"

    def rule(self, layer_idx, kv_head):
        return None

    @property
    def evicts(self) -> bool:
        return False


@dataclass(frozen=True)
class Streaming(Policy):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453): every head keeps the first ``sink`` tokens and the last ``window``.
    ``sink=0`` is a plain sliding window (the paper's ablation without attention sinks)."""

    name = "streaming"
    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        _sink_count(self.sink, "Streaming")
        positive_int(self.window, "Streaming: window")

    def rule(self, layer_idx, kv_head):
        return SinkWindow(self.sink, self.window)


@dataclass(frozen=True)
class Headwise(Policy):
    """DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads", arXiv 2410.10819): per (layer, KV head) either full
    attention (a retrieval head) or sink + window (a streaming head).

    ``full_heads`` (required; its ``None`` default only keeps the dataclass's field order):
    booleans ``[num_layers, num_kv_heads]`` (a boolean tensor or numpy array, or nested lists of
    bools), True where the KV head keeps every token. ``sink`` may be 0 (a plain
    sliding window on the streaming heads). DuoAttention learns these gates; here they are given.
    """

    name = "headwise"
    # equality and hashing go by the normalised table: a tensor, an array and lists that say the
    # same compare equal (comparing the tensors themselves would raise)
    full_heads: object = field(default=None, compare=False)
    sink: int = 4
    window: int = 1024
    _table: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        _sink_count(self.sink, "Headwise")
        positive_int(self.window, "Headwise: window")
        rows = _table_rows(self.full_heads)
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"Headwise: full_heads rows must all have one entry per KV head, got lengths "
                             f"{[len(r) for r in rows]}")
        if not rows or not rows[0]:
            raise ValueError(f"Headwise: full_heads must be non-empty [num_layers, num_kv_heads], "
                             f"got {self.full_heads!r}")
        object.__setattr__(self, "_table", rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self._table), len(self._table[0])

    def check(self, num_layers, num_kv_heads):
        if self.shape != (num_layers, num_kv_heads):
            raise ValueError(
                f"Headwise: full_heads has shape {list(self.shape)} but the model has "
                f"[num_layers, num_kv_heads] = [{num_layers}, {num_kv_heads}]; build the policy for this model"
            )

    def rule(self, layer_idx, kv_head):
        if not (0 <= layer_idx < self.shape[0]):
            raise ValueError(f"Headwise: layer_idx={layer_idx} out of range; accepted 0..{self.shape[0] - 1}")
        if not (0 <= kv_head < self.shape[1]):
            raise ValueError(f"Headwise: kv_head={kv_head} out of range; accepted 0..{self.shape[1] - 1}")
        return None if self._table[layer_idx][kv_head] else SinkWindow(self.sink, self.window)

    @classmethod
    def from_heads(cls, full: dict, *, num_layers: int, num_kv_heads: int, sink: int = 4, window: int = 1024):
        """Build from ``{layer_idx: [full KV head indices]}``; every other head streams.

        Raises ``ValueError`` naming a layer or head index out of range."""
        positive_int(num_layers, "Headwise.from_heads: num_layers")
        positive_int(num_kv_heads, "Headwise.from_heads: num_kv_heads")
        table = [[False] * num_kv_heads for _ in range(num_layers)]
        for layer, heads in dict(full).items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"Headwise.from_heads: layer index {layer!r} out of range; accepted 0..{num_layers - 1}")
            for h in heads:
                if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_kv_heads:
                    raise ValueError(f"Headwise.from_heads: KV head index {h!r} (layer {layer}) out of range; "
                                     f"accepted 0..{num_kv_heads - 1}")
                table[layer][h] = True
        return cls(full_heads=table, sink=sink, window=window)

    @property
    def evicts(self) -> bool:
        return not all(all(r) for r in self._table)


#: method name -> policy class (``apply(model, "streaming", window=256)``)
METHODS: dict[str, type] = {"full": Full, "streaming": Streaming, "headwise": Headwise}


def resolve(method, options: dict) -> Policy:
    """A policy object from a policy (no options allowed) or a method name and its options."""
    if isinstance(method, Policy):
        if options:
            raise ValueError(f"options {sorted(options)} were given with a policy object; pass them to its constructor")
        return method
    if isinstance(method, str):
        name = method[3:] if method.startswith("hf-") else method
        if name not in METHODS:
            raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)} or a Policy object")
        cls = METHODS[name]
        accepted = [f.name for f in fields(cls) if f.init]
        unknown = sorted(k for k in options if k not in accepted)
        if unknown:
            raise ValueError(f"method {name!r} does not take option(s) {unknown}; accepted: {', '.join(accepted) or 'none'}")
        return cls(**options)
    raise ValueError(f"method must be a method name ({', '.join(METHODS)}) or a Policy, got {type(method).__name__}")

from .duo import Duo  # noqa: E402  (duo.py builds on Headwise above; registered here so resolve() knows "duo")
METHODS["duo"] = Duo
