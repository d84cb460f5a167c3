"""VAR: Visual Attention Redistribution, on any span of any causal decoder.

"See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et al., ICLR 2025,
arXiv 2503.03321; official code MICV-yonsei/VisAttnSink). Some tokens of the span (the image)
receive much attention without carrying what the text asks about: *visual sink tokens*, marked
like the language model's own sinks by massive activations in a few fixed hidden dimensions.
VAR takes the attention they receive as a surplus and gives it to the rest of the span, in the
heads that look at the span.

1. **Sinks** (:func:`find_sinks`, one identification pass with forward hooks on the decoder
   layers): at layer ``l`` (``l >= from_layer``) token ``j`` is a sink iff
   ``phi_l(j) = max_{d in D} |RMSNorm(h_l[j])[d]| > tau``, ``h_l`` the layer's input hidden state,
   RMSNorm without weight, ``D`` the model's sink dimensions.
2. **Span-centric heads**, per head and query ``i`` (after the span): the attention on the span
   ``m_i = sum_{j in span} a_ij >= summ`` and the sinks' share of it
   ``sum_{j in span sinks} a_ij / m_i <= rho``.
3. **Redistribution** in those rows: every sink's weight (inside and outside the span) is
   multiplied by ``p``; the removed ``(1 - p) * sum_{j in sinks} a_ij`` goes to the span's
   non-sink tokens in proportion to their weights. Rows still sum to 1.

Deviations from the official code (kept small; each says the official form):

- ``D`` is found per model when ``dims`` is not given: the ``num_dims`` dimensions where the row's
  first real token (the language model's own sink) has the largest mean ``|RMSNorm(h)|`` over layers
  ``>= from_layer``. The official code ships a fixed list per model (e.g. Llama-2-7B: 2533, 1415):
  pass it as ``dims=``.
- ``tau = 20`` (the official default) assumes a width near 4096: ``|RMSNorm(h)[d]| <= sqrt(C)``,
  so a small model needs a smaller ``tau`` (the subject, C = 256: at most 16).
- The official code flattens sink indices over the batch (it runs batch 1) and divides by
  ``sum(a + 1e-6)``; here each row has its own sinks, the same ``1e-6`` per span token is kept.
  A row whose span has no non-sink weight is left as it is (the official code divides by 0).
- Queries: the official code changes, at prefill, the queries after the image and at decode every
  query; ``queries="after_span"`` (the default) is the same.

With no sink inside the span at any layer (or ``p = 1``) no head is routed: the model is
bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .span import capture_hidden, check_queries, check_span, check_view, decoder_layers, query_rows
from .steer import Modifier, Steer

__all__ = ["SpanSinks", "find_sinks", "sink_dimensions", "VARModifier", "VAR"]


def _rms_abs(hidden: Tensor, eps: float = 1e-6) -> Tensor:
    h = hidden.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).abs()


@dataclass(frozen=True)
class SpanSinks:
    """What :func:`find_sinks` found. ``span`` ``[B, L]``; ``sinks`` ``{layer: [B, L] boolean}`` (every
    sink of the layer, inside the span or not); ``phi`` ``[num_layers, B, L]`` the sink statistic
    (0 at layers below ``from_layer``); ``dims`` the sink dimensions; ``tau`` the threshold."""

    span: Tensor
    sinks: dict
    phi: Tensor
    dims: tuple
    tau: float

    def in_span(self, layer: int) -> Tensor:
        """``[B, L]``: the layer's sinks inside the span."""
        return self.sinks[layer] & self.span

    def counts(self) -> dict:
        """``{layer: sinks inside the span, summed over rows}``."""
        return {layer: int(self.in_span(layer).sum()) for layer in sorted(self.sinks)}


def sink_dimensions(hidden: dict, start: Tensor, num_dims: int = 2, from_layer: int = 2) -> tuple:
    """The ``num_dims`` hidden dimensions where each row's first real token (at ``start`` ``[B]``) stands
    out most: ``|RMSNorm(h)|`` at the token minus the row's median, averaged over rows and layers
    ``>= from_layer`` (``hidden``: ``{layer: [B, S, C]}``)."""
    layers = [layer for layer in sorted(hidden) if layer >= from_layer] or sorted(hidden)
    rows = torch.arange(start.shape[0])
    stand_out = []
    for layer in layers:
        r = _rms_abs(hidden[layer])  # [B, S, C]
        # how far the sink token stands out of the row's typical token in each dimension
        stand_out.append((r[rows, start.cpu()] - r.median(dim=1).values).mean(0))
    score = torch.stack(stand_out).mean(0)  # [C]
    return tuple(int(d) for d in score.topk(num_dims).indices.sort().values)


@torch.no_grad()
def find_sinks(model, span: Tensor, input_ids: Tensor | None = None, *, dims=None, num_dims: int = 2,
               tau: float = 20.0, from_layer: int = 2, **model_inputs) -> SpanSinks:
    """One identification pass: the model's forward with hooks on its decoder layers.

    Args:
        model: a transformers causal LM or multimodal model (LLaVA, Qwen2-VL, ...).
        span: ``[B, L]`` boolean, ``L <= S`` (e.g. :func:`attnkit.hf.span.span_from_ids`).
        input_ids: ``[B, S]``; other inputs (``attention_mask``, ``pixel_values``, ...) as keywords.
        dims: the sink dimensions (the official per-model list), or None: :func:`sink_dimensions`.
        tau: the threshold on ``phi`` (official: 20 for 4096-wide models).
        from_layer: the first layer searched (official: 2).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"find_sinks: tau must be a positive number, got {tau!r}")
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"find_sinks: num_dims must be a positive int, got {num_dims!r}")
    layers = decoder_layers(model)
    num_layers = len(layers)
    if isinstance(from_layer, bool) or not isinstance(from_layer, int) or not 0 <= from_layer < num_layers:
        raise ValueError(f"find_sinks: from_layer must be an int in 0 .. {num_layers - 1}, got {from_layer!r}")
    if input_ids is not None:
        B, S = input_ids.shape
    else:
        embeds = model_inputs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("find_sinks: give input_ids (or inputs_embeds=)")
        B, S = embeds.shape[:2]
    span = check_span(span, B, S)
    with capture_hidden(model) as hidden:
        model(input_ids=input_ids, **model_inputs)
    width = next(iter(hidden.values())).shape[-1]
    if dims is None:
        mask = model_inputs.get("attention_mask")
        start = (mask != 0).to(torch.int8).argmax(1) if mask is not None else torch.zeros(B, dtype=torch.long)
        dims = sink_dimensions(hidden, start.cpu(), num_dims, from_layer)
    dims = tuple(int(d) for d in dims)
    if not dims or any(not 0 <= d < width for d in dims):
        raise ValueError(f"find_sinks: dims must be hidden dimensions in 0 .. {width - 1}, got {dims}")
    L = span.shape[1]
    phi = torch.zeros(num_layers, B, L, dtype=torch.float64)
    sinks = {}
    for layer, _ in layers:
        if layer < from_layer:
            continue
        phi[layer] = _rms_abs(hidden[layer][:, :L])[..., list(dims)].amax(-1).double().cpu()
        sinks[layer] = phi[layer] > tau
    return SpanSinks(span.cpu(), sinks, phi, dims, float(tau))


def _unit(value, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


class VARModifier(Modifier):
    """VAR's redistribution (see the module docstring) as a :class:`attnkit.hf.steer.Modifier`.

    Routes every head of each layer with a sink inside the span (the last layer excluded when
    ``skip_last_layer``, the official default); the span-centric rows are chosen per query inside
    :meth:`weights`. ``moved`` accumulates ``{layer: attention mass moved, summed over rows}``."""

    def __init__(self, sinks: SpanSinks, p: float = 0.6, rho: float = 0.5, summ: float = 0.2,
                 outside_sinks: bool = True, skip_last_layer: bool = True, queries: str = "after_span"):
        if not isinstance(sinks, SpanSinks):
            raise ValueError("VAR: sinks must be the SpanSinks of attnkit.hf.var.find_sinks, "
                             f"got {type(sinks).__name__}")
        self.sinks = sinks
        self.p, self.rho, self.summ = _unit(p, "p", "VAR"), _unit(rho, "rho", "VAR"), _unit(summ, "summ", "VAR")
        self.outside_sinks, self.skip_last_layer = bool(outside_sinks), bool(skip_last_layer)
        self.queries = check_queries(queries, "VAR")
        self.moved: dict = {}
        self.rows: dict = {}

    def heads(self, num_layers, num_heads):
        if self.p == 1.0:
            return ()
        layers = [layer for layer in self.sinks.sinks if bool(self.sinks.in_span(layer).any())
                  and not (self.skip_last_layer and layer == num_layers - 1)]
        if any(layer >= num_layers for layer in layers):
            raise ValueError(f"VAR: the sinks were found on a model of more than {num_layers} layers")
        return tuple((layer, h) for layer in sorted(layers) for h in range(num_heads))

    def weights(self, probs: Tensor, view) -> Tensor:
        span = self.sinks.span
        check_view(span, view, "VAR")
        layer_sinks = self.sinks.sinks[view.layer]
        span_keys = view.key_mask(span).to(probs.dtype)  # [B, 1, 1, S']
        span_sinks = view.key_mask(layer_sinks & span).to(probs.dtype)
        moved_keys = view.key_mask(layer_sinks).to(probs.dtype) if self.outside_sinks else span_sinks
        rest = span_keys * (1 - span_sinks)  # the span's non-sink tokens
        on_span = (probs * span_keys).sum(-1, keepdim=True)  # [B, h, t, 1]
        share = (probs * span_sinks).sum(-1, keepdim=True) / (on_span + 1e-6 * span_keys.sum(-1, keepdim=True))
        on_rest = (probs * rest).sum(-1, keepdim=True)
        budget = (1 - self.p) * (probs * moved_keys).sum(-1, keepdim=True)
        rows = (query_rows(span, view, self.queries) & (share <= self.rho) & (on_span >= self.summ)
                & (on_rest > 0) & (span_sinks.sum(-1, keepdim=True) > 0))
        changed = probs * (1 - (1 - self.p) * moved_keys) + budget * probs * rest / on_rest.clamp_min(1e-30)
        self.moved[view.layer] = self.moved.get(view.layer, 0.0) + float((budget * rows).sum())
        self.rows[view.layer] = self.rows.get(view.layer, 0) + int(rows.sum())
        return torch.where(rows, changed, probs)


@dataclass
class VAR(Steer):
    """VAR as a policy: ``attnkit.hf.apply(model, VAR(sinks=find_sinks(model, span, ids)))``, or
    ``VAR.identify(model, span, ids, tau=...)``. ``sinks=None``: nothing found, nothing changed.

    Options (official defaults): ``p`` 0.6 the weight sinks keep, ``rho`` 0.5 the largest sink share
    of a span-centric row, ``summ`` 0.2 its least attention on the span, ``outside_sinks`` True (sinks
    outside the span give their weight to the span too), ``skip_last_layer`` True, ``queries``."""

    sinks: SpanSinks | None = None
    p: float = 0.6
    rho: float = 0.5
    summ: float = 0.2
    outside_sinks: bool = True
    skip_last_layer: bool = True
    queries: str = "after_span"
    modifier: Modifier = field(default=None, init=False, repr=False)
    name: ClassVar[str] = "var"

    def __post_init__(self):
        if self.sinks is None:
            _unit(self.p, "p", "VAR"), _unit(self.rho, "rho", "VAR"), _unit(self.summ, "summ", "VAR")
            check_queries(self.queries, "VAR")
            self.modifier = Modifier()  # no sinks: no head
        else:
            self.modifier = VARModifier(self.sinks, self.p, self.rho, self.summ, self.outside_sinks,
                                        self.skip_last_layer, self.queries)
        super().__post_init__()

    @classmethod
    def identify(cls, model, span, input_ids=None, *, dims=None, num_dims: int = 2, tau: float = 20.0,
                 from_layer: int = 2, model_inputs: dict | None = None, **options) -> "VAR":
        """:func:`find_sinks` then the policy (``options``: p, rho, summ, ...)."""
        sinks = find_sinks(model, span, input_ids, dims=dims, num_dims=num_dims, tau=tau, from_layer=from_layer,
                           **(model_inputs or {}))
        return cls(sinks=sinks, **options)
