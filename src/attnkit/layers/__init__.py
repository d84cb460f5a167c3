"""One file per mechanism; importing this package registers every card."""

from .base import AttentionLayer, check_input
from .deconstructed import DistanceAttention, SequenceIndependentAttention, StaticEmbeddingAttention
from .dynamic_mask import DynamicMaskAttention
from .group import Chronos2Attention, GroupAttention
from .multi_head import MultiHeadAttention
from .no_mixing import NoMixing
from .rcmha import RelativeConvAttention
from .s2 import S2Attention
from .selective import SelectiveAttention
from .sigmoid import SigmoidAttention
from .sparse_query import SparseQueryAttention
from .streaming import SlidingWindowAttention, StreamingAttention

__all__ = [
    "AttentionLayer",
    "Chronos2Attention",
    "DistanceAttention",
    "DynamicMaskAttention",
    "GroupAttention",
    "MultiHeadAttention",
    "NoMixing",
    "RelativeConvAttention",
    "S2Attention",
    "SelectiveAttention",
    "SequenceIndependentAttention",
    "SigmoidAttention",
    "SlidingWindowAttention",
    "SparseQueryAttention",
    "StaticEmbeddingAttention",
    "StreamingAttention",
    "check_input",
]
