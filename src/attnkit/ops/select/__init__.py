"""Selection ops: the k-th largest value of every prefix (``prefix_quantile``), DMA's thresholds."""

from .prefix_quantile import kth_largest_of_prefixes

__all__ = ["kth_largest_of_prefixes"]
