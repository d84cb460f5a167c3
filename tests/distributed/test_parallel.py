"""A W-rank DecoderLM training step under parallelize(): the same loss and parameter gradients as
one process on the whole sequence (float64), ring (zigzag, contiguous) and Ulysses; bad models refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.distributed import parallelize, sequence_loss, shard, spawn, sum_gradients
from attnkit.models import DecoderLM

SEQ, VOCAB = 24, 32


def _model(attention="gqa"):
    torch.manual_seed(0)
    return DecoderLM(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, attention=attention).double()


def _data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _worker(rank, world, mode, layout, attention):
    model = _model(attention)
    inputs, targets = _data()
    with parallelize(model, SEQ, mode=mode, layout=layout):
        logits = model(shard(inputs, world, rank, layout, dim=1))
        local = F.cross_entropy(logits.reshape(-1, VOCAB), shard(targets, world, rank, layout, dim=1).reshape(-1),
                                reduction="sum")
        loss, value = sequence_loss(local, shard(targets, world, rank, layout, dim=1).numel())
        loss.backward()
    sum_gradients(model)
    return value, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("world, mode, layout, attention", [
    (2, "ring", "zigzag", "gqa"), (3, "ring", "contiguous", "gqa"), (2, "ulysses", "contiguous", "mha"),
    (2, "ring", "contiguous", ["lightning", "gqa"]),  # LASP-2H: LASP-2 for the linear layer, the ring for softmax
])
def test_a_training_step_equals_one_process(world, mode, layout, attention):
    results = spawn(world, _worker, mode, layout, attention)
    model = _model(attention)
    inputs, targets = _data()
    loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    for value, grads in results:
        torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-11, msg=name)


def _refusals(rank, world):
    out = []
    for attention, kwargs in (("agent", {}), ("gqa", dict(mode="ulysses", layout="zigzag")),
                              ("gqa", dict(mode="spiral")), ("gqa", {"seq_len": 25}),
                              ("lightning", dict(layout="zigzag"))):
        try:
            parallelize(_model(attention), kwargs.pop("seq_len", SEQ), **kwargs)
            out.append(None)
        except ValueError as err:
            out.append(str(err))
    return out


def test_what_cannot_be_sharded_is_refused():
    messages = spawn(2, _refusals)[0]
    assert "(LASP-2) only; this model also has AgentAttention" in messages[0]
    assert "mode='ulysses' needs layout='contiguous'" in messages[1]
    assert "mode must be one of ring, ulysses" in messages[2]
    assert "a sequence of 25 tokens does not split over 2 ranks" in messages[3]
    assert "Lightning layers run LASP-2, which combines the ranks' states in sequence order" in messages[4]
