"""Training and evaluation of the recsys models on :class:`attnkit.tasks.recsys.RecsysWorld`.

Finite data, as in practice: a fixed training set drawn from the world (``seed``), several
epochs over it, a held-out set of fresh users for the metrics. :func:`run_next_item` trains an
:class:`~attnkit.models.recsys.MQSA` (or SASRec) and reports HR@10 / NDCG@10 over a full
ranking of all items; :func:`run_ctr` trains a CTR model (DARE, TIN, DIN) and reports AUC and,
for models with attention weights, :func:`~attnkit.models.recsys.retrieval_recall` against the
world's true behaviour relevance. Both also give the Bayes ceiling (the world's own
probabilities scored by the same metric).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...tasks.recsys import RecsysWorld, auc, hit_rate_at_k, ndcg_at_k
from .dare import retrieval_recall
from .mqsa import MQSA, transition_counts, transition_distillation_loss

__all__ = ["run_next_item", "run_ctr"]


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def run_next_item(model: MQSA, world: RecsysWorld, *, seed: int = 0, train_users: int = 3000, eval_users: int = 2000,
                  length: int = 20, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                  ted_weight: float = 0.0, ted_tau: float = 0.1, k: int = 10) -> dict:
    """Train ``model`` on ``train_users`` sequences of ``length + 1`` items, evaluate the last item of
    ``eval_users`` fresh sequences. ``ted_weight`` > 0 adds TED with the transition counts of the
    training set."""
    g = torch.Generator().manual_seed(seed)
    train = world.next_item_data(train_users, length, g)["items"]
    held = world.next_item_data(eval_users, length, torch.Generator().manual_seed(10_000 + seed))
    counts = transition_counts(train, world.num_items) if ted_weight > 0 else None
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in _batches(len(train), batch_size, g):
            seq = train[idx]
            scores = model(seq[:, :-1])  # (B, T, N)
            loss = F.cross_entropy(scores.reshape(-1, world.num_items), seq[:, 1:].reshape(-1))
            if counts is not None:
                table = model.item_embedding.weight[: world.num_items]
                loss = loss + ted_weight * transition_distillation_loss(table, seq[:, :-1].reshape(-1), counts, ted_tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(held["items"][:, :-1])[:, -1]
    target = held["items"][:, -1]
    return {"hr": hit_rate_at_k(scores, target, k), "ndcg": ndcg_at_k(scores, target, k),
            "oracle_hr": hit_rate_at_k(held["next_probs"], target, k),
            "oracle_ndcg": ndcg_at_k(held["next_probs"], target, k), "seconds": time.perf_counter() - start}


def run_ctr(model, world: RecsysWorld, *, seed: int = 0, train_rows: int = 20000, eval_rows: int = 5000,
            length: int = 50, epochs: int = 5, batch_size: int = 256, lr: float = 3e-3, k: int = 10) -> dict:
    """Train a CTR model (``model(history, buckets, candidate) -> logit``) with binary cross-entropy;
    AUC on fresh users; ``recall`` (top-``k`` search against the true relevance) when the model
    has ``attention_weights``."""
    g = torch.Generator().manual_seed(seed)
    train = world.ctr_data(train_rows, length, g)
    held = world.ctr_data(eval_rows, length, torch.Generator().manual_seed(10_000 + seed))
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in _batches(train_rows, batch_size, g):
            logit = model(train["history"][idx], train["buckets"][idx], train["candidate"][idx])
            loss = F.binary_cross_entropy_with_logits(logit, train["label"][idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logit = model(held["history"], held["buckets"], held["candidate"])
    out = {"auc": auc(logit, held["label"]), "oracle_auc": auc(held["click_prob"], held["label"]),
           "seconds": time.perf_counter() - start}
    if hasattr(model, "attention_weights"):
        weights = model.attention_weights(held["history"], held["buckets"], held["candidate"])
        out["recall"] = retrieval_recall(weights, held["relevance"], k)
    return out
