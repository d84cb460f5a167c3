"""Context-awareness: where the response's attention goes, steering it back to the user's context,
and conditional instruction fine-tuning with a context-dependency indicator.

Wang, Bai, Peng and Hsieh, "On the Loss of Context-awareness in General Instruction Fine-tuning",
arXiv 2411.02688 (official code: github.com/YihanWang617/context_awareness). The paper finds that
instruction fine-tuning with a chat template makes models attend less to the context the user
gives (a bias toward the roles, learned from training examples the model can answer from its own
knowledge). This module has the paper's four tools, on any transformers causal LM that
:func:`attnkit.hf.apply` serves:

1. **The attention-allocation diagnostic** (:func:`attention_allocation`): a prompt split into
   segments (token masks ``[B, L]``: the user's context, the template's role markers, the rest,
   e.g. from :func:`encode_chat`); for each (layer, query head) the share of attention the
   response positions give each segment, ``share[s][l, h] = mean_{b, i in response} sum_{j in s}
   A^{(l,h)}_{b,i,j}``, and a heatmap (:meth:`Allocation.plot`).
2. **Manual head steering toward the context** (:class:`ContextSteer`, method ``"context"``): the
   paper steers with PASTA's reweighting (Zhang et al., arXiv 2311.02262) on chosen heads (its
   code's final setting: every head). With ``G`` the user-context span and ``P`` the prompt,
   for a query ``i`` of a steered head::

       A'_ij = A_ij * c_j / sum_k A_ik * c_k,   c_j = alpha if j in P \\ G else 1     (0 < alpha)

   i.e. the prompt's keys outside the context are scaled by ``alpha`` and the row renormalised,
   which is the same as scaling the context's share up by ``1 / alpha``; written as ``+log(alpha)``
   on those keys' logits (exactly equivalent, and what the official code does through the
   attention mask). Keys after the prompt (the response being generated) are not scaled, as in
   the official code. ``alpha = 1`` is off: no head is routed, the logits are bit-identical.
3. **The context-dependency metric** (:func:`context_dependency`): of an instruction-response
   example, at one layer ``l`` of a probe model, the mean over the response tokens ``i`` of the
   largest attention mass any head gives the user's tokens ``U``:
   ``score = mean_{i in R} max_h sum_{j in U} A^{(l,h)}_{i,j}``. Examples above a threshold (the
   paper's released data: 0.6) are *context-dependent*.
4. **Conditional fine-tuning** (:func:`indicator_examples`, :func:`add_lora`, :func:`finetune`): the
   context-dependent examples get an indicator (``"[IND]"``) in their user message; fine-tuning on
   that set, then adding the indicator at inference on context-dependent tasks, keeps the
   model's attention on the context. :func:`add_lora` is a minimal LoRA (Hu et al., arXiv
   2106.09685) in plain torch: ``peft`` is not a dependency of attnkit.

Where this differs from the official code:

- the diagnostic and the metric read the attention through attnkit's steering spine
  (:mod:`attnkit.hf.steer`: every head materialised in float32, no ``output_attentions``), so
  they also see a steering policy's changed attention (``steer=``);
- the official metric masks newline / BOS / EOS token ids of Llama-2's vocabulary out of the
  user's tokens and averages over each response turn of a multi-turn conversation; here the
  user mask is whatever the caller gives (:func:`encode_chat` marks the user messages' content)
  and the response mask may hold several turns, averaged together;
- the official code appends the indicator to the end of the user message (after a period when
  the message ends with a letter or digit); :func:`add_indicator` appends ``" [IND]"`` by
  default and can prepend it (``at="start"``);
- :func:`encode_chat` tokenizes the template's pieces and the messages' contents one by one and
  concatenates the ids, so the segment masks are exact; for a BPE tokenizer this may differ from
  tokenizing the rendered string at the pieces' borders (the official code maps character
  offsets of the rendered string instead);
- the paper fine-tunes with full SFT or QLoRA through alignment-handbook; :func:`finetune` is a
  plain LoRA loop with the loss on the response tokens only.

Legend: B batch, L prompt (or sequence) length, H query heads, T queries, S keys.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .steer import HeadView, Modifier, Steer, check_heads

__all__ = ["ChatFormat", "ChatSegments", "SUBJECT_CHAT", "encode_chat", "Allocation", "attention_allocation",
           "ContextModifier", "ContextSteer", "context_dependency", "context_dependency_scores", "add_indicator",
           "indicator_examples", "INDICATOR", "LoRALinear", "add_lora", "merge_lora", "finetune"]

#: the paper's context-dependency indicator
INDICATOR = "[IND]"


# -- chat formats and segments ------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as the text around each role's message: a user turn is
    ``user_prefix + content + user_suffix``, an assistant turn ``assistant_prefix + content +
    assistant_suffix``; ``bos`` starts the conversation. :meth:`from_tokenizer` reads them from a
    tokenizer's own chat template."""

    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    bos: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFormat":
        """The role markers of ``tokenizer.apply_chat_template``, found by rendering placeholder
        messages and cutting around them (templates that change a turn's markers by its position
        in the conversation are read from a one-turn exchange)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; give a ChatFormat "
                             "(e.g. attnkit.hf.context.SUBJECT_CHAT)")
        u, a = "\ue000u\ue000", "\ue000a\ue000"

        def render(messages, gen):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

        full = render([{"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
        asked = render([{"role": "user", "content": u}], False)
        prompted = render([{"role": "user", "content": u}], True)
        if full.count(u) != 1 or full.count(a) != 1 or not prompted.startswith(asked):
            raise ValueError("could not read the role markers from the tokenizer's chat template; give a ChatFormat")
        before_u, rest = full.split(u)
        between, after_a = rest.split(a)
        user_suffix = asked.split(u)[1]
        assistant_prefix = prompted[len(asked):]
        if user_suffix + assistant_prefix != between:
            assistant_prefix = between[len(user_suffix):] if between.startswith(user_suffix) else between
            user_suffix = "" if not between.startswith(user_suffix) else user_suffix
        return cls(user_prefix=before_u, user_suffix=user_suffix, assistant_prefix=assistant_prefix,
                   assistant_suffix=after_a)


#: the format used with the shipped subject (a byte-level model trained without any chat template)
SUBJECT_CHAT = ChatFormat(user_prefix="<|user|>\n", user_suffix="\n", assistant_prefix="<|assistant|>\n",
                          assistant_suffix="\n")


@dataclass(frozen=True)
class ChatSegments:
    """One conversation as token ids ``[L]`` and boolean masks ``[L]``: ``user`` (the user messages'
    content: the context), ``template`` (BOS and role markers), ``response`` (the last assistant
    message's content), ``rest`` (everything else: earlier assistant messages)."""

    input_ids: Tensor
    user: Tensor
    template: Tensor
    response: Tensor
    rest: Tensor

    def segments(self) -> dict[str, Tensor]:
        """``{"user", "template", "rest"}`` as ``[1, L]`` masks (the response counts as rest: keys of
        the response are what the response already wrote)."""
        return {"user": self.user[None], "template": self.template[None], "rest": (self.rest | self.response)[None]}


def _ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer, messages, fmt: ChatFormat | None = None, *, add_generation_prompt: bool = False
                ) -> ChatSegments:
    """Token ids and segment masks of ``messages`` (``[{"role": "user" | "assistant", "content": str}]``)
    under ``fmt`` (None: read from the tokenizer's chat template). ``add_generation_prompt=True``
    ends with the assistant's prefix (a prompt to generate from; ``response`` is then empty)."""
    if fmt is None:
        fmt = ChatFormat.from_tokenizer(tokenizer)
    if not isinstance(fmt, ChatFormat):
        raise ValueError(f"fmt must be an attnkit.hf.context.ChatFormat or None, got {type(fmt).__name__}")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}"[:200])
    pieces: list[tuple[list[int], str]] = [(_ids(tokenizer, fmt.bos), "template")]
    last_assistant = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                         default=-1)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': 'user' | 'assistant', 'content': str}}, got {m!r}"[:200])
        if m["role"] == "user":
            pieces += [(_ids(tokenizer, fmt.user_prefix), "template"), (_ids(tokenizer, m["content"]), "user"),
                       (_ids(tokenizer, fmt.user_suffix), "template")]
        else:
            kind = "response" if i == last_assistant and not add_generation_prompt else "rest"
            pieces += [(_ids(tokenizer, fmt.assistant_prefix), "template"), (_ids(tokenizer, m["content"]), kind),
                       (_ids(tokenizer, fmt.assistant_suffix), "template")]
    if add_generation_prompt:
        pieces.append((_ids(tokenizer, fmt.assistant_prefix), "template"))
    ids = [t for p, _ in pieces for t in p]
    kinds = [k for p, k in pieces for _ in p]
    masks = {k: torch.tensor([x == k for x in kinds], dtype=torch.bool) for k in ("user", "template", "response", "rest")}
    return ChatSegments(torch.tensor(ids, dtype=torch.long), **masks)


# -- the spans and the masks --------------------------------------------------------------------


def _as_mask(value, name: str, owner: str, empty_ok: bool = False) -> Tensor:
    """``value`` as a boolean ``[B, L]`` tensor (``[L]`` becomes ``[1, L]``); every row marks at least one
    token unless ``empty_ok``."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{owner}: {name} must be a boolean mask [B, L] (True = a token of the span), got "
                             f"{type(value).__name__}") from None
    if value.dtype != torch.bool or value.dim() not in (1, 2) or value.shape[-1] == 0:
        raise ValueError(f"{owner}: {name} must be a boolean mask [B, L] or [L] with L >= 1 (True = a token of the "
                         f"span), got dtype {value.dtype} shape {tuple(value.shape)}")
    value = value.detach().cpu()
    value = value[None] if value.dim() == 1 else value
    empty = [] if empty_ok else [b for b in range(value.shape[0]) if not bool(value[b].any())]
    if empty:
        raise ValueError(f"{owner}: {name} is an empty span in row(s) {empty}; accepted: a mask marking at least one "
                         "token per row")
    return value


def _rows(mask: Tensor, batch: int, name: str, owner: str) -> Tensor:
    """``mask`` ``[1|B, L]`` for a call of batch ``batch``."""
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(batch, -1)
    raise ValueError(f"{owner}: {name} has {mask.shape[0]} rows but the model was called with batch {batch}; "
                     "accepted: one row (shared) or one per row of the batch")


def _check_inside(mask: Tensor, seen: int, name: str, owner: str) -> None:
    if mask.shape[-1] > seen and bool(mask[:, seen:].any()):
        last = int(mask.any(0).nonzero().max())
        raise ValueError(f"{owner}: {name} marks position {last} but the sequence has only {seen} tokens "
                         f"(positions 0 .. {seen - 1}); the span must lie inside the prompt")


# -- steering -----------------------------------------------------------------------------------


class ContextModifier(Modifier):
    """PASTA's reweighting toward a span, as the paper applies it (see the module docstring):
    ``+log(alpha)`` on the logits of the prompt's keys outside ``context`` (``[B|1, L]``, ``L`` the
    prompt's length), on the ``heads`` chosen ("all" or (layer, query head) pairs)."""

    def __init__(self, alpha: float, heads, context: Tensor):
        self.alpha, self.pairs, self.context = float(alpha), heads, context

    def heads(self, num_layers, num_heads):
        if self.alpha == 1.0:
            return ()  # off: nothing is routed, the model stays bit-identical
        if isinstance(self.pairs, str):
            return tuple((l, h) for l in range(num_layers) for h in range(num_heads))
        return check_heads(self.pairs, num_layers, num_heads, owner="ContextSteer: heads")

    def logits(self, logits: Tensor, view: HeadView) -> Tensor:
        context = _rows(self.context, view.start.shape[0], "context", "ContextSteer")
        _check_inside(context, view.call.seen if view.call is not None else context.shape[1], "context", "ContextSteer")
        outside = view.key_mask(~context.to(logits.device))  # [B, 1, 1, S']: prompt keys outside the span
        return logits + math.log(self.alpha) * outside.to(logits.dtype)


@dataclass
class ContextSteer(Steer):
    """Steer chosen heads toward the user's context (the paper's manual attention steering).

    Args:
        alpha: the prompt's tokens outside ``context`` get their attention scaled by ``alpha`` and
            each row is renormalised (``> 0``; ``1``: off, bit-identical; ``< 1``: toward the
            context, the paper's 0.9 / 0.95; ``> 1``: away from it).
        heads: ``"all"`` (the official code's setting) or (layer, query head) pairs (e.g. from
            :func:`attnkit.hf.top_heads` on an :class:`Allocation`).
        context: boolean ``[L]`` or ``[B, L]`` over the prompt's positions (``L`` the prompt's
            length, left padding included), True on the user's context (e.g.
            ``encode_chat(...).user``). Needed when the policy is applied.

    ``attnkit.hf.apply(model, ContextSteer(alpha=0.9, context=mask))`` or
    ``attnkit.hf.apply(model, "context", alpha=0.9, context=mask)``; on a model whose cache drops
    keys pass ``past_key_values=handle.cache()``.
    """

    modifier: Modifier = field(default=None, init=False, repr=False)
    alpha: float = 0.9
    heads: object = "all"
    context: object = field(default=None, compare=False, repr=False)
    name: ClassVar[str] = "context"

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"ContextSteer: alpha must be a finite number > 0 (1: off, < 1: toward the context), "
                             f"got {self.alpha!r}")
        if isinstance(self.heads, str) and self.heads != "all":
            raise ValueError(f"ContextSteer: heads must be 'all' or (layer, query head) pairs, got {self.heads!r}")
        if not isinstance(self.heads, str):
            try:
                self.heads = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in self.heads)
            except TypeError:
                raise ValueError(f"ContextSteer: heads must be 'all' or (layer, query head) pairs, got "
                                 f"{self.heads!r}") from None
        mask = None if self.context is None else _as_mask(self.context, "context", "ContextSteer")
        self.modifier = ContextModifier(self.alpha, self.heads, mask)

    def bind(self, model) -> None:
        if self.modifier.context is None and self.alpha != 1.0:
            raise ValueError("ContextSteer: context is None; give the user's context as a boolean mask [B, L] over the "
                             "prompt's positions (e.g. attnkit.hf.context.encode_chat(tokenizer, messages).user)")
        super().bind(model)


# -- the diagnostic -----------------------------------------------------------------------------


class _Recorder(Modifier):
    """Routes every head through the materialised attention, applies ``inner``'s changes to the heads
    it selects, and records per query the mass each segment's keys receive."""

    def __init__(self, inner: Modifier | None, inner_heads, segments: dict[str, Tensor], num_layers, num_heads):
        self.inner, self.inner_heads = inner, set(inner_heads)
        self.segments = segments
        self.selected = tuple((l, h) for l in range(num_layers) for h in range(num_heads))
        self.num_heads = num_heads
        self.mass: dict[int, dict[str, Tensor]] = {}  # layer -> segment -> [B, H, T] float64

    def heads(self, num_layers, num_heads):
        return self.selected

    def _split(self, view: HeadView):
        rows = torch.tensor([(view.layer, int(h)) in self.inner_heads for h in view.heads.tolist()], dtype=torch.bool)
        if not bool(rows.any()):
            return None, None
        allowed = view.allowed if view.allowed.shape[1] == 1 else view.allowed[:, rows]
        return rows, HeadView(view.layer, view.heads[rows], view.q_pos, view.k_pos, view.start, allowed, view.call)

    def _delegate(self, hook: str, t: Tensor, view: HeadView) -> Tensor:
        if self.inner is None or not self.inner.overrides(hook):
            return t
        rows, sub = self._split(view)
        if rows is None:
            return t
        t = t.clone()
        t[:, rows.to(t.device)] = getattr(self.inner, hook)(t[:, rows.to(t.device)], sub)
        return t

    def logits(self, logits, view):
        return self._delegate("logits", logits, view)

    def weights(self, probs, view):
        probs = self._delegate("weights", probs, view)
        B, h, t, _ = probs.shape
        L = view.call.seen if view.call is not None else int(view.q_pos.max()) + 1
        store = self.mass.setdefault(view.layer, {})
        for name, mask in self.segments.items():
            keys = view.key_mask(_rows(mask, B, name, "attention_allocation").to(probs.device))  # [B, 1, 1, S']
            got = (probs * keys.to(probs.dtype)).sum(-1).double().cpu()  # [B, h, t]
            buf = store.setdefault(name, torch.zeros(B, self.num_heads, L, dtype=torch.float64))
            buf[:, view.heads.cpu()[:, None], view.q_pos.cpu()[None, :]] = got  # [B, h, t] into [B, H, T]
        return probs

    def output(self, out, view):
        return self._delegate("output", out, view)


@dataclass
class Allocation:
    """The attention the response positions give each segment.

    Attributes:
        share: ``{segment: [num_layers, num_heads]}`` float64, the mean over rows and response
            positions of the attention mass on the segment's keys (the segments need not cover the
            sequence: ``1 - sum`` is what went elsewhere).
        per_query: ``{segment: [num_layers, B, num_heads, T]}`` float64, the mass per query position
            (every position of the sequence; the response's are those of ``queries``).
        queries: ``[B, T]`` boolean, the response positions averaged over.
    """

    share: dict
    per_query: dict
    queries: Tensor

    def layer_share(self) -> dict:
        """``{segment: [num_layers]}``: ``share`` averaged over the heads."""
        return {k: v.mean(1) for k, v in self.share.items()}

    def plot(self, path, title: str = "attention allocation", vmax: float | None = None) -> None:
        """One heatmap per segment, layers x query heads, the share in each cell; written to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.share)
        L, H = next(iter(self.share.values())).shape
        fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 1.1 * H * len(names), 0.9 + 0.32 * L), squeeze=False)
        top = vmax if vmax is not None else max(float(v.max()) for v in self.share.values())
        for ax, name in zip(axes[0], names):
            im = ax.imshow(self.share[name].numpy(), vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
            ax.set_title(f"{name} (mean {float(self.share[name].mean()):.2f})", fontsize=9)
            ax.set_xlabel("query head")
            ax.set_xticks(range(H))
            ax.set_yticks(range(L))
            for l in range(L):
                for h in range(H):
                    v = float(self.share[name][l, h])
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 * top else "black")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of attention from the response")
        fig.suptitle(title, fontsize=10)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


def _model_shape(model) -> tuple[int, int]:
    from .attention import _text_config

    config = _text_config(model)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


@torch.no_grad()
def attention_allocation(model, input_ids: Tensor, segments: dict, queries: Tensor, *,
                         attention_mask: Tensor | None = None, steer: Steer | None = None) -> Allocation:
    """The share of attention each segment gets from the ``queries`` positions, per (layer, query head).

    Args:
        model: a transformers causal LM (:func:`attnkit.hf.apply` serves it; nothing else may be applied).
        input_ids: ``[B, L]`` (or ``[L]``) the whole sequence, prompt and response (one forward pass).
        segments: ``{name: [B|1, L] boolean}`` (e.g. :meth:`ChatSegments.segments`).
        queries: ``[B|1, L]`` boolean, the response positions to average over.
        attention_mask: ``[B, L]`` the model's padding mask, or None.
        steer: a :class:`attnkit.hf.steer.Steer` policy (e.g. :class:`ContextSteer`) whose changes the
            diagnostic sees (None: the model as it is).
    """
    from . import apply

    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    B, L = input_ids.shape
    if not isinstance(segments, dict) or not segments:
        raise ValueError(f"segments must be a non-empty dict name -> boolean mask [B, L], got {type(segments).__name__}")
    masks = {}
    for name, m in segments.items():
        m = _as_mask(m, f"segments[{name!r}]", "attention_allocation", empty_ok=True)
        if m.shape[1] != L:
            raise ValueError(f"attention_allocation: segments[{name!r}] covers {m.shape[1]} positions but input_ids has "
                             f"{L}; accepted: masks over the same positions [B|1, {L}]")
        masks[name] = _rows(m, B, f"segments[{name!r}]", "attention_allocation")
    q = _as_mask(queries, "queries", "attention_allocation")
    if q.shape[1] != L:
        raise ValueError(f"attention_allocation: queries covers {q.shape[1]} positions but input_ids has {L}")
    q = _rows(q, B, "queries", "attention_allocation")
    num_layers, num_heads = _model_shape(model)
    inner, inner_heads = None, ()
    if steer is not None:
        if not isinstance(steer, Steer):
            raise ValueError(f"steer must be an attnkit.hf.steer.Steer policy or None, got {type(steer).__name__}")
        steer.bind(model)
        inner = steer.modifier
        inner_heads = inner.heads(num_layers, num_heads)
    recorder = _Recorder(inner, inner_heads, masks, num_layers, num_heads)
    with apply(model, Steer(recorder)):
        model(input_ids, attention_mask=attention_mask)
    weight = q.to(torch.float64)[:, None, :]  # [B, 1, T]
    count = float(q.sum())
    share, per_query = {}, {}
    for name in masks:
        stack = torch.stack([recorder.mass[l][name] for l in range(num_layers)])  # [num_layers, B, H, T]
        per_query[name] = stack
        share[name] = (stack * weight[None]).sum((1, 3)) / count
    return Allocation(share, per_query, q)


# -- the context-dependency metric --------------------------------------------------------------


def context_dependency(probs: Tensor, user: Tensor, response: Tensor) -> Tensor:
    """The paper's context-dependency score from one layer's attention probabilities.

    Args:
        probs: ``[B, H, T, S]`` attention probabilities (rows over keys), queries and keys over the
            same positions (``T == S``, the whole example).
        user: ``[B, S]`` boolean, the user's tokens. response: ``[B, T]`` boolean, the response's.

    Returns:
        ``[B]`` float64: ``mean_{i in response} max_h sum_{j in user} probs[b, h, i, j]``.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, T, S], got shape {tuple(probs.shape)}")
    B, H, T, S = probs.shape
    user = _as_mask(user, "user", "context_dependency")
    response = _as_mask(response, "response", "context_dependency")
    if user.shape != (B, S) and user.shape != (1, S):
        raise ValueError(f"context_dependency: user must be [B, S] = [{B}, {S}], got {tuple(user.shape)}")
    if response.shape != (B, T) and response.shape != (1, T):
        raise ValueError(f"context_dependency: response must be [B, T] = [{B}, {T}], got {tuple(response.shape)}")
    mass = (probs.double().cpu() * user.to(torch.float64)[:, None, None, :]).sum(-1)  # [B, H, T]
    return _score(mass, response.expand(B, T))


def _score(mass: Tensor, response: Tensor) -> Tensor:
    top = mass.max(1).values  # [B, T]: the most attentive head per query
    r = response.to(torch.float64)
    return (top * r).sum(1) / r.sum(1)


@torch.no_grad()
def context_dependency_scores(model, input_ids: Tensor, user: Tensor, response: Tensor, *, layer: int,
                              attention_mask: Tensor | None = None) -> Tensor:
    """:func:`context_dependency` of ``model`` (the probe) at ``layer`` on whole examples
    ``input_ids`` ``[B, L]`` with masks ``user`` / ``response`` ``[B|1, L]`` -> ``[B]`` float64."""
    num_layers, _ = _model_shape(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in 0 .. {num_layers - 1}, got {layer!r}")
    alloc = attention_allocation(model, input_ids, {"user": user}, response, attention_mask=attention_mask)
    return _score(alloc.per_query["user"][layer], alloc.queries)


# -- conditional fine-tuning --------------------------------------------------------------------


def add_indicator(text: str, indicator: str = INDICATOR, at: str = "end") -> str:
    """``text`` with the indicator appended (``at="end"``, the official code's place: ``" [IND]"``)
    or prepended (``at="start"``: ``"[IND] "``)."""
    if at not in ("end", "start"):
        raise ValueError(f"at must be 'end' or 'start', got {at!r}")
    if not isinstance(indicator, str) or not indicator:
        raise ValueError(f"indicator must be a non-empty string, got {indicator!r}")
    return f"{text} {indicator}" if at == "end" else f"{indicator} {text}"


def indicator_examples(conversations, scores, threshold: float = 0.6, indicator: str = INDICATOR,
                       at: str = "end") -> list:
    """The conditional fine-tuning set: ``conversations`` (lists of messages) with ``indicator``
    added to every user message of those whose context-dependency score is above ``threshold``
    (the paper's released sets: 0.6); the others unchanged. Returns new lists (inputs untouched)."""
    scores = [float(s) for s in torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()]
    if len(scores) != len(conversations):
        raise ValueError(f"scores has {len(scores)} entries but there are {len(conversations)} conversations")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    out = []
    for conv, s in zip(conversations, scores):
        conv = [dict(m) for m in conv]
        if s > threshold:
            for m in conv:
                if m.get("role") == "user":
                    m["content"] = add_indicator(m["content"], indicator, at)
        out.append(conv)
    return out


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``: a frozen ``nn.Linear`` plus a trainable low-rank
    update (A ``[rank, in]`` random, B ``[out, rank]`` zero, so it starts as the base exactly)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.base, self.scaling = base, float(alpha) / rank
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scaling
        return self.base


def add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank: int = 8, alpha: float = 16.0,
             seed: int = 0) -> list:
    """Wrap every ``nn.Linear`` named in ``targets`` with :class:`LoRALinear` and freeze the rest of
    ``model``; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in {type(model).__name__}")
    params = []
    for name, module in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        lora = LoRALinear(module, rank, alpha)
        setattr(parent, name.rsplit(".", 1)[-1], lora)
        params += [lora.lora_a, lora.lora_b]
    return params


def merge_lora(model) -> None:
    """Fold every :class:`LoRALinear` of ``model`` back into a plain ``nn.Linear``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.merged())


def finetune(model, examples, params, *, steps: int, lr: float = 1e-3, batch_size: int = 4, seed: int = 0,
             log_every: int = 10) -> list:
    """Supervised fine-tuning on ``examples`` (``ChatSegments``, the loss on each ``response`` token):
    AdamW on ``params`` for ``steps`` steps of ``batch_size`` examples (right-padded with id 0,
    drawn with ``seed``). Returns the loss curve ``[(step, loss)]``."""
    import torch.nn.functional as F

    if not examples:
        raise ValueError("finetune: no examples")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    curve = []
    model.train()
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        L = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(batch_size, L, dtype=torch.long)
        target = torch.full((batch_size, L), -100, dtype=torch.long)
        mask = torch.zeros(batch_size, L, dtype=torch.long)
        for b, e in enumerate(batch):
            n = len(e.input_ids)
            ids[b, :n], mask[b, :n] = e.input_ids, 1
            target[b, :n] = torch.where(e.response, e.input_ids, torch.full_like(e.input_ids, -100))
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append((step, float(loss.detach())))
    model.eval()
    return curve
