"""Policies: what each KV head of each layer keeps and how its queries attend.

A policy is a small dataclass. ``plan(layer_idx, num_kv_heads)`` splits a layer's KV heads into
groups, each with one rule:

- ``None``: full causal attention over every cached key (the model's own attention);
- :class:`SinkWindow`: StreamingLLM's working set (arXiv 2309.17453): the first ``sink`` tokens
  of the sequence (its first non-padding tokens) and the last ``window`` tokens;
- any other :class:`Rule`: a method's own rule (scored eviction, a static selection, a
  query-dependent sparse attention), written against the protocol below.

Query heads follow their KV head (GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
The head-wise cache (:class:`attnkit.hf.HeadwiseCache`) stores each group on its own, so a
sink + window group holds ``sink + window`` tokens per head however long the context.

Built-in policies: :class:`Full`, :class:`Streaming` (every head sink + window) and
:class:`Headwise` (DuoAttention, arXiv 2410.10819: per (layer, KV head) a choice between full
attention, "retrieval heads", and sink + window, "streaming heads").

The rule protocol
-----------------
Legend: B batch, T this call's queries, n the group's KV heads, g = Hq // Hkv query heads per
KV head (the group's query heads are ``n * g``, KV head by KV head), S' the group's candidate
keys in this call (what it kept from earlier calls, then this call's new tokens), D head dim.

A rule is a frozen dataclass (hashable: heads with equal rules form one group) subclassing
:class:`Rule`. Every call of a layer goes, per group, through the same three steps:

1. **stage** (the cache): the candidates are the group's kept keys and values ``[B, n, K, D]``
   followed by this call's ``T`` new ones, with their original positions ``[B, 1|n, S']``
   (``-1``: an empty slot of a row that kept fewer tokens; ``1``: shared by the group's heads,
   ``n``: one set per head) and, for a ``scored`` rule, their scores ``[B, n, S']`` (float32, or
   float64 for float64 keys; a new token starts at 0).
2. **attend** (``rule.attend(q, k, v, call) -> out`` or ``(out, received)``): q ``[B, n*g, T, D]``,
   k / v ``[B, n, S', D]`` the candidates, ``call`` a :class:`GroupCall` (positions, padding
   starts, the model's mask, the scaling, the group's persistent ``state`` dict). Returns
   ``out [B, n*g, T, Dv]``; a ``scored`` rule also returns ``received [B, n, S']``, which the
   cache adds to the candidates' scores. The default attends under ``call.allowed()``: the
   model's own mask (causal / sliding window / padding) at the candidates' positions, ANDed with
   ``rule.allowed(q_pos, k_pos, start)`` when that is not None. A rule supplies its own
   attention by overriding ``attend`` (``call.attend(q, k, v, allowed)`` runs ``attnkit.attend``
   with any boolean mask ``[B, 1|n|n*g, T, S']``; ``call.attend_probs`` also returns the
   attention mass each key received).
3. **keep** (``rule.keep(pos, scores, call) -> bool [B, 1|n, S'] or None``): which candidates
   the group keeps for later calls (None: all of them). The cache drops the others, frees their
   memory and keeps the survivors in position order, per head when the mask is per head.

Class attributes say what a rule needs:

- ``evicts`` (default True): False stores the group like full heads (every token, positions
  ``0 .. S-1``; ``keep`` is not called), e.g. a sparse attention over the full cache;
- ``scored`` (default False): the cache holds the scores of step 1 (for an evicting group: the
  scores serve ``keep``);
- ``stateful`` (default: ``scored``): what the group keeps depends on earlier calls, so only the
  head-wise cache (``handle.cache()``) can serve it; on the model's own cache (which keeps every
  token) a stateful rule raises ``ValueError``, a stateless one attends through ``allowed`` /
  ``attend`` over every token (outputs the rule's, no memory saved; ``keep`` is not called
  there, so a stateless rule says what it keeps through ``allowed`` or its ``attend``).

Examples: scored eviction (H2O, :mod:`attnkit.hf.h2o`) is ``scored`` with an ``attend`` that
returns the attention mass and a ``keep`` choosing the top scores within a budget; a static
selection at prefill (Task-KV) chooses in ``keep`` when ``call.prefill`` and then keeps what it
chose plus a recent window (``call.state`` remembers what it needs); a query-dependent sparse
attention over the full cache (LongHeads, ProxyAttn) has ``evicts = False`` and its own
``attend``, reading positions from ``call.k_pos`` and the padding from ``call.start``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import positive_int

__all__ = ["Rule", "GroupCall", "SinkWindow", "Group", "Policy", "Full", "Streaming", "Headwise", "METHODS", "resolve"]


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


class Rule:
    """Base class of a KV-head group's rule (see "The rule protocol" in the module docstring).

    Subclasses are frozen dataclasses. The hooks' defaults: ``allowed`` None (no restriction
    beyond the model's mask), ``attend`` attnkit.attend under ``call.allowed()``, ``keep`` None
    (keep every candidate)."""

    #: False: the group's cache keeps every token, stored like full heads (``keep`` is not called)
    evicts: ClassVar[bool] = True
    #: True: the cache holds a score per candidate and KV head, which ``attend``'s ``received`` adds to
    scored: ClassVar[bool] = False
    #: True: what the group keeps depends on earlier calls, so only the head-wise cache serves it
    #: (a ``scored`` rule counts as stateful whatever this says)
    stateful: ClassVar[bool] = False
    #: tokens a head keeps at most between calls (None: unbounded); ``plan`` orders groups by it.
    #: A plain attribute, so that a rule's dataclass may have a ``budget`` field.
    budget = None

    def allowed(self, q_pos: Tensor, k_pos: Tensor, start: Tensor) -> Tensor | None:
        """Boolean, broadcast over ``q_pos``, ``k_pos`` (original positions) and ``start`` (the row's
        first real position): which keys a query may see besides the model's mask; None: all."""
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: "GroupCall"):
        """q ``[B, n*g, T, D]``, k / v ``[B, n, S', D]`` -> out ``[B, n*g, T, Dv]`` (a ``scored`` rule:
        ``(out, received [B, n, S'])``)."""
        return call.attend(q, k, v)

    def keep(self, pos: Tensor, scores: Tensor | None, call: "GroupCall") -> Tensor | None:
        """pos ``[B, 1|n, S']`` (``-1``: empty), scores ``[B, n, S']`` or None -> boolean
        ``[B, 1|n, S']``: the candidates the group keeps (None: all)."""
        return None


@dataclass(frozen=True)
class SinkWindow(Rule):
    """Keep the first ``sink`` real tokens (``sink >= 0``) and the last ``window`` tokens (the
    query's own included).

    A query at position ``i`` of a row whose first non-padding token is at ``start`` sees key
    ``j`` iff ``j <= i`` and (``i - j < window`` or ``j - start < sink``). The attention function
    serves this rule on a built-in path (as a pattern where nothing needs materialising)."""

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

    def keep(self, pos: Tensor, scores: Tensor | None, call: "GroupCall") -> Tensor:
        """Which cached keys at ``pos`` ``[B, 1, S']`` any later query (position > ``call.last``) can still see."""
        start = call.start[:, None, None]
        return (pos >= start) & ((pos - start < self.sink) | (pos > call.last - self.window))


class GroupCall:
    """What a rule's ``attend`` and ``keep`` get about one call of one KV-head group.

    Attributes:
        rule: the group's rule. layer_idx: the model layer. kv_heads: the group's KV heads
            (sorted indices). group_size: g, query heads per KV head.
        q_pos: ``[T]`` long, the original positions of this call's queries (the same for every row).
        k_pos: ``[B|1, 1|n, S']`` long, the candidates' original positions (``-1``: empty slot);
            for an ``evicts = False`` group ``arange(S')`` as ``[1, 1, S']``.
        start: ``[B]`` long, each row's first non-padding position (0 where unknown).
        mask: the model's boolean mask ``[B, 1, T, seen]`` over every original position
            (causal / sliding window / padding; True = attend), or None: plain causal, no padding.
        scale: the softmax scaling. score_mod: a score modification (Gemma 2's soft-capping) or None.
        seen: positions seen so far, this call's included (``last = seen - 1``).
        scores: ``[B, n, S']`` (a ``scored`` rule) after this call's ``received`` was added, else None.
        state: a dict that persists for this group of this cache layer across calls (empty on a
            fresh cache; a throwaway dict on the model's own cache).
        backend: ``attnkit.attend``'s backend.
        module: the model's attention module (its ``config`` holds e.g. the RoPE settings a rule
            needs to re-rotate keys), or None where the cache builds the call for ``keep``.
        every_position: True where the candidates are every position ``0 .. seen-1`` in order
            (``k_pos`` is ``arange(seen)`` as ``[1, 1, seen]``: a group that keeps everything).
        input_ids: ``[B, T]`` the token ids of this call's queries (what the model was called
            with; e.g. for a rule that keeps separator tokens), or None (called with embeddings).
    """

    __slots__ = ("rule", "layer_idx", "kv_heads", "group_size", "q_pos", "k_pos", "start", "mask", "scale",
                 "score_mod", "seen", "scores", "state", "backend", "module", "every_position", "input_ids", "_base")

    def __init__(self, rule, layer_idx, kv_heads, group_size, q_pos, k_pos, start, mask, scale, score_mod, seen,
                 scores, state, backend, module=None, every_position=False, input_ids=None):
        self.rule, self.layer_idx, self.kv_heads, self.group_size = rule, layer_idx, kv_heads, group_size
        self.q_pos, self.k_pos, self.start, self.mask = q_pos, k_pos, start, mask
        self.scale, self.score_mod, self.seen, self.scores = scale, score_mod, seen, scores
        self.state, self.backend, self.module, self._base = state, backend, module, None
        self.every_position, self.input_ids = every_position, input_ids

    @property
    def last(self) -> int:
        """The last position seen (this call's last query)."""
        return self.seen - 1

    @property
    def prefill(self) -> bool:
        """Whether this is the sequence's first call (no earlier tokens)."""
        return self.seen == self.q_pos.shape[0]

    def base(self) -> Tensor:
        """The model's mask at the candidates: boolean ``[B, 1|n, T, S']`` (causal / sliding window /
        padding, and never an empty slot)."""
        if self._base is None:
            k_pos, q_pos = self.k_pos, self.q_pos
            pc = k_pos.clamp(min=0)
            T, S = q_pos.shape[0], k_pos.shape[2]
            if self.mask is None:
                base = pc[:, :, None, :] <= q_pos[None, None, :, None]
            elif self.every_position:
                base = self.mask  # the candidates are every position in order: the mask as it is
            else:
                B, h = max(self.mask.shape[0], pc.shape[0]), pc.shape[1]
                base = self.mask.expand(B, h, T, self.mask.shape[3]).gather(3, pc[:, :, None, :].expand(B, h, T, S))
            if bool((k_pos < 0).any()):
                base = base & (k_pos >= 0)[:, :, None, :]
            self._base = base
        return self._base

    def allowed(self) -> Tensor:
        """``base()`` ANDed with ``rule.allowed`` at the candidates' positions: ``[B, 1|n, T, S']``."""
        extra = self.rule.allowed(self.q_pos[None, None, :, None], self.k_pos.clamp(min=0)[:, :, None, :],
                                  self.start[:, None, None, None])
        return self.base() if extra is None else self.base() & extra

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``attnkit.attend`` of q ``[B, n*g, T, D]`` on k / v ``[B, n, S', D]`` under ``allowed``
        (boolean ``[B, 1|n|n*g, T, S']``; default ``self.allowed()``) -> ``[B, n*g, T, Dv]``."""
        from ..ops.softmax import attend
        from .attention import _DenseMask

        allowed = self.allowed() if allowed is None else allowed
        allowed = self._per_query_head(allowed, q.shape[1])
        backend = self.backend
        if backend == "auto":
            backend = "sdpa" if self.score_mod is None else "reference"
        return attend(q, k, v, pattern=_DenseMask(allowed), scale=self.scale, score_mod=self.score_mod,
                      backend=backend)

    def attend_probs(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
                     queries: Tensor | None = None, chunk_elements: int = 1 << 26):
        """Softmax attention written out, also returning what each key received:
        ``(out [B, n*g, T, Dv], received [B, n*g, S'])``, ``received`` the attention probabilities
        summed over the queries (query rows of padding, at positions before ``start``, excluded;
        ``queries`` ``[B, T]`` boolean, if given, restricts them further: e.g. an observation window).
        Computed in float32 at least (float64 for float64 inputs), in chunks of queries."""
        B, Hq, T, D = q.shape
        n, S = k.shape[1], k.shape[2]
        g = Hq // n
        allowed = self.allowed() if allowed is None else allowed
        if allowed.shape[1] == Hq and g > 1:
            allowed = allowed.view(allowed.shape[0], n, g, T, S)
        else:
            allowed = allowed[:, :, None]  # [B, 1|n, 1, T, S']
        dtype = torch.promote_types(q.dtype, torch.float32)
        real = self.q_pos[None, :] >= self.start[:, None]  # [B, T]
        if queries is not None:
            real = real & queries
        qg = q.to(dtype).view(B, n, g, T, D)
        kt = k.to(dtype)[:, :, None].transpose(-1, -2)  # [B, n, 1, D, S']
        vv = v.to(dtype)[:, :, None]  # [B, n, 1, S', Dv]
        out = q.new_empty(B, n, g, T, v.shape[3])
        received = torch.zeros(B, n, g, S, dtype=dtype, device=q.device)
        step = max(1, chunk_elements // max(1, B * Hq * S))
        for lo in range(0, T, step):
            hi = min(T, lo + step)
            logits = (qg[:, :, :, lo:hi] @ kt) * self.scale  # [B, n, g, t, S']
            if self.score_mod is not None:
                logits = self.score_mod(logits, None, None, self.q_pos[lo:hi, None], self.k_pos[:, :, None, None, :])
            logits = logits.masked_fill(~allowed[:, :, :, lo:hi], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no key: zeros
            out[:, :, :, lo:hi] = (probs @ vv).to(out.dtype)
            weight = real[:, None, None, lo:hi, None].to(dtype)
            received += (probs * weight).sum(dim=3)
        return out.view(B, Hq, T, -1), received.view(B, Hq, S)

    @staticmethod
    def _per_query_head(allowed: Tensor, num_query_heads: int) -> Tensor:
        """A mask per KV head ``[B, n, T, S']`` repeated for each KV head's query heads (GQA)."""
        h = allowed.shape[1]
        if h == 1 or h == num_query_heads:
            return allowed
        return allowed.repeat_interleave(num_query_heads // h, dim=1)


@dataclass(frozen=True)
class Group:
    """KV heads ``kv_heads`` (sorted indices into the layer's KV heads) attending by ``rule``."""

    kv_heads: tuple[int, ...]
    rule: Rule | None


class Policy:
    """Base class: subclasses are dataclasses and implement :meth:`rule`.

    ``rule(layer_idx, kv_head) -> Rule | None`` decides one KV head; :meth:`plan` groups
    a layer's heads by rule. ``check(num_layers, num_kv_heads)`` raises ``ValueError`` when a
    policy built for another model cannot serve this one (``apply`` calls it)."""

    name: str = ""

    def rule(self, layer_idx: int, kv_head: int) -> Rule | None:
        """What KV head ``kv_head`` of layer ``layer_idx`` keeps: ``None`` for every token (full
        attention), a :class:`SinkWindow` or another :class:`Rule`. The method a policy of your
        own implements."""
        raise NotImplementedError(f"{type(self).__name__} must implement rule(layer_idx, kv_head) -> Rule | None")

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ``ValueError`` if this policy cannot serve a model of this shape."""

    def bind(self, model) -> None:
        """Called by ``apply`` before :meth:`check` with the model itself: a policy that needs more
        than the layer and KV-head counts (the query heads a steering method selects) reads it here."""

    def plan(self, layer_idx: int, num_kv_heads: int) -> tuple[Group, ...]:
        """The layer's KV heads grouped by rule, full heads first."""
        by_rule: dict = {}
        for h in range(num_kv_heads):
            rule = self.rule(layer_idx, h)
            if rule is not None and not isinstance(rule, Rule):
                raise ValueError(f"{type(self).__name__}.rule({layer_idx}, {h}) returned {rule!r}; accepted: None "
                                 "(full attention), an attnkit.hf.SinkWindow(sink, window) or another attnkit.hf.Rule")
            try:
                by_rule.setdefault(rule, []).append(h)
            except TypeError as err:  # heads are grouped by equal rules
                raise ValueError(f"{type(self).__name__}.rule({layer_idx}, {h}) returned an unhashable "
                                 f"{type(rule).__name__}; accepted: a frozen dataclass (@dataclass(frozen=True))") from err
        # full heads first, then by budget (unbounded last); equal budgets in a stable, readable order
        order = sorted(by_rule, key=lambda r: (r is not None, 0 if r is None else
                                               (r.budget if r.budget is not None else float("inf")),
                                               "" if r is None else type(r).__name__ + repr(r)))
        return tuple(Group(tuple(by_rule[r]), r) for r in order)

    @property
    def evicts(self) -> bool:
        """False only where every head of every layer has rule None (plain full attention): the
        attention function then skips its per-layer lookups. A policy of your own may leave it True."""
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

# -- methods in files of their own (each imports this module, so they register after it) -------
from .duo import Duo  # noqa: E402
from .h2o import H2O, SFAttn, SinkLoRA  # noqa: E402
from .taskkv import TaskKV  # noqa: E402

from .longheads import LongHeads  # noqa: E402
from .proxyattn import ProxyAttn  # noqa: E402

METHODS.update({"duo": Duo, "taskkv": TaskKV, "h2o": H2O, "sinklora": SinkLoRA, "sf-attn": SFAttn,
                "longheads": LongHeads, "proxyattn": ProxyAttn})

from .context import ContextSteer  # noqa: E402

METHODS.update({"context": ContextSteer})
from .imbalance import PAINT  # noqa: E402
from .var import VAR  # noqa: E402
from .vhr import VHR  # noqa: E402

METHODS.update({"var": VAR, "vhr": VHR, "paint": PAINT})
# steering methods (issue 24): ZeroTuning, ACT, soft injection of task embeddings
from .act import ACT  # noqa: E402
from .taskinject import TaskInject  # noqa: E402
from .zerotuning import ZeroTuning  # noqa: E402

METHODS.update({"zerotuning": ZeroTuning, "act": ACT, "taskinject": TaskInject})
