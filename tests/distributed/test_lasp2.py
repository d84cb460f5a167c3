"""LASP-2 on W gloo processes against the single-device float64 Lightning reference: each rank's
share of the output, the final state and the gradients of q, k, v, the slopes and the initial state."""

from __future__ import annotations

import torch

from attnkit.distributed import lasp2_bytes, lasp2_lightning, sent_bytes, shard, spawn, unshard
from attnkit.ops.linear.lightning import lightning_attend_reference

B, H, T_LOCAL, D, E = 2, 3, 5, 4, 6


def _inputs(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = world * T_LOCAL
    q, k = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, S, E, generator=g, dtype=torch.float64)
    slopes = torch.tensor([0.0, 0.1, 0.7], dtype=torch.float64)  # 0: LASP-2's no-decay case
    s0 = torch.randn(B, H, D, E, generator=g, dtype=torch.float64)
    d_out = torch.randn(B, H, S, E, generator=g, dtype=torch.float64)
    d_state = torch.randn(B, H, D, E, generator=g, dtype=torch.float64)
    return q, k, v, slopes, s0, d_out, d_state


def _worker(rank, world):
    results = []
    for with_state in (False, True):
        q, k, v, slopes, s0, d_out, d_state = _inputs(world)
        mine = [shard(t, world, rank).clone().requires_grad_(True) for t in (q, k, v)]
        slopes, s0 = slopes.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        sent_bytes(reset=True)
        out, state = lasp2_lightning(*mine, slopes, initial_state=s0 if with_state else None, backend="chunked")
        # one all-gather of the [B, H, D, E] state, W - 1 states per rank, whatever the sequence length
        assert sent_bytes(reset=True) == lasp2_bytes(state.shape, state.dtype, world) > 0
        # the final state's loss counted once over the ranks (every rank holds the same state)
        loss = (out * shard(d_out, world, rank)).sum() + (state * d_state).sum() / world
        loss.backward()
        results.append([t.detach() for t in (out, state, *(m.grad for m in mine), slopes.grad,
                                             s0.grad if with_state else torch.zeros(()))])
    return results


def test_lasp2_equals_single_device_lightning():
    for world in (2, 3):
        got = spawn(world, _worker)
        for c, with_state in enumerate((False, True)):
            q, k, v, slopes, s0, d_out, d_state = _inputs(world)
            q, k, v, slopes, s0 = (t.clone().requires_grad_(True) for t in (q, k, v, slopes, s0))
            out, state = lightning_attend_reference(q, k, v, slopes, initial_state=s0 if with_state else None)
            ((out * d_out).sum() + (state * d_state).sum()).backward()
            for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
                want = (out, None, q.grad, k.grad, v.grad)[i]
                torch.testing.assert_close(unshard([r[c][i] for r in got]), want.detach(), rtol=1e-10, atol=1e-10,
                                           msg=f"{name} world={world} state={with_state}")
            for r in got:  # the final state on every rank; the slopes' and S0's gradients summed over ranks
                torch.testing.assert_close(r[c][1], state.detach(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(sum(r[c][5] for r in got), slopes.grad, rtol=1e-10, atol=1e-10)
            if with_state:
                torch.testing.assert_close(sum(r[c][6] for r in got), s0.grad, rtol=1e-10, atol=1e-10)
