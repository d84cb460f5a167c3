"""H2O eviction, SinkLoRA's sink-token variant of it, and SinkLoRA's SF-Attn training pattern.

**H2O** (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", arXiv 2306.14048): each KV head keeps at most ``budget`` tokens: the ``recent``
newest ones and the *heavy hitters*, the older tokens with the largest accumulated attention
probability. For every kept key ``j`` of KV head ``h`` the cache holds a score

    score[h, j] = sum over the calls since j arrived, over their real queries i and over the
    query heads q of KV head h, of softmax_j(q_i . k_j * scale)  (under the kept set at that time)

After every call (the prefill, then each decode step) a head keeps its ``sink`` first real
tokens, its ``recent`` newest tokens and, among the others, the ``budget - (sinks + recent)``
of highest score (ties: the earlier position); the rest is evicted and its memory freed. So the
prefill attends every prompt token (causal) and then cuts each head down to the budget, and a
decode step attends ``budget + 1`` keys and evicts one, as the official "real drop"
implementation does (h2o_hf/utils_real_drop); the paper's lm-eval simulation also masks the
prompt's own queries step by step, which attnkit does not.

*GQA*: a KV head's score adds the probabilities of all its query heads (one choice per KV
head: the memory is per KV head). The official code targets MHA Llama/OPT: it keeps scores per
query head, sums them over the batch too (it assumes batch 1) and would not index a GQA cache.
attnkit keeps them per row (left padding: padding never scores and is never kept).

*Budget as the paper*: ``budget`` is tokens per head (an int) or a fraction of each row's prompt
(a float in (0, 1], fixed at the first call: the paper's "20% KV cache" is ``budget=0.2``);
``recent`` is tokens (an int) or a fraction of the budget (a float in [0, 1]; the paper splits
the budget evenly: ``recent=0.5``, the default).

**SinkLoRA** (Zhang, "SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context
Large Language Models", arXiv 2406.05678) runs H2O at inference with the attention sinks of
StreamingLLM always kept: ``apply(model, "sinklora")`` is H2O with ``sink=4``.

**SF-Attn** (SinkLoRA's "Sink Fixed Attention", for long-context LoRA fine-tuning): LongLoRA's
shifted sparse attention (S2-Attn, arXiv 2309.12307: the sequence split into groups of
``group_size`` tokens, attention causal within a group, half of the heads on groups shifted by
half a group) with two changes: the shifted heads' groups do not wrap around (LongLoRA's cyclic
shift puts the last half group and the first half group of the sequence in one group; SF-Attn
segments that group and puts each half back in place: ``[0, G/2)`` and ``[T - G/2, T)`` are
groups of their own), and the first ``sink`` tokens are global: every query attends them. This
is our reading of the paper's description; its repository ships LongLoRA's S2-Attn code only.
:class:`SinkShiftedGroups` is the pattern; ``apply(model, "sf-attn")`` trains under it
(full-sequence forwards; a decode step raises: as in LongLoRA, inference uses full attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import patterns as _patterns
from ..cards import FlopCount, dense_attention_flops
from .policies import GroupCall, Policy, Rule, _sink_count

__all__ = ["HeavyHitters", "H2O", "SinkLoRA", "SinkShiftedGroups", "SinkShiftedRule", "SFAttn", "h2o_flops",
           "sf_attn_flops"]


def _budget_value(value, owner: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: budget must be a positive integer (tokens per KV head) or a float in (0, 1] "
                         f"(a fraction of each row's prompt), got {value!r}")
    if isinstance(value, int) and value <= 0 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{owner}: budget must be a positive integer (tokens per KV head) or a float in (0, 1] "
                         f"(a fraction of each row's prompt), got {value!r}")
    return value


def _recent_value(value, owner: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: recent must be a non-negative integer (tokens) or a float in [0, 1] "
                         f"(a fraction of the budget), got {value!r}")
    if isinstance(value, int) and value < 0 or isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: recent must be a non-negative integer (tokens) or a float in [0, 1] "
                         f"(a fraction of the budget), got {value!r}")
    return value


def _check_h2o(budget, recent, sink, owner: str) -> None:
    _budget_value(budget, owner)
    _recent_value(recent, owner)
    _sink_count(sink, owner)
    if isinstance(budget, int):
        if isinstance(recent, int) and recent > budget:
            raise ValueError(f"{owner}: recent={recent} is larger than budget={budget}; accepted: recent <= budget")
        recent_tokens = recent if isinstance(recent, int) else int(recent * budget)
        if sink + recent_tokens > budget:
            raise ValueError(f"{owner}: sink + recent = {sink} + {recent_tokens} exceeds budget={budget} (tokens per "
                             "KV head); accepted: sink + recent <= budget (what is left goes to heavy hitters)")


@dataclass(frozen=True)
class HeavyHitters(Rule):
    """The H2O rule of one group of KV heads (see the module docstring); ``budget``, ``recent``,
    ``sink`` as :class:`H2O` takes them."""

    budget: int | float
    recent: int | float = 0.5
    sink: int = 0
    scored = True

    def __post_init__(self):
        _check_h2o(self.budget, self.recent, self.sink, "HeavyHitters")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall):
        """Softmax attention over the candidates; ``received [B, n, S']`` sums each key's
        probability over the real queries and the KV head's query heads."""
        out, received = call.attend_probs(q, k, v)  # received [B, n*g, S']
        B, S = received.shape[0], received.shape[2]
        return out, received.view(B, k.shape[1], -1, S).sum(dim=2)

    def _limits(self, call: GroupCall):
        """(budget, recent) as ints, or as ``[B, 1, 1]`` tensors for a budget given as a fraction."""
        if isinstance(self.budget, int):
            recent = self.recent if isinstance(self.recent, int) else int(self.recent * self.budget)
            return self.budget, recent
        if "budget" not in call.state:
            # a fraction of each row's prompt: the first call's real tokens, fixed from then on
            prompt = (call.last + 1 - call.start).clamp(min=1)  # [B]
            budget = torch.round(prompt.double() * self.budget).long()
            low = self.sink + (self.recent if isinstance(self.recent, int) else 0)
            budget = budget.clamp(min=max(1, low))
            recent = (torch.full_like(budget, self.recent) if isinstance(self.recent, int)
                      else (budget.double() * self.recent).long())
            recent = torch.minimum(recent, budget - self.sink)
            call.state["budget"], call.state["recent"] = budget[:, None, None], recent[:, None, None]
        return call.state["budget"], call.state["recent"]

    def keep(self, pos: Tensor, scores: Tensor, call: GroupCall) -> Tensor:
        """pos ``[B, 1|n, S']``, scores ``[B, n, S']`` -> ``[B, n, S']``: sinks, recent tokens and the
        highest-scoring others, at most ``budget`` per row and head."""
        budget, recent = self._limits(call)
        B, n, S = scores.shape
        start = call.start[:, None, None]
        pos = pos.expand(B, n, S)
        real = pos >= start
        fixed = real & ((pos - start < self.sink) | (pos > call.last - recent))
        candidates = real & ~fixed
        heavy = (budget - fixed.sum(dim=2, keepdim=True)).clamp(min=0)  # [B, n, 1]
        ranked = scores.masked_fill(~candidates, float("-inf"))
        # rank of each slot by score, ties to the earlier slot (slots are in position order)
        order = ranked.argsort(dim=2, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(S, device=pos.device).expand(B, n, S))
        return fixed | (candidates & (rank < heavy))


@dataclass(frozen=True)
class H2O(Policy):
    """H2O (arXiv 2306.14048) on every KV head of every layer: at most ``budget`` tokens per head,
    ``recent`` of them the newest, ``sink`` the first real ones (0 in H2O), the rest heavy hitters.

    ``budget``: tokens per KV head (int > 0) or a fraction of each row's prompt (float in (0, 1]).
    ``recent``: tokens (int >= 0) or a fraction of the budget (float in [0, 1]; default 0.5).
    ``sink``: first real tokens always kept (int >= 0). ``sink + recent <= budget``.
    Needs the head-wise cache (``handle.cache()``): the scores live there."""

    name = "h2o"
    budget: int | float = 256
    recent: int | float = 0.5
    sink: int = 0

    def __post_init__(self):
        _check_h2o(self.budget, self.recent, self.sink, type(self).__name__)

    def rule(self, layer_idx, kv_head):
        return HeavyHitters(self.budget, self.recent, self.sink)


@dataclass(frozen=True)
class SinkLoRA(H2O):
    """SinkLoRA's inference (arXiv 2406.05678): H2O with the ``sink`` first tokens always kept
    (attention sinks, default 4)."""

    name = "sinklora"
    sink: int = 4


# -- SF-Attn: the training-time pattern -----------------------------------------------------
class SinkShiftedGroups(_patterns.Pattern):
    """SF-Attn's mask (see the module docstring): causal attention within groups of
    ``group_size`` tokens; the last ``num_heads // 2`` query heads (LongLoRA shifts the second
    half) use groups shifted by ``group_size // 2`` that do not wrap around; every query also
    sees the first ``sink_tokens`` keys.

    A query at ``i`` of head ``h`` sees key ``j`` iff ``j <= i`` and (``j < sink_tokens`` or
    ``(i + o) // G == (j + o) // G``) with ``o = G // 2`` on a shifted head, else 0."""

    depends_on_head = True

    def __init__(self, group_size: int, num_heads: int, sink_tokens: int = 4):
        self.group_size = positive = group_size
        if isinstance(positive, bool) or not isinstance(positive, int) or positive < 2:
            raise ValueError(f"SinkShiftedGroups: group_size must be an integer >= 2 (half of it is the shift), "
                             f"got {group_size!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"SinkShiftedGroups: num_heads must be a positive integer, got {num_heads!r}")
        self.num_heads = num_heads
        self.sink_tokens = _sink_count(sink_tokens, "SinkShiftedGroups")

    def allowed(self, b, h, q_pos, k_pos):
        G = self.group_size
        offset = torch.where(h >= self.num_heads - self.num_heads // 2, G // 2, 0)
        same = torch.div(q_pos + offset, G, rounding_mode="floor") == torch.div(k_pos + offset, G, rounding_mode="floor")
        return (k_pos <= q_pos) & (same | (k_pos < self.sink_tokens))

    def validate(self, batch, heads, kv_len):
        if heads != self.num_heads:
            raise ValueError(f"SinkShiftedGroups was built for num_heads={self.num_heads}, the attention has {heads}")

    @property
    def cache_key(self):
        return ("sink_shifted_groups", self.group_size, self.num_heads, self.sink_tokens)

    def __repr__(self):
        return (f"SinkShiftedGroups(group_size={self.group_size}, num_heads={self.num_heads}, "
                f"sink_tokens={self.sink_tokens})")


@dataclass(frozen=True)
class SinkShiftedRule(Rule):
    """SF-Attn as a rule over the full sequence of one forward (no eviction). Serves calls whose
    queries are the whole sequence (training, a scoring forward); a decode step raises."""

    group_size: int | None = None
    group_ratio: float = 0.25
    sink: int = 4
    evicts = False

    def group_for(self, length: int) -> int:
        """The group size for a sequence of ``length`` tokens (LongLoRA: a quarter of it)."""
        return self.group_size if self.group_size is not None else max(2, int(length * self.group_ratio))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: GroupCall) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        if T != S or call.seen != T:
            raise ValueError(
                f"sf-attn is SinkLoRA's training-time pattern over whole sequences; this call has {T} queries over "
                f"{S} cached keys (a decode step). For inference remove it (full attention, as LongLoRA and SinkLoRA "
                "do) or apply 'sinklora' (H2O with sink tokens)")
        heads = q.shape[1]
        pattern = SinkShiftedGroups(self.group_for(int(S - call.start.min())), heads, self.sink)
        start = call.start[:, None, None, None]
        rel_q = call.q_pos[None, None, :, None] - start  # positions from each row's first real token
        rel_k = call.k_pos[:, :, None, :] - start
        h = torch.arange(heads, device=q.device)[None, :, None, None]
        allowed = call.base() & pattern.allowed(None, h, rel_q, rel_k)  # [B, H, T, S]
        return call.attend(q, k, v, allowed)


@dataclass(frozen=True)
class SFAttn(Policy):
    """SinkLoRA's SF-Attn on every layer, for fine-tuning (LoRA or any subset of weights) on
    long sequences: ``group_size`` tokens per group (None: ``group_ratio`` of each sequence, 1/4
    as LongLoRA), ``sink`` global tokens (default 4). Every head is in one group (the shifted
    half is chosen by query head)."""

    name = "sf-attn"
    group_size: int | None = None
    group_ratio: float = 0.25
    sink: int = 4

    def __post_init__(self):
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2):
            raise ValueError(f"SFAttn: group_size must be an integer >= 2 or None (group_ratio of the sequence), "
                             f"got {self.group_size!r}")
        if isinstance(self.group_ratio, bool) or not isinstance(self.group_ratio, (int, float)) or \
                not 0.0 < self.group_ratio <= 1.0:
            raise ValueError(f"SFAttn: group_ratio must be a number in (0, 1], got {self.group_ratio!r}")
        _sink_count(self.sink, "SFAttn")

    def rule(self, layer_idx, kv_head):
        return SinkShiftedRule(self.group_size, float(self.group_ratio), self.sink)


# -- the cards' FLOP models (attention core of one model layer of width dim, num_heads heads) ----
def h2o_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Each query reads at most ``budget`` keys (a fraction: of ``seq``), as sink + window would."""
    budget = config["budget"]
    budget = budget if isinstance(budget, int) else max(1, round(budget * seq))
    sink = min(config["sink"], budget - 1)
    pattern = _patterns.sink_window(sink, budget - sink)
    heads = config["num_heads"]
    return FlopCount(attention_fwd=dense_attention_flops(batch, seq, num_heads=heads, head_dim=config["dim"] // heads,
                                                         pattern=pattern), projection_fwd=0.0)


def sf_attn_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """SF-Attn's pairs at this sequence length (the group a ``group_ratio`` of it when not given)."""
    heads = config["num_heads"]
    rule = SinkShiftedRule(config["group_size"], float(config["group_ratio"]), config["sink"])
    pattern = SinkShiftedGroups(rule.group_for(seq), heads, config["sink"])
    return FlopCount(attention_fwd=dense_attention_flops(batch, seq, num_heads=heads, head_dim=config["dim"] // heads,
                                                         pattern=pattern), projection_fwd=0.0)
