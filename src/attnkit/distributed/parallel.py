"""Sequence parallelism for a model built of attnkit layers: one call, one option.

:func:`parallelize` turns a :class:`attnkit.models.DecoderLM` (or any module holding attnkit's
multi-head softmax layers) into a sequence-parallel one: every rank of the group feeds its share of
each sequence (:func:`attnkit.distributed.shard`, the layout given here), and

- each softmax layer's RoPE uses the tokens' **global** positions (its share's, from the layout),
- its attention core runs :func:`ring_attend` (``mode="ring"``: causal or full patterns) or
  :func:`ulysses_attend` (``mode="ulysses"``: any pattern; contiguous layout, heads divisible by
  the world size),
- each Lightning (linear attention) layer runs :func:`lasp2_lightning` (LASP-2; contiguous
  layout), so a hybrid stack of Lightning and softmax layers is LASP-2H (Sun et al., arXiv
  2502.07563: linear layers by one all-gather of states, softmax layers by ring or all-to-all),

while embeddings, norms and MLPs work per token as before. A training step's loss is the sum over
the ranks of each rank's token losses (:func:`sequence_loss` does the all-reduce), and parameter
gradients are summed over the ranks (:func:`sum_gradients`, the same all-reduce data parallelism
does). :meth:`Parallel.remove` restores the layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import patterns as _patterns
from .lasp2 import lasp2_lightning
from .ring import LAYOUTS, _group_info, ring_attend, shard_positions, ulysses_attend

__all__ = ["Parallel", "parallelize", "sequence_loss", "sum_gradients", "MODES"]

MODES = ("ring", "ulysses")


class _GlobalRope(nn.Module):
    """The layer's RoPE at this rank's global positions (a call without explicit positions)."""

    def __init__(self, rope: nn.Module, positions: Tensor):
        super().__init__()
        self.inner = rope
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, q, k, offset: int = 0, positions=None):
        if positions is not None:
            raise ValueError("parallelize: packed documents (document_ids) are not supported under sequence "
                             "parallelism yet; pass whole sequences")
        if q.shape[2] != self.positions.numel():
            raise ValueError(f"parallelize: this rank was set up for shares of {self.positions.numel()} tokens, got "
                             f"{q.shape[2]}; call parallelize again with seq_len= the new length")
        return self.inner(q, k, positions=self.positions.to(q.device)[None] + offset)


class Parallel:
    """What :func:`parallelize` changed; :meth:`remove` undoes it."""

    def __init__(self, changed):
        self._changed = changed

    def remove(self) -> None:
        for layer, rope, core in reversed(self._changed):
            if hasattr(layer, "rope"):
                layer.rope = rope
            if core is None:
                layer.__dict__.pop("core", None)
            else:
                layer.core = core
        self._changed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def parallelize(model: nn.Module, seq_len: int, *, group=None, mode: str = "ring", layout: str = "zigzag") -> Parallel:
    """Make ``model``'s softmax attention layers sequence parallel over ``group``.

    Args:
        model: a module holding attnkit ``MultiHeadAttention`` layers (MHA, GQA, MQA: the
            ``DecoderLM`` default). Any other attention layer is refused (its mixing is not
            sharded here yet); packed documents are refused at the forward.
        seq_len: the whole sequence's length (each rank feeds ``seq_len / W`` tokens).
        mode: ``"ring"`` (causal / full) or ``"ulysses"`` (any pattern). layout: ``"zigzag"``
            (ring only: balances causal work) or ``"contiguous"``.
    """
    from ..layers.multi_head import MultiHeadAttention

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if mode == "ulysses" and layout != "contiguous":
        raise ValueError("mode='ulysses' needs layout='contiguous' (its all-to-all keeps the shards in rank order)")
    world, rank = _group_info(group)
    positions = shard_positions(seq_len, world, rank, layout)  # the divisibility rule, with its message
    from ..layers.base import AttentionLayer

    from ..layers.lightning import LightningAttention

    layers = [m for m in model.modules() if isinstance(m, AttentionLayer)]
    softmax = [m for m in layers if isinstance(m, MultiHeadAttention) and type(m).core is MultiHeadAttention.core
               and type(m).adjust is MultiHeadAttention.adjust]
    linear = [m for m in layers if type(m) is LightningAttention]
    others = sorted({type(m).__name__ for m in layers if m not in softmax and m not in linear})
    if others:
        raise ValueError(f"parallelize shards softmax multi-head attention (mha, gqa, mqa) and Lightning attention "
                         f"(LASP-2) only; this model also has {', '.join(others)}, whose mixing is not sequence "
                         "parallel here")
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no attnkit attention layers")
    if linear and layout != "contiguous":
        raise ValueError("Lightning layers run LASP-2, which combines the ranks' states in sequence order: use "
                         "layout='contiguous'")
    changed = []
    for layer in linear:
        changed.append((layer, None, layer.__dict__.get("core")))
        layer.core = _lasp2_core(layer, group)
    for layer in softmax:
        kind = _patterns.resolve(layer.pattern).kind
        if mode == "ring" and kind not in ("causal", "full"):
            raise ValueError(f"mode='ring' runs causal or full attention; a layer has pattern {layer.pattern!r}: use "
                             "mode='ulysses' (any pattern)")
        if mode == "ulysses" and (layer.num_heads % world or layer.num_kv_heads % world):
            raise ValueError(f"mode='ulysses' needs heads divisible by the world size {world}; a layer has "
                             f"{layer.num_heads} query / {layer.num_kv_heads} key-value heads: use mode='ring'")
        changed.append((layer, layer.rope, layer.__dict__.get("core")))
        if layer.rope is not None:
            layer.rope = _GlobalRope(layer.rope, positions)
        layer.core = _core(layer, mode, layout, group)
    return Parallel(changed)


def _core(layer, mode, layout, group):
    def core(q, k, v, pattern, q_offset):
        if q_offset is not None:
            raise ValueError("parallelize: decoding with a state is not sequence parallel; generate on one rank")
        if mode == "ulysses":
            return ulysses_attend(q, k, v, group=group, pattern=pattern)
        return ring_attend(q, k, v, group=group, causal=_patterns.resolve(pattern).kind == "causal", layout=layout)

    return core


def _lasp2_core(layer, group):
    def core(q, k, v, initial):
        if initial is not None:
            raise ValueError("parallelize: decoding with a state is not sequence parallel; generate on one rank")
        return lasp2_lightning(q, k, v, layer.slopes, group=group, backend=layer.backend)

    return core


def sequence_loss(local_sum: Tensor, local_count, group=None) -> tuple[Tensor, Tensor]:
    """``(loss, value)`` from each rank's token-loss sum and count: ``loss = local_sum / N`` with
    ``N`` the tokens of every rank (an all-reduce of the counts), for ``backward`` on every rank
    (then :func:`sum_gradients`); ``value``: the whole sequence's mean loss (the ranks' ``loss``
    summed, detached), the number to log."""
    count = torch.as_tensor(float(local_count), dtype=torch.float64, device=local_sum.device)
    dist.all_reduce(count, group=group)
    loss = local_sum / count.to(local_sum.dtype)
    value = loss.detach().clone()
    dist.all_reduce(value, group=group)
    return loss, value


def sum_gradients(model: nn.Module, group=None) -> None:
    """Sum every parameter's gradient over the ranks (after ``backward``): each rank saw part of
    the sequence, the step needs the whole's."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
