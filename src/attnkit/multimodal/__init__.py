"""Attention that fuses the tokens of several modalities (issue 28, family ``multimodal``).

:mod:`attnkit.multimodal.moda`: MODA's modular duplex attention (arXiv 2507.04635) and the joint-attention
baseline; :mod:`attnkit.multimodal.task`: the paired two-modality task they are compared on.
"""

from .moda import CARDS, MASKS, ModularDuplexAttention, duplex_align, moda_reference

__all__ = ["CARDS", "MASKS", "ModularDuplexAttention", "duplex_align", "moda_reference"]
