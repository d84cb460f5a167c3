"""The vision modules' cards (``kind="vision"``), listed explicitly. ``seq`` in a FLOP model is the number
of patch tokens N per image; ``batch`` the number of images."""

from __future__ import annotations

from ..cards import Capabilities, Card
from .concepts import ConceptCentricTransformer, cct_flops
from .lookupvit import LookupViTBlock, lookupvit_block_flops
from .probing import AttentiveProbe, EfficientProbe, LinearProbe, probe_flops
from .vit import ViTBlock, vit_block_flops

__all__ = ["CARDS"]

_CAPS = Capabilities(causal=False, bidirectional=True, decode=False, varlen=False, backends=("reference", "sdpa"))


def _probe(kind: str):
    def flops(batch: int, seq: int, config: dict):
        return probe_flops(batch, seq, {**config, "probe": kind})

    return flops


CARDS = (
    Card("vit-block", "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", "2010.11929",
         "vision", ViTBlock, vit_block_flops, defaults={"mlp_ratio": 4.0}, kind="vision", capabilities=_CAPS,
         summary="pre-norm self-attention over all N patch tokens and a 4x MLP: LookupViT's baseline"),
    Card("lookupvit", "LookupViT: Compressing visual information to a limited number of tokens", "2407.12753",
         "vision", LookupViTBlock, lookupvit_block_flops,
         defaults={"num_compressed": 16, "mlp_ratio": 4.0, "lookup_mlp_ratio": 0.5}, kind="vision",
         capabilities=_CAPS,
         summary="M compressed tokens gather from the N lookup tokens by cross-attention, get the heavy "
                 "self-attention and MLP, and scatter back through the same (transposed) attention logits"),
    Card("linear-probe", "Linear probing (mean-pooled frozen features)", None, "pooling", LinearProbe,
         _probe("linear"), defaults={"num_classes": 10}, kind="vision", capabilities=_CAPS,
         summary="mean over the patch features, BatchNorm, linear classifier"),
    Card("attentive-probe", "Attentive probing (a learned query through multi-head cross-attention)", None,
         "pooling", AttentiveProbe, _probe("attentive"), defaults={"num_classes": 10, "num_queries": 1},
         kind="vision", capabilities=_CAPS,
         summary="one learned query, W_q W_k W_v W_o over the frozen patch features, then a linear classifier"),
    Card("efficient-probe", "Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency",
         "2506.10178", "pooling", EfficientProbe, _probe("efficient"),
         defaults={"num_classes": 10, "num_queries": 8, "d_out": 1}, kind="vision",
         capabilities=Capabilities(causal=False, bidirectional=True, decode=False, varlen=False, backends=("reference",)),
         summary="M learned queries attend to the raw features (no W_q, W_k, W_o); one value projection "
                 "C -> C/d_out split among the queries"),
    Card("cct", "Concept-Centric Transformers: Enhancing Model Interpretability through Object-Centric Concept "
         "Learning within a Shared Global Workspace", "2305.15775", "vision", ConceptCentricTransformer, cct_flops,
         defaults={"num_concepts": 8, "num_classes": 10}, kind="vision", capabilities=_CAPS,
         summary="slot attention gathers concept slots into a shared workspace; tokens cross-attend to it and "
                 "the concept attention explains the prediction"),
)
