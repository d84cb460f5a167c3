"""A sequence-parallel ``DecoderLM`` end to end: training steps, then decoding, checked against one process.

Under ``torchrun`` (each rank one process; gloo on CPU, NCCL with ``--backend nccl`` on GPUs)::

    torchrun --nproc-per-node 2 -m attnkit.distributed.demo --steps 3

or on local processes without torchrun::

    python -m attnkit.distributed.demo --world 2

Every rank builds the same float64 model (a Lightning layer and a GQA layer: LASP-2H), feeds its
contiguous share of each sequence, and takes ``--steps`` SGD steps with :func:`parallelize`,
:func:`sequence_loss` and :func:`sum_gradients`; then it continues a prompt split over the ranks
with :func:`attnkit.distributed.generate`. Rank 0 repeats the same on the whole sequences in one
process and prints the largest differences (losses, parameters) and whether the tokens agree.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F


def _model(vocab: int):
    from ..models import DecoderLM

    torch.manual_seed(0)
    return DecoderLM(vocab_size=vocab, dim=32, num_layers=2, num_heads=4, attention=["lightning", "gqa"]).double()


def _step(model, loss, lr):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def run(rank: int, world: int, steps: int = 3, seq: int = 32, new_tokens: int = 8, device: str = "cpu") -> dict:
    """Train and decode on this rank's shares; on rank 0 also in one process, and compare."""
    from . import generate, parallelize, sequence_loss, shard, sum_gradients

    vocab, lr = 64, 0.5
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (2, seq + 1), generator=g).to(device)
    inputs, targets = data[:, :-1], data[:, 1:]
    model = _model(vocab).to(device)
    losses = []
    for _ in range(steps):
        with parallelize(model, seq, layout="contiguous"):
            mine = shard(targets, world, rank, "contiguous", dim=1)
            logits = model(shard(inputs, world, rank, "contiguous", dim=1))
            local = F.cross_entropy(logits.reshape(-1, vocab), mine.reshape(-1), reduction="sum")
            loss, value = sequence_loss(local, mine.numel())
            loss.backward()
        sum_gradients(model)
        _step(model, loss, lr)
        losses.append(float(value))
    sample = dict(temperature=1.0, top_k=16)  # sampled with one seed: the same draws as one process makes
    tokens = generate(model, shard(inputs, world, rank, "contiguous", dim=1), new_tokens, **sample,
                      generator=torch.Generator(device).manual_seed(2))
    result = {"losses": losses, "tokens": tokens.cpu()}
    if rank == 0:
        one = _model(vocab).to(device)
        one_losses = []
        for _ in range(steps):
            loss = F.cross_entropy(one(inputs).reshape(-1, vocab), targets.reshape(-1))
            loss.backward()
            _step(one, loss, lr)
            one_losses.append(float(loss.detach()))
        one_tokens = one.generate(inputs, new_tokens, **sample, generator=torch.Generator(device).manual_seed(2))[:, seq:]
        result.update(
            loss_difference=max(abs(a - b) for a, b in zip(losses, one_losses)) if steps else 0.0,
            parameter_difference=max(float((p - q).abs().max()) for p, q in zip(model.parameters(), one.parameters())),
            tokens_equal=bool(torch.equal(tokens, one_tokens)))
    return result


def _report(result: dict, world: int) -> int:
    print(f"{world} ranks, float64 DecoderLM (lightning + gqa: LASP-2H): losses "
          + ", ".join(f"{x:.6f}" for x in result["losses"]))
    print(f"against one process: largest loss difference {result['loss_difference']:.1e}, parameter difference "
          f"{result['parameter_difference']:.1e}; generated tokens {'equal' if result['tokens_equal'] else 'DIFFER'}: "
          f"{result['tokens'][0].tolist()}")
    ok = result["tokens_equal"] and result["loss_difference"] < 1e-9 and result["parameter_difference"] < 1e-9
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnkit.distributed.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="local processes when not under torchrun (default: 2)")
    p.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    p.add_argument("--seq", type=int, default=32, help="sequence length, a multiple of the world size (default: 32)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="under torchrun: the process group's backend (default: nccl with CUDA, else gloo)")
    a = p.parse_args(argv)
    for name in ("world", "seq", "new_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.steps < 0:
        p.error(f"--steps must be >= 0, got {a.steps}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

        backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = "cpu"
        if backend == "nccl":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if a.seq % world:
            p.error(f"--seq {a.seq} must be a multiple of the world size {world}")
        try:
            result = run(rank, world, a.steps, a.seq, a.new_tokens, device)
        finally:
            dist.destroy_process_group()
        return _report(result, world) if rank == 0 else 0
    from .launch import spawn

    if a.seq % a.world:
        p.error(f"--seq {a.seq} must be a multiple of --world {a.world}")
    return _report(spawn(a.world, run, a.steps, a.seq, a.new_tokens)[0], a.world)


if __name__ == "__main__":
    sys.exit(main())
