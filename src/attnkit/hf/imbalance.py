"""PAINT: fixing imbalanced attention (in-context hallucination of vision-language models), on any span.

"Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model"
(Arif et al., arXiv 2501.12206; official code hasanar1f/PAINT, ``modPAI/``). Deep layers stop
looking at the image; the method raises the logits of chosen span tokens in chosen heads:

1. **Dual-stream token selection** (:func:`select_tokens`): *local* tokens, the top ``top_ratio``
   (0.25) of the span by a first score (official: the vision encoder's first-layer CLS attention,
   summed over heads), and *summary* tokens, the outliers ``> Q3 + 1.5 IQR`` of a second score over
   the span (official: the CLS attention of the encoder's penultimate layer); local tokens that are
   also summary tokens count as summary tokens.
2. **Modulation** at the changed queries of the reinforced layers (official: layers 2 .. L-1, the
   last query row), per head ``(l, h)``:
   ``z_j += w_{l,h} * alpha * |z_j|`` at local tokens and ``z_j += w_{l,h} * beta * |z_j|`` at summary
   tokens (official ``alpha = 0.7``, ``beta = 0.3``; the paper's best ``beta = 0.4``), ``z`` the logits
   before the softmax.

Deviations (each with the official form):

- Head-specific modulation: ``w_{l,h}`` is the head's measured sensitivity to the span
  (:func:`span_sensitivity`: its mean attention mass on the span from the queries after it, divided
  by the largest over all heads), as the paper describes. The official code applies the same
  factors to every head: ``sensitivity=None`` (``w = 1``) is that form.
- Text spans have no vision encoder: :func:`attention_received` scores span tokens by the attention
  the language model's own layer gives them from the queries after the span (an early layer for
  the local stream, a late layer for the summary stream), the analogue of the encoder's CLS
  attention. For a multimodal model pass the encoder's CLS attention (or any per-token score).

``alpha = beta = 0`` (or no token selected) routes no head: the model is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .span import Probe, check_queries, check_span, check_view, query_rows
from .steer import Modifier, Steer

__all__ = ["select_tokens", "attention_received", "span_sensitivity", "PAINTModifier", "PAINT"]


def select_tokens(span: Tensor, local_scores: Tensor, summary_scores: Tensor | None = None,
                  top_ratio: float = 0.25) -> tuple[Tensor, Tensor]:
    """``(local, summary)``, each ``[B, L]`` boolean inside ``span`` (see the module docstring).
    ``local_scores`` / ``summary_scores``: ``[B, L]`` float per position (positions outside the span
    are ignored); ``summary_scores`` None: no summary tokens."""
    span = check_span(span)
    if isinstance(top_ratio, bool) or not isinstance(top_ratio, (int, float)) or not 0.0 <= top_ratio <= 1.0:
        raise ValueError(f"PAINT: top_ratio must be a number in [0, 1], got {top_ratio!r}")
    for name, s in (("local_scores", local_scores), ("summary_scores", summary_scores)):
        if s is not None and (not isinstance(s, Tensor) or tuple(s.shape) != tuple(span.shape)):
            raise ValueError(f"PAINT: {name} must be a tensor of the span's shape {tuple(span.shape)}, "
                             f"got {tuple(getattr(s, 'shape', ())) or type(s).__name__}")
    local = torch.zeros_like(span)
    summary = torch.zeros_like(span)
    for b in range(span.shape[0]):
        where = span[b].nonzero().flatten()
        n = int(top_ratio * where.numel())  # the official int(576 * 0.25)
        if n:
            local[b, where[local_scores[b, where].double().topk(n).indices]] = True
        if summary_scores is not None:
            s = summary_scores[b, where].double()
            q1, q3 = torch.quantile(s, 0.25), torch.quantile(s, 0.75)
            summary[b, where[s > q3 + 1.5 * (q3 - q1)]] = True
    return local & ~summary, summary


class _Received(Modifier):
    """Record the attention each key receives from the queries after the span, in every head of ``layer``."""

    def __init__(self, span, layer):
        self.span, self.layer, self.received = span, layer, None

    def heads(self, num_layers, num_heads):
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"attention_received: layer {self.layer} out of range; accepted: 0 .. {num_layers - 1}")
        return tuple((self.layer, h) for h in range(num_heads))

    def weights(self, probs, view):
        from .span import queries_after

        got = (probs * queries_after(self.span, view)).sum(dim=(1, 2))  # [B, S']
        L = self.span.shape[1]
        pos = view.k_pos[:, 0].expand(got.shape[0], -1)
        inside = (pos >= 0) & (pos < L)
        out = torch.zeros(got.shape[0], L, dtype=torch.float64)
        out.scatter_add_(1, pos.clamp(0, L - 1).cpu(), (got * inside).double().cpu())
        self.received = out if self.received is None else self.received + out
        return probs


@torch.no_grad()
def attention_received(model, span: Tensor, input_ids: Tensor, layer: int, **model_inputs) -> Tensor:
    """``[B, L]`` float64: the attention each position receives in ``layer`` (summed over heads) from the
    queries after its row's span; the text analogue of a vision encoder's CLS attention."""
    from . import apply

    span = check_span(span, *input_ids.shape)
    probe = _Received(span, layer)
    with apply(model, Steer(probe)):
        model(input_ids=input_ids, **model_inputs)
    return probe.received


@torch.no_grad()
def span_sensitivity(model, span: Tensor, input_ids: Tensor, **model_inputs) -> Tensor:
    """``[num_layers, num_heads]`` float64: each head's mean attention mass on the span from the queries
    after it (the per-head sensitivity PAINT's head-specific modulation scales by)."""
    from . import apply

    span = check_span(span, *input_ids.shape)
    probe = Probe({"span": span})
    with apply(model, Steer(probe)):
        model(input_ids=input_ids, **model_inputs)
    return probe.before["span"].nan_to_num(0.0)


class PAINTModifier(Modifier):
    """PAINT's logit modulation (see the module docstring) on ``layers`` (default 2 .. L-1)."""

    def __init__(self, span: Tensor, local: Tensor, summary: Tensor | None = None, alpha: float = 0.7,
                 beta: float = 0.3, sensitivity=None, layers=None, queries: str = "last"):
        self.span = check_span(span)
        for name, m in (("local", local), ("summary", summary)):
            if m is not None and (not isinstance(m, Tensor) or tuple(m.shape) != tuple(self.span.shape)):
                raise ValueError(f"PAINT: {name} must be a boolean mask of the span's shape {tuple(self.span.shape)}, "
                                 f"got {tuple(getattr(m, 'shape', ())) or type(m).__name__}")
        self.local = local.bool() & self.span
        self.summary = (summary.bool() if summary is not None else torch.zeros_like(self.span)) & self.span
        for name, v in (("alpha", alpha), ("beta", beta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"PAINT: {name} must be a non-negative number (0: off), got {v!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        if sensitivity is not None:
            sensitivity = torch.as_tensor(sensitivity, dtype=torch.float64)
            if sensitivity.dim() != 2 or bool((sensitivity < 0).any()) or bool(torch.isnan(sensitivity).any()):
                raise ValueError("PAINT: sensitivity must be [num_layers, num_heads] non-negative scores, got "
                                 f"shape {tuple(sensitivity.shape)}")
            top = float(sensitivity.max())
            sensitivity = sensitivity / top if top > 0 else sensitivity
        self.sensitivity = sensitivity
        self.layers = None if layers is None else tuple(layers)
        self.queries = check_queries(queries, "PAINT")

    def heads(self, num_layers, num_heads):
        off = (self.alpha == 0 or not bool(self.local.any())) and (self.beta == 0 or not bool(self.summary.any()))
        if off:
            return ()
        layers = range(2, num_layers) if self.layers is None else self.layers
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"PAINT: layer {layer!r} out of range; accepted: 0 .. {num_layers - 1}")
        if self.sensitivity is not None and tuple(self.sensitivity.shape) != (num_layers, num_heads):
            raise ValueError(f"PAINT: sensitivity has shape {tuple(self.sensitivity.shape)}, the model has "
                             f"[num_layers, num_heads] = [{num_layers}, {num_heads}]")
        return tuple((layer, h) for layer in sorted(set(layers)) for h in range(num_heads)
                     if self.sensitivity is None or float(self.sensitivity[layer, h]) > 0)

    def logits(self, logits, view):
        check_view(self.span, view, "PAINT")
        w = (torch.ones(len(view.heads), dtype=logits.dtype) if self.sensitivity is None
             else self.sensitivity[view.layer, view.heads.cpu()].to(logits.dtype))
        w = w.to(logits.device)[None, :, None, None]  # [1, h, 1, 1]
        # the masks in the logits' dtype first: a float times a bool tensor is float32 even for float64 logits
        local, summary = (view.key_mask(m).to(logits.dtype) for m in (self.local, self.summary))
        gain = self.alpha * local + self.beta * summary  # [B, 1, 1, S']
        rows = query_rows(self.span, view, self.queries)
        bump = torch.where(rows, w * gain * logits.abs(), 0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        return logits + bump


@dataclass
class PAINT(Steer):
    """PAINT as a policy: ``PAINT(span=span, local=..., summary=..., sensitivity=...)`` or
    ``PAINT.identify(model, span, ids)`` (text analogue: token scores from the model's own attention).
    ``span`` None, ``alpha = beta = 0`` or no token selected: no change."""

    span: Tensor | None = None
    local: Tensor | None = None
    summary: Tensor | None = None
    alpha: float = 0.7
    beta: float = 0.3
    sensitivity: Tensor | None = field(default=None, repr=False)
    layers: tuple | None = None
    queries: str = "last"
    modifier: Modifier = field(default=None, init=False, repr=False)
    name: ClassVar[str] = "paint"

    def __post_init__(self):
        if self.span is None:
            if self.local is not None or self.summary is not None:
                raise ValueError("PAINT: local / summary tokens were given without their span")
            check_queries(self.queries, "PAINT")
            self.modifier = Modifier()
        else:
            local = self.local if self.local is not None else torch.zeros_like(check_span(self.span))
            self.modifier = PAINTModifier(self.span, local, self.summary, self.alpha, self.beta, self.sensitivity,
                                          self.layers, self.queries)
        super().__post_init__()

    @classmethod
    def identify(cls, model, span, input_ids, *, local_layer: int = 1, summary_layer: int | None = None,
                 top_ratio: float = 0.25, head_specific: bool = True, model_inputs: dict | None = None,
                 **options) -> "PAINT":
        """Text analogue of the official selection: local tokens by the attention of ``local_layer``
        (an early layer), summary tokens by that of ``summary_layer`` (default: the penultimate layer),
        sensitivity by :func:`span_sensitivity` (``head_specific=False``: the official uniform factors)."""
        from .attention import _text_config

        inputs = model_inputs or {}
        num_layers = int(_text_config(model).num_hidden_layers)
        summary_layer = num_layers - 2 if summary_layer is None else summary_layer
        local_scores = attention_received(model, span, input_ids, local_layer, **inputs)
        summary_scores = attention_received(model, span, input_ids, summary_layer, **inputs)
        local, summary = select_tokens(span, local_scores, summary_scores, top_ratio)
        sensitivity = span_sensitivity(model, span, input_ids, **inputs) if head_specific else None
        return cls(span=span, local=local, summary=summary, sensitivity=sensitivity, **options)
