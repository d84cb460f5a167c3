"""Task-KV (He, Liu and Chen, "Task-KV: Task-aware KV Cache Optimization via Semantic
Differentiation of Attention Heads", arXiv 2501.15113) as an ``attnkit.hf`` policy.

At prefill, every KV head gets a *semantic vector* from the last ``window`` queries of the prompt
(the paper's observation window): with ``C[j]`` the attention key ``j`` receives, averaged over
those queries (and, GQA, over the KV head's query heads) and ``I`` the ``top`` keys of largest
``C``, the head's vector is ``v = sum_{j in I} C[j] V[j]`` ``[D]``. The *semantic centre* of a
layer is the mean of its KV heads' vectors; the paper's *semantic separator* ranks the heads by
their Euclidean distance to it:

- **heterogeneous heads**, the ``f(r)`` farthest of layer ``r`` (plus, ``closest=True``, the one
  head nearest the centre, the paper's supplement), keep the full KV cache;
- every other head keeps ``budget`` tokens: the first ``sink`` real tokens (attention sinks),
  the last ``recent`` tokens, and ``budget - sink - recent`` *middle activations*: the tokens
  between them with the largest pooled window attention (``C`` averaged over ``pool`` neighbours).
  The choice is made once, at prefill (the cache's first call: a prompt fed in chunks is chosen
  on its first chunk); while decoding, the recent window moves on (so such a head keeps exactly
  ``budget`` tokens however long the generation).

``f(r) = round(n * full_fraction - (n * full_fraction - full_last) * r / (R - 1))``: ``n`` KV heads,
``R`` layers, from ``n * full_fraction`` heterogeneous heads at the first layer down to
``full_last`` at the last (the paper's ``beta`` and ``m``; ``full_last=None``: the same count in
every layer). The paper's settings: ``sink=16, recent=256, window=32, pool=7, top=256``;
``full_fraction=0.25, full_last=4`` on Llama-2-7B (32 heads), ``0.3, 1`` on Mistral-7B.

Where the heads are chosen (``full_heads``):

- ``None`` (the paper): on each prompt, per row, inside the prefill. Outputs are the paper's; the
  head-wise cache stores a layer's heads as one block, so the non-heterogeneous heads' storage is
  padded to the full heads' length (their dropped slots are empty, not freed):
  :func:`kept_tokens` counts what they keep, ``cache.nbytes()`` does not shrink.
- a boolean table ``[num_layers, num_kv_heads]`` (True: heterogeneous), e.g. from
  :func:`identify` run on a calibration prompt of the task, or on the prompt itself before
  generating: heads are grouped statically, so the cache frees every dropped token (bytes =
  the budgets). A batch shares one table (:func:`identify` averages the distances over rows).

GQA: a KV head is classified, not a query head: ``C`` is averaged over the KV head's query heads
before the semantic vector and the middle activations are computed (a query head reads its KV
head's cache, so the cache can only differ per KV head).

What differs from the paper (which gives no code): the semantic centre is the mean vector and the
distance Euclidean; the middle activations use the window scores average-pooled with zero padding
(SnapKV's pooling, the paper's kernel 7); ties in scores go to the earlier position. The paper's
"semantic separator" is this head classifier, not a set of separator tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import positive_int
from .policies import GroupCall, Policy, Rule, _sink_count, _table_rows

__all__ = ["TaskKV", "TaskKVRule", "identify", "kept_tokens", "full_counts", "semantic_vectors"]


def full_counts(num_layers: int, num_kv_heads: int, full_fraction: float, full_last: int | None) -> list[int]:
    """Heterogeneous (full) KV heads per layer before the closest-head supplement: the paper's
    linear schedule ``f(r)`` from ``num_kv_heads * full_fraction`` at layer 0 to ``full_last`` at the
    last layer (``None``: constant), rounded half up and clamped to ``0 .. num_kv_heads``."""
    first = num_kv_heads * full_fraction
    last = first if full_last is None else float(full_last)
    counts = []
    for r in range(num_layers):
        f = first if num_layers == 1 else first - (first - last) * r / (num_layers - 1)
        counts.append(min(num_kv_heads, max(0, math.floor(f + 0.5))))
    return counts


@dataclass(frozen=True)
class TaskKVRule(Rule):
    """A layer's Task-KV heads (see the module docstring). ``num_full`` > 0: the group is the whole
    layer and its ``num_full`` farthest heads (plus the closest, ``closest``) are chosen per row at
    prefill; 0: every head of the group keeps ``budget`` tokens (sink + middle + recent).

    State after the prefill (``call.state``): ``prompt_last`` (the prompt's last position),
    ``chosen [B, n, prompt_last + 1]`` (the sinks and middle activations each head keeps for good),
    ``full [B, n]`` (the heterogeneous heads), and with ``num_full`` > 0 ``distance [B, n]``."""

    sink: int
    recent: int
    window: int
    pool: int
    top: int
    budget: int = None  # Rule's class attribute budget = None makes it a default: it follows the fields without
    num_full: int = 0
    closest: bool = False
    stateful = True

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall) -> Tensor:
        """Full attention over the candidates; at prefill, also the selection (into ``call.state``)."""
        out = call.attend(q, k, v)
        if call.prefill:
            self._select(q, k, v, call)
        return out

    def window_scores(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall) -> Tensor:
        """``C``: the attention each candidate receives from the observation window (the last
        ``window`` real queries of this call), averaged over them and over the KV head's query
        heads: ``[B, n, S']`` (float32 at least)."""
        B, Hq, T, _ = q.shape
        n, S = k.shape[1], k.shape[2]
        w = min(self.window, T)
        mask = None if call.mask is None else call.mask[:, :, T - w:]
        win = GroupCall(self, call.layer_idx, call.kv_heads, call.group_size, call.q_pos[T - w:], call.k_pos,
                        call.start, mask, call.scale, call.score_mod, call.seen, None, {}, call.backend, call.module,
                        call.every_position)
        _, received = win.attend_probs(q[:, :, T - w:], k, v)  # [B, n*g, S'] summed over the real window queries
        count = (win.q_pos[None, :] >= call.start[:, None]).sum(1).clamp(min=1)  # [B]
        return received.view(B, n, Hq // n, S).mean(2) / count[:, None, None].to(received.dtype)

    def _select(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall) -> None:
        scores = self.window_scores(q, k, v, call)  # [B, n, S]
        B, n, S = scores.shape
        pos = call.k_pos.clamp(min=0).expand(B, n, S)  # at prefill: 0 .. S-1
        start = call.start[:, None, None]
        real = (call.k_pos >= 0) & (call.k_pos >= start)
        full = torch.zeros(B, n, dtype=torch.bool, device=q.device)
        if self.num_full:
            vectors = semantic_vectors(scores, v, self.top)  # [B, n, Dv]
            distance = (vectors - vectors.mean(1, keepdim=True)).norm(dim=-1)  # [B, n]
            full = _farthest(distance, self.num_full, self.closest)
            call.state["distance"] = distance
        middle = real & (pos - start >= self.sink) & (pos <= call.last - self.recent)
        chosen = real & (pos - start < self.sink)
        room = self.budget - self.sink - self.recent
        if room > 0:
            pooled = F.avg_pool1d(scores, self.pool, stride=1, padding=self.pool // 2) if self.pool > 1 else scores
            ranked = pooled.masked_fill(~middle, float("-inf"))
            order = torch.sort(ranked, dim=2, descending=True, stable=True).indices[:, :, :room]  # earlier wins ties
            top = torch.zeros_like(middle).scatter(2, order, True) & middle
            chosen = chosen | top
        call.state.update(prompt_last=call.last, chosen=chosen.expand(B, n, S), full=full)

    def keep(self, pos: Tensor, scores, call: GroupCall) -> Tensor:
        """The heterogeneous heads keep every real token; the others their sinks and middle
        activations (chosen at prefill) and the last ``recent`` tokens."""
        state = call.state
        last, chosen = state["prompt_last"], state["chosen"]
        B, n = chosen.shape[:2]
        pos = pos.expand(B, n, pos.shape[2])
        real = (pos >= 0) & (pos >= call.start[:, None, None])
        picked = chosen.gather(2, pos.clamp(0, last)) & (pos <= last)
        recent = pos > call.last - self.recent
        return real & (picked | recent | state["full"][:, :, None])


def semantic_vectors(scores: Tensor, v: Tensor, top: int) -> Tensor:
    """The paper's semantic vector per head: ``sum_{j in top-t of C} C[j] V[j]``; scores ``[B, n, S]``,
    v ``[B, n, S, Dv]`` -> ``[B, n, Dv]`` (in the scores' dtype)."""
    t = min(top, scores.shape[2])
    weight, index = scores.topk(t, dim=2)  # keys with no attention add nothing, so ties at 0 do not matter
    picked = v.to(scores.dtype).gather(2, index[..., None].expand(-1, -1, -1, v.shape[3]))
    return (weight[..., None] * picked).sum(2)


def _farthest(distance: Tensor, count: int, closest: bool) -> Tensor:
    """Boolean ``[B, n]``: per row the ``count`` heads farthest from the centre, plus the closest
    of the others when ``closest`` (and some remain)."""
    n = distance.shape[1]
    order = torch.sort(distance, dim=1, descending=True, stable=True).indices
    full = torch.zeros_like(distance, dtype=torch.bool).scatter(1, order[:, :count], True)
    if closest and 0 < count < n:
        full = full.scatter(1, order[:, -1:], True)
    return full


@dataclass(frozen=True)
class TaskKV(Policy):
    """Task-KV (arXiv 2501.15113): heterogeneous heads keep the full cache, the others ``budget``
    tokens (``sink`` attention sinks, middle activations, ``recent`` tokens). See the module
    docstring for the selection and for ``full_heads``.

    Options: ``budget`` (tokens a non-heterogeneous KV head keeps, ``>= sink + recent``), ``sink``
    (>= 0), ``recent`` (>= 1), ``full_fraction`` in [0, 1] and ``full_last`` (heterogeneous KV heads
    at the first layer as a fraction, at the last as a count; None: the first layer's count),
    ``closest`` (add the head nearest the centre), ``window`` (observation queries), ``pool`` (odd
    kernel of the score pooling; 1: none), ``top`` (keys in the semantic vector), ``full_heads``
    (None: chosen on each prompt; or a boolean table ``[num_layers, num_kv_heads]``)."""

    name = "taskkv"
    budget: int = 512
    sink: int = 16
    recent: int = 256
    full_fraction: float = 0.25
    full_last: int | None = None
    closest: bool = True
    window: int = 32
    pool: int = 7
    top: int = 256
    # equality goes by the normalised table (as Headwise does)
    full_heads: object = field(default=None, compare=False)
    _table: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        positive_int(self.budget, "TaskKV: budget")
        _sink_count(self.sink, "TaskKV")
        positive_int(self.recent, "TaskKV: recent")
        if self.sink + self.recent > self.budget:
            raise ValueError(f"TaskKV: sink + recent = {self.sink} + {self.recent} = {self.sink + self.recent} "
                             f"exceeds budget={self.budget}; accepted: sink + recent <= budget (the rest of the "
                             "budget holds the middle activations)")
        frac = self.full_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"TaskKV: full_fraction must be a number in [0, 1] (the fraction of KV heads that keep "
                             f"the full cache at the first layer), got {frac!r}")
        if self.full_last is not None and (isinstance(self.full_last, bool) or not isinstance(self.full_last, int)
                                           or self.full_last < 0):
            raise ValueError(f"TaskKV: full_last must be None or a non-negative integer (heterogeneous KV heads at "
                             f"the last layer), got {self.full_last!r}")
        if not isinstance(self.closest, bool):
            raise ValueError(f"TaskKV: closest must be True or False, got {self.closest!r}")
        positive_int(self.window, "TaskKV: window")
        positive_int(self.top, "TaskKV: top")
        positive_int(self.pool, "TaskKV: pool")
        if self.pool % 2 == 0:
            raise ValueError(f"TaskKV: pool must be an odd kernel size (1: no pooling), got {self.pool}")
        if self.full_heads is not None:
            try:
                rows = _table_rows(self.full_heads)
            except ValueError as err:
                raise ValueError(str(err).replace("Headwise:", "TaskKV:")) from None
            if len({len(r) for r in rows}) > 1 or not rows[0]:
                raise ValueError(f"TaskKV: full_heads must be [num_layers, num_kv_heads] with one entry per KV head "
                                 f"in every row, got row lengths {[len(r) for r in rows]}")
            object.__setattr__(self, "_table", rows)

    def check(self, num_layers, num_kv_heads):
        if self._table is not None and (len(self._table), len(self._table[0])) != (num_layers, num_kv_heads):
            raise ValueError(f"TaskKV: full_heads has shape [{len(self._table)}, {len(self._table[0])}] but the model "
                             f"has [num_layers, num_kv_heads] = [{num_layers}, {num_kv_heads}]; identify the heads "
                             "on this model (attnkit.hf.taskkv.identify)")
        if self.full_last is not None and self.full_last > num_kv_heads:
            raise ValueError(f"TaskKV: full_last={self.full_last} exceeds the model's {num_kv_heads} KV heads per layer")
        # the schedule f(r) needs the model's depth, which plan() is not told (apply() checks first; the
        # last model checked wins, so one policy object serves models of one depth at a time)
        object.__setattr__(self, "_depth", num_layers)

    def farthest_count(self, layer_idx: int, num_kv_heads: int) -> int:
        """``f(r)``: the KV heads of layer ``layer_idx`` chosen as the farthest from the centre."""
        if self.full_last is None:
            depth = layer_idx + 1  # a constant schedule: the depth does not matter
        else:
            depth = self.__dict__.get("_depth")
            if depth is None:
                raise ValueError("TaskKV with full_last needs the model's depth: apply it with attnkit.hf.apply "
                                 "(or call policy.check(num_layers, num_kv_heads) first)")
        return full_counts(depth, num_kv_heads, self.full_fraction, self.full_last)[layer_idx]

    def full_count(self, layer_idx: int, num_kv_heads: int) -> int:
        """Heterogeneous KV heads of layer ``layer_idx``: ``f(r)`` plus the closest head's supplement."""
        f = self.farthest_count(layer_idx, num_kv_heads)
        return f + (1 if self.closest and 0 < f < num_kv_heads else 0)

    def rule(self, layer_idx, kv_head):
        """With a ``full_heads`` table: None (full) or the budget rule. Chosen per prompt, a layer's
        heads form one group (:meth:`plan`), so no single head has a rule of its own."""
        if self._table is None:
            raise ValueError("TaskKV chooses its heads per prompt (full_heads=None): a layer's KV heads form one "
                             "group, planned by plan(layer_idx, num_kv_heads)")
        if self._table[layer_idx][kv_head]:
            return None
        return TaskKVRule(self.sink, self.recent, self.window, self.pool, self.top, self.budget)

    def plan(self, layer_idx, num_kv_heads):
        """Grouped by the table; or, chosen per prompt, the layer as one group: every head full where
        the schedule asks for all of them, else one :class:`TaskKVRule` choosing ``f(r)`` per row."""
        from .policies import Group

        if self._table is not None:
            return super().plan(layer_idx, num_kv_heads)
        heads = tuple(range(num_kv_heads))
        if self.full_count(layer_idx, num_kv_heads) >= num_kv_heads:
            return (Group(heads, None),)
        f = self.farthest_count(layer_idx, num_kv_heads)
        rule = TaskKVRule(self.sink, self.recent, self.window, self.pool, self.top, self.budget, f,
                          self.closest and f > 0)
        return (Group(heads, rule),)

    @property
    def evicts(self) -> bool:
        return self._table is None or not all(all(r) for r in self._table)


def identify(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, full_fraction: float = 0.25,
             full_last: int | None = None, closest: bool = True, window: int = 32, top: int = 256) -> Tensor:
    """The paper's semantic separator on ``input_ids`` ``[B, T]`` (a calibration prompt of the task,
    or the prompt itself): boolean ``[num_layers, num_kv_heads]``, True for the heterogeneous KV
    heads, for ``TaskKV(full_heads=...)``. One prefill of ``model`` (which must have no attnkit.hf
    method applied); with several rows, each head's distance to the centre is averaged over them.
    ``attention_mask`` ``[B, T]``: 0 on left padding."""
    from .attention import apply

    policy = TaskKV(budget=1, sink=0, recent=1, full_fraction=full_fraction, full_last=full_last, closest=closest,
                    window=window, pool=1, top=top)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"identify: input_ids must be a [batch, length] tensor of token ids, got {got}")
    kwargs = {}
    if attention_mask is not None:
        kwargs.update(attention_mask=attention_mask, position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0))
    with apply(model, policy) as handle, torch.no_grad():
        cache = handle.cache()
        model(input_ids, past_key_values=cache, use_cache=True, **kwargs)
        rows = []
        for layer in cache.layers:
            group = layer.groups[0]
            n = len(group.kv_heads)
            if group.rule is None:  # the schedule keeps every head of this layer
                rows.append([True] * n)
            elif group.rule.num_full == 0:
                rows.append([False] * n)
            else:
                distance = layer.states[0]["distance"].mean(0, keepdim=True)  # [1, n]
                rows.append(_farthest(distance, group.rule.num_full, group.rule.closest)[0].tolist())
    return torch.tensor(rows, dtype=torch.bool)


def kept_tokens(cache) -> list[Tensor]:
    """Per layer of a :class:`attnkit.hf.HeadwiseCache`: the tokens each KV head holds, ``[B, Hkv]``
    long (a full head: every position it stores; a budget head: its non-empty slots)."""
    counts = []
    for layer in cache.layers:
        out = None
        for group, store in zip(layer.groups, layer.stores()):
            if store is None:
                continue
            k, _, pos = store
            B, n = k.shape[0], k.shape[1]
            if out is None:
                out = torch.zeros(B, layer.num_kv_heads, dtype=torch.long, device=k.device)
            if pos is None:
                held = torch.full((B, n), k.shape[2], dtype=torch.long, device=k.device)
            else:
                held = (pos >= 0).sum(-1)
                held = held[:, None].expand(B, n) if held.dim() == 1 else held
            out[:, list(group.kv_heads)] = held
        counts.append(out)
    return counts
