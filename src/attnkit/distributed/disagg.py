"""Core attention disaggregation: the attention core of packed documents on attention-server ranks.

After "Efficient Long-context Language Model Training by Core Attention Disaggregation" (the DistCA
system). The core ``softmax(q k^T) v`` has no parameters and no state, so it can run anywhere;
its cost grows with the square of each document's length, while the other layers' cost grows
with the number of tokens. With packed variable-length documents, ranks holding the same number
of tokens then hold very different attention work (a rank with one 8k document does 8x the
attention of a rank with eight 1k documents), and every step waits for the slowest. Sending the
attention core to separate servers, rebatched by FLOPs, balances it.

Legend: C compute ranks, S attention servers, n a document's length, B batch, Hq / Hkv heads,
T the local sequence, D / Dv head dims.

**Plan** (:func:`plan`). A causal document of length ``n`` costs ``n (n + 1) / 2`` query-key
pairs (forward FLOPs ``4 Hq D`` per pair). Documents larger than ``split`` x the mean server load
are cut into query chunks of equal cost (boundaries ``n sqrt(j / m)``); the chunk of queries
``q0 .. q1 - 1`` needs the document's keys ``0 .. q1 - 1`` (causal) and costs
``(q1 (q1 + 1) - q0 (q0 + 1)) / 2``. Items go to servers largest first, each to the least loaded
server (greedy LPT). :class:`Plan` lists the items per server and reports the load imbalance
(max / mean) of the compute ranks before (attention where the documents live) and of the servers
after.

**Attend** (:func:`disaggregated_attend`). One process group; ``roles[r]`` is ``"compute"`` or
``"server"``. Every rank calls it (servers with ``q = k = v = None``). The compute ranks'
document lengths are all-gathered (a few integers per document) so that every rank builds the
same plan; each compute rank sends each server one buffer with the q / k / v pieces of its items
(point-to-point, ``batch_isend_irecv``), the servers run causal attention per item with
:func:`attnkit.attend`, and send the outputs back into place. **Backward**: the compute ranks
send the output gradient of each item, the servers recompute the item's attention (they kept
the pieces) and send back ``dq`` and the ``dk`` / ``dv`` of the item's key prefix, which the
compute rank adds up (chunks of one document share keys). On a server, the returned tensor is
empty; call ``out.sum().backward()`` on it when the compute ranks run their backward, so the
server takes part in the exchange.

**Ping-pong** (``pingpong=True``): each compute rank's items for a server travel in two messages
of about equal cost; a server posts every receive at once, attends each message as soon as it has
arrived and answers it with an asynchronous send, so the exchange of one half overlaps the
attention of the other (with ``t_c`` the exchange and ``t_a`` the attention per half, about
``max(t_c, t_a)`` instead of ``t_c + t_a``; :func:`step_time` reports both bounds). Tested for
equality; the overlap itself is not measured here (CPU gloo).

**Not implemented, described**: the ping-pong of DistCA across the other layers too (one half's
attention on the servers while the compute ranks run the other half's linear layers: that needs
the model split in two micro-batches, outside this op), servers that are the compute ranks
themselves (time-shared, as in DistCA: here the roles are disjoint), and a communication-aware
plan (a document kept where it lives when that costs less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.softmax import attend

__all__ = ["ROLES", "Item", "Plan", "plan", "causal_pairs", "disaggregated_attend", "step_time"]

ROLES = ("compute", "server")


def causal_pairs(q0: int, q1: int) -> int:
    """Query-key pairs of causal queries ``q0 .. q1 - 1`` of a document (keys ``0 .. q1 - 1``)."""
    return (q1 * (q1 + 1) - q0 * (q0 + 1)) // 2


@dataclass(frozen=True)
class Item:
    """One piece of work: queries ``q0 .. q1 - 1`` of document ``doc`` of compute rank ``compute``
    (its ``compute``-th compute rank), attending the document's keys ``0 .. q1 - 1``; the document
    starts at token ``start`` of that rank's packed sequence (batch rows concatenated)."""

    compute: int
    doc: int
    start: int
    q0: int
    q1: int

    @property
    def pairs(self) -> int:
        return causal_pairs(self.q0, self.q1)

    @property
    def key_range(self) -> tuple[int, int]:
        return (0, self.q1)


@dataclass(frozen=True)
class Plan:
    """``items[s]``: the items of server ``s``. ``loads[s]``: its query-key pairs (FLOPs / (4 Hq D)).
    ``before[c]``: the pairs of compute rank ``c`` when attention stays where the documents live."""

    lengths: tuple[tuple[int, ...], ...]
    items: tuple[tuple[Item, ...], ...]
    loads: tuple[int, ...]
    before: tuple[int, ...]

    @property
    def servers(self) -> int:
        return len(self.items)

    @staticmethod
    def _imbalance(loads) -> float:
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    @property
    def imbalance_before(self) -> float:
        """max / mean attention load over the compute ranks, without disaggregation."""
        return self._imbalance(self.before)

    @property
    def imbalance_after(self) -> float:
        """max / mean attention load over the servers."""
        return self._imbalance(self.loads)

    def flops(self, heads: int, head_dim: int) -> list[float]:
        """Forward FLOPs per server (``q k^T`` and ``p v``: 4 Hq D per pair)."""
        return [4.0 * heads * head_dim * p for p in self.loads]

    def validate(self, servers: int | None = None, lengths=None) -> None:
        """``ValueError`` unless every item names a server below ``servers`` (the group's), a known
        compute rank and document, and the items cover every query of every document exactly once."""
        if servers is not None and self.servers != servers:
            raise ValueError(f"plan: the plan has {self.servers} servers but the group has {servers} server ranks; "
                             "plan with the number of ranks whose role is 'server'")
        if lengths is not None and tuple(tuple(int(n) for n in ls) for ls in lengths) != self.lengths:
            raise ValueError(f"plan: the plan was made for document lengths {self.lengths} but the compute ranks hold "
                             f"{tuple(tuple(ls) for ls in lengths)}")
        seen: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for s, items in enumerate(self.items):
            for it in items:
                if not (0 <= it.compute < len(self.lengths)) or not (0 <= it.doc < len(self.lengths[it.compute])):
                    raise ValueError(f"plan: server {s} has item {it} for a compute rank / document that does not "
                                     f"exist (lengths {self.lengths})")
                n = self.lengths[it.compute][it.doc]
                if not (0 <= it.q0 < it.q1 <= n) or it.start != sum(self.lengths[it.compute][: it.doc]):
                    raise ValueError(f"plan: item {it} does not fit document {it.doc} of length {n}")
                seen.setdefault((it.compute, it.doc), []).append((it.q0, it.q1))
        for c, ls in enumerate(self.lengths):
            for d, n in enumerate(ls):
                ranges = sorted(seen.get((c, d), []))
                ends = [0] + [b for _, b in ranges]
                if [a for a, _ in ranges] != ends[:-1] or ends[-1] != n:
                    raise ValueError(f"plan: the query ranges {ranges} of document {d} on compute rank {c} do not "
                                     f"cover 0 .. {n - 1} exactly once")


def _check_lengths(lengths, name: str = "doc_lengths_per_compute_rank") -> tuple[tuple[int, ...], ...]:
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__") or len(lengths) == 0:
        raise ValueError(f"{name} must be a non-empty list (one per compute rank) of lists of document lengths, "
                         f"got {lengths!r}")
    out = []
    for c, ls in enumerate(lengths):
        if isinstance(ls, (str, bytes)) or not hasattr(ls, "__iter__"):
            raise ValueError(f"{name}[{c}] must be a list of document lengths, got {ls!r}")
        ls = tuple(ls)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ls):
            raise ValueError(f"{name}[{c}] must hold positive integer lengths, got {ls!r}")
        out.append(ls)
    return tuple(out)


def _pieces(n: int, m: int) -> list[tuple[int, int]]:
    """Query ranges of equal causal cost: boundaries ``n sqrt(j / m)`` (the cost up to q is ~q^2 / 2)."""
    bounds = sorted({0, n, *(min(n, max(1, round(n * math.sqrt(j / m)))) for j in range(1, m))})
    return list(zip(bounds[:-1], bounds[1:]))


def plan(doc_lengths_per_compute_rank, servers: int, *, split: float = 0.5) -> Plan:
    """A FLOP-balanced assignment of document shards to ``servers`` attention servers.

    Args:
        doc_lengths_per_compute_rank: ``lengths[c]``: the lengths of the documents packed on
            compute rank ``c``, in order (their sum is that rank's ``B * T``).
        servers: the number of attention servers (>= 1).
        split: a document costing more than ``split`` x the mean server load is cut into query
            chunks of about that cost (``inf``: never cut; smaller: finer balance, more items).
    Returns: a :class:`Plan`.
    """
    lengths = _check_lengths(doc_lengths_per_compute_rank)
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ValueError(f"servers must be an integer >= 1, got {servers!r}")
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not split > 0:
        raise ValueError(f"split must be a positive number (a fraction of the mean server load), got {split!r}")
    before = tuple(sum(causal_pairs(0, n) for n in ls) for ls in lengths)
    cap = max(1.0, split * sum(before) / servers)
    items = []
    for c, ls in enumerate(lengths):
        start = 0
        for d, n in enumerate(ls):
            m = 1 if math.isinf(cap) else min(n, max(1, math.ceil(causal_pairs(0, n) / cap)))
            items += [Item(c, d, start, a, b) for a, b in _pieces(n, m)]
            start += n
    # largest first, each to the least loaded server (ties: the lowest index, so every rank agrees)
    items.sort(key=lambda it: (-it.pairs, it.compute, it.doc, it.q0))
    loads = [0] * servers
    per: list[list[Item]] = [[] for _ in range(servers)]
    for it in items:
        s = min(range(servers), key=lambda i: (loads[i], i))
        per[s].append(it)
        loads[s] += it.pairs
    return Plan(lengths, tuple(tuple(p) for p in per), tuple(loads), before)


_make_plan = plan  # disaggregated_attend's argument `plan` hides the function


# -- the exchange ---------------------------------------------------------------------------------------


def _runs(doc_ids: Tensor) -> list[int]:
    """Lengths of the runs of equal ids, row after row (a document never crosses a row)."""
    out = []
    for row in doc_ids:
        change = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), row.numel()]
        out += [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def _peer(group, p: int) -> int:
    return dist.get_global_rank(group, p) if group is not None else p


def _p2p(sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]], group) -> None:
    """Post every ``(tensor, group rank, tag)`` send and receive at once and wait for all."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, p), group, tag) for t, p, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, p), group, tag) for t, p, tag in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def _flat(x: Tensor) -> Tensor:
    """``[B, H, T, D]`` -> ``[H, B*T, D]``: the batch rows concatenated (documents stay inside a row)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])


def _unflat(x: Tensor, B: int) -> Tensor:
    return x.reshape(x.shape[0], B, -1, x.shape[2]).transpose(0, 1)


def _messages(info, me: int):
    """The messages between this rank and its peers: ``(peer, wave, items)``, in the order the
    server works through them (wave by wave, then compute rank by compute rank). A compute rank's
    items on one server are dealt round-robin into ``waves`` messages (largest first, so the halves
    cost about the same)."""
    p, computes, servers, waves = info["plan"], info["computes"], info["servers"], info["waves"]
    out = []
    if me in computes:
        c = computes.index(me)
        for s, items in enumerate(p.items):
            mine = [it for it in items if it.compute == c]
            out += [(servers[s], w, mine[w::waves]) for w in range(waves) if mine[w::waves]]
        return out
    s = servers.index(me)
    for w in range(waves):
        for c, rank in enumerate(computes):
            part = [it for it in p.items[s] if it.compute == c][w::waves]
            if part:
                out.append((rank, w, part))
    return out


def _sizes(it: Item, meta) -> tuple[int, int, int, int]:
    """Elements of an item's q chunk, k prefix, v prefix and output chunk."""
    Hq, Hkv, D, Dv, _ = meta
    nq, nk = it.q1 - it.q0, it.q1
    return Hq * nq * D, Hkv * nk * D, Hkv * nk * Dv, Hq * nq * Dv


def _serve(messages, size, work, like: Tensor, group) -> list:
    """A server's loop: post every receive, then take the messages in order, each answered (an
    asynchronous send) as soon as it is done, so that the exchange of one message overlaps the
    attention of the others (ping-pong with two waves)."""
    posted = []
    for peer, wave, items in messages:
        buf = torch.empty(size(items), dtype=like.dtype, device=like.device)
        posted.append((peer, wave, items, buf, dist.irecv(buf, _peer(group, peer), group=group, tag=wave)))
    sends, kept = [], []
    for peer, wave, items, buf, req in posted:
        req.wait()
        answer, state = work(items, buf)
        kept.append(state)
        sends.append((answer, dist.isend(answer, _peer(group, peer), group=group, tag=wave)))
    for _, req in sends:
        req.wait()
    return kept


class _Disagg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info):
        ctx.info = info
        me, meta, group = info["me"], info["meta"], info["group"]
        Hq, Hkv, D, Dv, dtype = meta
        messages = _messages(info, me)
        if me in info["computes"]:
            xq, xk, xv = _flat(q), _flat(k), _flat(v)
            sends, recvs = [], []
            for peer, wave, items in messages:
                parts = []
                for it in items:
                    a = it.start
                    parts += [xq[:, a + it.q0:a + it.q1].reshape(-1), xk[:, a:a + it.q1].reshape(-1),
                              xv[:, a:a + it.q1].reshape(-1)]
                sends.append((torch.cat(parts).contiguous(), peer, wave))
                recvs.append((torch.empty(sum(_sizes(it, meta)[3] for it in items), dtype=dtype, device=q.device),
                              peer, wave))
            _p2p(sends, recvs, group)
            out = torch.zeros(Hq, xq.shape[1], Dv, dtype=dtype, device=q.device)
            for (_, _, items), (buf, _, _) in zip(messages, recvs):
                o = 0
                for it in items:
                    n = _sizes(it, meta)[3]
                    out[:, it.start + it.q0:it.start + it.q1] = buf[o:o + n].view(Hq, it.q1 - it.q0, Dv)
                    o += n
            ctx.B = q.shape[0]
            return _unflat(out, q.shape[0])

        def work(items, buf):
            o, outs, kept = 0, [], []
            for it in items:
                sq, sk, sv, _ = _sizes(it, meta)
                nq, nk = it.q1 - it.q0, it.q1
                qi = buf[o:o + sq].view(1, Hq, nq, D)
                ki = buf[o + sq:o + sq + sk].view(1, Hkv, nk, D)
                vi = buf[o + sq + sk:o + sq + sk + sv].view(1, Hkv, nk, Dv)
                o += sq + sk + sv
                # default q_offset = S - T = q0: the chunk's queries sit at the end of its key prefix
                outs.append(attend(qi, ki, vi, pattern="causal", scale=info["scale"], backend=info["backend"]).reshape(-1))
                kept.append((qi, ki, vi))
            return torch.cat(outs).contiguous(), kept

        ctx.kept = _serve(messages, lambda items: sum(sum(_sizes(it, meta)[:3]) for it in items), work, q, group)
        return q.new_empty(0)

    @staticmethod
    def backward(ctx, dout):
        info = ctx.info
        me, meta, group = info["me"], info["meta"], info["group"]
        Hq, Hkv, D, Dv, dtype = meta
        messages = _messages(info, me)
        if me in info["computes"]:
            xo = _flat(dout)
            N = xo.shape[1]
            sends, recvs = [], []
            for peer, wave, items in messages:
                sends.append((torch.cat([xo[:, it.start + it.q0:it.start + it.q1].reshape(-1) for it in items])
                              .to(dtype).contiguous(), peer, wave))
                recvs.append((torch.empty(sum(sum(_sizes(it, meta)[:3]) for it in items), dtype=dtype,
                                          device=dout.device), peer, wave))
            _p2p(sends, recvs, group)
            dq = torch.zeros(Hq, N, D, dtype=dtype, device=dout.device)
            dk = torch.zeros(Hkv, N, D, dtype=dtype, device=dout.device)
            dv = torch.zeros(Hkv, N, Dv, dtype=dtype, device=dout.device)
            for (_, _, items), (buf, _, _) in zip(messages, recvs):
                o = 0
                for it in items:
                    sq, sk, sv, _ = _sizes(it, meta)
                    a, nq, nk = it.start, it.q1 - it.q0, it.q1
                    dq[:, a + it.q0:a + it.q1] += buf[o:o + sq].view(Hq, nq, D)
                    # chunks of one document share its keys: their key / value gradients add up
                    dk[:, a:a + nk] += buf[o + sq:o + sq + sk].view(Hkv, nk, D)
                    dv[:, a:a + nk] += buf[o + sq + sk:o + sq + sk + sv].view(Hkv, nk, Dv)
                    o += sq + sk + sv
            return _unflat(dq, ctx.B), _unflat(dk, ctx.B), _unflat(dv, ctx.B), None
        kept = iter(ctx.kept)

        def work(items, dbuf):
            o, parts = 0, []
            for it, saved in zip(items, next(kept)):
                n = _sizes(it, meta)[3]
                qi, ki, vi = (t.detach().requires_grad_(True) for t in saved)
                g = dbuf[o:o + n].view(1, Hq, it.q1 - it.q0, Dv)
                o += n
                with torch.enable_grad():
                    out = attend(qi, ki, vi, pattern="causal", scale=info["scale"], backend=info["backend"])
                    grads = torch.autograd.grad(out, (qi, ki, vi), g)
                parts += [t.reshape(-1) for t in grads]
            return torch.cat(parts).contiguous(), None

        _serve(messages, lambda items: sum(_sizes(it, meta)[3] for it in items), work, dout, group)
        ctx.kept = None
        empty = dout.new_zeros(0)
        return empty, empty, empty, None


def disaggregated_attend(q: Tensor | None, k: Tensor | None, v: Tensor | None, lengths=None, *, doc_ids=None,
                         roles, group=None, plan=None, split: float = 0.5, pingpong: bool = False,
                         scale: float | None = None, backend: str = "auto") -> Tensor:
    """Causal attention of packed documents, computed on the attention-server ranks.

    Every rank of ``group`` calls it. On a compute rank: ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``,
    ``v [B, Hkv, T, Dv]`` packed sequences, and the documents as ``lengths`` (document lengths,
    row after row, summing to ``B * T``; a document does not cross a row) or ``doc_ids [B, T]``
    (runs of equal ids); returns ``[B, Hq, T, Dv]``, equal to
    ``attend(q, k, v, pattern=documents(ids) & causal())``. On a server: ``q = k = v = None``
    (and no lengths); returns an empty tensor, on which to call ``.sum().backward()`` when the
    compute ranks run their backward.

    Args:
        roles: ``roles[r]`` for every rank ``r`` of the group: ``"compute"`` or ``"server"``
            (at least one of each). The ``c``-th compute rank is compute rank ``c`` of the plan.
        plan: a :class:`Plan` to use (default: :func:`plan` of the gathered lengths with ``split``);
            checked against the group and the lengths on every rank.
        pingpong: send each compute rank's items for a server in two messages (two halves of
            about equal cost), so that a server attends the first while the second arrives, and
            sends the first's outputs back while it attends the second (DistCA's ping-pong; with
            ``False`` a server still overlaps one compute rank's message with the others').
        scale: multiplies ``q . k``; default ``D ** -0.5``. backend: :func:`attnkit.attend`'s.
    """
    if not isinstance(pingpong, bool):
        raise ValueError(f"pingpong must be True or False, got {pingpong!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("disaggregated_attend needs an initialised process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if isinstance(roles, str) or not hasattr(roles, "__len__") or len(roles) != world:
        raise ValueError(f"roles must list the role of each of the {world} ranks of the group, got {roles!r}")
    bad = [(r, x) for r, x in enumerate(roles) if x not in ROLES]
    if bad:
        raise ValueError(f"roles: rank {bad[0][0]} has the unknown role {bad[0][1]!r}; the roles are {', '.join(ROLES)}")
    computes = [r for r, x in enumerate(roles) if x == "compute"]
    servers = [r for r, x in enumerate(roles) if x == "server"]
    if not computes or not servers:
        raise ValueError(f"roles must hold at least one 'compute' and one 'server' rank, got {list(roles)!r}")
    # local checks; the error (if any) travels with the gathered lengths so that every rank raises
    error, mine = None, None
    try:
        if me in computes:
            mine = _local(q, k, v, lengths, doc_ids)
        elif any(x is not None for x in (q, k, v, lengths, doc_ids)):
            raise ValueError(f"rank {me} is an attention server: pass q = k = v = None and no lengths / doc_ids")
    except ValueError as e:
        error = str(e)
    # the settings that shape the messages must agree, or a send would wait forever for its receive
    settings = (pingpong, split if plan is None else plan)
    gathered = [None] * world
    dist.all_gather_object(gathered, (error, mine, settings), group=group)
    errors = [(r, e) for r, (e, _, _) in enumerate(gathered) if e is not None]
    if errors:
        raise ValueError(f"disaggregated_attend: rank {errors[0][0]}: {errors[0][1]}")
    differ = [r for r, (_, _, x) in enumerate(gathered) if x != gathered[0][2]]
    if differ:
        raise ValueError(f"disaggregated_attend: rank {differ[0]} passed pingpong / split / plan "
                         f"{gathered[differ[0]][2]!r} but rank 0 passed {gathered[0][2]!r}; every rank must pass the same")
    metas = {gathered[r][1][1] for r in computes}
    if len(metas) > 1:
        raise ValueError(f"disaggregated_attend: the compute ranks disagree on (Hq, Hkv, D, Dv, dtype): {sorted(map(str, metas))}")
    meta = metas.pop()
    all_lengths = [gathered[r][1][0] for r in computes]
    if plan is None:
        plan = _make_plan(all_lengths, len(servers), split=split)
    elif not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan (attnkit.distributed.disagg.plan) or None, got {type(plan).__name__}")
    plan.validate(len(servers), all_lengths)
    dtype = meta[4]
    if me in servers:
        # NCCL sends only from the GPU: a server's buffers live on its current CUDA device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        dummy = torch.zeros(0, dtype=dtype, device=device, requires_grad=torch.is_grad_enabled())
        q = k = v = dummy
    info = dict(plan=plan, me=me, computes=computes, servers=servers, meta=meta, group=group, scale=scale,
                backend=backend, waves=2 if pingpong else 1)
    return _Disagg.apply(q, k, v, info)


def _local(q, k, v, lengths, doc_ids):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"a compute rank's {name} must be a rank-4 tensor [B, H, T, D], got {got}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, Hq, T, D], "
                         "[B, Hkv, T, D], [B, Hkv, T, Dv]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key / value heads {k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T = q.shape[0], q.shape[2]
    if (lengths is None) == (doc_ids is None):
        raise ValueError("a compute rank passes exactly one of lengths (document lengths) or doc_ids [B, T]")
    if doc_ids is not None:
        if not isinstance(doc_ids, Tensor) or tuple(doc_ids.shape) != (B, T):
            got = tuple(doc_ids.shape) if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
            raise ValueError(f"doc_ids must be an integer tensor [B, T] = [{B}, {T}], got {got}")
        lengths = _runs(doc_ids)
    if isinstance(lengths, Tensor):
        lengths = lengths.tolist()
    ls = _check_lengths([lengths], "lengths")[0]
    if sum(ls) != B * T:
        raise ValueError(f"lengths {list(ls)} sum to {sum(ls)} but the packed sequence has B * T = {B} * {T} = {B * T} tokens")
    cuts = set(range(T, B * T, T))
    e = 0
    for n in ls:
        if any(e < c < e + n for c in cuts):
            raise ValueError(f"lengths {list(ls)}: a document crosses the end of a batch row (every {T} tokens)")
        e += n
    return ls, (q.shape[1], k.shape[1], q.shape[3], v.shape[3], q.dtype)


# -- throughput model -----------------------------------------------------------------------------------


def step_time(doc_lengths_per_compute_rank, servers: int, *, heads: int, head_dim: int,
              attention_flops_per_s: float, other_s_per_token: float = 0.0, bandwidth_bytes_per_s: float = math.inf,
              kv_heads: int | None = None, bytes_per_element: int = 2, split: float = 0.5) -> dict:
    """An estimate of a forward step, with the attention core where the documents live
    (``colocated``) and on ``servers`` servers (``disaggregated``).

    Model: a compute rank spends ``other_s_per_token`` per token on the other layers; attention
    costs ``4 Hq D`` FLOPs per causal query-key pair at ``attention_flops_per_s``. Colocated, a
    step waits for the slowest rank: ``max_c (other_c + attention_c)``. Disaggregated:
    ``max_c other_c`` + exchange + ``max_s attention_s``, the exchange being the largest volume one
    rank sends or receives (q, k, v of every item's query chunk / key prefix and the outputs) over
    ``bandwidth_bytes_per_s``; ``disaggregated_overlapped`` is the ping-pong bound
    ``max_c other_c + max(exchange, attention)`` (not implemented in :func:`disaggregated_attend`).
    Returns a dict of seconds and the plan's imbalances."""
    p = plan(doc_lengths_per_compute_rank, servers, split=split)
    for name, x in (("heads", heads), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive integer, got {x!r}")
    if not attention_flops_per_s > 0 or not bandwidth_bytes_per_s > 0 or other_s_per_token < 0:
        raise ValueError(f"attention_flops_per_s and bandwidth_bytes_per_s must be > 0 and other_s_per_token >= 0, got "
                         f"{attention_flops_per_s!r}, {bandwidth_bytes_per_s!r}, {other_s_per_token!r}")
    hkv = heads if kv_heads is None else kv_heads
    per_pair = 4.0 * heads * head_dim / attention_flops_per_s
    other = [other_s_per_token * sum(ls) for ls in p.lengths]
    colocated = max(o + b * per_pair for o, b in zip(other, p.before))
    attention = max(p.loads) * per_pair
    # elements moved per item: q chunk and output (Hq * nq * D each) plus the key / value prefix
    moved_c = [0] * len(p.lengths)
    moved_s = [0] * servers
    for s, items in enumerate(p.items):
        for it in items:
            n = 2 * heads * (it.q1 - it.q0) * head_dim + 2 * hkv * it.q1 * head_dim
            moved_c[it.compute] += n
            moved_s[s] += n
    exchange = max(moved_c + moved_s) * bytes_per_element / bandwidth_bytes_per_s
    base = max(other)
    return {"colocated": colocated, "disaggregated": base + exchange + attention,
            "disaggregated_overlapped": base + max(exchange, attention), "attention_colocated": max(p.before) * per_pair,
            "attention_disaggregated": attention, "exchange": exchange,
            "imbalance_before": p.imbalance_before, "imbalance_after": p.imbalance_after}
