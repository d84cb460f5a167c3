"""Linear attention with a fixed-size state: Lightning (``lightning``: reference, chunked and
recurrent paths, dispatch; ``lightning_triton``: its chunk-parallel kernels), Flow-Attention
(``flow``), and the two-level prefix sums they and causal Agent attention share (``prefix_sum``)."""

from .flow import FLOW_BACKENDS, FlowState, flow_attend, flow_attend_reference
from .lightning import LIGHTNING_BACKENDS, alibi_slopes, lightning_attend, lightning_attend_reference

__all__ = ["lightning_attend", "lightning_attend_reference", "alibi_slopes", "LIGHTNING_BACKENDS", "flow_attend",
           "flow_attend_reference", "FlowState", "FLOW_BACKENDS"]
