"""Sparse mixture-of-experts routing (issue 28): the top-k SMoE baseline and the graph-of-tokens routers of
*Improving Routing in Sparse Mixture of Experts with Graph of Tokens* (arXiv 2505.00792): Similarity-Aware
and Attention-Aware SMoE.

- :mod:`~attnkit.routing.smoe`: :class:`SparseMoE` (``x [B, T, C] -> [B, T, C]``), the routers
  (:class:`TopKRouter`, :class:`SimilarityAwareRouter`, :class:`AttentionAwareRouter`), the Switch
  load-balancing loss, and the plain references the fast paths are tested against.
- :mod:`~attnkit.routing.blocks`: :class:`RoutedBlock` (attention + SMoE, the paper's MoE-Attention block),
  :class:`RoutedLM`, the FLOP models.
- :mod:`~attnkit.routing.metrics`: routing fluctuation and expert load.
- :mod:`~attnkit.routing.experiments`: the measured direction (docs/routing.md).

Their cards (``kind="routing"``, family ``routing``) are :data:`CARDS`, a list of their own: an MoE feed-forward
block is not an attention layer with decode state, so it stays out of the layer registry.

    >>> from attnkit.routing import CARDS
    >>> block = next(c for c in CARDS if c.name == "smoe-similarity").build(64, 4)
"""

from .blocks import RoutedBlock, RoutedLM, routed_block_flops, smoe_flops
from .cards import CARDS
from .metrics import expert_load, routing_fluctuation, top1_experts
from .smoe import (ROUTERS, AttentionAwareRouter, AttentionInputs, Experts, Routing, SimilarityAwareRouter, SparseMoE,
                   TopKRouter, balance_loss, select_top_k)

__all__ = ["CARDS", "SparseMoE", "TopKRouter", "SimilarityAwareRouter", "AttentionAwareRouter", "AttentionInputs",
           "Routing", "Experts", "ROUTERS", "balance_loss", "select_top_k", "RoutedBlock", "RoutedLM",
           "routed_block_flops", "smoe_flops", "routing_fluctuation", "expert_load", "top1_experts"]
