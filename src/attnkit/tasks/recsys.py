"""A synthetic sequential-recommendation world with known structure, and its ranking and CTR metrics.

No recommendation data set can be downloaded here, so the recommendation modules of
:mod:`attnkit.models.recsys` (MQSA-TED, DARE, TIN) are measured on a world whose generating
process is written down, so that what each module is for has something to find:

- **items** belong to ``num_clusters`` clusters (their semantics, the "category" of CTR data);
  each item carries a scalar ``value`` (independent of its cluster) that only matters for the
  ``value_weight`` CTR variant (DARE's: attention must find the cluster, the representation
  must carry the value);
- **users** hold latent interests: a Dirichlet mixture over ``interests_per_user`` clusters;
- **behaviour sequences** follow a Markov chain: the next item is, with probability
  ``transition_prob``, one of the previous item's ``successors`` (fixed random items of any
  cluster, weights ``successor_weights``: the transitional signal MQSA-TED distils), else an
  item of a cluster drawn from the user's interests (the collaborative signal);
- **timestamps**: gaps are exponential with mean ``mean_gap``; the CTR label is target-aware in
  time and semantics (TIN's assumption): a behaviour raises the click probability of candidate
  ``c`` by ``relevance_i = [cluster(i) == cluster(c)] * exp(-(t_target - t_i) / decay)``
  (times ``1 + value_weight * value(i)``), so behaviours related to the candidate and recent
  matter most::

      logit = click_bias + click_scale * sum_i relevance_i * (1 + value_weight * value(i))

Tasks: **next-item prediction** (:meth:`RecsysWorld.next_item_data`) scored by HR@10 and
NDCG@10 over a **full ranking of all items** (no sampled negatives, history items not
excluded); **CTR prediction** (:meth:`RecsysWorld.ctr_data`): a candidate item (half from the
user's interest clusters, half uniform) and a click label drawn from the logit above, scored by
AUC. Both return the generating quantities (the true next-item distribution, the true click
probability, the true per-behaviour relevance) so the Bayes ceiling and an attention-quality
metric come for free. Everything is a function of ``seed`` and of the generator passed in.

    >>> import torch
    >>> world = RecsysWorld(seed=0)
    >>> data = world.next_item_data(8, 20, torch.Generator().manual_seed(1))
    >>> data["items"].shape, data["next_probs"].shape
    (torch.Size([8, 21]), torch.Size([8, 200]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import whole_number

__all__ = ["RecsysWorld", "hit_rate_at_k", "ndcg_at_k", "auc", "ranks", "time_buckets"]


def _fraction(value, name: str, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def time_buckets(gaps: Tensor, num_buckets: int) -> Tensor:
    """Log-spaced bucket of each time gap (``t_target - t_i`` >= 0): ``floor(log2(1 + 4 gap))``,
    clipped to ``num_buckets - 1``. Bucket 0 is "now" (the target itself)."""
    return torch.log2(1 + 4 * gaps.clamp(min=0)).floor().long().clamp(max=num_buckets - 1)


@dataclass
class RecsysWorld:
    num_items: int = 200
    num_clusters: int = 10
    interests_per_user: int = 2
    successors: int = 3
    successor_weights: tuple = (0.6, 0.3, 0.1)
    transition_prob: float = 0.5
    mean_gap: float = 1.0
    decay: float = 3.0
    click_scale: float = 2.0
    click_bias: float = -1.5
    value_weight: float = 0.0
    num_time_buckets: int = 8
    seed: int = 0
    item_cluster: Tensor = field(init=False, repr=False)
    item_value: Tensor = field(init=False, repr=False)
    successor_table: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        whole_number(self.num_items, "num_items", minimum=2)
        whole_number(self.num_clusters, "num_clusters", minimum=1)
        if self.num_clusters > self.num_items:
            raise ValueError(f"num_clusters must be at most num_items ({self.num_items}), got {self.num_clusters}")
        whole_number(self.interests_per_user, "interests_per_user", minimum=1)
        if self.interests_per_user > self.num_clusters:
            raise ValueError(f"interests_per_user must be at most num_clusters ({self.num_clusters}), "
                             f"got {self.interests_per_user}")
        whole_number(self.successors, "successors", minimum=1)
        weights = self.successor_weights
        if (not isinstance(weights, (tuple, list)) or len(weights) != self.successors
                or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights)
                or sum(weights) <= 0):
            raise ValueError(f"successor_weights must be {self.successors} non-negative numbers (one per successor) "
                             f"with a positive sum, got {weights!r}")
        _fraction(self.transition_prob, "transition_prob")
        _positive(self.mean_gap, "mean_gap")
        _positive(self.decay, "decay")
        for name in ("click_scale", "click_bias", "value_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        whole_number(self.num_time_buckets, "num_time_buckets", minimum=2)
        whole_number(self.seed, "seed", minimum=0)
        g = torch.Generator().manual_seed(self.seed)
        # balanced clusters in a random order: cluster c holds about num_items / num_clusters items
        self.item_cluster = (torch.randperm(self.num_items, generator=g) % self.num_clusters)
        self.item_value = torch.randn(self.num_items, generator=g, dtype=torch.float64).clamp(-2, 2)
        # successors of item i: random items of any cluster, none equal to i
        succ = torch.randint(0, self.num_items - 1, (self.num_items, self.successors), generator=g)
        self.successor_table = succ + (succ >= torch.arange(self.num_items)[:, None]).long()
        w = torch.tensor(weights, dtype=torch.float64)
        self._succ_weights = w / w.sum()
        self._cluster_items = torch.nn.functional.one_hot(self.item_cluster, self.num_clusters).double().T  # (K, N)
        self._cluster_items = self._cluster_items / self._cluster_items.sum(1, keepdim=True)

    # -- the generating process --------------------------------------------------------------
    def sample_interests(self, batch: int, generator: torch.Generator) -> Tensor:
        """Users' interest mixtures over clusters, ``[B, K]`` (rows sum to 1, ``interests_per_user``
        clusters non-zero)."""
        whole_number(batch, "batch", minimum=1)
        scores = torch.rand(batch, self.num_clusters, generator=generator)
        chosen = scores.argsort(dim=1)[:, : self.interests_per_user]
        weights = -torch.log(torch.rand(batch, self.interests_per_user, generator=generator).clamp_min(1e-12))
        mix = torch.zeros(batch, self.num_clusters, dtype=torch.float64)
        mix.scatter_(1, chosen, weights.double())  # Dirichlet(1) weights on the chosen clusters
        return mix / mix.sum(1, keepdim=True)

    def interest_item_probs(self, interests: Tensor) -> Tensor:
        """``[B, N]``: the item distribution of the collaborative (interest) branch."""
        return interests @ self._cluster_items

    def next_probs(self, previous: Tensor, interests: Tensor, *, item_probs: Tensor | None = None) -> Tensor:
        """The true next-item distribution ``[B, N]`` after item ``previous [B]`` (``item_probs``:
        :meth:`interest_item_probs` of ``interests`` if already computed)."""
        item_probs = self.interest_item_probs(interests) if item_probs is None else item_probs
        probs = (1 - self.transition_prob) * item_probs
        succ = torch.zeros_like(probs)
        succ.scatter_add_(1, self.successor_table[previous], self._succ_weights.expand(len(previous), -1).clone())
        return probs + self.transition_prob * succ

    def sample_sequences(self, interests: Tensor, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Items ``[B, length]`` (long) and timestamps ``[B, length]`` (float64, increasing)."""
        whole_number(length, "length", minimum=1)
        batch = interests.shape[0]
        item_probs = self.interest_item_probs(interests)  # once, not once per step
        items = [torch.multinomial(item_probs, 1, generator=generator)[:, 0]]
        for _ in range(length - 1):
            probs = self.next_probs(items[-1], interests, item_probs=item_probs)
            items.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
        gaps = -self.mean_gap * torch.log(torch.rand(batch, length, generator=generator, dtype=torch.float64)
                                          .clamp_min(1e-12))
        return torch.stack(items, 1), gaps.cumsum(1)

    # -- tasks --------------------------------------------------------------------------------
    def next_item_data(self, batch: int, length: int, generator: torch.Generator) -> dict:
        """``items [B, length + 1]``: the model reads ``items[:, :-1]`` and predicts
        ``items[:, 1:]`` (next-item training at every position; evaluation on the last);
        ``next_probs [B, N]``: the true distribution of the last item given the rest."""
        whole_number(length, "length", minimum=1)
        interests = self.sample_interests(batch, generator)
        items, _ = self.sample_sequences(interests, length + 1, generator)
        return {"items": items, "interests": interests, "next_probs": self.next_probs(items[:, -2], interests)}

    def ctr_data(self, batch: int, length: int, generator: torch.Generator) -> dict:
        """A behaviour history, a candidate and a click label per row:

        ``history [B, T]`` items (oldest first), ``gaps [B, T]`` = ``t_target - t_i`` (float64),
        ``buckets [B, T]`` its :func:`time_buckets`, ``candidate [B]``, ``label [B]`` (0/1 float),
        ``click_prob [B]`` (the true probability), ``relevance [B, T]`` (each behaviour's true
        weight ``[same cluster] * exp(-gap / decay)``), ``history_cluster``, ``candidate_cluster``.
        """
        interests = self.sample_interests(batch, generator)
        history, times = self.sample_sequences(interests, length, generator)
        target_time = times[:, -1] - self.mean_gap * torch.log(
            torch.rand(batch, generator=generator, dtype=torch.float64).clamp_min(1e-12))
        gaps = target_time[:, None] - times
        from_interest = torch.multinomial(self.interest_item_probs(interests), 1, generator=generator)[:, 0]
        uniform = torch.randint(0, self.num_items, (batch,), generator=generator)
        candidate = torch.where(torch.rand(batch, generator=generator) < 0.5, from_interest, uniform)
        same = self.item_cluster[history] == self.item_cluster[candidate][:, None]
        relevance = same.double() * torch.exp(-gaps / self.decay)
        contribution = relevance * (1 + self.value_weight * self.item_value[history])
        click_prob = torch.sigmoid(self.click_bias + self.click_scale * contribution.sum(1))
        label = (torch.rand(batch, generator=generator, dtype=torch.float64) < click_prob).double()
        return {"history": history, "gaps": gaps, "buckets": time_buckets(gaps, self.num_time_buckets),
                "candidate": candidate, "label": label, "click_prob": click_prob, "relevance": relevance,
                "history_cluster": self.item_cluster[history], "candidate_cluster": self.item_cluster[candidate]}


# -- metrics ----------------------------------------------------------------------------------
def ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each row's target item in a full ranking: the number of items scored
    strictly higher (ties are resolved in the target's favour). ``scores [B, N]``, ``targets [B]``."""
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [B, N] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    target_scores = scores.gather(1, targets[:, None].long())
    return (scores > target_scores).sum(1)


def _k(k) -> int:
    return whole_number(k, "k", minimum=1)


def hit_rate_at_k(scores: Tensor, targets: Tensor, k: int = 10) -> float:
    """HR@k: the share of rows whose target ranks in the top ``k``."""
    return float((ranks(scores, targets) < _k(k)).double().mean())


def ndcg_at_k(scores: Tensor, targets: Tensor, k: int = 10) -> float:
    """NDCG@k with one relevant item: ``1 / log2(rank + 2)`` if ``rank < k`` else 0, averaged."""
    r = ranks(scores, targets).double()
    return float(torch.where(r < _k(k), 1 / torch.log2(r + 2), torch.zeros_like(r)).mean())


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties counted one half. ``scores [B]``,
    ``labels [B]`` in {0, 1}; both classes must be present."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same number of entries, got {scores.numel()} "
                         f"and {labels.numel()}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"auc needs both classes, got {len(pos)} positive and {len(neg)} negative labels")
    greater = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(greater / (len(pos) * len(neg)))
