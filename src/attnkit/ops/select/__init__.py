"""Selection ops: the k-th largest value of every prefix (``prefix_quantile``), DMA's thresholds."""
