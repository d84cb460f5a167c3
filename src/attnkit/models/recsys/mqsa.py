"""MQSA-TED: multi-query self-attention with transition-aware embedding distillation.

Paper: "Collaboration and Transition: Distilling Item Transitions into Multi-Query
Self-Attention for Sequential Recommendation", Zhu et al., WSDM 2024, arXiv 2311.01056
(official TensorFlow code: github zhuty16/MQSA-TED, read for this file; not copied).

**L-query self-attention.** SASRec's causal self-attention takes the query at position t from
item t alone. MQSA's long-query branch takes it from the mean of the last ``L`` items
(``L = window``; padding excluded), so the query stands for a short run of behaviour rather
than one item; keys and values stay per item. With H heads of width D, C = H D::

    q_t = LN(mean(x_{t-L+1..t})) W_q,    k_s = x_s W_k,    v_s = x_s W_v
    o_t = softmax_s<=t(q_t k_s^T / sqrt(D)) v      (per head, padded keys masked)
    h_t = LN(o_t + LN(mean(...))) ; h_t += FFN(h_t)       (the block around it)

The model runs a short-query branch (``L = 1``: SASRec) and a long-query branch
(``L = window``) on the same item embeddings and mixes their item scores,
``alpha * short + (1 - alpha) * long`` (the official code mixes logits so).

**TED.** A teacher built from item transitions of the training data (row ``i``: how often
item ``j`` followed item ``i``, scaled by its row maximum) gives soft labels
``softmax(row / tau)``; the student is the item embedding table itself,
``softmax(e_i E^T sqrt(C) / tau)``; the loss is their cross-entropy, added with weight
``lambda``. The official code uses the count rows directly as the teacher, as here.

SASRec is this model with ``alpha = 1`` (the long branch unused) and no TED.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["window_mean", "window_mean_reference", "l_query_attention", "l_query_attention_reference",
           "LQueryBlock", "MQSA", "transition_counts", "transition_distillation_loss", "mqsa_flops"]


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the number of items pooled into a query), got {window!r}")
    return window


def window_mean_reference(x: Tensor, valid: Tensor, window: int) -> Tensor:
    """Mean of ``x [B, T, C]`` over the last ``window`` positions ``s <= t`` that are ``valid [B, T]``
    (a loop over positions; 0 where none is valid)."""
    _check_window(window)
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        lo = max(0, t - window + 1)
        w = valid[:, lo : t + 1].to(x.dtype)  # (B, L)
        total = (x[:, lo : t + 1] * w[..., None]).sum(1)
        out[:, t] = total / w.sum(1, keepdim=True).clamp_min(1)
    return out


def window_mean(x: Tensor, valid: Tensor, window: int) -> Tensor:
    """:func:`window_mean_reference` by differences of a cumulative sum (O(T), not O(T L))."""
    _check_window(window)
    w = valid.to(x.dtype)[..., None]
    csum = F.pad((x * w).cumsum(1), (0, 0, 1, 0))  # (B, T + 1, C): csum[:, t] = sum of x[:, :t]
    ccount = F.pad(w.cumsum(1), (0, 0, 1, 0))
    T = x.shape[1]
    hi = torch.arange(1, T + 1, device=x.device)
    lo = (hi - window).clamp(min=0)
    total = csum[:, hi] - csum[:, lo]
    count = ccount[:, hi] - ccount[:, lo]
    return total / count.clamp_min(1)


def _check_attention_inputs(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> None:
    if queries.dim() != 3 or keys.shape != queries.shape or values.shape != queries.shape:
        raise ValueError(f"queries, keys and values must all be [B, T, C], got {tuple(queries.shape)}, "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if valid.shape != queries.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor [B, T] = {tuple(queries.shape[:2])}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or queries.shape[-1] % num_heads:
        raise ValueError(f"num_heads must be a positive integer dividing the width {queries.shape[-1]}, got {num_heads!r}")


def l_query_attention_reference(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> Tensor:
    """Causal multi-head attention of the (already pooled and projected) queries over keys
    ``[B, T, C]``, invalid keys masked; a row with no valid key gives 0 (as the official code's
    query masking does for padded positions). Plain float64-friendly math."""
    _check_attention_inputs(queries, keys, values, valid, num_heads)
    B, T, C = queries.shape
    D = C // num_heads
    q = queries.view(B, T, num_heads, D).transpose(1, 2)  # (B, H, T, D)
    k = keys.view(B, T, num_heads, D).transpose(1, 2)
    v = values.view(B, T, num_heads, D).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key: all -inf -> 0
    return (weights @ v).transpose(1, 2).reshape(B, T, C)


def l_query_attention(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> Tensor:
    """:func:`l_query_attention_reference` through ``scaled_dot_product_attention`` with a
    boolean causal-and-padding mask (rows with no valid key are zeroed after the call)."""
    _check_attention_inputs(queries, keys, values, valid, num_heads)
    B, T, C = queries.shape
    D = C // num_heads
    q, k, v = (t.view(B, T, num_heads, D).transpose(1, 2) for t in (queries, keys, values))  # (B, H, T, D)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & valid[:, None, None, :]
    any_key = allowed.any(-1, keepdim=True)  # (B, 1, T, 1)
    # a row with no key would be NaN in SDPA: give it one dummy key and zero its output
    safe = allowed | ~any_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe) * any_key
    return out.transpose(1, 2).reshape(B, T, C)


class LQueryBlock(nn.Module):
    """One MQSA block (``window = 1``: a SASRec block). ``x [B, T, C]``, ``valid [B, T]`` ->
    ``[B, T, C]``, padded positions zeroed."""

    def __init__(self, dim: int, num_heads: int, window: int = 1, dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive integer dividing dim={dim}, got {num_heads!r}")
        if backend not in ("sdpa", "reference"):
            raise ValueError(f"backend must be 'sdpa' or 'reference', got {backend!r}")
        self.window, self.num_heads, self.backend = _check_window(window), num_heads, backend
        self.query_norm, self.out_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        pool = window_mean if self.backend == "sdpa" else window_mean_reference
        pooled = self.query_norm(pool(x, valid, self.window))  # (B, T, C)
        attend = l_query_attention if self.backend == "sdpa" else l_query_attention_reference
        h = self.out_norm(attend(self.q_proj(pooled), self.k_proj(x), self.v_proj(x), valid, self.num_heads) + pooled)
        return (h + self.ffn(h)) * valid[..., None]


class MQSA(nn.Module):
    """MQSA for next-item prediction. ``items [B, T]`` (``num_items`` = padding) -> item scores
    ``[B, T, num_items]`` at every position (the scores of the item that comes next).

    ``window``: L, the items pooled into a long query; ``alpha``: the weight of the short-query
    (SASRec) branch; ``alpha = 1`` is SASRec (the long branch is then not built).
    """

    def __init__(self, dim: int = 32, num_heads: int = 2, *, num_items: int = 200, max_len: int = 50,
                 num_blocks: int = 1, window: int = 3, alpha: float = 0.5, dropout: float = 0.2,
                 backend: str = "sdpa"):
        super().__init__()
        for name, value in (("num_items", num_items), ("max_len", max_len), ("num_blocks", num_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1] (the short-query branch's weight), got {alpha!r}")
        self.num_items, self.max_len, self.alpha, self.dim = num_items, max_len, float(alpha), dim
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        with torch.no_grad():  # small, as the official code's (it scales by sqrt(C) at lookup)
            self.item_embedding.weight[:num_items].normal_(0, 0.05)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        blocks = lambda w: nn.ModuleList(LQueryBlock(dim, num_heads, w, dropout, backend) for _ in range(num_blocks))
        self.short_blocks = blocks(1) if self.alpha > 0 else None
        self.long_blocks = blocks(_check_window(window)) if self.alpha < 1 else None
        self.short_norm, self.long_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def item_scores(self, items: Tensor) -> Tensor:
        if items.dim() != 2 or items.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"items must be an integer tensor [B, T], got {items.dtype} {tuple(items.shape)}")
        if items.shape[1] > self.max_len:
            raise ValueError(f"items has {items.shape[1]} positions, more than max_len={self.max_len}")
        if items.numel() and (items.min() < 0 or items.max() > self.num_items):
            raise ValueError(f"items must lie in [0, {self.num_items}] ({self.num_items} = padding), got values in "
                             f"[{int(items.min())}, {int(items.max())}]")
        valid = items != self.num_items
        positions = torch.arange(items.shape[1], device=items.device)
        x = self.item_embedding(items) * math.sqrt(self.dim) + self.position_embedding(positions)
        x = self.dropout(x) * valid[..., None]
        table = self.item_embedding.weight[: self.num_items]  # (N, C)
        scores = 0.0
        for blocks, norm, weight in ((self.short_blocks, self.short_norm, self.alpha),
                                     (self.long_blocks, self.long_norm, 1 - self.alpha)):
            if blocks is None:
                continue
            h = x
            for block in blocks:
                h = block(h, valid)
            scores = scores + weight * (norm(h) @ table.T)
        return scores  # (B, T, N)

    forward = item_scores


def transition_counts(sequences: Tensor, num_items: int) -> Tensor:
    """``[N, N]`` float: how often item ``j`` directly followed item ``i`` in ``sequences [B, T]``
    (pairs with a padding item, index ``num_items``, are skipped)."""
    if sequences.dim() != 2 or sequences.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequences must be an integer tensor [B, T], got {sequences.dtype} {tuple(sequences.shape)}")
    if sequences.numel() and (sequences.min() < 0 or sequences.max() > num_items):
        raise ValueError(f"sequences must lie in [0, {num_items}] ({num_items} = padding), got values in "
                         f"[{int(sequences.min())}, {int(sequences.max())}]")
    heads, tails = sequences[:, :-1].reshape(-1), sequences[:, 1:].reshape(-1)
    keep = (heads < num_items) & (tails < num_items)
    counts = torch.zeros(num_items * num_items, dtype=torch.float64)
    counts.index_add_(0, heads[keep] * num_items + tails[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return counts.view(num_items, num_items)


def transition_distillation_loss(item_table: Tensor, heads: Tensor, counts: Tensor, tau: float = 0.1) -> Tensor:
    """TED: cross-entropy between the teacher ``softmax(counts[head] / max(counts[head]) / tau)`` and
    the student ``softmax(e_head E^T sqrt(C) / tau)``, averaged over ``heads [M]``.
    ``item_table [N, C]`` (no padding row), ``counts [N, N]``."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    if counts.shape != (item_table.shape[0], item_table.shape[0]):
        raise ValueError(f"counts must be [N, N] with N = {item_table.shape[0]} items, got {tuple(counts.shape)}")
    rows = counts[heads].to(item_table.dtype)
    teacher = torch.softmax(rows / (rows.amax(1, keepdim=True) + 1e-24) / tau, dim=1)
    logits = item_table[heads] * math.sqrt(item_table.shape[1]) @ item_table.T / tau
    return -(teacher * torch.log_softmax(logits, dim=1)).sum(1).mean()


def mqsa_flops(batch: int, seq: int, config: dict):
    """Forward FLOPs: attention core ``4 B T^2 C`` (causal: half) per block and branch, projections
    ``10 B T C^2`` (q, k, v and the FFN's two) per block and branch, plus the item scores ``2 B T C N``."""
    from ...cards import FlopCount

    C, blocks = config["dim"], config.get("num_blocks", 1)
    branches = (config.get("alpha", 0.5) > 0) + (config.get("alpha", 0.5) < 1)
    attention = branches * blocks * 2.0 * batch * seq * seq * C
    projection = branches * blocks * 10.0 * batch * seq * C * C + 2.0 * batch * seq * C * config["num_items"]
    return FlopCount(attention_fwd=attention, projection_fwd=projection)
