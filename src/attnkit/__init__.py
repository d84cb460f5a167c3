"""attnkit: attention mechanisms from recent research behind one PyTorch API.

    >>> import torch, attnkit
    >>> layer = attnkit.build("gqa", dim=256, num_heads=8)
    >>> y = layer(torch.randn(2, 16, 256))          # [B, T, C] -> [B, T, C]
"""

from . import patterns
from .ops import attend, attend_reference
from .registry import Card, build, get, mechanisms, register
from .state import KVCache, RecurrentState, State

__version__ = "0.1.0"

__all__ = [
    "attend",
    "attend_reference",
    "patterns",
    "build",
    "get",
    "mechanisms",
    "register",
    "Card",
    "State",
    "KVCache",
    "RecurrentState",
    "__version__",
]
