"""Soft injection of task embeddings (attnkit.hf.taskinject): embeddings from the heads' outputs at
the last position, mixed in at the last position with soft weights; against a float64 eager
reference; zero weights bit-identical; the weights learn; bad input."""

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.taskinject import TaskInject, fit_task_injection, task_embeddings  # noqa: E402
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(2, 4, generator=g, dtype=torch.float64)
    w[0, 0] = w[1, 3] = 0.0  # untouched heads
    return w


def _ref_inject(emb, w):
    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "output" or w[layer, head] == 0:
            return t
        out = t.clone()  # [B, T, Dv]: mix at the last position
        out[:, -1] = (1 - w[layer, head]) * t[:, -1] + w[layer, head] * emb[layer, head]
        return out
    return change


def test_injection_equals_float64_reference():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    g = torch.Generator().manual_seed(1)
    emb, w = torch.randn(2, 4, 16, generator=g, dtype=torch.float64), _weights()
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    # the policy stores float32 embeddings / weights: the reference gets the same numbers
    emb32, w32 = emb.float().double(), w.float().double()
    want = _reference_forward(model, ids, mask, _ref_inject(emb32, w32))
    with torch.no_grad(), hf.apply(model, TaskInject(embeddings=emb, weights=w)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    # only the last position changes
    torch.testing.assert_close(got[:, :-1][valid[:, :-1]], plain[:, :-1][valid[:, :-1]], atol=1e-10, rtol=0)
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_task_embeddings_are_the_mean_last_position_head_outputs():
    model = tiny("llama", dtype=torch.float64)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    E = task_embeddings(model, prompts, batch_size=2)
    assert E.shape == (2, 4, 16) and E.dtype == torch.float32
    # the same mean from one prompt at a time through the float64 reference's output stage
    seen = {}

    def grab(layer, head, stage, t, q_pos, k_pos, start):
        if stage == "output":
            seen.setdefault((layer, head), []).append(t[0, -1].clone())
        return t

    for p in prompts:
        ids = torch.tensor([p])
        _reference_forward(model, ids, torch.ones_like(ids), grab)
    for (l, h), rows in seen.items():
        torch.testing.assert_close(E[l, h].double(), torch.stack(rows).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_zero_weights_are_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    E = task_embeddings(model, [[1, 2, 3], [4, 5]])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, TaskInject(embeddings=E, weights=torch.zeros(2, 4))):
            zero = model(ids, attention_mask=mask).logits
        with hf.apply(model, TaskInject(embeddings=E)):  # weights default to 0
            default = model(ids, attention_mask=mask).logits
        with hf.apply(model, TaskInject()):
            empty = model(ids, attention_mask=mask).logits
        with hf.apply(model, TaskInject(embeddings=E, weights=torch.full((2, 4), 0.5))):
            mixed = model(ids, attention_mask=mask).logits
    assert torch.equal(zero, ref) and torch.equal(default, ref) and torch.equal(empty, ref)
    assert not torch.equal(mixed, ref)


def test_subject_zero_weights_bit_identical_and_fit_lowers_the_loss():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    demo = [list(b"Label each word.\nInput: apple\nLabel: zip\nInput: horse\nLabel: zap\nInput: pear\nLabel: zip\n"
                 b"Input: " + w + b"\nLabel: ") for w in (b"plum", b"tiger", b"fig")]
    E = task_embeddings(model, demo)
    ids = torch.tensor([list(b"Label each word.\nInput: lemon\nLabel: ")])
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, TaskInject(embeddings=E, weights=torch.zeros(12, 4))):
            same = model(ids).logits
    assert torch.equal(same, ref)
    prompts = [list(b"Label each word.\nInput: " + w + b"\nLabel: z") for w in (b"lemon", b"zebra", b"mango", b"wolf")]
    targets = [ord("i"), ord("a"), ord("i"), ord("a")]
    policy, rep = fit_task_injection(model, E, prompts, targets, steps=8, lr=0.3, batch_size=4)
    assert rep["loss"][-1] < rep["loss"][0]
    w = policy.weights
    assert w.shape == (12, 4) and bool(((w > 0) & (w < 1)).all())


def test_bad_input():
    model = tiny("llama")
    E = torch.zeros(2, 4, 16)
    with pytest.raises(ValueError, match="weights must be in \\[0, 1\\]"):
        TaskInject(embeddings=E, weights=torch.full((2, 4), 1.5))
    with pytest.raises(ValueError, match="weights have shape \\(3, 4\\)"):
        TaskInject(embeddings=E, weights=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="embeddings must have 3 dims"):
        TaskInject(embeddings=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        TaskInject(embeddings=E, weights=torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="without embeddings"):
        TaskInject(weights=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positions must be one of"):
        TaskInject(embeddings=E, positions="all")
    with pytest.raises(ValueError, match="embeddings are for \\[num_layers, num_heads\\] = \\[3, 4\\]"):
        hf.apply(model, TaskInject(embeddings=torch.zeros(3, 4, 16), weights=torch.ones(3, 4) * 0.5))
    with pytest.raises(ValueError, match="prompts is empty"):
        task_embeddings(model, [])
    with pytest.raises(ValueError, match="a prompt is empty"):
        task_embeddings(model, [[1], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        fit_task_injection(model, E, [], [])
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        fit_task_injection(model, E, [[1], [2]], [3])
    with pytest.raises(ValueError, match="steps must be a positive"):
        fit_task_injection(model, E, [[1]], [3], steps=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        fit_task_injection(model, E, [[1]], [3], lr=float("nan"))
    with pytest.raises(ValueError, match="embeddings are for \\[3, 4\\]"):
        fit_task_injection(model, torch.zeros(3, 4, 16), [[1]], [3])
    hf.apply(model, TaskInject()).remove()


def test_prefill_positions_inject_only_the_prompts_last_token():
    from hf_models import greedy_decode

    model = tiny("llama")
    ids, mask = padded_inputs()
    E = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    w = torch.full((2, 4), 0.7)
    runs = {}
    for positions in ("last", "prefill"):
        with hf.apply(model, TaskInject(embeddings=E, weights=w, positions=positions)) as handle:
            runs[positions] = greedy_decode(model, ids, mask, handle.cache(), steps=2)
    assert torch.equal(runs["last"][0], runs["prefill"][0])  # the prompt: injected either way
    # a decode step: "last" injects its token too, "prefill" does not (the same cache before it)
    assert not torch.allclose(runs["last"][1], runs["prefill"][1], atol=1e-4)
