"""Linear attention with a fixed-size state: Lightning (``lightning``: reference, chunked and
recurrent paths, dispatch; ``lightning_triton``: its chunk-parallel kernels), Flow-Attention
(``flow``), and the two-level prefix sums they and causal Agent attention share (``prefix_sum``)."""
