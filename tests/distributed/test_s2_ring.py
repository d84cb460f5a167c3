"""S2-Attention split over W gloo ranks: this rank's output and the gradients of q, k, v equal
single-process float64 attention under the same S2 pattern; only the blocks a later rank can see
travel (fewer bytes than the ring, equal to the formula); bad input is a clear error."""

from __future__ import annotations

import pytest
import torch

from attnkit import attend
from attnkit import patterns as P
from attnkit.distributed import ring_bytes, s2_attend, s2_bytes, sent_bytes, shard, spawn

B, D = 2, 8


def _case(world, hq, hkv, local, stride, dense, seq):
    pattern = P.s2_strided(num_heads=hq, num_kv_heads=hkv, block_size=4, local_blocks=local, vert_stride=stride,
                           dense_heads=dense)
    g = torch.Generator().manual_seed(hq * 100 + seq)
    q = torch.randn(B, hq, seq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, hkv, seq, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, hq, seq, D, generator=g, dtype=torch.float64)
    return pattern, q, k, v, dout


CASES = [(4, 4, 1, 4, (), 48), (4, 2, 2, 8, (), 48), (8, 2, 1, 16, (), 96), (4, 2, 1, 4, (3,), 48)]


def _worker(rank, world, cases):
    out = []
    for case in cases:
        pattern, q, k, v, dout = _case(world, *case)
        mine = [shard(t, world, rank).clone().requires_grad_(True) for t in (q, k, v)]
        sent_bytes(reset=True)
        o = s2_attend(*mine, pattern)
        sent = sent_bytes(reset=True)
        (o * shard(dout, world, rank)).sum().backward()
        out.append((o.detach(), *(m.grad for m in mine), sent, s2_bytes(mine[1], mine[2], pattern, world),
                    ring_bytes(*mine, world)))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_s2_split_over_ranks_equals_one_process_and_sends_less_than_the_ring(world):
    results = spawn(world, _worker, CASES)
    for i, case in enumerate(CASES):
        pattern, q, k, v, dout = _case(world, *case)
        whole = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = attend(*whole, pattern=pattern, backend="reference")
        (ref * dout).sum().backward()
        for rank in range(world):
            o, dq, dk, dv, sent, formula, ring = results[rank][i]
            torch.testing.assert_close(o, shard(ref, world, rank), rtol=1e-10, atol=1e-12)
            for got, w in zip((dq, dk, dv), whole):
                torch.testing.assert_close(got, shard(w.grad, world, rank), rtol=1e-10, atol=1e-12)
            assert sent == formula
            if not case[4]:  # without a dense head only stripes and the window's tail travel
                assert sent < ring, (case, sent, ring)


def _refusals(rank, world):
    q = torch.randn(1, 4, 8, D)
    k = v = torch.randn(1, 2, 8, D)
    out = []
    for pattern in (P.sliding_window(4), P.s2_strided(num_heads=8, num_kv_heads=2, block_size=4)):
        try:
            s2_attend(q, k, v, pattern)
            out.append(None)
        except ValueError as err:
            out.append(str(err))
    return out


def test_a_pattern_that_is_not_s2_or_for_other_heads_is_refused():
    messages = spawn(2, _refusals)[0]
    assert "pattern must be an attnkit.patterns.S2Strided" in messages[0]
    assert "built for 8 query / 2 key-value heads, the tensors have 4 / 2" in messages[1]
