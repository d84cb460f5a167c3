"""Sequence parallelism for softmax attention on ``torch.distributed``: ring attention and Ulysses.

Legend: B batch, Hq / Hkv query / key-value heads, T the local (per-rank) sequence, D head dim,
W the world size of the process group, r a rank.

**Shards.** A sequence of ``W * T`` tokens is split over the ranks by :func:`shard`:
``"contiguous"`` (rank r holds tokens ``r*T .. (r+1)*T - 1``) or ``"zigzag"`` (the sequence in
``2W`` chunks; rank r holds chunks ``r`` and ``2W - 1 - r``, so every rank has the same share of
causal work: the layout of ring-flash-attention and Llama 3's context parallelism).

**Ring attention** (:func:`ring_attend`; Liu et al., "Ring Attention with Blockwise Transformers",
arXiv 2310.01889). Each rank keeps its queries; the key / value shards travel around the ring
(``W - 1`` sends of one shard per rank). At each of the ``W`` steps a rank attends its queries to
the shard it holds, chunk by chunk, skipping chunk pairs that the causal rule masks entirely, and
merges the partial outputs by log-sum-exp in float32: with ``(o_i, l_i)`` the partial output and
lse, ``l = logsumexp_i l_i``, ``o = sum_i exp(l_i - l) o_i``. The backward runs the ring again:
each rank recomputes the probabilities of every block from the saved global lse
(``P = exp(q k^T * scale - lse)``), accumulates ``dq`` locally, and sends ``dk`` / ``dv``
accumulators around with their shard, so they arrive back at the shard's owner after the last
step. Exact: outputs, lse and every gradient equal single-device attention (tested in float64
with 2, 3 and 4 gloo processes). The per-block backward is written out (materialising a
``[T_chunk, T_chunk]`` block of probabilities), the forward uses :func:`attnkit.attend`.

**Ulysses** (:func:`ulysses_attend`; Jacobs et al., "DeepSpeed Ulysses", arXiv 2309.14509): an
all-to-all turns the sequence shards into head shards (each rank: ``H / W`` heads over the whole
sequence), attention runs locally with any pattern, and a second all-to-all turns the output
back; the all-to-alls are autograd-aware (``torch.distributed.nn``). Needs ``Hq % W == 0`` and
``Hkv % W == 0`` and the contiguous layout.

Bad input is checked before any collective where it can be decided locally, and the shapes of all
ranks are compared once (an all-gather of the shape) so that ranks that disagree get a
``ValueError`` each instead of a hang.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.softmax import attend

__all__ = ["LAYOUTS", "shard", "unshard", "shard_positions", "ring_attend", "ulysses_attend", "ring_bytes", "ulysses_bytes",
           "sent_bytes"]

_SENT = [0]  # bytes this process sent through the ring's point-to-point ops (see sent_bytes)


def sent_bytes(reset: bool = False) -> int:
    """Bytes this process has sent so far (``reset=True``: and start again from 0): the measured side
    of :func:`ring_bytes` (the ring's point-to-point sends, forward and backward), :func:`ulysses_bytes`
    (the forward's all-to-alls, minus the slice a rank keeps) and :func:`~attnkit.distributed.lasp2.lasp2_bytes`
    (the all-gather of the states, forward: a ring all-gather has each rank transmit ``W - 1`` states)."""
    value = _SENT[0]
    if reset:
        _SENT[0] = 0
    return value

LAYOUTS = ("contiguous", "zigzag")


# -- shards ------------------------------------------------------------------------------------------


def _chunks(total: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """``(start, length)`` of the global position ranges rank ``rank`` holds, in local order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    parts = world if layout == "contiguous" else 2 * world
    if total % parts:
        rule = "the world size" if layout == "contiguous" else "2 x the world size (zigzag)"
        raise ValueError(f"a sequence of {total} tokens does not split over {world} ranks: its length must be a "
                         f"multiple of {rule} = {parts}; pad it to {math.ceil(total / parts) * parts}")
    n = total // parts
    if layout == "contiguous":
        return [(rank * n, n)]
    return [(rank * n, n), ((2 * world - 1 - rank) * n, n)]


def shard_positions(total: int, world: int, rank: int, layout: str = "contiguous") -> Tensor:
    """The global positions of rank ``rank``'s tokens, in its local order ``[total / world]``."""
    return torch.cat([torch.arange(s, s + n) for s, n in _chunks(total, world, rank, layout)])


def shard(x: Tensor, world: int, rank: int, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank ``rank``'s share of ``x`` along ``dim`` (the sequence)."""
    return torch.cat([x.narrow(dim, s, n) for s, n in _chunks(x.shape[dim], world, rank, layout)], dim=dim)


def unshard(parts: list[Tensor], layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The whole sequence from every rank's share (``parts[r]`` from rank r)."""
    world = len(parts)
    total = sum(p.shape[dim] for p in parts)
    out = [None] * (world if layout == "contiguous" else 2 * world)
    for r, p in enumerate(parts):
        offset = 0
        for s, n in _chunks(total, world, r, layout):
            out[s // n] = p.narrow(dim, offset, n)
            offset += n
    return torch.cat(out, dim=dim)


# -- checks ------------------------------------------------------------------------------------------


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence parallel attention needs an initialised process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, group, what: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}: {name} must be a rank-4 tensor [B, H, T, D], got {got}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be local shards of "
                         "one sequence: [B, Hq, T, D], [B, Hkv, T, D], [B, Hkv, T, Dv]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{what}: query heads {q.shape[1]} must be a multiple of key / value heads {k.shape[1]}")
    _check_same_shapes([q, k, v], group, what)


def _check_same_shapes(tensors: list[Tensor], group, what: str) -> None:
    """Every rank must hold the same shapes (else a send / receive pair would wait forever): one
    all-gather of the shapes, and a ``ValueError`` on every rank where they differ."""
    mine = torch.tensor([d for t in tensors for d in t.shape], dtype=torch.long)
    world = dist.get_world_size(group)
    if world > 1:
        device = tensors[0].device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([mine.numel()], device=device), group=group)
        longest = int(max(t.item() for t in sizes))
        padded = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded[: mine.numel()] = mine.to(device)
        everyone = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(everyone, padded, group=group)
        shapes = {tuple(t.tolist()) for t in everyone}
        if len(shapes) > 1:
            raise ValueError(f"{what}: the ranks hold shards of different shapes {sorted(shapes)}; every rank must "
                             "pass inputs of the same shape")


# -- the ring ----------------------------------------------------------------------------------------


def _relation(qs: int, qn: int, ks: int, kn: int, causal: bool, window: int | None = None) -> str:
    """How a query range attends a key range: ``full``, ``causal`` (the same range), ``empty`` or
    ``mixed`` (a partial overlap: a mask from positions). ``window``: keys at distance < window only."""
    if window is not None:
        if ks > qs + qn - 1 or qs - (ks + kn - 1) >= window:
            return "empty"
        if ks + kn - 1 <= qs and (qs + qn - 1) - ks < window:
            return "full"
        return "causal" if (qs, qn) == (ks, kn) and qn <= window else "mixed"
    if not causal or ks + kn - 1 <= qs:
        return "full"
    if ks > qs + qn - 1:
        return "empty"
    return "causal" if (qs, qn) == (ks, kn) else "mixed"


def _exchange(tensors: list[Tensor], group, world: int, rank: int, shift: int = 1) -> list[Tensor]:
    """Send ``tensors`` to rank ``rank + shift`` and receive rank ``rank - shift``'s, at once."""
    return _finish_exchange(_start_exchange(tensors, group, world, rank, shift))


def _merge(out: Tensor | None, lse: Tensor | None, o: Tensor, l: Tensor):
    """Log-sum-exp merge of partial results (float32 or float64 accumulators)."""
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    a = torch.where(torch.isfinite(lse), torch.exp(lse - safe), torch.zeros_like(lse))
    b = torch.where(torch.isfinite(l), torch.exp(l - safe), torch.zeros_like(l))
    return out * a[..., None] + o * b[..., None], new


def _block_mask(qs, qn, ks, kn, device, window=None):
    qp = torch.arange(qs, qs + qn, device=device)
    kp = torch.arange(ks, ks + kn, device=device)
    mask = kp[None, :] <= qp[:, None]  # [qn, kn]
    return mask if window is None else mask & (qp[:, None] - kp[None, :] < window)


def _ring_steps(world: int, t_local: int, window: int | None) -> int:
    """Ring steps that bring a rank every shard it needs: all W, or with a sliding window over a
    contiguous layout only the shards within the window (1 + ceil((window - 1) / T))."""
    if window is None:
        return world
    return min(world, 1 + -(-(window - 1) // t_local))


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, world, rank, layout, causal, scale, window):
        total = q.shape[2] * world
        mine = _chunks(total, world, rank, layout)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = lse = None
        kv = [k, v]
        steps = _ring_steps(world, q.shape[2], window)
        for step in range(steps):
            src = (rank - step) % world
            if step < steps - 1:
                # the next shard is in flight while this one is used (gloo / NCCL run the ops asynchronously)
                pending = _start_exchange(kv, group, world, rank)
            theirs = _chunks(total, world, src, layout)
            o_step = torch.zeros(*q.shape[:3], v.shape[3], dtype=acc_dtype, device=q.device)
            l_step = torch.full(q.shape[:3], -math.inf, dtype=acc_dtype, device=q.device)
            qo = 0
            for qs, qn in mine:
                ko = 0
                for ks, kn in theirs:
                    rel = _relation(qs, qn, ks, kn, causal, window)
                    if rel != "empty":
                        qq = q[:, :, qo:qo + qn]
                        kk, vv = kv[0][:, :, ko:ko + kn], kv[1][:, :, ko:ko + kn]
                        if rel == "mixed":
                            from ..patterns import DenseMask
                            pattern = DenseMask(_block_mask(qs, qn, ks, kn, q.device, window)[None, None])
                        else:
                            pattern = "causal" if rel == "causal" else None
                        o, l = attend(qq, kk, vv, pattern=pattern, scale=scale, return_lse=True,
                                      q_offset=0 if rel == "causal" else None)
                        mo, ml = _merge(o_step[:, :, qo:qo + qn], l_step[:, :, qo:qo + qn], o.to(acc_dtype),
                                        l.to(acc_dtype))
                        o_step[:, :, qo:qo + qn], l_step[:, :, qo:qo + qn] = mo, ml
                    ko += kn
                qo += qn
            out, lse = _merge(out, lse, o_step, l_step)
            if step < steps - 1:
                kv = _finish_exchange(pending)
        ctx.save_for_backward(q, k, v, out.to(q.dtype), lse)
        ctx.group, ctx.world, ctx.rank, ctx.layout, ctx.causal, ctx.scale = group, world, rank, layout, causal, scale
        ctx.window = window
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, world, rank, layout, causal, scale = ctx.group, ctx.world, ctx.rank, ctx.layout, ctx.causal, ctx.scale
        window = ctx.window
        steps = _ring_steps(world, q.shape[2], window)
        acc = lse.dtype
        total = q.shape[2] * world
        mine = _chunks(total, world, rank, layout)
        g = q.shape[1] // k.shape[1]
        qf, do = q.to(acc), d_out.to(acc)
        delta = (do * out.to(acc)).sum(-1)  # [B, Hq, T]
        if d_lse is not None:  # lse as an output: d lse_i / d s_ij = P_ij
            delta = delta - d_lse.to(acc)
        dq = torch.zeros_like(qf)
        kv = [k, v, torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)]
        for step in range(steps):
            src = (rank - step) % world
            theirs = _chunks(total, world, src, layout)
            kk_all = kv[0].to(acc).repeat_interleave(g, dim=1)
            vv_all = kv[1].to(acc).repeat_interleave(g, dim=1)
            dk_all = torch.zeros_like(kk_all)
            dv_all = torch.zeros_like(vv_all)
            qo = 0
            for qs, qn in mine:
                ko = 0
                for ks, kn in theirs:
                    rel = _relation(qs, qn, ks, kn, causal, window)
                    if rel != "empty":
                        qq, dd = qf[:, :, qo:qo + qn], do[:, :, qo:qo + qn]
                        kk, vv = kk_all[:, :, ko:ko + kn], vv_all[:, :, ko:ko + kn]
                        p = torch.exp(qq @ kk.transpose(-1, -2) * scale - lse[:, :, qo:qo + qn, None])
                        if rel != "full":
                            p = p * _block_mask(qs, qn, ks, kn, q.device, window).to(acc)
                        dv_all[:, :, ko:ko + kn] += p.transpose(-1, -2) @ dd
                        ds = p * (dd @ vv.transpose(-1, -2) - delta[:, :, qo:qo + qn, None])
                        dq[:, :, qo:qo + qn] += ds @ kk * scale
                        dk_all[:, :, ko:ko + kn] += ds.transpose(-1, -2) @ qq * scale
                    ko += kn
                qo += qn
            B, _, S, D = dk_all.shape
            kv[2] = kv[2] + dk_all.view(B, -1, g, S, D).sum(2)
            kv[3] = kv[3] + dv_all.view(B, -1, g, S, dv_all.shape[3]).sum(2)
            if step < steps - 1:
                kv = _exchange(kv, group, world, rank)
        # after steps - 1 moves each rank holds the shard of rank - (steps - 1): one send brings the gradients
        # home (with the whole ring, steps = W, that is the next rank)
        dk, dv = (_exchange(kv[2:], group, world, rank, shift=1 - steps) if steps > 1 else kv[2:])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _start_exchange(tensors, group, world, rank, shift: int = 1):
    nxt, prv = (rank + shift) % world, (rank - shift) % world
    nxt_g, prv_g = (dist.get_global_rank(group, r) if group is not None else r for r in (nxt, prv))
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt_g, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv_g, group) for r in received]
    _SENT[0] += sum(t.numel() * t.element_size() for t in tensors)
    return dist.batch_isend_irecv(ops), received


def _finish_exchange(pending):
    reqs, received = pending
    for req in reqs:
        req.wait()
    return received


def ring_attend(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, layout: str = "contiguous",
                scale: float | None = None, return_lse: bool = False, window: int | None = None):
    """Ring attention over a process group: this rank's share of the output.

    Args:
        q: ``[B, Hq, T, D]``, this rank's queries (its share of the sequence, :func:`shard`).
        k, v: ``[B, Hkv, T, D]`` / ``[B, Hkv, T, Dv]``, this rank's keys and values; GQA when
            ``Hkv < Hq``.
        group: the process group (default: the world). causal: the causal rule on global
            positions. layout: how the sequence was sharded (``"contiguous"`` or ``"zigzag"``).
        scale: default ``D ** -0.5``. return_lse: also return the lse ``[B, Hq, T]``.
        window: a causal sliding window (each query sees the ``window`` newest keys, itself
            included: ``patterns.sliding_window``); with the contiguous layout the ring then runs
            only ``1 + ceil((window - 1) / T)`` steps, so a rank receives just the shards its
            window reaches.

    Returns:
        ``out [B, Hq, T, Dv]`` (and ``lse``), equal to this rank's share of
        ``attnkit.attend(q_all, k_all, v_all, pattern="causal" if causal else None)``.
    """
    world, rank = _group_info(group)
    _check_inputs(q, k, v, group, "ring_attend")
    _chunks(q.shape[2] * world, world, rank, layout)  # the layout's divisibility rule, before any send
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"ring_attend: window must be a positive integer, got {window!r}")
        if layout != "contiguous":
            raise ValueError("ring_attend: a sliding window needs layout='contiguous' (its shards are a ring range)")
        causal = True
    if scale is None:
        scale = q.shape[3] ** -0.5
    out, lse = _Ring.apply(q, k, v, group, world, rank, layout, bool(causal), float(scale), window)
    return (out, lse) if return_lse else out


def ulysses_attend(q: Tensor, k: Tensor, v: Tensor, *, group=None, pattern=None, scale: float | None = None) -> Tensor:
    """All-to-all (Ulysses) sequence parallelism: heads are spread over the ranks for the attention,
    so any ``pattern`` of :func:`attnkit.attend` works on the whole sequence. Shards in the
    contiguous layout; needs ``Hq`` and ``Hkv`` divisible by the world size."""
    from torch.distributed.nn.functional import all_to_all_single

    world, rank = _group_info(group)
    _check_inputs(q, k, v, group, "ulysses_attend")
    if q.shape[1] % world or k.shape[1] % world:
        raise ValueError(f"ulysses_attend: query heads {q.shape[1]} and key / value heads {k.shape[1]} must both be "
                         f"multiples of the world size {world}; use ring_attend otherwise")

    def to_heads(x):  # [B, H, T, D] (sequence shard) -> [B, H / W, W * T, D] (head shard)
        B, H, T, D = x.shape
        send = x.reshape(B, world, H // world, T, D).transpose(0, 1).contiguous()  # [W, B, H/W, T, D]
        _SENT[0] += send.numel() * send.element_size() * (world - 1) // world  # all slices but its own leave
        recv = all_to_all_single(torch.empty_like(send), send, group=group)  # recv[r]: rank r's tokens
        return recv.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * T, D)

    def to_sequence(x):  # the inverse: [B, H / W, W * T, D] -> [B, H, T, D]
        B, h, S, D = x.shape
        T = S // world
        send = x.reshape(B, h, world, T, D).permute(2, 0, 1, 3, 4).contiguous()  # [W, B, H/W, T, D]
        _SENT[0] += send.numel() * send.element_size() * (world - 1) // world
        recv = all_to_all_single(torch.empty_like(send), send, group=group)  # recv[r]: heads of rank r
        return recv.transpose(0, 1).reshape(B, world * h, T, D)

    out = attend(to_heads(q), to_heads(k), to_heads(v), pattern=pattern, scale=scale)
    return to_sequence(out)


def ulysses_bytes(q: Tensor, k: Tensor, v: Tensor, world: int) -> int:
    """Bytes one rank sends in :func:`ulysses_attend`'s forward: four all-to-alls (q, k, v to head
    shards, the output back), each sending ``(W - 1) / W`` of the tensor; the backward's all-to-alls
    move the same volume again (not counted by :func:`sent_bytes`: autograd runs them)."""
    out = q.numel() // q.shape[3] * v.shape[3] * q.element_size()
    total = sum(t.numel() * t.element_size() for t in (q, k, v)) + out
    return total * (world - 1) // world


def ring_bytes(q: Tensor, k: Tensor, v: Tensor, world: int, backward: bool = False, window: int | None = None) -> int:
    """Bytes one rank sends in :func:`ring_attend`: ``n - 1`` key / value shards forward (``n = W``,
    or the steps a sliding ``window`` needs); backward ``n - 1`` shards with their ``dk`` / ``dv``
    accumulators plus one send of the accumulators home."""
    moves = _ring_steps(world, q.shape[2], window) - 1
    kv = k.numel() * k.element_size() + v.numel() * v.element_size()
    if not backward:
        return moves * kv
    acc = 4 if k.dtype != torch.float64 else 8
    grads = (k.numel() + v.numel()) * acc
    return moves * (kv + grads) + (grads if moves > 0 else 0)
