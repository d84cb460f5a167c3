"""The routing modules' cards (``kind="routing"``, family ``"routing"``), listed explicitly. Each card builds a
:class:`~attnkit.routing.RoutedBlock` (attention + sparse MoE feed-forward, ``x [B, T, C] -> [B, T, C]``)
with one router; ``flops(batch, seq, config)`` counts the attention, the router's token-graph mixing
(``attention_fwd``) and the gate and experts (``projection_fwd``)."""

from __future__ import annotations

from ..cards import Capabilities, Card
from .blocks import RoutedBlock, routed_block_flops

__all__ = ["CARDS"]

_CAPS = Capabilities(causal=True, bidirectional=True, decode=False, varlen=False, backends=("reference", "sdpa"))
_TITLE = "Improving Routing in Sparse Mixture of Experts with Graph of Tokens"
_DEFAULTS = {"num_experts": 8, "top_k": 2}

CARDS = (
    Card("smoe-topk", "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", "1701.06538",
         "routing", RoutedBlock, routed_block_flops, defaults={**_DEFAULTS, "router": "topk"}, kind="routing",
         capabilities=_CAPS,
         summary="the SMoE baseline: each token routes on its own, top-k of softmax(W_g x); Switch load-balancing loss"),
    Card("smoe-similarity", _TITLE, "2505.00792", "routing", RoutedBlock, routed_block_flops,
         defaults={**_DEFAULTS, "router": "similarity"}, kind="routing", capabilities=_CAPS,
         summary="Similarity-Aware SMoE: a token's routing distribution is the mixture of its (causal) neighbours' "
                 "under a token-similarity graph softmax(x_i W_s x_j / tau), run through attend"),
    Card("smoe-attention", _TITLE, "2505.00792", "routing", RoutedBlock, routed_block_flops,
         defaults={**_DEFAULTS, "router": "attention"}, kind="routing", capabilities=_CAPS,
         summary="Attention-Aware SMoE: routing distributions mixed through the block's own attention matrix "
                 "(mean over heads), recomputed from its q and k inside attend"),
)
