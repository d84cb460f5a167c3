"""Pure attention functions ``(q, k, v) -> out``, each with a plain reference beside its fast paths."""

from .attention import BACKENDS, attend, attend_reference, block_mask_for, choose_backend, clear_block_mask_cache, set_sdpa_priority
from .sigmoid import sigmoid_attend, sigmoid_attend_reference

__all__ = [
    "attend",
    "attend_reference",
    "block_mask_for",
    "choose_backend",
    "clear_block_mask_cache",
    "BACKENDS",
    "set_sdpa_priority",
    "sigmoid_attend",
    "sigmoid_attend_reference",
]
