"""One file per mechanism; importing this package registers every card."""

from .base import AttentionLayer, check_input
from .multi_head import MultiHeadAttention

__all__ = ["AttentionLayer", "MultiHeadAttention", "check_input"]
