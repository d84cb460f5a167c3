"""What a card is: the description of one mechanism (paper, family, how to build it, what it
costs, what it can do), as plain data.

Each layer module defines its cards as module data (``CARDS = (Card(...), ...)``), with no
side effect; :mod:`attnkit.registry` lists those tuples explicitly. This module sits
below both (it imports only :mod:`attnkit.patterns`), so a layer file imports ``Card`` without
importing the registry, and the registry imports the layers without a circle.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from . import patterns as _patterns

__all__ = ["KINDS", "Card", "Capabilities", "FlopCount", "dense_attention_flops"]

#: what a card's ``layer`` is. ``"layer"``: an ``nn.Module`` ``x [B, T, C] -> [B, T, C]`` built
#: by :meth:`Card.build` (every card today). ``"hf"``: a method applied to a transformers model
#: (issue 22); ``"diffusion"``: a diffusers attention processor (issue 26). Each kind has one
#: explicit list of cards, kept by the package that owns the kind (docs/architecture.md).
KINDS = ("layer", "hf", "diffusion")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one layer call. Backward: 2.5 x forward for the attention core (the
    FlashAttention convention), 2 x forward for the projections (two matmuls per matmul)."""

    attention_fwd: float
    projection_fwd: float

    @property
    def attention_bwd(self) -> float:
        return 2.5 * self.attention_fwd

    @property
    def projection_bwd(self) -> float:
        return 2.0 * self.projection_fwd

    @property
    def fwd(self) -> float:
        return self.attention_fwd + self.projection_fwd

    @property
    def bwd(self) -> float:
        return self.attention_bwd + self.projection_bwd

    def total(self, mode: str = "fwd") -> float:
        return self.fwd if mode in ("fwd", "decode") else self.fwd + self.bwd

    def attention(self, mode: str = "fwd") -> float:
        return self.attention_fwd if mode in ("fwd", "decode") else self.attention_fwd + self.attention_bwd


@dataclass(frozen=True)
class Capabilities:
    causal: bool = True
    bidirectional: bool = True
    decode: bool = True
    varlen: bool = True
    backends: tuple[str, ...] = ("reference", "sdpa", "flex")


@dataclass(frozen=True)
class Card:
    """One mechanism. ``family`` groups mechanisms for people (``baseline``, ``sharing``,
    ``pattern``, ...); ``kind`` (one of :data:`KINDS`) says what ``layer`` is and so which
    package's list holds the card."""

    name: str
    title: str
    arxiv: str | None
    family: str
    layer: type
    flops: Callable[[int, int, dict], FlopCount]
    defaults: dict = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)
    summary: str = ""
    kind: str = "layer"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Card {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def paper(self) -> str:
        return f"{self.title} (arXiv {self.arxiv})" if self.arxiv else self.title

    def config(self, dim: int, num_heads: int, **options) -> dict:
        """Defaults, then options: the full keyword set the layer is built with. A default
        may be a function of ``(dim, num_heads)`` (e.g. GQA's ``num_kv_heads = H // 4``)."""
        defaults = {k: (v(dim, num_heads) if callable(v) else v) for k, v in self.defaults.items()}
        return {"dim": dim, "num_heads": num_heads, **defaults, **options}

    def build(self, dim: int, num_heads: int, **options):
        config = self.config(dim, num_heads, **options)
        accepted = self.accepted_options()  # through **options into the base classes
        unknown = sorted(k for k in config if k not in accepted)
        if unknown:
            raise ValueError(f"{self.name} does not take option(s) {unknown}; accepted: {', '.join(sorted(accepted))}")
        switches = self.switch_options()
        for key, value in options.items():  # a string "False" is truthy: the switch would be silently on
            if key in switches and not isinstance(value, bool):
                raise ValueError(f"{self.name}: option {key} is a switch, True or False; got {value!r}")
        try:
            return self.layer(**config)
        except TypeError as err:  # a layer forwarding **options to its parent
            if "unexpected keyword argument" not in str(err):
                raise
            raise ValueError(f"{self.name}: {err}") from None

    def _init_parameters(self):
        """The ``__init__`` parameters of the layer and, where it forwards ``**options`` to its base
        class (as the MultiHeadAttention variants do), of the base's too."""
        for cls in self.layer.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())
            yield from (p for p in params if p.name != "self"
                        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break

    def accepted_options(self) -> set[str]:
        """The keyword names the layer takes (its own ``__init__``'s and those it forwards to its base)."""
        return {p.name for p in self._init_parameters()}

    def switch_options(self) -> set[str]:
        """The keyword names whose default is True or False (the layer's on/off switches)."""
        return {p.name for p in self._init_parameters() if isinstance(p.default, bool)}

    def flop_count(self, batch: int, seq: int, dim: int, num_heads: int, **options) -> FlopCount:
        return self.flops(batch, seq, self.config(dim, num_heads, **options))


def dense_attention_flops(
    batch: int, seq: int, *, num_heads: int, head_dim: int, pattern="causal", kv_len: int | None = None
) -> float:
    """Forward FLOPs of the softmax attention core: ``4 * B * H * pairs * D``, where
    ``pairs`` counts the (query, key) pairs the pattern keeps (T*S for full,
    T(T+1)/2 for causal)."""
    pattern = _patterns.resolve(pattern)
    kv_len = seq if kv_len is None else kv_len
    pairs = pattern.pairs(seq, kv_len, heads=num_heads)
    return 4.0 * batch * num_heads * pairs * head_dim


# -- issue 28: the vision modules (attnkit.vision: LookupViT and ViT blocks, probes over frozen patch
# features, the Concept-Centric Transformer head) are a kind of their own: modules over image patch
# tokens whose calls are not a layer x [B, T, C] -> [B, T, C] with decode state; their list is
# attnkit.vision.CARDS, not the registry's
KINDS = (*KINDS, "vision")
# -- issue 28: recommendation models (attnkit.models.recsys) are a kind of their own: a CTR or
# next-item model over item ids, not a layer x [B, T, C] -> [B, T, C]; their list is
# attnkit.models.recsys.CARDS, not the registry's
KINDS = (*KINDS, "recsys")
# -- issue 28: pooling heads over a frozen LM's hidden states (B, L, T, C) -> (B, C) (attnkit.pooling) and
# multimodal fusion blocks taking per-token modality ids (attnkit.multimodal) are kinds of their own: their
# calls are not a layer x [B, T, C] -> [B, T, C] with decode state; their lists are attnkit.pooling.CARDS and
# attnkit.multimodal.CARDS, not the registry's
KINDS = (*KINDS, "pooling", "multimodal")
# -- issue 28: speech enhancement models over STFT spectrograms (attnkit.speech: MambAttention) and
# mixture-of-experts feed-forward layers with token routers (attnkit.routing: graph-of-tokens SMoE) are kinds
# of their own; their lists are attnkit.speech.CARDS and attnkit.routing.CARDS, not the registry's
KINDS = (*KINDS, "speech", "routing")
