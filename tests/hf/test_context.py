"""Context-awareness (attnkit.hf.context, arXiv 2411.02688): ContextSteer against a float64 reference that
reweights a materialised attention matrix; off is bit-identical; the allocation diagnostic; the
context-dependency metric on a hand-computed case; the indicator; LoRA; bad input."""

import math

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.context import (SUBJECT_CHAT, ChatFormat, ContextSteer, LoRALinear, add_indicator, add_lora,  # noqa: E402
                                attention_allocation, context_dependency, context_dependency_scores, encode_chat,
                                indicator_examples, merge_lora)
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402

HEADS = ((0, 1), (1, 2))
T = 14


def _context(B=2, lo=6, hi=10, length=T):
    mask = torch.zeros(B, length, dtype=torch.bool)
    mask[:, lo:hi] = True
    return mask


def _pasta_change(alpha, context, heads=HEADS, prompt_len=T):
    """The paper's formula on the materialised probabilities: the prompt's keys outside the context
    scaled by alpha, each row renormalised."""

    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "weights" or (layer, head) not in heads:
            return t
        outside = (~context[:, k_pos.clamp(max=prompt_len - 1)]) & (k_pos < prompt_len)[None]  # [B, S]
        scale = (1.0 + (alpha - 1.0) * outside.to(t.dtype))[:, None, :]  # float64 (torch.where(.., 0.3, 1.0) is float32)
        scaled = t * scale
        return scaled / scaled.sum(-1, keepdim=True).clamp_min(1e-300)

    return change


@pytest.mark.parametrize("alpha", [0.3, 2.5])
def test_context_steer_equals_float64_reference(alpha):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    context = _context()
    want = _reference_forward(model, ids, mask, _pasta_change(alpha, context))
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    with torch.no_grad(), hf.apply(model, ContextSteer(alpha=alpha, heads=HEADS, context=context)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    assert (got[valid] - plain[valid]).abs().max() > 1e-3  # the change is real


def test_keys_after_the_prompt_are_not_scaled():
    """A context mask over the first 10 positions: keys 10.. (the response) keep their weight, as in
    the official code (only the prompt's other tokens are scaled)."""
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    context = _context(length=10)
    want = _reference_forward(model, ids, mask, _pasta_change(0.4, context, prompt_len=10))
    with torch.no_grad(), hf.apply(model, "context", alpha=0.4, heads=HEADS, context=context):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_alpha_one_is_bit_identical_and_steering_changes_the_logits(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, ContextSteer(alpha=1.0, context=_context())):
            off = model(ids, attention_mask=mask).logits
        with hf.apply(model, ContextSteer(alpha=0.5, context=_context())) as handle:
            on = model(ids, attention_mask=mask, past_key_values=handle.cache()).logits
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(off, ref) and torch.equal(after, ref)
    valid = mask.bool()
    assert (on[valid] - ref[valid]).abs().max() > 1e-4


def test_subject_alpha_one_is_bit_identical():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnkit.hf.subject import default_subject

    path = default_subject()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    segs = encode_chat(tok, [{"role": "user", "content": "The pass key is 12345. What is it?"},
                             {"role": "assistant", "content": "12345"}], SUBJECT_CHAT)
    ids = segs.input_ids[None]
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, ContextSteer(alpha=1.0, context=segs.user)):
            off = model(ids).logits
        with hf.apply(model, ContextSteer(alpha=0.5, context=segs.user)):
            on = model(ids).logits
    assert torch.equal(off, ref)
    assert (on - ref).abs().max() > 1e-3


def test_encode_chat_masks_partition_the_sequence():
    from attnkit.hf.subject import byte_tokenizer

    tok = byte_tokenizer()
    segs = encode_chat(tok, [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "xy"}], SUBJECT_CHAT)
    text = bytes(segs.input_ids.tolist()).decode()
    assert text == "<|user|>\nabc\n<|assistant|>\nxy\n"
    assert bytes(segs.input_ids[segs.user].tolist()) == b"abc"
    assert bytes(segs.input_ids[segs.response].tolist()) == b"xy"
    total = segs.user.int() + segs.template.int() + segs.response.int() + segs.rest.int()
    assert bool((total == 1).all())
    gen = encode_chat(tok, [{"role": "user", "content": "abc"}], SUBJECT_CHAT, add_generation_prompt=True)
    assert bytes(gen.input_ids.tolist()).decode() == "<|user|>\nabc\n<|assistant|>\n" and not gen.response.any()


def test_chat_format_from_a_tokenizers_template():
    from attnkit.hf.subject import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt == ChatFormat("[user]", "[/user]", "[assistant]", "[/assistant]")


def _float64_attentions(model, ids):
    """Per layer ``[B, H, T, S]``: the probabilities of test_steer's float64 eager attention (transformers'
    own eager attention takes its softmax in float32)."""
    got = {}

    def record(layer, head, stage, t, q_pos, k_pos, start):
        if stage == "weights":
            got[layer, head] = t.clone()
        return t

    _reference_forward(model, ids, torch.ones_like(ids), record)
    layers = 1 + max(l for l, _ in got)
    heads = 1 + max(h for _, h in got)
    return [torch.stack([got[l, h] for h in range(heads)], 1) for l in range(layers)]


def test_allocation_shares_equal_a_direct_computation():
    """The diagnostic's per-head shares against the attention read from an eager float64 forward."""
    model = tiny("llama", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (1, 12), generator=g)
    user = torch.zeros(1, 12, dtype=torch.bool)
    user[0, 2:7] = True
    template = torch.zeros(1, 12, dtype=torch.bool)
    template[0, [0, 1, 7, 8]] = True
    response = torch.zeros(1, 12, dtype=torch.bool)
    response[0, 9:] = True
    alloc = attention_allocation(model, ids, {"user": user, "template": template, "rest": ~(user | template)}, response)
    attn = _float64_attentions(model, ids)  # per layer [1, H, T, S]
    for layer, a in enumerate(attn):
        want = (a[0][:, 9:, :] * user[0].double()).sum(-1).mean(-1)  # [H]
        torch.testing.assert_close(alloc.share["user"][layer], want, atol=1e-10, rtol=0)
    total = sum(alloc.share.values())
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-10, rtol=0)
    # steering toward the user's tokens raises their share on the steered heads only
    steered = attention_allocation(model, ids, {"user": user}, response,
                                   steer=ContextSteer(alpha=0.3, heads=((1, 0),), context=user[:, :9]))
    assert steered.share["user"][1, 0] > alloc.share["user"][1, 0] + 1e-3
    assert torch.equal(steered.share["user"][0], alloc.share["user"][0])


def test_context_dependency_on_a_hand_computed_case():
    # 2 heads, 4 positions; user tokens {0, 1}, response {2, 3}
    probs = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    probs[0, 0, 2, :3] = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)    # head 0, query 2: user mass 0.7
    probs[0, 1, 2, :3] = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)    # head 1, query 2: 0.2
    probs[0, 0, 3] = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float64)   # head 0, query 3: 0.2
    probs[0, 1, 3] = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)   # head 1, query 3: 0.6
    user = torch.tensor([[True, True, False, False]])
    response = torch.tensor([[False, False, True, True]])
    # mean over queries 2, 3 of the best head: (0.7 + 0.6) / 2
    assert context_dependency(probs, user, response).item() == pytest.approx(0.65, abs=1e-15)


def test_context_dependency_scores_of_a_model_match_its_attention():
    model = tiny("llama", dtype=torch.float64)
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    user = torch.zeros(1, 10, dtype=torch.bool)
    user[0, 1:5] = True
    response = torch.zeros(1, 10, dtype=torch.bool)
    response[0, 6:] = True
    got = context_dependency_scores(model, ids, user, response, layer=1)
    attn = _float64_attentions(model, ids)[1]
    torch.testing.assert_close(got, context_dependency(attn, user, response), atol=1e-10, rtol=0)


def test_indicator_examples_flag_only_the_context_dependent():
    convs = [[{"role": "user", "content": "doc. question?"}, {"role": "assistant", "content": "a"}],
             [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "b"}]]
    out = indicator_examples(convs, [0.8, 0.3], threshold=0.6)
    assert out[0][0]["content"] == "doc. question? [IND]" and out[1][0]["content"] == "hello"
    assert convs[0][0]["content"] == "doc. question?"  # the input is untouched
    assert add_indicator("q", at="start") == "[IND] q"
    with pytest.raises(ValueError, match="scores has 1 entries"):
        indicator_examples(convs, [0.8])
    with pytest.raises(ValueError, match="at must be"):
        add_indicator("q", at="middle")


def test_lora_starts_exact_and_merges_exactly():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    params = add_lora(model, rank=4, alpha=8)
    assert all(p.requires_grad for p in params) and not model.lm_head.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)  # B = 0: the base exactly
        for p in params[1::2]:
            p.normal_(0, 0.05)
        lora = model(ids, attention_mask=mask).logits
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, lora, atol=1e-10, rtol=0)
    assert (lora - ref).abs().max() > 1e-3


def test_bad_input_raises_clear_errors():
    model = tiny("llama")
    ids, mask = padded_inputs()
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        ContextSteer(alpha=-0.5, context=_context())
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        ContextSteer(alpha=0.0, context=_context())
    with pytest.raises(ValueError, match="empty span in row"):
        ContextSteer(context=torch.zeros(2, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask"):
        ContextSteer(context=torch.ones(2, T))
    with pytest.raises(ValueError, match="heads must be 'all'"):
        ContextSteer(heads="some", context=_context())
    with pytest.raises(ValueError, match="query head 4 .* out of range; accepted: 0 .. 3"):
        hf.apply(model, ContextSteer(heads=((0, 4),), context=_context()))
    with pytest.raises(ValueError, match="layer 2 .* out of range"):
        hf.apply(model, ContextSteer(heads=((2, 0),), context=_context()))
    with pytest.raises(ValueError, match="context is None"):
        hf.apply(model, "context", alpha=0.9)
    # a span outside the sequence: position 20 of a 14-token call
    with pytest.raises(ValueError, match="marks position 20 but the sequence has only 14 tokens"):
        with torch.no_grad(), hf.apply(model, ContextSteer(context=_context(lo=18, hi=21, length=24))):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="3 rows but the model was called with batch 2"):
        with torch.no_grad(), hf.apply(model, ContextSteer(context=_context(B=3))):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="layer must be an int in 0 .. 1"):
        context_dependency_scores(model, ids, _context(), _context(), layer=2)
    with pytest.raises(ValueError, match="covers 10 positions but input_ids has 14"):
        attention_allocation(model, ids, {"user": _context(length=10)}, _context())
    with pytest.raises(ValueError, match="probs must be"):
        context_dependency(torch.zeros(2, 3, 4), _context(), _context())
    with pytest.raises(ValueError, match="no chat_template"):
        from attnkit.hf.subject import byte_tokenizer

        encode_chat(byte_tokenizer(), [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be"):
        encode_chat(None, [{"role": "system", "content": "x"}], SUBJECT_CHAT)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRALinear(torch.nn.Linear(2, 2), rank=0)
    # nothing was left applied by the failures
    hf.apply(model, ContextSteer(alpha=0.9, context=_context())).remove()


def test_card_and_method_name():
    card = next(c for c in hf.CARDS if c.name == "hf-context")
    assert card.arxiv == "2411.02688" and card.layer is ContextSteer and hf.METHODS["context"] is ContextSteer
    assert math.isclose(card.layer(**card.defaults).alpha, 0.9)


def test_steering_some_heads_of_a_batch_without_a_padding_mask():
    """The spine's other query heads of a steered KV head got a one-row mask when the model was called
    without attention_mask on a batch (steer.py fix): now served, and equal to the reference."""
    model = tiny("llama", dtype=torch.float64)
    ids, _ = padded_inputs(pads=(0, 0))
    context = _context()
    want = _reference_forward(model, ids, torch.ones_like(ids), _pasta_change(0.5, context))
    with torch.no_grad(), hf.apply(model, ContextSteer(alpha=0.5, heads=HEADS, context=context)):
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
