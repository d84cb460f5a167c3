"""Ring attention and Ulysses on W gloo processes (loopback) against single-process float64
attention: each rank's share of the output, the lse and every gradient."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.distributed import (ring_attend, ring_bytes, sent_bytes, shard, spawn, ulysses_attend, ulysses_bytes,
                                 unshard)

B, HQ, D, T_LOCAL = 2, 4, 8, 6


def _inputs(world, hkv, seed=0, t_local=T_LOCAL):
    g = torch.Generator().manual_seed(seed)
    S = world * t_local
    q = torch.randn(B, HQ, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, S, D + 2, generator=g, dtype=torch.float64)
    dout = torch.randn(B, HQ, S, D + 2, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, HQ, S, generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def _ring_worker(rank, world, cases):
    # several cases in one process group: a spawn costs seconds (every process imports torch)
    return [_ring_case(rank, world, *case) for case in cases]


def _ring_case(rank, world, causal, layout, hkv, window=None):
    q, k, v, dout, dlse = _inputs(world, hkv)
    mine = [shard(t, world, rank, layout).clone().requires_grad_(True) for t in (q, k, v)]
    sent_bytes(reset=True)
    out, lse = ring_attend(*mine, causal=causal, layout=layout, return_lse=True, window=window)
    forward = sent_bytes(reset=True)
    # a loss that uses both outputs, so the lse's gradient path is checked too
    loss = (out * shard(dout, world, rank, layout)).sum() + (lse * shard(dlse, world, rank, layout)).sum()
    loss.backward()
    backward = sent_bytes(reset=True)
    assert forward == ring_bytes(*mine, world, window=window), (forward, ring_bytes(*mine, world, window=window))
    assert backward == ring_bytes(*mine, world, backward=True, window=window)
    return [t.detach() for t in (out, lse, mine[0].grad, mine[1].grad, mine[2].grad)]


def _reference(world, causal, hkv, window=None):
    q, k, v, dout, dlse = _inputs(world, hkv)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    pattern = attnkit.patterns.sliding_window(window) if window else ("causal" if causal else None)
    out, lse = attnkit.attend(q, k, v, pattern=pattern, return_lse=True, backend="reference")
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    return [t.detach() for t in (out, lse, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("world, cases", [
    (2, [(True, "contiguous", 4), (False, "zigzag", 4), (True, "zigzag", 2)]),
    (3, [(True, "zigzag", 2), (False, "contiguous", 2)]),
    # sliding windows: 5 keys need the previous shard only (2 steps of 4), 8 keys two shards (3 steps)
    (4, [(True, "zigzag", 1), (True, "contiguous", 2), (True, "contiguous", 2, 5), (True, "contiguous", 1, 8)]),
])
def test_ring_equals_single_process_attention(world, cases):
    results = spawn(world, _ring_worker, cases)
    for c, (causal, layout, hkv, *window) in enumerate(cases):
        expected = _reference(world, causal, hkv, *window)
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            whole = unshard([r[c][i] for r in results], layout)
            torch.testing.assert_close(whole, expected[i], rtol=1e-10, atol=1e-10, msg=f"{name} {cases[c]}")


def _ulysses_worker(rank, world, names):
    return [_ulysses_case(rank, world, name) for name in names]


def _ulysses_case(rank, world, pattern_name):
    q, k, v, dout, _ = _inputs(world, 2)
    pattern = _pattern(pattern_name, q.shape[2])
    mine = [shard(t, world, rank).clone().requires_grad_(True) for t in (q, k, v)]
    sent_bytes(reset=True)
    out = ulysses_attend(*mine, pattern=pattern)
    assert sent_bytes(reset=True) == ulysses_bytes(*mine, world) > 0  # the forward's four all-to-alls
    (out * shard(dout, world, rank)).sum().backward()
    return [t.detach() for t in (out, mine[0].grad, mine[1].grad, mine[2].grad)]


def _pattern(name, total):
    if name == "window":
        return attnkit.patterns.sliding_window(5)
    if name == "documents":
        ids = torch.tensor([0] * 5 + [1] * (total - 9) + [2] * 4)
        return attnkit.patterns.documents(ids[None].expand(B, -1))
    return name


def test_ulysses_equals_single_process_attention_for_any_pattern():
    world, names = 2, ["causal", "window", "documents"]
    results = spawn(world, _ulysses_worker, names)
    for c, pattern_name in enumerate(names):
        q, k, v, dout, _ = _inputs(world, 2)
        q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = attnkit.attend(q, k, v, pattern=_pattern(pattern_name, q.shape[2]), backend="reference")
        (out * dout).sum().backward()
        for i, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad))):
            torch.testing.assert_close(unshard([r[c][i] for r in results]), want.detach(), rtol=1e-10, atol=1e-10,
                                       msg=f"{name} {pattern_name}")


def _bad_worker(rank, world, cases):
    return [_bad_case(rank, world, case) for case in cases]


def _bad_case(rank, world, case):
    q, k, v, _, _ = _inputs(world, 2)
    mine = [shard(t, world, rank) for t in (q, k, v)]
    try:
        if case == "shapes":  # rank 1 holds one token fewer: refused on every rank, no hang
            if rank == 1:
                mine = [t[:, :, :-1] for t in mine]
            ring_attend(*mine, causal=True)
        elif case == "zigzag-odd":
            ring_attend(*(t[:, :, :-1] for t in mine), causal=True, layout="zigzag")
        elif case == "ulysses-heads":
            ulysses_attend(mine[0][:, :3], mine[1][:, :1], mine[2][:, :1])
    except ValueError as err:
        return str(err)
    return None


def test_bad_input_is_a_clear_error_on_every_rank():
    cases = {"shapes": "the ranks hold shards of different shapes",
             "zigzag-odd": "must be a multiple of 2 x the world size (zigzag) = 4; pad it to",
             "ulysses-heads": "must both be multiples of the world size 2; use ring_attend otherwise"}
    results = spawn(2, _bad_worker, list(cases), timeout=30)
    for c, words in enumerate(cases.values()):
        messages = [r[c] for r in results]
        assert all(m is not None and words in m for m in messages), messages


def test_shards_round_trip_and_without_a_group_it_says_so():
    x = torch.arange(24).reshape(1, 1, 24, 1)
    for layout in ("contiguous", "zigzag"):
        parts = [shard(x, 3, r, layout) for r in range(3)]
        assert torch.equal(unshard(parts, layout), x)
    assert shard(x, 3, 0, "zigzag").flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="layout must be one of contiguous, zigzag"):
        shard(x, 3, 0, "spiral")
    with pytest.raises(ValueError, match="needs an initialised process group"):
        ring_attend(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
