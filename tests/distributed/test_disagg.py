"""Core attention disaggregation: on 4 gloo processes (2 compute ranks, 2 attention servers) each
compute rank's output and gradients equal single-process float64 causal attention per document;
the plan balances the load; bad input is a clear ValueError on every rank."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import patterns
from attnkit.distributed import spawn
from attnkit.distributed.disagg import Item, Plan, causal_pairs, disaggregated_attend, plan, step_time

HQ, HKV, D, DV = 4, 2, 8, 6
ROLES = ["compute", "server", "compute", "server"]
# compute rank 0: one long document and a short one in each of 2 rows; compute rank 1: many short ones
LENGTHS = {0: [20, 4, 24], 2: [3, 5, 7, 9, 2, 6, 8, 8]}  # both B * T = 2 * 24 = 48 tokens


def _inputs(rank, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(2, HQ, 24, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, HKV, 24, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, HKV, 24, DV, generator=g, dtype=torch.float64)
    dout = torch.randn(2, HQ, 24, DV, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _ids(lengths, T=24):
    flat = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return flat.reshape(-1, T)


def _reference(rank):
    q, k, v, dout = _inputs(rank)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attnkit.attend(q, k, v, pattern=patterns.documents(_ids(LENGTHS[rank])) & patterns.causal(),
                         backend="reference")
    (out * dout).sum().backward()
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def _worker(rank, world):
    results = {}
    for case, split, pingpong in (("lengths", 0.5, False), ("ids", float("inf"), False), ("pingpong", 0.2, True)):
        if ROLES[rank] == "compute":
            q, k, v, dout = _inputs(rank)
            q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
            kw = {"doc_ids": _ids(LENGTHS[rank])} if case == "ids" else {"lengths": torch.tensor(LENGTHS[rank])}
            out = disaggregated_attend(q, k, v, roles=ROLES, split=split, pingpong=pingpong, backend="reference", **kw)
            (out * dout).sum().backward()
            results[case] = [t.detach() for t in (out, q.grad, k.grad, v.grad)]
        else:
            out = disaggregated_attend(None, None, None, roles=ROLES, split=split, pingpong=pingpong, backend="reference")
            out.sum().backward()  # takes part in the compute ranks' backward
            results[case] = out.shape
    # bad input: every rank must raise (not hang)
    errors = []
    mine = _inputs(rank)[:3] if ROLES[rank] == "compute" else (None, None, None)
    lengths = LENGTHS.get(rank)
    bad_plan = plan([LENGTHS[0], LENGTHS[2]], 3)  # 3 servers, the group has 2
    for what, kw in (("server index", dict(lengths=lengths, plan=bad_plan)),
                     ("lengths sum", dict(lengths=[5, 5] if rank == 2 else lengths)),
                     ("unknown role", dict(lengths=lengths, roles=["compute", "server", "compute", "srv"])),
                     ("roles length", dict(lengths=lengths, roles=["compute", "server"])),
                     ("no server", dict(lengths=lengths, roles=["compute"] * 4)),
                     ("other lengths", dict(lengths=lengths, plan=plan([LENGTHS[2], LENGTHS[0]], 2))),
                     ("row crossing", dict(lengths=[30, 18] if rank == 0 else lengths)),
                     ("pingpong", dict(lengths=lengths, pingpong="yes")),
                     ("settings differ", dict(lengths=lengths, pingpong=rank == 3)),
                     ("server tensors", dict(lengths=lengths, doc_ids=torch.zeros(1, 4) if rank == 1 else None))):
        kw.setdefault("roles", ROLES)
        if ROLES[rank] == "server" and kw["roles"] != ["compute"] * 4:
            kw.pop("lengths")
        try:
            disaggregated_attend(*mine, **kw)
            errors.append((what, None))
        except ValueError as e:
            errors.append((what, str(e)))
    results["errors"] = errors
    return results


def test_disaggregated_attend_equals_single_process():
    got = spawn(4, _worker)
    for rank in (0, 2):
        want = _reference(rank)
        for case in ("lengths", "ids", "pingpong"):
            for name, a, b in zip(("out", "dq", "dk", "dv"), got[rank][case], want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} rank {rank} {case}")
    for rank in (1, 3):
        assert got[rank]["lengths"] == torch.Size([0])
    for rank in range(4):
        errors = dict(got[rank]["errors"])
        assert "3 servers" in errors["server index"] and "2 server ranks" in errors["server index"], errors
        assert "rank 2" in errors["lengths sum"] and "sum to 10" in errors["lengths sum"], errors
        assert "rank 3" in errors["unknown role"] and "'srv'" in errors["unknown role"], errors
        assert "each of the 4 ranks" in errors["roles length"], errors
        assert "at least one 'compute' and one 'server'" in errors["no server"], errors
        assert "was made for document lengths" in errors["other lengths"], errors
        assert "rank 0" in errors["row crossing"] and "crosses the end of a batch row" in errors["row crossing"], errors
        assert "pingpong must be True or False" in errors["pingpong"], errors
        assert "rank 3 passed pingpong" in errors["settings differ"], errors
        assert "rank 1 is an attention server" in errors["server tensors"], errors


def test_plan_balances_imbalanced_documents():
    lengths = [[512], [64] * 8, [128] * 4, [32] * 16]  # 512 tokens each, attention work 1 : 1/8 : 1/4 : 1/16
    p = plan(lengths, 4)
    assert p.imbalance_before > 2.5
    assert p.imbalance_after < 1.05
    assert max(p.loads) < max(p.before) / 2
    assert sum(p.loads) == sum(p.before) == sum(causal_pairs(0, n) for ls in lengths for n in ls)
    p.validate(4, lengths)
    # the long document was cut into query chunks, each needing its keys up to its end
    chunks = sorted((it.q0, it.q1) for items in p.items for it in items if it.compute == 0)
    assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == 512
    assert all(it.key_range == (0, it.q1) for items in p.items for it in items)
    unsplit = plan(lengths, 4, split=float("inf"))
    assert unsplit.imbalance_after > p.imbalance_after


def test_step_time_disaggregation_is_faster_on_imbalanced_lengths():
    # long documents: attention dominates (at 4k tokens per rank the exchange costs more than it saves)
    lengths = [[32768], [2048] * 16]
    kw = dict(heads=32, head_dim=128, attention_flops_per_s=4e14, other_s_per_token=2e-7, bandwidth_bytes_per_s=4e11)
    t = step_time(lengths, 2, **kw)
    assert t["disaggregated"] < t["colocated"]
    assert t["disaggregated_overlapped"] <= t["disaggregated"]
    assert t["attention_disaggregated"] < t["attention_colocated"]
    # balanced lengths: nothing to gain, the exchange is a pure cost
    even = step_time([[2048] * 16, [2048] * 16], 2, **kw)
    assert even["disaggregated"] > even["colocated"]


def test_compute_rank_bad_input():
    from attnkit.distributed.disagg import _local

    with pytest.raises(ValueError, match="exactly one of lengths"):
        _local(*_inputs(0)[:3], None, None)
    with pytest.raises(ValueError, match=r"doc_ids must be an integer tensor \[B, T\] = \[2, 24\]"):
        _local(*_inputs(0)[:3], None, torch.zeros(48, dtype=torch.long))
    with pytest.raises(ValueError, match="rank-4"):
        _local(torch.zeros(3, 4), *_inputs(0)[1:3], [48], None)


def test_plan_bad_input():
    cases = [((["a"], 2), "doc_lengths_per_compute_rank"), (([[3, 0]], 2), "positive integer"),
             (([[3]], 0), "servers"), (([[3]], 1, 0.0), "split"), (([], 1), "non-empty")]
    for args, word in cases:
        with pytest.raises(ValueError, match=word):
            plan(*args[:2], **({"split": args[2]} if len(args) > 2 else {}))
    p = plan([[4, 4]], 1)
    broken = Plan(p.lengths, ((Item(0, 0, 0, 0, 2), Item(0, 1, 4, 0, 4)),), p.loads, p.before)
    with pytest.raises(ValueError, match="cover"):
        broken.validate()
    outside = Plan(p.lengths, ((Item(1, 0, 0, 0, 4),),), p.loads, p.before)
    with pytest.raises(ValueError, match="does not exist"):
        outside.validate()
