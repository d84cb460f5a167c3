"""Soft injection of task embeddings (Park & Rhee, "Soft Injection of Task Embeddings Outperforms
Prompt-Based In-Context Learning", arXiv 2507.20906; also titled SITE, "Soft Head Selection for
Injecting ICL-Derived Task Embeddings").

Three stages:

1. **task embeddings** (:func:`task_embeddings`): run few-shot prompts of the task and average,
   per (layer, query head), the head's attention output at the last position (before the output
   projection): ``E [L, H, Dv]``. Built once.
2. **soft head selection** (:func:`fit_task_injection`): mixing weights ``alpha = sigmoid(theta)``
   ``[L, H]`` (``theta`` starts at 0, alpha 0.5) learnt with Adam so that zero-shot prompts of the
   task, with the embeddings mixed in, give the right first answer token (cross-entropy over the
   whole vocabulary). Only ``theta`` is trained; the model is frozen.
3. **zero-shot inference** (:class:`TaskInject`): at the last position of each call, every head's
   output becomes ``(1 - alpha) * out + alpha * E`` (the ``output`` hook of the steering spine).

Heads whose weight is 0 are not selected: all-zero weights leave the model bit-identical.

Deviations from the official code (SNU-DRL/Soft_Injection): the official hooks the input of each
``o_proj`` (per-architecture module names) where here the spine's ``output`` hook serves any model
attnkit.hf can steer; the official builds embeddings from M=50 prompts of N=10 shots and trains
for a fixed number of epochs at a given learning rate (``lr`` argument) on GPU; here the numbers
are arguments (small defaults that run on a CPU). The official injects at the last prompt token;
here each call's last position is injected (at prefill the prompt's last token; during decoding
each new token as well: pass ``positions="prefill"`` for the prompt's last token only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from .steer import HeadView, Modifier, Steer, check_heads

__all__ = ["TaskInjectModifier", "TaskInject", "task_embeddings", "fit_task_injection"]

_POSITIONS = ("last", "prefill")


class _Recorder(Modifier):
    """Every head's output at the call's last position, summed over rows (``output`` hook)."""

    def __init__(self, num_layers, num_heads):
        self.selected = tuple((l, h) for l in range(num_layers) for h in range(num_heads))
        self.sums: dict = {}

    def output(self, out, view):
        last = out[:, :, -1].double().sum(0)  # [h, Dv]
        for r, h in enumerate(view.heads.tolist()):
            key = (view.layer, h)
            self.sums[key] = self.sums.get(key, 0) + last[r]
        return out


def _shape(model):
    from .attention import _text_config

    config = _text_config(model)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


@torch.no_grad()
def task_embeddings(model, prompts: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 32) -> Tensor:
    """``[L, H, Dv]`` float32: each (layer, query head)'s attention output at the last position,
    averaged over ``prompts`` (token-id lists, e.g. few-shot prompts of the task). ``ValueError`` on
    an empty list or an empty prompt."""
    from .attention import apply
    from .zerotuning import left_padded

    if len(prompts) == 0:
        raise ValueError("task_embeddings: prompts is empty; give the few-shot prompts of the task")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("task_embeddings: a prompt is empty")
    L, H = _shape(model)
    recorder = _Recorder(L, H)
    device = next(model.parameters()).device
    with apply(model, Steer(recorder)):
        for _, ids, mask, pos in left_padded(prompts, pad_id, batch_size, device):
            model(ids, attention_mask=mask, position_ids=pos)
    Dv = next(iter(recorder.sums.values())).shape[-1]
    out = torch.zeros(L, H, Dv, dtype=torch.float64)
    for (l, h), s in recorder.sums.items():
        out[l, h] = s.cpu()
    return (out / len(prompts)).float()


class TaskInjectModifier(Modifier):
    """Mix ``embeddings`` ``[L, H, Dv]`` into the heads' outputs at the last position with weights
    ``weights`` ``[L, H]`` in [0, 1] (``output`` hook). ``theta`` (a ``[L, H]`` tensor that may
    require grad) replaces the weights by ``sigmoid(theta)`` on every head: the training form."""

    def __init__(self, embeddings: Tensor, weights: Tensor | None = None, theta: Tensor | None = None,
                 positions: str = "last"):
        if positions not in _POSITIONS:
            raise ValueError(f"TaskInject: positions must be one of {', '.join(_POSITIONS)}, got {positions!r}")
        self.embeddings, self.theta, self.positions = embeddings, theta, positions
        L, H = embeddings.shape[:2]
        if theta is not None:
            self.weights = None
            self.selected = tuple((l, h) for l in range(L) for h in range(H))
        else:
            self.weights = weights
            nz = (weights != 0).nonzero().tolist()
            self.selected = tuple((int(l), int(h)) for l, h in nz)

    def heads(self, num_layers, num_heads):
        L, H = self.embeddings.shape[:2]
        if (L, H) != (num_layers, num_heads):
            raise ValueError(f"TaskInject: embeddings are for [num_layers, num_heads] = [{L}, {H}] but the model "
                             f"has [{num_layers}, {num_heads}]; build them on this model (task_embeddings)")
        return check_heads(self.selected, num_layers, num_heads, owner="TaskInject")

    def output(self, out: Tensor, view: HeadView) -> Tensor:
        if self.positions == "prefill" and not view.call.prefill:
            return out
        heads = view.heads.to(self.embeddings.device)
        e = self.embeddings[view.layer].index_select(0, heads).to(out.device, out.dtype)  # [h, Dv]
        if self.theta is not None:
            w = torch.sigmoid(self.theta[view.layer].index_select(0, heads.to(self.theta.device)))
        else:
            w = self.weights[view.layer].index_select(0, heads.to(self.weights.device))
        w = w.to(out.device, out.dtype)[None, :, None]  # [1, h, 1]
        last = (1 - w) * out[:, :, -1] + w * e[None]
        return torch.cat([out[:, :, :-1], last[:, :, None]], dim=2)


def _tensor(value, name: str, dims: int) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"TaskInject: {name} must be a float tensor of {dims} dims, got {type(value).__name__}") from None
    if t.dim() != dims:
        raise ValueError(f"TaskInject: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"TaskInject: {name} holds NaN or infinite values")
    return t.detach().cpu()


@dataclass(eq=False)  # tensors: compared by identity
class TaskInject(Steer):
    """Soft injection as a named policy: ``attnkit.hf.apply(model, "taskinject", embeddings=E, weights=A)``.

    ``embeddings`` ``[L, H, Dv]`` (:func:`task_embeddings`), ``weights`` ``[L, H]`` in [0, 1] (the
    learnt ``sigmoid(theta)``, :func:`fit_task_injection`); ``positions``: ``"last"`` (each call's
    last position) or ``"prefill"`` (the prompt's last token only). Without embeddings (the
    defaults) no head is selected."""

    modifier: Modifier = field(default=None, init=False, repr=False, compare=False)
    embeddings: object = field(default=None, compare=False)
    weights: object = field(default=None, compare=False)
    positions: str = "last"
    name: ClassVar[str] = "taskinject"

    def __post_init__(self):
        if self.embeddings is None:
            if self.weights is not None:
                raise ValueError("TaskInject: weights were given without embeddings")
            emb, w = torch.zeros(1, 1, 1), torch.zeros(1, 1)
            self.modifier = _NoHeads(emb, w, positions=self.positions)
        else:
            emb = _tensor(self.embeddings, "embeddings", 3)
            w = torch.zeros(emb.shape[:2]) if self.weights is None else _tensor(self.weights, "weights", 2)
            if tuple(w.shape) != tuple(emb.shape[:2]):
                raise ValueError(f"TaskInject: weights have shape {tuple(w.shape)} but embeddings are for "
                                 f"[num_layers, num_heads] = {list(emb.shape[:2])}")
            if bool(((w < 0) | (w > 1)).any()):
                raise ValueError(f"TaskInject: weights must be in [0, 1] (sigmoid of the learnt logits), got values "
                                 f"in [{float(w.min()):.3g}, {float(w.max()):.3g}]")
            self.modifier = TaskInjectModifier(emb, w, positions=self.positions)
        super().__post_init__()


class _NoHeads(TaskInjectModifier):
    """A TaskInject without embeddings: selects nothing on any model."""

    def heads(self, num_layers, num_heads):
        return ()


def fit_task_injection(model, embeddings: Tensor, prompts: Sequence[Sequence[int]], targets: Sequence[int], *,
                       steps: int = 60, lr: float = 0.1, batch_size: int = 16, seed: int = 0,
                       pad_id: int = 0) -> tuple[TaskInject, dict]:
    """Learn the soft head-selection weights: ``theta`` ``[L, H]`` (zeros: alpha 0.5 everywhere)
    trained with Adam (``lr``) for ``steps`` mini-batches of ``batch_size`` zero-shot ``prompts``
    (token-id lists) so the injected model's next token is ``targets`` (one token id per prompt;
    cross-entropy over the vocabulary). Returns ``(TaskInject(embeddings, sigmoid(theta)), report)``,
    ``report["loss"]`` the loss per step."""
    from .attention import apply
    from .zerotuning import left_padded

    if len(prompts) == 0:
        raise ValueError("fit_task_injection: prompts is empty; give zero-shot prompts of the task")
    if len(targets) != len(prompts):
        raise ValueError(f"fit_task_injection: {len(prompts)} prompts but {len(targets)} targets")
    for name, v, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0)):
        if isinstance(v, bool) or not ok:
            raise ValueError(f"fit_task_injection: {name} must be a positive number, got {v!r}")
    emb = _tensor(embeddings, "embeddings", 3)
    L, H = _shape(model)
    if tuple(emb.shape[:2]) != (L, H):
        raise ValueError(f"fit_task_injection: embeddings are for {list(emb.shape[:2])} but the model has "
                         f"[num_layers, num_heads] = [{L}, {H}]")
    device = next(model.parameters()).device
    theta = torch.zeros(L, H, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    modifier = TaskInjectModifier(emb.to(device), theta=theta)
    gen = torch.Generator().manual_seed(seed)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    try:
        with apply(model, Steer(modifier)), torch.enable_grad():
            for _ in range(steps):
                rows = torch.randperm(len(prompts), generator=gen)[:batch_size].tolist()
                batch = [prompts[i] for i in rows]
                want = torch.tensor([int(targets[i]) for i in rows], device=device)
                (_, ids, mask, pos), = left_padded(batch, pad_id, len(batch), device)
                logits = model(ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
                loss = torch.nn.functional.cross_entropy(logits, want)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
    weights = torch.sigmoid(theta.detach())
    return TaskInject(embeddings=emb, weights=weights), {"loss": losses, "weights": weights}
