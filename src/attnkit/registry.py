"""Mechanism registry: name -> card, from one explicit list.

A card (:mod:`attnkit.cards`) says what a mechanism is (paper, family), how to build it (layer
class and defaults), what it costs (a FLOP model) and what it can do (capabilities). ``attnkit
list``, ``attnkit bench`` and ``attnkit compare`` read nothing else, so listing a card in
:data:`LAYER_CARDS` puts a new mechanism into every command and every shared test.

Registration is explicit, as kvpress lists its presses: each layer module defines its cards as
plain module data (``CARDS = (Card(...), ...)``, no side effect on import), and
:data:`LAYER_CARDS` below names every module's tuple, in the order ``attnkit list`` shows them
(the baselines first). The import goes one way: this module imports ``layers``; a layer imports
``attnkit.cards`` (the ``Card`` type) and never this module (``tests/test_architecture.py``
enforces both, and that every ``CARDS`` tuple in ``layers/`` is listed here).

Each kind of card (:data:`attnkit.cards.KINDS`) has one explicit list. ``"layer"`` cards are
listed here. ``"hf"`` (methods on transformers models) and ``"diffusion"`` (diffusers attention
processors) sit above this module in docs/architecture.md's table, so the package of each keeps
its own ``CARDS`` list (``attnkit.hf``, ``attnkit.diffusion``) built from the same ``Card`` type
with ``kind="hf"`` / ``"diffusion"``, and the ``attnkit`` command, which imports everything,
concatenates the lists. :func:`register` adds a card of one's own at run time, explicitly.

    >>> import attnkit
    >>> [c.name for c in attnkit.mechanisms()][:3]
    ['mha', 'gqa', 'mqa']
    >>> layer = attnkit.build("gqa", dim=256, num_heads=8)
"""

from __future__ import annotations

from .cards import KINDS, Capabilities, Card, FlopCount, dense_attention_flops
from .layers import (
    agent,
    attention_experts,
    compressed_conv,
    deconstructed,
    dynamic_mask,
    echo,
    flow,
    group,
    lightning,
    matrix_atoms,
    mixture_of_heads,
    multi_head,
    no_mixing,
    rcmha,
    s2,
    selective,
    sigmoid,
    sparse_query,
    streaming,
)
from .layers import hcam, titans  # memory family (issue 28)

__all__ = ["Card", "Capabilities", "FlopCount", "LAYER_CARDS", "register", "mechanisms", "get", "build",
           "dense_attention_flops"]

#: every layer card, in ``attnkit list`` order
LAYER_CARDS: tuple[Card, ...] = (
    *multi_head.CARDS,  # mha, gqa, mqa: the baselines lead
    *agent.CARDS,  # agent, agent-causal
    *attention_experts.CARDS,  # bam
    *compressed_conv.CARDS,  # cca, ccgqa
    *deconstructed.CARDS,  # fixed-mixing, l2-attention, static-qk
    *dynamic_mask.CARDS,  # dma
    *echo.CARDS,  # echo
    *flow.CARDS,  # flow
    *group.CARDS,  # chronos2-group, chronos2
    *lightning.CARDS,  # lightning
    *matrix_atoms.CARDS,  # masa
    *mixture_of_heads.CARDS,  # moh
    *no_mixing.CARDS,  # no-mixing
    *rcmha.CARDS,  # rcmha
    *s2.CARDS,  # s2
    *selective.CARDS,  # selective
    *sigmoid.CARDS,  # sigmoid, sigmoid-nobias
    *sparse_query.CARDS,  # sqa, ssqa, xsqa, xsmqa
    *streaming.CARDS,  # sliding-window, streaming
    *titans.CARDS,  # titans-mac, titans-mag, titans-mal
    *hcam.CARDS,  # hcam
)

_REGISTRY: dict[str, Card] = {}


def register(card: Card) -> Card:
    """Add ``card`` (a mechanism of one's own) to the registry, after the listed ones. Names
    are unique across kinds."""
    if not isinstance(card, Card):
        raise ValueError(f"register takes an attnkit.Card, got {type(card).__name__}")
    if card.name in _REGISTRY:
        raise ValueError(f"a mechanism named {card.name!r} is already registered")
    _REGISTRY[card.name] = card
    return card


for _card in LAYER_CARDS:
    register(_card)


def mechanisms(family: str | None = None, *, kind: str | None = None) -> list[Card]:
    """All registered cards, in :data:`LAYER_CARDS` order then registration order (optionally
    of one family, or of one kind, see :data:`attnkit.cards.KINDS`)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return [c for c in _REGISTRY.values() if (family is None or c.family == family) and (kind is None or c.kind == kind)]


def get(name: str) -> Card:
    if name not in _REGISTRY:
        raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build(name: str, *, dim: int, num_heads: int, **options):
    """Build the layer of mechanism ``name`` at width ``dim`` with ``num_heads`` heads."""
    return get(name).build(dim, num_heads, **options)
