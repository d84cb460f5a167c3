"""One file per mechanism; importing this package registers every card."""

from .base import AttentionLayer, check_input
from .multi_head import MultiHeadAttention
from .no_mixing import NoMixing
from .s2 import S2Attention
from .sigmoid import SigmoidAttention
from .streaming import SlidingWindowAttention, StreamingAttention

__all__ = [
    "AttentionLayer",
    "MultiHeadAttention",
    "NoMixing",
    "S2Attention",
    "SigmoidAttention",
    "SlidingWindowAttention",
    "StreamingAttention",
    "check_input",
]
