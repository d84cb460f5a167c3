"""DARE: decoupled attention and representation embeddings for long behaviour sequences.

Paper: "Long-Sequence Recommendation Models Need Decoupled Embeddings", Feng et al., arXiv
2410.02604 (official PyTorch code: github thuml/DARE, read for this file; not copied).

A target-attention CTR model embeds each item once and uses that embedding twice: to score
behaviours against the candidate (attention, and the top-k search of long-sequence models) and
as the vector pooled into the user representation. The paper finds the two uses conflict (the
representation's gradients dominate and the attention learns poorly) and gives each its own
table::

    w_i = softmax_i(<a(c), a(b_i)> / sqrt(D))          a: the attention embeddings (item + time)
    u   = sum_i w_i r(b_i)                              r: the representation embeddings
    logit = MLP([r(c), u, r(c) * u])

The baseline (``decoupled=False``) uses one table for both. The official code concatenates or
adds time embeddings to each table; this file adds them (its "add" mode). The paper's
attention-quality analysis compares learned attention with the true relevance of each
behaviour; :func:`retrieval_recall` measures the same thing here, as a top-k search would use it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .target import target_attention, target_attention_reference, target_attention_weights

__all__ = ["DARE", "dare_attention", "retrieval_recall", "ctr_flops", "check_ctr_inputs"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_ctr_inputs(model, history: Tensor, buckets: Tensor, candidate: Tensor, valid: Tensor | None) -> Tensor:
    """The shared input checks of the CTR models; returns ``valid`` (all True if None)."""
    if history.dim() != 2 or history.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"history must be an integer tensor [B, T], got {history.dtype} {tuple(history.shape)}")
    if buckets.shape != history.shape or buckets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"buckets must be an integer tensor shaped like history {tuple(history.shape)}, got "
                         f"{buckets.dtype} {tuple(buckets.shape)}")
    if candidate.shape != history.shape[:1]:
        raise ValueError(f"candidate must be [B] = [{history.shape[0]}], got {tuple(candidate.shape)}")
    for name, ids, limit in (("history", history, model.num_items), ("candidate", candidate, model.num_items),
                             ("buckets", buckets, model.num_time_buckets)):
        if ids.numel() and (ids.min() < 0 or ids.max() >= limit):
            raise ValueError(f"{name} must lie in [0, {limit - 1}], got values in [{int(ids.min())}, {int(ids.max())}]")
    if valid is None:
        return torch.ones_like(history, dtype=torch.bool)
    if valid.shape != history.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor shaped like history, got {valid.dtype} {tuple(valid.shape)}")
    return valid


def _head(dim: int, hidden: tuple = (64, 32)) -> nn.Sequential:
    layers, width = [], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.PReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def dare_attention(target_attn: Tensor, behaviour_attn: Tensor, behaviour_repr: Tensor, valid: Tensor,
                   num_heads: int = 1, *, reference: bool = False) -> Tensor:
    """DARE's attention part: weights from the attention embeddings, output from the
    representation embeddings. ``target_attn [B, Da]``, ``behaviour_attn [B, T, Da]``,
    ``behaviour_repr [B, T, Dr]`` -> ``[B, Dr]``."""
    attend = target_attention_reference if reference else target_attention
    return attend(target_attn, behaviour_attn, behaviour_repr, valid, num_heads)


class DARE(nn.Module):
    """Target-attention CTR model with decoupled (``decoupled=True``) or shared embeddings.

    ``history [B, T]`` item ids, ``buckets [B, T]`` time buckets relative to the target,
    ``candidate [B]`` -> click logit ``[B]``. ``attention_dim``: the width of the attention
    table (the paper shows it can be smaller than the representation's); ``dim`` by default.
    """

    def __init__(self, dim: int = 16, num_heads: int = 1, *, num_items: int = 200, num_time_buckets: int = 8,
                 decoupled: bool = True, attention_dim: int | None = None, backend: str = "sdpa"):
        super().__init__()
        self.num_items = _positive_int(num_items, "num_items")
        self.num_time_buckets = _positive_int(num_time_buckets, "num_time_buckets")
        dim = _positive_int(dim, "dim")
        if not isinstance(decoupled, bool):
            raise ValueError(f"decoupled must be True or False, got {decoupled!r}")
        attention_dim = dim if attention_dim is None else _positive_int(attention_dim, "attention_dim")
        if not decoupled and attention_dim != dim:
            raise ValueError(f"attention_dim must equal dim ({dim}) when decoupled=False (one shared table), "
                             f"got {attention_dim}")
        _positive_int(num_heads, "num_heads")
        if attention_dim % num_heads or dim % num_heads:
            raise ValueError(f"num_heads must divide dim={dim} and attention_dim={attention_dim}, got {num_heads}")
        if backend not in ("sdpa", "reference"):
            raise ValueError(f"backend must be 'sdpa' or 'reference', got {backend!r}")
        self.decoupled, self.num_heads, self.backend = decoupled, num_heads, backend
        self.repr_item = nn.Embedding(num_items, dim)
        self.repr_time = nn.Embedding(num_time_buckets, dim)
        self.attn_item = nn.Embedding(num_items, attention_dim) if decoupled else self.repr_item
        self.attn_time = nn.Embedding(num_time_buckets, attention_dim) if decoupled else self.repr_time
        for table in (self.repr_item, self.repr_time, self.attn_item, self.attn_time):
            nn.init.normal_(table.weight, std=0.1)
        self.head = _head(3 * dim)

    def _embed(self, history, buckets, candidate):
        now = torch.zeros_like(candidate)
        target_attn = self.attn_item(candidate) + self.attn_time(now)  # (B, Da)
        target_repr = self.repr_item(candidate) + self.repr_time(now)  # (B, Dr)
        behaviour_attn = self.attn_item(history) + self.attn_time(buckets)  # (B, T, Da)
        behaviour_repr = self.repr_item(history) + self.repr_time(buckets)  # (B, T, Dr)
        return target_attn, target_repr, behaviour_attn, behaviour_repr

    def forward(self, history: Tensor, buckets: Tensor, candidate: Tensor, valid: Tensor | None = None) -> Tensor:
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        target_attn, target_repr, behaviour_attn, behaviour_repr = self._embed(history, buckets, candidate)
        pooled = dare_attention(target_attn, behaviour_attn, behaviour_repr, valid, self.num_heads,
                                reference=self.backend == "reference")
        return self.head(torch.cat([target_repr, pooled, target_repr * pooled], -1))[:, 0]

    @torch.no_grad()
    def attention_weights(self, history: Tensor, buckets: Tensor, candidate: Tensor, valid: Tensor | None = None):
        """``[B, T]``: the weights the model gives each behaviour (averaged over heads)."""
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        target_attn, _, behaviour_attn, _ = self._embed(history, buckets, candidate)
        return target_attention_weights(target_attn, behaviour_attn, valid, self.num_heads).mean(1)


def retrieval_recall(weights: Tensor, relevance: Tensor, k: int = 10) -> float:
    """Top-k search quality: of the ``k`` behaviours with the highest true ``relevance [B, T]``
    (only those with relevance > 0 count), the share found among the ``k`` with the highest
    learned ``weights [B, T]``. Rows with no relevant behaviour are skipped."""
    if weights.shape != relevance.shape or weights.dim() != 2:
        raise ValueError(f"weights and relevance must both be [B, T], got {tuple(weights.shape)} and "
                         f"{tuple(relevance.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= weights.shape[1]:
        raise ValueError(f"k must be an integer in [1, {weights.shape[1]}], got {k!r}")
    true_top = relevance.topk(k, dim=1).indices
    learned = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, weights.topk(k, dim=1).indices, True)
    true_mask = torch.zeros_like(learned).scatter_(1, true_top, True) & (relevance > 0)
    counted = true_mask.sum(1)
    keep = counted > 0
    found = (true_mask & learned).sum(1)
    return float((found[keep].double() / counted[keep].double()).mean())


def ctr_flops(batch: int, seq: int, config: dict):
    """Forward FLOPs of a target-attention CTR model: attention ``4 B T D`` (one query), the head MLP."""
    from ...cards import FlopCount

    D = config["dim"]
    head = 2.0 * batch * (3 * D * 64 + 64 * 32 + 32)
    return FlopCount(attention_fwd=4.0 * batch * seq * D, projection_fwd=head)
