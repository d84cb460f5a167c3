"""TIN: the Temporal Interest Network, against DIN's target attention.

Paper: "Temporal Interest Network for User Response Prediction", Zhou et al., WWW 2024, arXiv
2308.08487 (official TensorFlow code: github zhouxy1003/TIN, read for this file; not copied).

TIN's claim: a behaviour matters for a candidate through the *semantic-temporal correlation*:
related to the candidate and close to it in time. It captures this with

- **target-aware temporal encoding**: each behaviour's embedding gets the embedding of its time
  position relative to the target, ``e~_i = e_i + p(t_target - t_i)``, the target its own,
  ``v~ = v + p(0)``;
- **target-aware attention**: ``w_i = softmax_i(<e~_i, v~> / sqrt(D))``; the inner product of
  two sums splits into semantic, temporal and cross terms, so the weight is, up to normalisation,
  ``exp(semantic) * exp(temporal) * ...``: a product, as the correlation needs;
- **target-aware representation**: ``u = sum_i w_i (e~_i * v~)`` (element-wise product with the
  target), fed to the prediction MLP with ``v~``.

The official code computes ``sum_i w_i e~_i`` and multiplies by the target embedding at the
MLP's input (``[u, v, u * v]``); the product is the same up to its normalisation layers.

DIN (Zhou et al., arXiv 1706.06978), the baseline: an activation unit
``w_i = MLP([e_i, v, e_i - v, e_i * v])`` (not normalised), ``u = sum_i w_i e_i``, MLP on
``[u, v, u * v]``; ``use_time=True`` adds the same time embeddings to the behaviours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dare import _head, _positive_int, check_ctr_inputs
from .target import target_attention, target_attention_reference, target_attention_weights

__all__ = ["TIN", "DIN", "tin_attention", "tin_attention_reference", "din_flops"]


def _check_tin(target, behaviours, target_time, behaviour_time):
    if target_time.shape != target.shape or behaviour_time.shape != behaviours.shape:
        raise ValueError(f"target_time must be shaped like target {tuple(target.shape)} and behaviour_time like "
                         f"behaviours {tuple(behaviours.shape)}; got {tuple(target_time.shape)} and "
                         f"{tuple(behaviour_time.shape)}")


def tin_attention_reference(target: Tensor, behaviours: Tensor, target_time: Tensor, behaviour_time: Tensor,
                            valid: Tensor, num_heads: int = 1) -> Tensor:
    """``u = sum_i softmax_i(<e_i + p_i, v + p_t> / sqrt(D)) ((e_i + p_i) * (v + p_t))``, materialised.
    ``target, target_time [B, D]``; ``behaviours, behaviour_time [B, T, D]`` -> ``[B, D]``."""
    _check_tin(target, behaviours, target_time, behaviour_time)
    v = target + target_time  # (B, D)
    e = behaviours + behaviour_time  # (B, T, D)
    B, T, D = e.shape
    target_attention_reference(v, e, e, valid, num_heads)  # for its input checks
    weights = target_attention_weights(v, e, valid, num_heads)  # (B, H, T)
    product = (e * v[:, None]).view(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, H, T, D/H)
    return (weights[..., None] * product).sum(2).reshape(B, D)


def tin_attention(target: Tensor, behaviours: Tensor, target_time: Tensor, behaviour_time: Tensor,
                  valid: Tensor, num_heads: int = 1) -> Tensor:
    """:func:`tin_attention_reference` as one SDPA call: ``sum_i w_i (e_i * v) = (sum_i w_i e_i) * v``."""
    _check_tin(target, behaviours, target_time, behaviour_time)
    v = target + target_time
    e = behaviours + behaviour_time
    return target_attention(v, e, e, valid, num_heads) * v


class TIN(nn.Module):
    """TIN for CTR. ``history [B, T]``, ``buckets [B, T]`` (time position relative to the target,
    0 = now), ``candidate [B]`` -> click logit ``[B]``."""

    def __init__(self, dim: int = 16, num_heads: int = 1, *, num_items: int = 200, num_time_buckets: int = 8,
                 backend: str = "sdpa"):
        super().__init__()
        self.num_items = _positive_int(num_items, "num_items")
        self.num_time_buckets = _positive_int(num_time_buckets, "num_time_buckets")
        _positive_int(dim, "dim")
        if _positive_int(num_heads, "num_heads") and dim % num_heads:
            raise ValueError(f"num_heads must divide dim={dim}, got {num_heads}")
        if backend not in ("sdpa", "reference"):
            raise ValueError(f"backend must be 'sdpa' or 'reference', got {backend!r}")
        self.num_heads, self.backend = num_heads, backend
        self.item = nn.Embedding(num_items, dim)
        self.time = nn.Embedding(num_time_buckets, dim)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.normal_(self.time.weight, std=0.1)
        self.head = _head(2 * dim)

    def forward(self, history: Tensor, buckets: Tensor, candidate: Tensor, valid: Tensor | None = None) -> Tensor:
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        v, p_t = self.item(candidate), self.time(torch.zeros_like(candidate))
        attend = tin_attention_reference if self.backend == "reference" else tin_attention
        u = attend(v, self.item(history), p_t, self.time(buckets), valid, self.num_heads)  # (B, D)
        return self.head(torch.cat([u, v + p_t], -1))[:, 0]

    @torch.no_grad()
    def attention_weights(self, history, buckets, candidate, valid=None) -> Tensor:
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        v = self.item(candidate) + self.time(torch.zeros_like(candidate))
        return target_attention_weights(v, self.item(history) + self.time(buckets), valid, self.num_heads).mean(1)


class DIN(nn.Module):
    """DIN's target attention (activation unit, unnormalised weights). Same inputs as :class:`TIN`;
    ``use_time``: add time-position embeddings to the behaviours (off in the DIN paper)."""

    def __init__(self, dim: int = 16, num_heads: int = 1, *, num_items: int = 200, num_time_buckets: int = 8,
                 use_time: bool = False):
        super().__init__()
        self.num_items = _positive_int(num_items, "num_items")
        self.num_time_buckets = _positive_int(num_time_buckets, "num_time_buckets")
        _positive_int(dim, "dim")
        if num_heads != 1:
            raise ValueError(f"num_heads must be 1 (DIN's activation unit gives one weight per behaviour), got {num_heads!r}")
        if not isinstance(use_time, bool):
            raise ValueError(f"use_time must be True or False, got {use_time!r}")
        self.use_time = use_time
        self.item = nn.Embedding(num_items, dim)
        self.time = nn.Embedding(num_time_buckets, dim) if use_time else None
        nn.init.normal_(self.item.weight, std=0.1)
        self.activation_unit = nn.Sequential(nn.Linear(4 * dim, 36), nn.PReLU(), nn.Linear(36, 1))
        self.head = _head(3 * dim)

    def _weights(self, e, v, valid):
        v = v[:, None].expand_as(e)
        w = self.activation_unit(torch.cat([e, v, e - v, e * v], -1))[..., 0]  # (B, T)
        return w * valid

    def forward(self, history: Tensor, buckets: Tensor, candidate: Tensor, valid: Tensor | None = None) -> Tensor:
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        e, v = self.item(history), self.item(candidate)
        if self.time is not None:
            e = e + self.time(buckets)
        u = (self._weights(e, v, valid)[..., None] * e).sum(1)  # (B, D)
        return self.head(torch.cat([u, v, u * v], -1))[:, 0]

    @torch.no_grad()
    def attention_weights(self, history, buckets, candidate, valid=None) -> Tensor:
        valid = check_ctr_inputs(self, history, buckets, candidate, valid)
        e = self.item(history) + (self.time(buckets) if self.time is not None else 0)
        return self._weights(e, self.item(candidate), valid)


def din_flops(batch: int, seq: int, config: dict):
    """Forward FLOPs of DIN: the activation unit (an MLP ``4D -> 36 -> 1`` per behaviour) is its
    attention; the weighted sum ``2 B T D``; the head MLP as for the other CTR models."""
    from ...cards import FlopCount
    from .dare import ctr_flops

    D = config["dim"]
    unit = 2.0 * batch * seq * (4 * D * 36 + 36) + 2.0 * batch * seq * D
    return FlopCount(attention_fwd=unit, projection_fwd=ctr_flops(batch, seq, config).projection_fwd)
