"""Recommendation models built on attention (issue 28, the ``recsys`` family): MQSA-TED, DARE
and TIN, each beside the baseline its paper beats (SASRec, shared embeddings, DIN), measured on
the synthetic world of :mod:`attnkit.tasks.recsys` (docs/recsys.md).

These are not layers ``x [B, T, C] -> [B, T, C]``: they read item ids, so their cards are of
kind ``"recsys"`` and live in :data:`CARDS` here, not in the layer registry.

    >>> import torch
    >>> from attnkit.models.recsys import CARDS
    >>> model = CARDS[0].build(32, 2, num_items=50)   # mqsa-ted
    >>> model(torch.randint(0, 50, (4, 10))).shape
    torch.Size([4, 10, 50])
"""

from __future__ import annotations

from ...cards import Capabilities, Card
from .dare import DARE, ctr_flops, dare_attention, retrieval_recall
from .mqsa import (MQSA, LQueryBlock, l_query_attention, l_query_attention_reference, mqsa_flops,
                   transition_counts, transition_distillation_loss, window_mean, window_mean_reference)
from .target import target_attention, target_attention_reference, target_attention_weights
from .tin import DIN, TIN, din_flops, tin_attention, tin_attention_reference

__all__ = ["CARDS", "MQSA", "LQueryBlock", "DARE", "TIN", "DIN", "l_query_attention", "l_query_attention_reference",
           "window_mean", "window_mean_reference", "transition_counts", "transition_distillation_loss",
           "target_attention", "target_attention_reference", "target_attention_weights", "dare_attention",
           "retrieval_recall", "tin_attention", "tin_attention_reference"]

_MQSA = ("Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for "
         "Sequential Recommendation")
_DARE = "Long-Sequence Recommendation Models Need Decoupled Embeddings"
_TIN = "Temporal Interest Network for User Response Prediction"
_NEXT = Capabilities(causal=True, bidirectional=False, decode=False, varlen=True, backends=("reference", "sdpa"))
_CTR = Capabilities(causal=False, bidirectional=True, decode=False, varlen=True, backends=("reference", "sdpa"))

#: the recsys cards (kind ``"recsys"``): each module, then its baseline
CARDS: tuple[Card, ...] = (
    Card("mqsa-ted", _MQSA, "2311.01056", "recsys", MQSA, mqsa_flops, defaults={"window": 3, "alpha": 0.5},
         capabilities=_NEXT, kind="recsys",
         summary="next-item model: short (1-item) and long (L-item pooled) query branches; train with "
                 "transition_distillation_loss (TED)"),
    Card("sasrec", "Self-Attentive Sequential Recommendation", "1808.09781", "recsys", MQSA, mqsa_flops,
         defaults={"alpha": 1.0}, capabilities=_NEXT, kind="recsys",
         summary="MQSA-TED's baseline: single-item queries, no distillation"),
    Card("dare", _DARE, "2410.02604", "recsys", DARE, ctr_flops, defaults={"decoupled": True},
         capabilities=_CTR, kind="recsys",
         summary="CTR target attention: attention weights from one embedding table, pooled vectors from another"),
    Card("dare-shared", _DARE, "2410.02604", "recsys", DARE, ctr_flops, defaults={"decoupled": False},
         capabilities=_CTR, kind="recsys", summary="DARE's baseline: one table for attention and representation"),
    Card("tin", _TIN, "2308.08487", "recsys", TIN, ctr_flops, capabilities=_CTR, kind="recsys",
         summary="CTR: target-aware temporal encoding, target-aware attention and representation"),
    Card("din", "Deep Interest Network for Click-Through Rate Prediction", "1706.06978", "recsys", DIN, din_flops,
         capabilities=Capabilities(causal=False, bidirectional=True, decode=False, varlen=True,
                                   backends=("reference",)),
         kind="recsys", summary="TIN's baseline: activation-unit target attention, no time"),
)
