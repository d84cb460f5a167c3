"""Spans: a designated set of token positions (the image tokens of a multimodal model, a retrieved
document, the haystack of a long prompt) as a boolean mask ``[B, L]``, and what the span-steering
methods (:mod:`attnkit.hf.var`, :mod:`attnkit.hf.vhr`, :mod:`attnkit.hf.imbalance`) share:

- :func:`check_span`: a span checked against the inputs (shape, inside the sequence, not empty);
- :func:`span_from_ids` / :func:`span_from_range`: the span of a multimodal model's image token id,
  or of a position range;
- :func:`decoder_layers` and :func:`capture_hidden`: the causal text decoder's layers (those
  ``attnkit.hf.apply`` routes; a vision tower's are not among them) and forward hooks capturing
  each layer's input hidden states ``[B, S, C]`` in one identification pass;
- :class:`Probe`: a modifier that measures the attention mass every routed head gives to
  named key masks (the span, its sinks) from chosen queries, optionally around another
  modifier's change (``before`` / ``after``): the mass a method moved.

A span position ``p`` is a key position of the prompt; keys past the mask's length (decode steps)
are outside the span. Queries "after the span" are those at positions past the row's last span
position.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from .steer import HeadView, Modifier, check_heads

__all__ = ["check_span", "span_from_ids", "span_from_range", "span_end", "decoder_layers", "capture_hidden",
           "Probe", "queries_after", "QUERIES", "check_queries", "query_rows", "check_view"]


def check_span(span, batch: int | None = None, length: int | None = None, name: str = "span") -> Tensor:
    """``span`` as a boolean ``[B, L]`` tensor, else ``ValueError`` naming what was wrong: not 2-D,
    a batch other than ``batch``, longer than the sequence (``length``: positions past it are outside
    the sequence), not boolean (0/1 integers are accepted), or a row with no position marked."""
    if not isinstance(span, Tensor):
        raise ValueError(f"{name} must be a boolean tensor [B, L] over token positions, got {type(span).__name__}")
    if span.dim() != 2:
        raise ValueError(f"{name} must be a boolean tensor [B, L] over token positions, got shape {tuple(span.shape)}")
    if span.dtype != torch.bool:
        if span.is_floating_point() or not bool(((span == 0) | (span == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1 integers), got dtype {span.dtype}")
        span = span.bool()
    if batch is not None and span.shape[0] != batch:
        raise ValueError(f"{name} has batch {span.shape[0]}, the inputs have {batch}; "
                         f"accepted: [B, L] with B = {batch}")
    if length is not None and span.shape[1] > length:
        marked = span[:, length:].any(dim=0).nonzero().flatten()
        where = f" (position {int(marked[0]) + length} is marked)" if marked.numel() else ""
        raise ValueError(f"{name} covers {span.shape[1]} positions, outside the sequence of {length} tokens{where}; "
                         f"accepted: [B, L] with L <= {length}")
    empty = (~span.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} marks no position in row(s) {empty}; every row needs at least one span token")
    return span


def span_from_ids(input_ids: Tensor, token_id: int) -> Tensor:
    """``[B, S]`` boolean: the positions holding ``token_id`` (a multimodal model's image token:
    ``config.image_token_index`` for LLaVA, ``config.image_token_id`` for Qwen2-VL)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    return check_span(input_ids == int(token_id), name=f"span_from_ids(token_id={token_id})")


def span_from_range(batch: int, length: int, start: int, stop: int) -> Tensor:
    """``[batch, length]`` boolean, True at positions ``start .. stop - 1`` of every row."""
    if not (0 <= start < stop <= length):
        raise ValueError(f"span range [{start}, {stop}) must satisfy 0 <= start < stop <= length = {length}")
    span = torch.zeros(batch, length, dtype=torch.bool)
    span[:, start:stop] = True
    return span


def span_end(span: Tensor) -> Tensor:
    """``[B]`` long: each row's last span position."""
    L = span.shape[1]
    return L - 1 - span.flip(1).to(torch.int8).argmax(dim=1)


def queries_after(span: Tensor, view: HeadView) -> Tensor:
    """``[B, 1, t, 1]`` boolean: the chunk's queries past their row's last span position."""
    end = span_end(span).to(view.q_pos.device)
    return (view.q_pos[None, :] > end[:, None])[:, None, :, None]


def decoder_layers(model) -> list:
    """``[(layer_idx, module)]``: the decoder layers whose self-attention ``attnkit.hf.apply`` routes
    (causal, with a ``layer_idx``), in layer order; a vision tower's layers are not among them."""
    from .attention import _attention_modules

    attention = {id(m): m for m in _attention_modules(model) if m.is_causal is True}
    layers = {}
    for module in model.modules():
        for child in module.children():
            if id(child) in attention:
                layers[attention[id(child)].layer_idx] = module
    if not layers:
        raise ValueError(f"{type(model).__name__} has no causal decoder layers routed through AttentionInterface")
    return sorted(layers.items())


@contextmanager
def capture_hidden(model):
    """Forward pre-hooks on every decoder layer: inside the ``with``, each forward fills the yielded
    dict ``{layer_idx: hidden states [B, S, C]}`` with the layer's input (the residual stream before
    the layer's norm), detached. The hooks are removed on exit."""
    store: dict = {}
    hooks = []

    def hook_for(idx):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            store[idx] = h.detach()
        return hook

    try:
        for idx, layer in decoder_layers(model):
            hooks.append(layer.register_forward_pre_hook(hook_for(idx), with_kwargs=True))
        yield store
    finally:
        for h in hooks:
            h.remove()


class Probe(Modifier):
    """Measure the attention mass routed heads give to named key masks, optionally around another
    modifier's change.

    Args:
        masks: ``{name: [B, L] boolean}`` key masks (a span, its sinks), or ``{name: {layer: [B, L]}}``
            for a per-layer mask (VAR's sinks).
        queries: ``[B, L]`` boolean, the query positions averaged over (default: every query past the
            last position of the first mask, see :func:`queries_after`); positions >= L are excluded.
        inner: a modifier whose change is applied (on its own heads only) between ``before`` and
            ``after``; None: nothing is changed (``before`` == ``after``).
        heads: the (layer, head) pairs probed (default: every head of the model).

    After a forward, ``before[name]`` and ``after[name]`` hold ``[num_layers, num_heads]`` float64 mean
    masses (NaN where a head was not probed or no query counted).
    """

    def __init__(self, masks: dict, queries: Tensor | None = None, inner: Modifier | None = None, heads=None):
        self.masks, self.queries, self.inner, self._heads = dict(masks), queries, inner, heads
        self.before: dict = {}
        self.after: dict = {}
        self._inner_heads: set = set()

    def heads(self, num_layers, num_heads):
        pairs = (check_heads(self._heads, num_layers, num_heads, owner="Probe") if self._heads is not None
                 else tuple((layer, h) for layer in range(num_layers) for h in range(num_heads)))
        inner = self.inner.heads(num_layers, num_heads) if self.inner is not None else ()
        self._inner_heads = set(inner)
        self._sums = {k: torch.zeros(2, num_layers, num_heads, dtype=torch.float64) for k in self.masks}
        self._counts = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.before = {k: torch.full((num_layers, num_heads), float("nan"), dtype=torch.float64) for k in self.masks}
        self.after = {k: v.clone() for k, v in self.before.items()}
        return tuple(sorted(set(pairs) | set(inner)))

    def _rows(self, view):
        return [i for i, h in enumerate(view.heads.tolist()) if (view.layer, h) in self._inner_heads]

    def _sub(self, view, rows):
        allowed = view.allowed if view.allowed.shape[1] == 1 else view.allowed[:, rows]
        return HeadView(view.layer, view.heads[rows], view.q_pos, view.k_pos, view.start, allowed, view.call)

    def logits(self, logits, view):
        rows = self._rows(view) if self.inner is not None and self.inner.overrides("logits") else []
        if not rows:
            return logits
        logits = logits.clone()
        logits[:, rows] = self.inner.logits(logits[:, rows], self._sub(view, rows))
        return logits

    def _measure(self, probs, view, slot):
        first = next(iter(self.masks.values()))
        first = first.get(view.layer, next(iter(first.values()))) if isinstance(first, dict) else first
        if self.queries is None:
            q = queries_after(first, view)  # [B, 1, t, 1]
        else:
            L = self.queries.shape[1]
            qp = view.q_pos.clamp(max=L - 1)
            q = (self.queries.to(qp.device)[:, qp] & (view.q_pos < L)[None])[:, None, :, None]
        n = q.sum(dim=(0, 2)).flatten().to(torch.float64)  # [1]
        layer, heads = view.layer, view.heads.cpu()
        for name, mask in self.masks.items():
            if isinstance(mask, dict):
                mask = mask.get(layer)
                if mask is None:
                    continue
            keys = view.key_mask(mask)  # [B, 1, 1, S']
            mass = (probs * keys).sum(-1, keepdim=True)  # [B, h, t, 1]
            total = (mass * q).sum(dim=(0, 2)).flatten().to(torch.float64).cpu()  # [h]
            self._sums[name][slot, layer, heads] += total
        if slot == 0:
            self._counts[layer, heads] += float(n)

    def weights(self, probs, view):
        self._measure(probs, view, 0)
        rows = self._rows(view) if self.inner is not None else []
        if rows and self.inner.overrides("weights"):
            probs = probs.clone()
            probs[:, rows] = self.inner.weights(probs[:, rows], self._sub(view, rows))
        self._measure(probs, view, 1)
        for name in self.masks:
            self.before[name] = self._sums[name][0] / self._counts
            self.after[name] = self._sums[name][1] / self._counts
        return probs

    def output(self, out, view):
        rows = self._rows(view) if self.inner is not None and self.inner.overrides("output") else []
        if not rows:
            return out
        out = out.clone()
        out[:, rows] = self.inner.output(out[:, rows], self._sub(view, rows))
        return out

    def overrides(self, hook):
        return hook == "weights" or (self.inner is not None and self.inner.overrides(hook))


QUERIES = ("after_span", "last")


def check_queries(queries: str, owner: str) -> str:
    if queries not in QUERIES:
        raise ValueError(f"{owner}: queries must be one of {QUERIES} ('after_span': every query past the span's end; "
                         f"'last': each call's last query, i.e. the prompt's last token and every decode step), "
                         f"got {queries!r}")
    return queries


def query_rows(span: Tensor, view: HeadView, queries: str) -> Tensor:
    """``[B, 1, t, 1]`` boolean: the chunk's queries a span method changes (see :func:`check_queries`)."""
    after = queries_after(span, view)
    if queries == "last":
        return after & (view.q_pos == view.call.last)[None, None, :, None]
    return after


def check_view(span: Tensor, view: HeadView, owner: str) -> None:
    """``ValueError`` where ``span`` does not fit the call: another batch, or (at prefill) longer
    than the sequence."""
    B = view.start.shape[0]
    if span.shape[0] != B:
        raise ValueError(f"{owner}: the span has batch {span.shape[0]}, the model was called with batch {B}")
    seen = view.call.seen
    if view.call.prefill and span.shape[1] > seen:
        raise ValueError(f"{owner}: the span covers {span.shape[1]} positions, outside the sequence of {seen} tokens; "
                         f"accepted: [B, L] with L <= {seen}")
