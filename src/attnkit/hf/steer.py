"""Steering: change what chosen query heads attend to, or what they output, at inference time.

The seed methods that steer, calibrate or reinforce attention heads of a pretrained model
(ZeroTuning, ACT, VAR, VHR, context-awareness steering, task-embedding injection, ...) share one
shape: pick heads, then change their **logits** (before the softmax), their **weights** (the
probabilities after it) or their **output** (the head's attention output, before ``o_proj``).
This module is that shape, once:

- :class:`Modifier`: a method's change, overriding any of :meth:`Modifier.logits`,
  :meth:`Modifier.weights`, :meth:`Modifier.output`, and saying which query heads it touches
  (:meth:`Modifier.heads`);
- :class:`Steer`: the policy that routes exactly those heads through a materialised attention
  (the logits ``[B, h, t, S']`` are written out, in float32 or float64) and leaves every other
  head on the model's own path. ``attnkit.hf.apply(model, Steer(modifier))`` applies it like any
  KV policy (the same attention function, the same ``remove()``);
- :func:`top_heads`: a deterministic head selection from a score per (layer, head).

A modifier that touches no head leaves the model bit-identical (nothing is routed differently),
which is how "gamma = 1", "no sink found" and "injection weight 0" keep the model's logits exact.

Legend: B batch, h the selected query heads of one KV-head group, t queries of this chunk,
S' keys (every cached token: steering never evicts), Dv value head dim.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .policies import GroupCall, Policy, Rule

__all__ = ["Modifier", "HeadView", "Steer", "SteerRule", "top_heads", "steered_attention"]


class HeadView:
    """What a modifier's hooks see about one call of one KV-head group's selected query heads.

    Attributes:
        layer: the model layer. heads: ``[h]`` long, the global query-head indices of the rows.
        q_pos: ``[t]`` long, the original positions of this chunk's queries.
        k_pos: ``[B|1, 1, S']`` long, the keys' original positions (``-1``: an empty slot).
        start: ``[B]`` long, each row's first non-padding position.
        allowed: ``[B, 1|h, t, S']`` boolean, the model's mask at the keys (True = attend).
        call: the group's :class:`attnkit.hf.GroupCall` (``input_ids``, ``module``, ``prefill``, ...).
    """

    __slots__ = ("layer", "heads", "q_pos", "k_pos", "start", "allowed", "call")

    def __init__(self, layer, heads, q_pos, k_pos, start, allowed, call):
        self.layer, self.heads, self.q_pos, self.k_pos = layer, heads, q_pos, k_pos
        self.start, self.allowed, self.call = start, allowed, call

    def first_token(self) -> Tensor:
        """``[B, 1, 1, S']`` boolean: the key that is each row's first real token (the initial token
        ZeroTuning scales; the first non-padding position of the row)."""
        return (self.k_pos == self.start[:, None, None])[:, :, None, :]

    def key_mask(self, positions: Tensor) -> Tensor:
        """``[B, 1, 1, S']`` boolean: the keys whose original position is marked in ``positions``
        (``[B, L]`` boolean over positions ``0 .. L-1``, e.g. a span; positions >= L are False)."""
        B, L = positions.shape
        pos = self.k_pos.expand(B, 1, -1)
        inside = (pos >= 0) & (pos < L)
        got = positions.to(pos.device).gather(1, pos[:, 0].clamp(0, L - 1))
        return (got[:, None] & inside)[:, :, None, :]


class Modifier:
    """A steering method's change to the heads it selects. Subclass and override what you need.

    ``heads(num_layers, num_heads)`` returns the ``(layer, query head)`` pairs to route through the
    materialised attention (default: every pair of :attr:`selected`). The hooks take float tensors
    (float32, float64 for float64 models) and return the same shape:

    - ``logits(logits [B, h, t, S'], view)``: before the softmax; keys the mask forbids are
      ``-inf`` and stay so whatever the hook returns;
    - ``weights(probs [B, h, t, S'], view)``: after the softmax (rows sum to 1 over allowed keys);
      the hook may redistribute mass (it is not renormalised for you);
    - ``output(out [B, h, T, Dv], view)``: the heads' attention output of the whole call (``view``'s
      ``q_pos`` then covers every query of the call), before the model's output projection.
    """

    #: (layer, query head) pairs this modifier touches; a subclass may set it or override heads()
    selected: tuple = ()

    def heads(self, num_layers: int, num_heads: int) -> tuple[tuple[int, int], ...]:
        """The (layer, query head) pairs to steer, checked against the model's shape."""
        return check_heads(self.selected, num_layers, num_heads, owner=type(self).__name__)

    def logits(self, logits: Tensor, view: HeadView) -> Tensor:
        return logits

    def weights(self, probs: Tensor, view: HeadView) -> Tensor:
        return probs

    def output(self, out: Tensor, view: HeadView) -> Tensor:
        return out

    def overrides(self, hook: str) -> bool:
        """Whether this modifier's class overrides ``hook`` (``"logits"``, ``"weights"``, ``"output"``)."""
        return getattr(type(self), hook) is not getattr(Modifier, hook)


def check_heads(pairs, num_layers: int, num_heads: int, owner: str = "heads") -> tuple[tuple[int, int], ...]:
    """``pairs`` as a sorted tuple of (layer, query head), each in range, else ``ValueError``."""
    out = set()
    for pair in pairs:
        try:
            layer, head = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: a head must be a (layer, query head) pair of ints, got {pair!r}") from None
        if not 0 <= layer < num_layers:
            raise ValueError(f"{owner}: layer {layer} in head {pair!r} is out of range; accepted: 0 .. {num_layers - 1}")
        if not 0 <= head < num_heads:
            raise ValueError(f"{owner}: query head {head} in head {pair!r} is out of range; accepted: "
                             f"0 .. {num_heads - 1}")
        out.add((layer, head))
    return tuple(sorted(out))


def top_heads(scores, *, k: int | None = None, fraction: float | None = None, largest: bool = True,
              seed: int = 0) -> tuple[tuple[int, int], ...]:
    """The ``k`` (or ``fraction`` of all) heads with the largest (``largest=False``: smallest)
    ``scores`` ``[num_layers, num_heads]``, as sorted (layer, head) pairs. Ties are broken by a
    permutation drawn from ``seed``, so the choice is deterministic given the seed."""
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_layers, num_heads], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores hold NaN; accepted: finite or infinite scores per (layer, head)")
    n = scores.numel()
    if (k is None) == (fraction is None):
        raise ValueError(f"give exactly one of k and fraction, got k={k!r}, fraction={fraction!r}")
    if fraction is not None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        k = round(float(fraction) * n)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in 0 .. {n} (the number of heads), got {k!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)  # the tie-break
    flat = scores.reshape(-1).tolist()
    rank = {i: r for r, i in enumerate(order)}
    chosen = sorted(range(n), key=lambda i: ((-flat[i]) if largest else flat[i], rank[i]))[:k]
    H = scores.shape[1]
    return tuple(sorted((i // H, i % H) for i in chosen))


def steered_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, modifier: Modifier,
                      view: HeadView, score_mod=None, chunk_elements: int = 1 << 26,
                      changed: list | None = None) -> Tensor:
    """Softmax attention written out with ``modifier``'s hooks: q ``[B, h, T, D]``, k / v
    ``[B, 1, S', D]`` (the heads' shared KV head), ``allowed`` ``[B, 1|h, T, S']`` -> ``[B, h, T, Dv]``
    in q's dtype; computed in float32 at least (float64 for float64 inputs), in chunks of queries.
    ``changed``, if given, gets one bool appended: False when every hook call returned its input
    object (the modifier changed nothing on this call, e.g. ACT finding no sink)."""
    touched = False
    B, h, T, D = q.shape
    S = k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kt, vf = q.to(dtype), k.to(dtype).transpose(-1, -2), v.to(dtype)
    out = torch.empty(B, h, T, v.shape[3], dtype=dtype, device=q.device)
    step = max(1, chunk_elements // max(1, B * h * S))
    q_pos = view.q_pos
    for lo in range(0, T, step):
        hi = min(T, lo + step)
        a = allowed[:, :, lo:hi]
        chunk = HeadView(view.layer, view.heads, q_pos[lo:hi], view.k_pos, view.start, a, view.call)
        logits = (qf[:, :, lo:hi] @ kt) * scale  # [B, h, t, S']
        if score_mod is not None:
            logits = score_mod(logits, None, None, q_pos[lo:hi, None], view.k_pos[:, :, None, :])
        logits = logits.masked_fill(~a, float("-inf"))
        if modifier.overrides("logits"):
            new = modifier.logits(logits, chunk)
            touched |= new is not logits
            logits = new.masked_fill(~a, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no key: zeros
        if modifier.overrides("weights"):
            new = modifier.weights(probs, chunk)
            touched |= new is not probs
            probs = new
        out[:, :, lo:hi] = probs @ vf
    if modifier.overrides("output"):
        new = modifier.output(out, view)
        touched |= new is not out
        out = new
    if changed is not None:
        changed.append(touched)
    return out.to(q.dtype)


@dataclass(frozen=True)
class SteerRule(Rule):
    """The rule of a KV head some of whose query heads a :class:`Modifier` steers: those heads
    attend through :func:`steered_attention` over every cached token, the KV head's other query
    heads through the model's own (SDPA) path. Nothing is evicted."""

    layer: int
    heads: tuple  # the steered global query heads of this KV head
    modifier: Modifier  # compared (and hashed) as the modifier compares: by identity unless it says otherwise

    evicts: ClassVar[bool] = False
    scored: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    budget = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall) -> Tensor:
        from .attention import _query_heads

        # a SteerRule names its KV head's steered query heads, so its group is that one KV head
        if len(call.kv_heads) != 1:
            raise RuntimeError(f"SteerRule serves one KV head per group, got {call.kv_heads}")
        rows = _query_heads(call.kv_heads, call.group_size, q.device)  # the global query head of each row
        sel = torch.isin(rows, torch.tensor(self.heads, device=q.device))
        allowed = call.allowed()  # [B|1, 1, T, S'] (1 row when the model has no padding mask)
        allowed = allowed.expand(q.shape[0], *allowed.shape[1:])  # the model's path checks the batch
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        if bool((~sel).any()):  # the KV head's other query heads: the model's own softmax attention
            out[:, ~sel] = call.attend(q[:, ~sel], k, v, allowed)
        view = HeadView(self.layer, rows[sel], call.q_pos, call.k_pos, call.start, allowed, call)
        changed: list = []
        steered = steered_attention(q[:, sel], k, v, allowed, call.scale, self.modifier, view, call.score_mod,
                                    changed=changed)
        if not changed[0]:  # the hooks changed nothing on this call: the model's own path, bit for bit
            steered = call.attend(q[:, sel], k, v, allowed)
        out[:, sel] = steered
        return out


@dataclass
class Steer(Policy):
    """Route the heads ``modifier`` selects through its hooks; every other head is untouched.

    ``attnkit.hf.apply(model, Steer(modifier))`` (or a method's own policy built on it). On a model
    whose own cache drops keys (sliding-window layers) pass ``past_key_values=handle.cache()``.
    """

    modifier: Modifier
    name: ClassVar[str] = "steer"
    _heads: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _group: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.modifier, Modifier):
            raise ValueError(f"modifier must be an attnkit.hf.steer.Modifier, got {type(self.modifier).__name__}")

    def bind(self, model) -> None:
        """Check the modifier's heads against ``model``'s shape (``apply`` calls it)."""
        from .attention import _text_config

        config = _text_config(model)
        num_heads = int(config.num_attention_heads)
        num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
        pairs = self.modifier.heads(int(config.num_hidden_layers), num_heads)
        self._group = num_heads // num_kv
        self._heads = {}
        for layer, head in pairs:
            self._heads.setdefault(layer, []).append(head)

    def rule(self, layer_idx: int, kv_head: int):
        if self._group is None:
            raise RuntimeError("Steer.rule before bind(model): apply the policy with attnkit.hf.apply(model, policy)")
        g = self._group
        mine = tuple(h for h in self._heads.get(layer_idx, ()) if h // g == kv_head)
        return SteerRule(layer_idx, mine, self.modifier) if mine else None

    @property
    def evicts(self) -> bool:
        return bool(self._heads)
