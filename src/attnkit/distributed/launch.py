"""Run a function on W local processes of one ``torch.distributed`` job (gloo on CPU, loopback):
how the tests check sequence parallelism against a single process, and a way to try it on a
laptop without ``torchrun``."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn", "check_ring"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, timeout: float, folder: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes in one process group and
    return their results (``torch.save``-able), rank order. ``fn`` must be importable by name
    (a module-level function). A collective that waits longer than ``timeout`` seconds fails
    instead of hanging; a failing rank fails the call with its traceback."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    with tempfile.TemporaryDirectory(prefix="attnkit-spawn-") as folder:
        mp.start_processes(_entry, args=(world, _free_port(), backend, timeout, folder, fn, args), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def check_ring(rank: int, world: int, seq: int = 64, causal: bool = True, layout: str = "zigzag",
               heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0) -> float:
    """A self-test to run on every rank (``spawn(2, check_ring)`` or under torchrun): ring attention
    on this rank's share of a random float64 sequence (the same on every rank, from ``seed``)
    against single-process attention of the whole sequence; returns this rank's largest absolute
    difference of the output and of the gradients."""
    from ..ops.softmax import attend
    from .ring import ring_attend, shard

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, seq, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    whole = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attend(*whole, pattern="causal" if causal else None, backend="reference")
    ref.square().sum().backward()
    mine = [shard(t, world, rank, layout).clone().requires_grad_(True) for t in (q, k, v)]
    out = ring_attend(*mine, causal=causal, layout=layout)
    out.square().sum().backward()
    # every rank's backward together gives each shard the gradient of the sum of all ranks' losses,
    # which is the single-process loss: the shards of its gradients
    errors = [(out - shard(ref, world, rank, layout)).abs().max()]
    errors += [(m.grad - shard(w.grad, world, rank, layout)).abs().max() for m, w in zip(mine, whole)]
    return float(max(errors))


def main(argv=None) -> int:
    """``python -m attnkit.distributed --world 4``: the ring self-test on local gloo processes."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m attnkit.distributed", description=main.__doc__.split(": ")[1])
    p.add_argument("--world", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--seq", type=int, default=64, help="sequence length, a multiple of 2 x world (default: 64)")
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    a = p.parse_args(argv)
    if a.world < 1 or a.seq < 1:
        p.error("--world and --seq must be positive")
    errors = spawn(a.world, check_ring, a.seq, True, a.layout)
    print(f"ring attention on {a.world} processes ({a.layout}, causal, seq {a.seq}): largest difference from one "
          f"process {max(errors):.2e} (output and gradients, float64)")
    return 0 if max(errors) < 1e-9 else 1
