"""Pure attention functions ``(q, k, v) -> out``, one package per family, each with a plain
reference beside its fast paths: ``softmax`` (:func:`attend`), ``sigmoid``, ``linear``
(Lightning, Flow, prefix sums) and ``select`` (prefix quantiles)."""

from .sigmoid import sigmoid_attend, sigmoid_attend_reference
from .softmax import BACKENDS, attend, attend_reference, block_mask_for, choose_backend, clear_block_mask_cache, set_sdpa_priority

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
