"""VHD / VHR (attnkit.hf.vhr): VHD against head outputs captured from a float64 eager attention with
and without the span's keys, the selection rule, the reinforcement against the reference, invariants
(alpha 1, no head: bit-identical) on Llama / Qwen2 / Mistral and the subject, the mechanics on tiny
LLaVA and Qwen2-VL, bad input."""

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.span import span_from_ids, span_from_range  # noqa: E402
from attnkit.hf.vhr import VHR, vhd_scores, vhr_heads  # noqa: E402
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402
from test_var import IMAGE, tiny_llava, tiny_qwen2vl  # noqa: E402


def _span(B=2, T=14):
    return span_from_range(B, T, 6, 11)


def _captured(model, ids, mask, change):
    store = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: store.__setitem__(i, args[0].double())) for i, layer in enumerate(model.model.layers)]
    try:
        _reference_forward(model, ids, mask, change)
    finally:
        for h in hooks:
            h.remove()
    return store


def test_vhd_equals_float64_reference():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    span = _span()

    def hide(layer, head, stage, t, q_pos, k_pos, start):  # the span's keys hidden from queries after it
        if stage != "logits":
            return t
        return t.masked_fill((k_pos[None, :] >= 6) & (k_pos[None, :] <= 10) & (q_pos[:, None] > 10), float("-inf"))

    with_span = _captured(model, ids, mask, lambda *a: a[3])
    without = _captured(model, ids, mask, hide)
    want = torch.zeros(2, 4, dtype=torch.float64)
    for layer in range(2):
        d = (with_span[layer] - without[layer]).view(2, 14, 4, 16).norm(dim=-1)[:, 11:]  # queries after the span
        want[layer] = d.mean((0, 1))
    got = vhd_scores(model, span, ids, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert bool((got > 0).all())
    # queries given explicitly: only the last one
    last = torch.zeros(2, 14, dtype=torch.bool)
    last[:, -1] = True
    want_last = torch.stack([(with_span[i] - without[i]).view(2, 14, 4, 16).norm(dim=-1)[:, -1].mean(0)
                             for i in range(2)])
    torch.testing.assert_close(vhd_scores(model, span, ids, queries=last, attention_mask=mask), want_last,
                               atol=1e-10, rtol=0)


def test_selection_rule_is_the_papers_and_deterministic():
    scores = torch.tensor([[1.0, 2.0, 3.0, 10.0],  # median 2.5, mean + std 4 + 3.54: 10 is a surge
                           [4.0, 4.0, 4.0, 4.0],   # nothing above the median
                           [0.1, 0.4, 0.3, 0.35]])  # median 0.325 (the mean of the middle two), surge 0.401
    assert vhr_heads(scores) == ((0, 2), (2, 1), (2, 3))
    assert vhr_heads(scores, layers=[2]) == ((2, 1), (2, 3))
    model = tiny("llama")
    ids, mask = padded_inputs()
    a = vhr_heads(vhd_scores(model, _span(), ids, attention_mask=mask))
    b = vhr_heads(vhd_scores(model, _span(), ids, attention_mask=mask))
    assert a == b and len(a) > 0
    # top-k over the model: ties broken by the seed, the same seed the same heads
    tied = VHR.identify(model, _span(), ids, k=3, seed=1, model_inputs={"attention_mask": mask})
    again = VHR.identify(model, _span(), ids, k=3, seed=1, model_inputs={"attention_mask": mask})
    assert tied.heads == again.heads and len(tied.heads) == 3
    flat = torch.ones(2, 4)
    from attnkit.hf.steer import top_heads

    picks = {top_heads(flat, k=2, seed=s) for s in range(10)}
    assert len(picks) > 1 and all(top_heads(flat, k=2, seed=s) == top_heads(flat, k=2, seed=s) for s in range(10))


@pytest.mark.parametrize("queries", ["last", "after_span"])
def test_reinforcement_equals_float64_reference(queries):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    heads = ((0, 1), (1, 2), (1, 3))

    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "output" or (layer, head) not in heads:
            return t
        rows = (q_pos == 13) if queries == "last" else (q_pos > 10)
        return torch.where(rows[None, :, None], 2.5 * t, t)

    want = _reference_forward(model, ids, mask, change)
    with torch.no_grad(), hf.apply(model, VHR(heads=heads, alpha=2.5, span=_span(), queries=queries)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_alpha_one_or_no_head_is_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for policy in (VHR(heads=((0, 1), (1, 0)), alpha=1.0, span=_span()), VHR(), VHR(heads=(), span=_span())):
            with hf.apply(model, policy):
                assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_subject_identify_and_invariant():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"The pass key is 12345. Remember it. Some filler text here. What is the pass key? ")])
    span = span_from_range(1, ids.shape[1], 0, 57)
    policy = VHR.identify(model, span, ids)
    assert policy.scores.shape == (12, 4) and len(policy.heads) > 0
    assert set(policy.heads) == set(vhr_heads(policy.scores))
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, VHR(heads=policy.heads, alpha=1.0, span=span)):
            assert torch.equal(model(ids).logits, ref)
        with hf.apply(model, policy):
            got = model(ids).logits
    torch.testing.assert_close(got[:, :-1], ref[:, :-1], atol=2e-4, rtol=0)  # "last": only the last query changes
    assert (got[:, -1] - ref[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl])
def test_multimodal_image_span_mechanics(build):
    model, ids, extra = build()
    span = span_from_ids(ids, IMAGE)
    scores = vhd_scores(model, span, ids, **extra)
    assert scores.shape == (4, 4) and bool((scores > 0).any())
    policy = VHR.identify(model, span, ids, model_inputs=extra, queries="after_span")
    with torch.no_grad():
        ref = model(input_ids=ids, **extra).logits
        with hf.apply(model, policy):
            got = model(input_ids=ids, **extra).logits
    end = int(span[0].nonzero().max())
    torch.testing.assert_close(got[:, : end + 1], ref[:, : end + 1], atol=1e-5, rtol=0)
    assert (got[:, end + 1 :] - ref[:, end + 1 :]).abs().max() > 1e-5


def test_bad_input_raises_clear_errors():
    model = tiny("llama")
    ids, mask = padded_inputs()
    with pytest.raises(ValueError, match="query head 4 .* out of range; accepted: 0 .. 3"):
        hf.apply(model, VHR(heads=((0, 4),), span=_span()))
    with pytest.raises(ValueError, match="layer 5 .* out of range"):
        hf.apply(model, VHR(heads=((5, 0),), span=_span()))
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        VHR(heads=((0, 1),), alpha=0)
    with pytest.raises(ValueError, match="queries must be one of"):
        VHR(heads=((0, 1),), queries="first")
    with pytest.raises(ValueError, match="outside the sequence of 14 tokens"):
        vhd_scores(model, torch.ones(2, 15, dtype=torch.bool), ids)
    with pytest.raises(ValueError, match="marks no position"):
        vhd_scores(model, torch.zeros(2, 14, dtype=torch.bool), ids)
    with pytest.raises(ValueError, match=r"scores must be finite \[num_layers, num_heads\]"):
        vhr_heads(torch.zeros(4))
    with pytest.raises(ValueError, match="layer 3 out of range; accepted: 0 .. 1"):
        vhr_heads(torch.zeros(2, 4), layers=[3])
    # a span longer than the sequence the model is called with
    with hf.apply(model, VHR(heads=((0, 1),), span=torch.ones(2, 20, dtype=torch.bool))), \
            pytest.raises(ValueError, match="outside the sequence of 14 tokens"):
        model(ids, attention_mask=mask)
    hf.apply(model, VHR()).remove()
