"""Vision modules over image patch tokens (issue 28): LookupViT's compressed-token block against the ViT
block, probes over frozen patch features (linear, the standard attentive probe, efficient probing),
and the Concept-Centric Transformer head with its concept explanations.

Their cards (``kind="vision"``, families ``vision`` and ``pooling``) are :data:`CARDS`, a list of
their own like ``attnkit.hf`` and ``attnkit.diffusion`` keep: the modules are not sequence layers
(no decode state, and a LookupViT block takes two token streams), so they stay out of the layer
registry and its shared layer tests. The image task is :mod:`attnkit.tasks.images`; the measured
directions are :mod:`attnkit.vision.experiments` (docs/vision.md).

    >>> from attnkit.vision import CARDS
    >>> block = next(c for c in CARDS if c.name == "lookupvit").build(64, 4, num_compressed=16)
"""

from .cards import CARDS
from .concepts import ConceptCentricTransformer, ConceptSlotAttention
from .lookupvit import LookupViTBlock, PatchClassifier, compress_grid
from .probing import AttentiveProbe, EfficientProbe, LinearProbe, probe_parameters
from .vit import ViTBlock

__all__ = ["CARDS", "ViTBlock", "LookupViTBlock", "PatchClassifier", "compress_grid", "LinearProbe", "AttentiveProbe",
           "EfficientProbe", "probe_parameters", "ConceptCentricTransformer", "ConceptSlotAttention"]
