"""VHD and VHR: how much each head's output depends on a span, and reinforcement of the heads
that depend on it most.

"Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (He et al., ACL
2025, arXiv 2412.13949; official code jinghan1he/VHR, not reachable from here: this follows the
paper).

- **VHD** (:func:`vhd_scores`): for head ``(l, i)`` and a query ``t`` after the span,
  ``VHD_{l,i}(t) = || A_{l,i}(t | span, text) - A_{l,i}(t | text) ||_2``, ``A_{l,i}`` the head's
  attention output (before the output projection); averaged over the chosen queries.
- **VHR** (:func:`vhr_heads`, :class:`VHR`): per reinforced layer, the heads whose VHD is above the
  layer's median, except outliers above the layer's mean + one standard deviation (the paper's
  filter of VHD "surges"), have their outputs multiplied by ``alpha`` (paper: 2).

Deviations from the paper (each with the paper's form):

- The "without the span" branch masks the span's keys from every query after the span (positions
  unchanged, the span's tokens still in the sequence) instead of feeding the prompt without the
  image; the branch runs the whole model this way (every layer sees the counterfactual residual
  stream), so it works alike for text spans and for image tokens whose count the model checks.
- The paper recomputes VHD at every generated token, layer by layer (the no-image branch in
  parallel, each layer selecting after the earlier layers were reinforced); here VHD is measured
  once on the prompt (queries after the span, or the ones you pass) and the selected heads stay
  fixed: the paper's "static heads" ablation. The dynamic form needs a second branch inside
  decoding; the steering spine serves one KV-head group per call, so a per-layer median per token
  is not expressible without it.

``alpha = 1`` or no head selected leaves the model bit-identical (nothing is routed).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .span import check_queries, check_span, check_view, decoder_layers, queries_after, query_rows
from .steer import Modifier, Steer, check_heads, top_heads

__all__ = ["vhd_scores", "vhr_heads", "SpanMask", "VHRModifier", "VHR"]


class SpanMask(Modifier):
    """Hide the span's keys from every query after the span, in every head: the "without the span"
    branch of VHD."""

    def __init__(self, span: Tensor):
        self.span = span

    def heads(self, num_layers, num_heads):
        return tuple((layer, h) for layer in range(num_layers) for h in range(num_heads))

    def logits(self, logits, view):
        check_view(self.span, view, "vhd_scores")
        return logits.masked_fill(view.key_mask(self.span) & queries_after(self.span, view), float("-inf"))


def _head_outputs(model, store: dict, stack: ExitStack):
    """Pre-hooks on each decoder layer's output projection: ``store[layer]`` = its input ``[B, S, H*Dv]``."""
    for idx, layer in decoder_layers(model):
        attn = next(m for m in layer.children() if getattr(m, "layer_idx", None) == idx)
        proj = getattr(attn, "o_proj", None)
        if proj is None:
            raise ValueError(f"{type(attn).__name__} has no o_proj; vhd_scores reads each head's output at its input")

        def hook(module, args, idx=idx):
            store[idx] = args[0].detach()

        stack.enter_context(_Removing(proj.register_forward_pre_hook(hook)))


class _Removing:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc):
        self.handle.remove()
        return False


@torch.no_grad()
def vhd_scores(model, span: Tensor, input_ids: Tensor | None = None, *, queries: Tensor | None = None,
               **model_inputs) -> Tensor:
    """``[num_layers, num_heads]`` float64: the mean over the chosen queries (``queries`` ``[B, S]``
    boolean; default every query after its row's span) of the L2 distance between each head's output
    with the span and with the span's keys hidden (see the module docstring). Two forwards."""
    from . import apply
    from .attention import _text_config

    if input_ids is None:
        raise ValueError("vhd_scores: give input_ids (and any other inputs as keywords)")
    B, S = input_ids.shape
    span = check_span(span, B, S)
    config = _text_config(model)
    H = int(config.num_attention_heads)
    if queries is None:
        end = torch.arange(S)[None, :] > (S - 1 - span.flip(1).to(torch.int8).argmax(1))[:, None]
        queries = end
    else:
        queries = check_span(queries, B, S, name="queries")
        if queries.shape[1] < S:
            queries = torch.cat([queries, queries.new_zeros(B, S - queries.shape[1])], 1)
    outs = []
    for masked in (False, True):
        store: dict = {}
        with ExitStack() as stack:
            _head_outputs(model, store, stack)
            if masked:
                stack.enter_context(apply(model, Steer(SpanMask(span))))
            model(input_ids=input_ids, **model_inputs)
        outs.append(store)
    num_layers = len(outs[0])
    scores = torch.zeros(num_layers, H, dtype=torch.float64)
    q = queries.to(torch.float64)
    for layer in range(num_layers):
        a, b = (o[layer].to(torch.float64).cpu() for o in (outs[0], outs[1]))
        dist = (a - b).view(B, S, H, -1).norm(dim=-1)  # [B, S, H]
        scores[layer] = (dist * q[:, :, None]).sum((0, 1)) / q.sum()
    return scores


def vhr_heads(scores, layers=None) -> tuple:
    """The paper's selection from VHD ``scores`` ``[num_layers, num_heads]``: in each of ``layers``
    (default all), the heads above the layer's median and not above its mean + std."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or bool(torch.isnan(scores).any()):
        raise ValueError(f"VHR: scores must be finite [num_layers, num_heads], got shape {tuple(scores.shape)}")
    L = scores.shape[0]
    layers = range(L) if layers is None else layers
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise ValueError(f"VHR: layer {layer!r} out of range; accepted: 0 .. {L - 1}")
        row = scores[layer]
        surge = row.mean() + row.std(unbiased=False)
        keep = (row > torch.quantile(row, 0.5)) & (row <= surge)  # the median of an even count: the middle mean
        chosen += [(layer, int(h)) for h in keep.nonzero().flatten()]
    return tuple(sorted(chosen))


class VHRModifier(Modifier):
    """Multiply the outputs of ``selected`` heads by ``alpha`` at the queries ``queries`` names
    (``"last"``: each call's last query, the generated tokens; ``"after_span"``: every query past the
    span; ``span`` None: every query)."""

    def __init__(self, selected, alpha: float = 2.0, span: Tensor | None = None, queries: str = "last"):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"VHR: alpha must be a positive number (1: no change), got {alpha!r}")
        self.selected, self.alpha = tuple(tuple(p) for p in selected), float(alpha)
        self.span = None if span is None else check_span(span)
        self.queries = check_queries(queries, "VHR")

    def heads(self, num_layers, num_heads):
        return () if self.alpha == 1.0 else check_heads(self.selected, num_layers, num_heads, owner="VHR")

    def output(self, out, view):
        if self.span is None:
            rows = (view.q_pos == view.call.last)[None, None, :, None] if self.queries == "last" else True
        else:
            check_view(self.span, view, "VHR")
            rows = query_rows(self.span, view, self.queries)
        return torch.where(rows, out * self.alpha, out) if rows is not True else out * self.alpha


@dataclass
class VHR(Steer):
    """VHR as a policy: ``VHR(heads=vhr_heads(vhd_scores(model, span, ids)), alpha=2.0, span=span)``
    or ``VHR.identify(model, span, ids)``. ``heads`` empty (the default) or ``alpha`` 1: no change."""

    heads: tuple = ()
    alpha: float = 2.0
    span: Tensor | None = None
    queries: str = "last"
    scores: Tensor | None = field(default=None, repr=False)
    modifier: Modifier = field(default=None, init=False, repr=False)
    name: ClassVar[str] = "vhr"

    def __post_init__(self):
        self.modifier = VHRModifier(self.heads, self.alpha, self.span, self.queries)
        super().__post_init__()

    @classmethod
    def identify(cls, model, span, input_ids, *, layers=None, k: int | None = None, seed: int = 0,
                 queries_mask=None, model_inputs: dict | None = None, **options) -> "VHR":
        """:func:`vhd_scores` then :func:`vhr_heads` (``layers``: the reinforced layers), or with ``k``
        the ``k`` heads of largest VHD over the whole model (:func:`attnkit.hf.steer.top_heads`, ties
        broken by ``seed``; the paper's top-k of T-VHD as a selection)."""
        scores = vhd_scores(model, span, input_ids, queries=queries_mask, **(model_inputs or {}))
        heads = vhr_heads(scores, layers) if k is None else top_heads(scores, k=k, seed=seed)
        return cls(heads=heads, span=span, scores=scores, **options)
