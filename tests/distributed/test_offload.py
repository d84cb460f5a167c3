"""Attention offloading on 2 gloo processes (rank 0 compute, rank 1 attention worker): greedy
decoding and its logits equal plain local decoding in float64; ping-pong micro-batches equal
each micro-batch alone; bad input is a ValueError before anything is sent; the memory / time
model's arithmetic on a case computed by hand."""

from __future__ import annotations

import pytest
import torch

from attnkit.distributed import offload, offload_plan, pingpong_step, serve, spawn
from attnkit.distributed.offload import AttentionClient
from attnkit.models import DecoderLM

STEPS = 6


def _model():
    torch.manual_seed(0)
    return DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4, attention=["gqa", "mha", "mqa"]).double()


def _local_decode(model, prompt):
    """Greedy decoding with the local KV caches: tokens and every step's logits."""
    state = model.init_state(prompt.shape[0])
    logits = [model(prompt, state)[:, -1]]
    out = [prompt]
    for _ in range(STEPS):
        out.append(logits[-1].argmax(-1, keepdim=True))
        logits.append(model(out[-1], state)[:, -1])
    return torch.cat(out, 1), torch.stack(logits)


def _worker(rank, world):
    if rank == 1:
        return serve(client_rank=0)
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 64, (3, 5), generator=g)
    prompt_b = torch.randint(0, 64, (2, 4), generator=g)
    with torch.no_grad():
        ref_tokens, ref_logits = _local_decode(model, prompt)
        ref_b = [model(prompt_b[:, : i + 1], None)[:, -1] for i in range(4)]
        client = offload(model, server_rank=1)
        errors = {}
        try:
            tokens, logits = _local_decode(model, prompt)  # the same loop, now through the worker
            errors["tokens_equal"] = bool(torch.equal(tokens, ref_tokens))
            errors["logits"] = float((logits - ref_logits).abs().max())
            errors["generate_equal"] = bool(torch.equal(model.generate(prompt, STEPS), ref_tokens))
            # a state reset empties the worker's caches too: decoding again from it gives the same logits
            state = model.init_state(3)
            model(prompt, state)
            for s in state:
                s.reset()
            errors["after_reset"] = float((model(prompt, state)[:, -1] - ref_logits[0]).abs().max())
            errors["device_state_bytes"] = sum(s.nbytes() for s in model.init_state(1))
            # two micro-batches interleaved (different batch sizes), token by token
            sa, sb = model.init_state(3), model.init_state(2)
            la, lb = pingpong_step(model, [prompt, prompt_b[:, :1]], [sa, sb])
            worst = max((la[:, -1] - ref_logits[0]).abs().max(), (lb[:, -1] - ref_b[0]).abs().max())
            for i in range(1, 4):
                la, lb = pingpong_step(model, [ref_tokens[:, 5 + i - 1: 5 + i], prompt_b[:, i: i + 1]], [sa, sb])
                worst = max(worst, (la[:, -1] - ref_logits[i]).abs().max(), (lb[:, -1] - ref_b[i]).abs().max())
            errors["pingpong"] = float(worst)
            client.events.clear()
            pingpong_step(model, [ref_tokens[:, -1:], prompt_b[:, :1]], [sa, sb])
            errors["events"] = list(client.events)
            errors["slots"] = ([s.slot for s in sa], [s.slot for s in sb])  # one slot per layer
            bad = []
            state = model.init_state(3)
            for call in (lambda: model(prompt[:2], state),                       # batch other than the state's
                         lambda: model.layers[0].attn(torch.zeros(3, 1, 7, dtype=torch.float64), state[0]),
                         lambda: model.layers[0].attn(torch.zeros(3, 1, 32, dtype=torch.float64),
                                                      model.layers[0].attn.layer.init_state(3)),  # a local cache
                         lambda: pingpong_step(model, [prompt], []),
                         lambda: pingpong_step(model, [prompt], [state[:2]]),
                         lambda: offload(model, server_rank=1)):                # already offloaded
                try:
                    call()
                    bad.append("no error")
                except ValueError as err:
                    bad.append(str(err))
            errors["bad"] = bad
            errors["sent"] = client.sent_bytes
            for st in (sa, sb, state):
                client.release(st)
        finally:
            client.stop()
    return errors


def test_offloaded_decoding_equals_local():
    results = spawn(2, _worker, timeout=60.0)
    mine, server = results
    assert mine["tokens_equal"] and mine["generate_equal"]
    assert mine["logits"] < 1e-10
    assert mine["pingpong"] < 1e-10
    assert mine["device_state_bytes"] == 0
    # ping-pong: micro-batch B's request for a layer goes out before A's answer is awaited, and A's
    # next-layer request before B's answer: the worker always has the other micro-batch queued
    a, b = mine["slots"]
    expected = [("submit", 0, a[0]), ("submit", 0, b[0])]
    for layer in range(3):
        expected += [("wait", layer, a[layer])] + ([("submit", layer + 1, a[layer + 1])] if layer < 2 else [])
        expected += [("wait", layer, b[layer])] + ([("submit", layer + 1, b[layer + 1])] if layer < 2 else [])
    assert mine["events"] == expected
    assert all(msg != "no error" for msg in mine["bad"]), mine["bad"]
    assert "batch_size=3" in mine["bad"][0] and "C=32" in mine["bad"][1] and "KVCache" in mine["bad"][2]
    assert "states[0]" in mine["bad"][4] and "already offloaded" in mine["bad"][5]
    assert mine["after_reset"] < 1e-10
    assert server["requests"] > 0 and server["peak_kv_bytes"] > 0
    # left on the worker: the 3 layers' caches of the two decodes and of the unused state from
    # device_state_bytes (never released); the released ones are gone
    assert server["caches"] == 3 * 4  # and the reset one
    assert mine["sent"] > 0


def test_offload_rejects_layers_it_cannot_serve():
    for other in ("sliding-window", "dma"):  # a bounded cache; a variant with its own adjust / core
        model = DecoderLM(vocab_size=16, dim=16, num_layers=2, num_heads=2, attention=["mha", other])
        with pytest.raises(ValueError, match="layer 1 attention"):
            offload(model, server_rank=1)
        assert type(model.layers[0].attn).__name__ == "MultiHeadAttention"  # nothing replaced
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        offload(DecoderLM(vocab_size=16, dim=16, num_layers=1, num_heads=2, attention_options={"pattern": "full"}), 1)
    with pytest.raises(ValueError, match="server_rank"):
        AttentionClient(-1)
    # the worker's arguments are checked before it waits for anything (no process group needed)
    with pytest.raises(ValueError, match="latency"):
        serve(0, latency=-1.0)
    with pytest.raises(ValueError, match="client_rank"):
        serve("0")


def test_plan_by_hand():
    # 1 layer, 2 kv heads, head dim 4, fp16, context 10: kv per sequence 2*1*2*4*10*2 = 320 bytes;
    # weights 100 params = 200 bytes; device 1000 bytes: 800 free -> 2 sequences locally.
    # Offloaded, per sequence (2*4 + 2*2)*4*2 = 96 bytes on the device -> 8; worker 3200 bytes -> 10.
    plan = offload_plan(num_params=100, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, context=10,
                        device_bytes=1000, worker_bytes=3200, dtype_bytes=2)
    assert plan["weight_bytes"] == 200 and plan["kv_bytes_per_seq"] == 320
    assert plan["max_batch_local"] == 2 and plan["max_batch_offload"] == 8
    assert plan["q_out_bytes"] == 2 * 8 * 4 * 4 * 2 and plan["kv_bytes"] == 2 * 8 * 2 * 4 * 2
    small_worker = offload_plan(num_params=100, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, context=10,
                                device_bytes=1000, worker_bytes=1000)
    assert small_worker["max_batch_offload"] == 3  # the worker's 1000 bytes hold 3 caches of 320
    timed = offload_plan(num_params=100, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, context=10,
                         device_bytes=1000, batch=1, compute_s=1.0, attention_s=0.5, bandwidth=48.0)
    # transfer per layer (2*4 + 2*2)*4*2 = 96 bytes / 48 B/s = 2 s
    assert timed["transfer_s"] == 2.0
    assert timed["sequential_s"] == 2 * (1.0 + 0.5 + 2.0)
    assert timed["pipelined_s"] == 2 * 2.5 + 1.0 / 2


def test_plan_batch_rises_when_kv_leaves_the_device():
    # a 7B-like shape on an 80 GB device, 4k context, bf16
    plan = offload_plan(num_params=7_000_000_000, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        context=4096, device_bytes=80e9, worker_bytes=1e12)
    assert plan["max_batch_offload"] > 5 * plan["max_batch_local"] > 0
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple"):
        offload_plan(num_params=1, num_layers=1, num_heads=6, num_kv_heads=4, head_dim=2, context=1, device_bytes=1)
    with pytest.raises(ValueError, match="bandwidth"):
        offload_plan(num_params=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2, context=1, device_bytes=1,
                     bandwidth=-1.0)
