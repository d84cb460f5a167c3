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

while embeddings, norms and MLPs work per token as before. :func:`generate` decodes from a prompt
split over the ranks: a sequence-parallel prefill, then decode steps whose attention reads every
rank's share of the KV cache. A training step's loss is the sum over
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

__all__ = ["Parallel", "parallelize", "generate", "sequence_loss", "sum_gradients", "MODES"]

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


# -- decoding under sequence parallelism --------------------------------------------------------


class _AtPosition(nn.Module):
    """The layer's RoPE at one global position, set before each decode step."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.inner = rope
        self.position = 0

    def forward(self, q, k, offset: int = 0, positions=None):
        return self.inner(q, k, positions=torch.tensor([[self.position]], device=q.device))


def _merge_partials(out: Tensor, lse: Tensor, group) -> Tensor:
    """Softmax attention over keys split across the ranks, from each rank's partial ``out`` over its
    keys and their log-sum-exp ``lse [B, H, T]``: ``sum_r exp(lse_r - m) out_r / sum_r exp(lse_r - m)``
    with ``m`` the ranks' largest lse (two all-reduces: the max, then numerator and denominator in one)."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    lse = lse.to(acc)
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top).nan_to_num(0.0)  # a rank whose keys are all masked: lse -inf, weight 0
    packed = torch.cat([(out.to(acc) * weight[..., None]).flatten(), weight.flatten()])
    dist.all_reduce(packed, group=group)
    numerator = packed[: out.numel()].view(out.shape)
    total = packed[out.numel():].view(weight.shape)
    return (numerator / total[..., None]).to(out.dtype)


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, *, group=None, mode: str = "ring",
             layout: str = "contiguous", temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Continue a prompt split over the ranks of ``group``; every rank calls it with its share.

    The prefill runs sequence parallel (:func:`parallelize`: ring or Ulysses for softmax layers,
    LASP-2 for Lightning) and each softmax layer keeps **its rank's share** of the keys and values:
    no rank holds the whole cache. A decode step runs the new token on every rank; each softmax
    layer attends it to the local share (plus the new keys, which go to the ranks in turn, so the
    shares stay even) and the ranks' partial results merge by log-sum-exp (two all-reduces of
    ``B x H`` numbers and one of the output); a Lightning layer continues from the sequence's
    final state, which LASP-2 gives every rank. The token is chosen on the rank that holds the
    prompt's last position and broadcast, so every rank returns the same tokens.

    Args:
        model: a :class:`~attnkit.models.DecoderLM` (or any model ``tokens [B, T] -> logits``) of
            layers :func:`parallelize` accepts.
        prompt: ``[B, T / W]`` token ids, this rank's share of the prompt in ``layout``
            (:func:`~attnkit.distributed.shard` along dim 1).
        max_new_tokens, temperature, top_k, generator: as :meth:`DecoderLM.generate` (the
            generator is used on the rank that chooses, as one process would use it).
        mode, layout: as :func:`parallelize`.

    Returns:
        ``[B, max_new_tokens]``, the continuation (the same on every rank). Greedy decoding gives
        the tokens one process gets from ``model.generate(whole_prompt, ...)`` (tested on gloo with
        2 and 3 ranks, softmax and Lightning + GQA hybrid stacks).
    """
    from ..layers.lightning import LightningAttention
    from ..models.decoder import next_token
    from ..ops.linear.lightning import lightning_attend
    from ..ops.softmax import attend
    from ..state import KVCache

    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long or prompt.numel() == 0:
        got = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be this rank's share of token ids, a LongTensor [B, T / W] with B, T >= 1, got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    world, rank = _group_info(group)
    B, T = prompt.shape
    seq_len = T * world
    is_last = [shard_positions(seq_len, world, r, layout) == seq_len - 1 for r in range(world)]
    owner = next(r for r in range(world) if bool(is_last[r].any()))  # contiguous: the last rank; zigzag: rank 0
    last = int(is_last[owner].nonzero()[0, 0])
    owner_global = dist.get_global_rank(group, owner) if group is not None else owner

    caches: dict = {}  # softmax layer -> this rank's KVCache share
    states: dict = {}  # Lightning layer -> the running state
    with parallelize(model, seq_len, group=group, mode=mode, layout=layout) as par:
        for layer, _rope, _core in par._changed:
            inner = layer.core

            if isinstance(layer, LightningAttention):  # keep the sequence's final state
                def prefill(q, k, v, initial, inner=inner, layer=layer):
                    out, final = inner(q, k, v, initial)
                    states[layer] = final
                    return out, final
            else:  # softmax: keep this rank's rotated keys and values
                def prefill(q, k, v, pattern, q_offset, inner=inner, layer=layer):
                    cache = KVCache(k.shape[0], k.shape[1], k.shape[3], value_dim=v.shape[3], max_len=None,
                                    device=k.device, dtype=k.dtype)
                    cache.update(k, v)
                    caches[layer] = cache
                    return inner(q, k, v, pattern, q_offset)
            layer.core = prefill
        logits = model(prompt)[:, last]  # every rank runs the prefill (its collectives); the owner's row counts

    def choose(logits):
        token = torch.empty(B, 1, dtype=torch.long, device=prompt.device)
        if rank == owner:
            token = next_token(logits, temperature, top_k, generator)
        dist.broadcast(token, src=owner_global, group=group)
        return token

    changed = []  # (layer, rope, core) to put back
    step = [0]
    try:
        for layer in caches:
            changed.append((layer, layer.rope, layer.__dict__.get("core")))
            if layer.rope is not None:
                layer.rope = _AtPosition(layer.rope)

            def decode(q, k, v, pattern, q_offset, layer=layer):
                cache = caches[layer]
                if step[0] % world == rank:  # the new keys go to the ranks in turn
                    cache.update(k, v)
                out, lse = attend(q, cache.keys, cache.values, backend=layer.backend, return_lse=True)
                return _merge_partials(out, lse, group)
            layer.core = decode
        for layer in states:
            changed.append((layer, None, layer.__dict__.get("core")))

            def recurrent(q, k, v, initial, layer=layer):
                out, final = lightning_attend(q, k, v, layer.slopes, initial_state=states[layer], backend=layer.backend,
                                              chunk_size=layer.chunk_size)
                states[layer] = final
                return out, final
            layer.core = recurrent
        tokens = []
        for t in range(max_new_tokens):
            token = choose(logits)
            tokens.append(token)
            if t + 1 == max_new_tokens:
                break
            step[0] = t
            for layer in caches:
                if isinstance(layer.rope, _AtPosition):
                    layer.rope.position = seq_len + t
            logits = model(token)[:, -1]
        return torch.cat(tokens, dim=1) if tokens else prompt.new_zeros(B, 0)
    finally:
        Parallel(changed).remove()
