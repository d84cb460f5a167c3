"""One file per mechanism; importing this package registers every card."""

from .base import AttentionLayer, check_input
from .multi_head import MultiHeadAttention
from .no_mixing import NoMixing

__all__ = ["AttentionLayer", "MultiHeadAttention", "NoMixing", "check_input"]
