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


def _generate_worker(rank, world, mode, layout, attention):
    from attnkit.distributed import generate

    model = _model(attention)
    prompt = shard(_data()[0], world, rank, layout, dim=1)
    greedy = generate(model, prompt, 6, mode=mode, layout=layout)
    sampled = generate(model, prompt, 6, mode=mode, layout=layout, temperature=1.0, top_k=8,
                       generator=torch.Generator().manual_seed(3))
    layers = [m for m in model.modules() if hasattr(m, "core") and "core" in m.__dict__]
    ropes = [type(m.rope).__name__ for m in model.modules() if getattr(m, "rope", None) is not None]
    return greedy, sampled, len(layers), ropes


@pytest.mark.parametrize("world, mode, layout, attention", [
    (2, "ring", "zigzag", "gqa"), (3, "ring", "contiguous", ["lightning", "gqa"]), (2, "ulysses", "contiguous", "mha"),
])
def test_generate_from_a_split_prompt_equals_one_process(world, mode, layout, attention):
    # each rank holds a share of the prompt and of every softmax layer's KV cache; a decode step merges
    # the ranks' partial attention by log-sum-exp: the tokens are one process's on the whole prompt
    results = spawn(world, _generate_worker, mode, layout, attention)
    model = _model(attention)
    prompt = _data()[0]
    greedy = model.generate(prompt, 6)[:, SEQ:]
    sampled = model.generate(prompt, 6, temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(3))[:, SEQ:]
    for rank_greedy, rank_sampled, patched, ropes in results:
        assert torch.equal(rank_greedy, greedy) and torch.equal(rank_sampled, sampled)
        assert patched == 0 and set(ropes) <= {"RotaryEmbedding"}  # the model is put back as it was


def _generate_refusals(rank, world):
    from attnkit.distributed import generate

    out = []
    for args, kwargs in (((torch.zeros(2, 12), 4), {}), ((torch.zeros(2, 12, dtype=torch.long), -1), {}),
                         ((torch.zeros(2, 12, dtype=torch.long), 2), dict(temperature=-1.0)),
                         ((torch.zeros(2, 12, dtype=torch.long), 2), dict(mode="spiral"))):
        try:
            generate(_model(), *args, **kwargs)
            out.append(None)
        except ValueError as err:
            out.append(str(err))
    return out


def test_generate_refuses_bad_input_on_every_rank():
    for messages in spawn(2, _generate_refusals):
        assert "prompt must be this rank's share of token ids, a LongTensor" in messages[0]
        assert "max_new_tokens must be an int >= 0, got -1" in messages[1]
        assert "temperature must be >= 0, got -1.0" in messages[2]
        assert "mode must be one of ring, ulysses" in messages[3]
