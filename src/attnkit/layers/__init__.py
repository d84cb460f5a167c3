"""One file per mechanism; importing this package registers every card."""

from .base import AttentionLayer, check_input
from .dynamic_mask import DynamicMaskAttention
from .group import Chronos2Attention, GroupAttention
from .multi_head import MultiHeadAttention
from .no_mixing import NoMixing
from .rcmha import RelativeConvAttention
from .s2 import S2Attention
from .selective import SelectiveAttention
from .sigmoid import SigmoidAttention
from .streaming import SlidingWindowAttention, StreamingAttention

__all__ = [
    "AttentionLayer",
    "Chronos2Attention",
    "DynamicMaskAttention",
    "GroupAttention",
    "MultiHeadAttention",
    "NoMixing",
    "RelativeConvAttention",
    "S2Attention",
    "SelectiveAttention",
    "SigmoidAttention",
    "SlidingWindowAttention",
    "StreamingAttention",
    "check_input",
]
