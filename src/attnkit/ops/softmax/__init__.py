"""Exact softmax attention: :func:`attend` behind one call (``dispatch``), its float64 reference
(``reference``) and the backends it dispatches to (``sdpa``, ``flex``, ``cudnn_band``), the
picked-rows split of MoH (``picked_causal``) and the log-sum-exp merges both build on
(``row_merge_triton``, ``sink_merge_triton``)."""

from .dispatch import BACKENDS, attend, choose_backend
from .flex import block_mask_for, clear_block_mask_cache
from .reference import attend_reference
from .sdpa import set_sdpa_priority

__all__ = ["attend", "attend_reference", "block_mask_for", "choose_backend", "clear_block_mask_cache", "BACKENDS",
           "set_sdpa_priority"]
