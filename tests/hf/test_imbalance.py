"""PAINT (attnkit.hf.imbalance): dual-stream token selection against a plain computation, the logit
modulation against a float64 eager attention, head-specific factors, invariants (alpha = beta = 0:
bit-identical) on Llama / Qwen2 / Mistral and the subject, the mechanics on tiny LLaVA and Qwen2-VL,
bad input."""

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.imbalance import PAINT, attention_received, select_tokens, span_sensitivity  # noqa: E402
from attnkit.hf.span import span_from_ids, span_from_range  # noqa: E402
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402
from test_var import IMAGE, tiny_llava, tiny_qwen2vl  # noqa: E402


def _span(B=2, T=14):
    return span_from_range(B, T, 2, 12)  # 10 tokens; row 1's pads (0 .. 4) are inside: they get no weight


def test_select_tokens_dual_stream():
    span = torch.zeros(1, 12, dtype=torch.bool)
    span[0, 1:9] = True  # 8 span tokens
    local = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]])  # top 25% of the span: positions 8, 7
    summary = torch.tensor([[0.0, 1, 1, 1, 1, 1, 1, 1, 50, 0, 0, 0]])  # one outlier (Q3 + 1.5 IQR): position 8
    got_local, got_summary = select_tokens(span, local, summary, top_ratio=0.25)
    assert got_summary[0].nonzero().flatten().tolist() == [8]
    assert got_local[0].nonzero().flatten().tolist() == [7]  # 8 is a summary token, so not a local one
    only_local, none = select_tokens(span, local, None, top_ratio=0.5)
    assert only_local[0].nonzero().flatten().tolist() == [5, 6, 7, 8] and not bool(none.any())


def test_attention_received_and_sensitivity():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    span = span_from_range(2, 14, 6, 11)
    got = attention_received(model, span, ids, 1, attention_mask=mask)
    probs = {}

    def grab(layer, head, stage, t, q_pos, k_pos, start):
        if stage == "weights":
            probs[(layer, head)] = t.clone()
        return t

    _reference_forward(model, ids, mask, grab)
    want = sum(probs[(1, h)][:, 11:].sum(1) for h in range(4))  # queries after the span
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    sens = span_sensitivity(model, span, ids, attention_mask=mask)
    want_sens = torch.tensor([[float(probs[(layer, h)][:, 11:, 6:11].sum(-1).mean()) for h in range(4)]
                              for layer in range(2)], dtype=torch.float64)
    torch.testing.assert_close(sens, want_sens, atol=1e-10, rtol=0)


@pytest.mark.parametrize("queries,head_specific", [("last", False), ("after_span", True)])
def test_modulation_equals_float64_reference(queries, head_specific):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    span = _span()
    local = torch.zeros(2, 14, dtype=torch.bool)
    summary = torch.zeros(2, 14, dtype=torch.bool)
    local[:, [6, 8]], summary[:, [10]] = True, True
    sensitivity = (torch.tensor([[0.0, 0.2, 0.4, 0.1], [0.8, 0.0, 0.3, 0.6]], dtype=torch.float64)
                   if head_specific else None)
    w = sensitivity / 0.8 if head_specific else torch.ones(2, 4)
    policy = PAINT(span=span, local=local, summary=summary, alpha=0.7, beta=0.4, sensitivity=sensitivity,
                   layers=(0, 1), queries=queries)

    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "logits":
            return t
        rows = (q_pos == 13) if queries == "last" else (q_pos > 11)
        gain = torch.zeros(14, dtype=torch.float64)
        gain[[6, 8]], gain[10] = 0.7, 0.4
        bump = float(w[layer, head]) * gain[None, None, :] * t.abs()
        return torch.where(rows[None, :, None] & (gain > 0)[None, None, :], t + bump, t)

    want = _reference_forward(model, ids, mask, change)
    with torch.no_grad(), hf.apply(model, policy):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-4
    if head_specific:  # heads of sensitivity 0 are not routed
        assert policy.modifier.heads(2, 4) == ((0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_modulation_off_is_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    span = _span()
    local = span & (torch.arange(14) % 2 == 0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for policy in (PAINT(span=span, local=local, summary=local, alpha=0.0, beta=0.0), PAINT(),
                       PAINT(span=span, local=torch.zeros_like(span), alpha=0.7),
                       PAINT(span=span, local=local, sensitivity=torch.zeros(2, 4), layers=(0, 1))):
            with hf.apply(model, policy):
                assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_subject_identify_and_invariant():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"The pass key is 12345. Remember it. Some filler text here. What is the pass key? ")])
    span = span_from_range(1, ids.shape[1], 0, 57)
    policy = PAINT.identify(model, span, ids)
    assert int(policy.local.sum()) + int(policy.summary.sum()) > 0 and policy.sensitivity.shape == (12, 4)
    assert not bool((policy.local & policy.summary).any()) and not bool((policy.local & ~span).any())
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, PAINT(span=span, local=policy.local, summary=policy.summary, alpha=0.0, beta=0.0)):
            assert torch.equal(model(ids).logits, ref)
        with hf.apply(model, policy):
            got = model(ids).logits
    torch.testing.assert_close(got[:, :-1], ref[:, :-1], atol=2e-4, rtol=0)
    assert (got[:, -1] - ref[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl])
def test_multimodal_image_span_mechanics(build):
    model, ids, extra = build()
    span = span_from_ids(ids, IMAGE)
    # scores for the two streams as a vision tower would give them (any [B, L] per-token score)
    g = torch.Generator().manual_seed(0)
    local, summary = select_tokens(span, torch.rand(span.shape, generator=g), torch.rand(span.shape, generator=g),
                                   top_ratio=0.5)
    assert bool(local.any()) and not bool((local & ~span).any())
    policy = PAINT(span=span, local=local, summary=summary, alpha=0.7, beta=0.3, queries="after_span")
    with torch.no_grad():
        ref = model(input_ids=ids, **extra).logits
        with hf.apply(model, policy):
            got = model(input_ids=ids, **extra).logits
        identified = PAINT.identify(model, span, ids, model_inputs=extra, local_layer=0, summary_layer=2)
    end = int(span[0].nonzero().max())
    torch.testing.assert_close(got[:, : end + 1], ref[:, : end + 1], atol=1e-5, rtol=0)
    assert (got[:, end + 1 :] - ref[:, end + 1 :]).abs().max() > 1e-6
    assert identified.sensitivity.shape == (4, 4) and bool(identified.local.any())


def test_bad_input_raises_clear_errors():
    model = tiny("llama")
    ids, mask = padded_inputs()
    span = _span()
    local = span.clone()
    with pytest.raises(ValueError, match="top_ratio must be a number in"):
        select_tokens(span, torch.rand(2, 14), top_ratio=2)
    with pytest.raises(ValueError, match=r"local_scores must be a tensor of the span's shape \(2, 14\)"):
        select_tokens(span, torch.rand(2, 13))
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        PAINT(span=span, local=local, alpha=-1)
    with pytest.raises(ValueError, match="local must be a boolean mask of the span's shape"):
        PAINT(span=span, local=local[:, :5])
    with pytest.raises(ValueError, match="without their span"):
        PAINT(local=local)
    with pytest.raises(ValueError, match=r"sensitivity has shape \(3, 4\)"):
        hf.apply(model, PAINT(span=span, local=local, sensitivity=torch.ones(3, 4)))
    with pytest.raises(ValueError, match="layer 2 out of range; accepted: 0 .. 1"):
        hf.apply(model, PAINT(span=span, local=local, layers=(0, 2)))
    with pytest.raises(ValueError, match="queries must be one of"):
        PAINT(span=span, local=local, queries="every")
    with pytest.raises(ValueError, match="layer 7 out of range"):
        attention_received(model, span, ids, 7)
    with pytest.raises(ValueError, match="marks no position"):
        PAINT(span=torch.zeros(2, 14, dtype=torch.bool), local=local)
    with hf.apply(model, PAINT(span=torch.ones(2, 20, dtype=torch.bool), local=torch.ones(2, 20, dtype=torch.bool),
                               layers=(0, 1))), pytest.raises(ValueError, match="outside the sequence of 14 tokens"):
        model(ids, attention_mask=mask)
    hf.apply(model, PAINT()).remove()
