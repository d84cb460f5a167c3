"""The steering spine (attnkit.hf.steer): logits / weights / output modifiers on chosen query heads,
against an independent float64 eager attention that applies the same change to a materialised
attention matrix; invariants; decode; GQA; bad input."""

import math

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.steer import HeadView, Modifier, Steer, check_heads, top_heads  # noqa: E402
from hf_models import greedy_decode, padded_inputs, tiny  # noqa: E402

HEADS = ((0, 1), (1, 2))  # GQA: query heads 0-1 read KV head 0, 2-3 KV head 1 (4 query / 2 KV heads)


class FirstTokenScale(Modifier):
    """Multiply the weight the first real token gets by gamma (a log added to its logit), per head."""

    def __init__(self, gamma, selected=HEADS):
        self.gamma, self.selected = gamma, selected

    def logits(self, logits, view: HeadView):
        return logits + math.log(self.gamma) * view.first_token()


class MoveToLast(Modifier):
    """Post-softmax: move half the weight of every key onto the query's own (newest) key."""

    selected = HEADS

    def weights(self, probs, view):
        diag = (view.k_pos[:, :, None, :] == view.q_pos[None, None, :, None])  # [B, 1, t, S']
        moved = 0.5 * probs
        return probs - moved + diag * moved.sum(-1, keepdim=True)


class ScaleOutput(Modifier):
    selected = HEADS

    def __init__(self, factor):
        self.factor = factor

    def output(self, out, view):
        return out * self.factor


class Identity(Modifier):
    selected = HEADS


def _reference_forward(model, ids, mask, change):
    """Logits with the model's attention replaced by a float64 eager attention written here, on
    which ``change(layer, head, stage, tensor, q_pos, k_pos, start)`` acts per query head."""
    import transformers as tf

    def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        q, k, v = query.double(), key.double().repeat_interleave(g, 1), value.double().repeat_interleave(g, 1)
        logits = (q @ k.transpose(-1, -2)) * scaling
        q_pos = torch.arange(S - T, S)
        k_pos = torch.arange(S)
        # causal and the padding of the 2D mask, built here (not the model's mask)
        allowed = ((k_pos[None, :] <= q_pos[:, None])[None, None] & mask[:, None, None, :S].bool()).expand(B, Hq, T, S)
        start = mask.argmax(1)  # each row's first real token
        logits = logits.masked_fill(~allowed, float("-inf"))
        for h in range(Hq):
            logits[:, h] = change(module.layer_idx, h, "logits", logits[:, h], q_pos, k_pos, start).masked_fill(
                ~allowed[:, h], float("-inf"))
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        for h in range(Hq):
            probs[:, h] = change(module.layer_idx, h, "weights", probs[:, h], q_pos, k_pos, start)
        out = probs @ v
        for h in range(Hq):
            out[:, h] = change(module.layer_idx, h, "output", out[:, h], q_pos, k_pos, start)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    tf.AttentionInterface.register("attnkit_test_eager64", eager)
    saved = model.config._attn_implementation
    model.set_attn_implementation("attnkit_test_eager64")
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation(saved)


def _ref_change(kind, value):
    def change(layer, head, stage, t, q_pos, k_pos, start):
        if (layer, head) not in HEADS or stage != kind:
            return t
        if kind == "logits":  # t [B, T, S]
            first = (k_pos[None, :] == start[:, None])[:, None, :]
            return t + math.log(value) * first
        if kind == "weights":
            diag = (k_pos[None, :] == q_pos[:, None])[None]
            moved = 0.5 * t
            return t - moved + diag * moved.sum(-1, keepdim=True)
        return t * value
    return change


@pytest.mark.parametrize("kind,modifier,value", [
    ("logits", FirstTokenScale(3.0), 3.0),
    ("weights", MoveToLast(), None),
    ("output", ScaleOutput(0.25), 0.25),
])
def test_modifier_equals_float64_reference(kind, modifier, value):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    want = _reference_forward(model, ids, mask, _ref_change(kind, value))
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    with torch.no_grad(), hf.apply(model, Steer(modifier)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    assert (got[valid] - plain[valid]).abs().max() > 1e-3  # the change is real


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_no_heads_is_bit_identical_and_identity_is_exact(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, Steer(FirstTokenScale(2.0, selected=()))):
            same = model(ids, attention_mask=mask).logits
        with hf.apply(model, Steer(Identity())) as handle:
            ident = model(ids, attention_mask=mask, past_key_values=handle.cache()).logits
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(same, ref)
    assert torch.equal(after, ref)  # remove() restores the model exactly
    valid = mask.bool()
    torch.testing.assert_close(ident[valid], ref[valid], atol=1e-5, rtol=0)


def test_decode_step_by_step_equals_full_forward():
    """Steering never evicts: each decode step's logits equal the full forward of the sequence so far."""
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    with hf.apply(model, Steer(FirstTokenScale(4.0))) as handle:
        steps = greedy_decode(model, ids, mask, handle.cache(), steps=5)
        seq = torch.cat([ids] + [s[:, -1:].argmax(-1) for s in steps[:-1]], dim=1)
        full_mask = torch.cat([mask, torch.ones(ids.shape[0], 5, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            full = model(seq, attention_mask=full_mask, position_ids=pos).logits
    for i, s in enumerate(steps[1:]):
        torch.testing.assert_close(s[:, -1], full[:, ids.shape[1] + i], atol=1e-10, rtol=0)


def test_gamma_one_is_bit_identical_through_policy_selection():
    """A method that selects only the heads it changes keeps the rest exact: gamma 1 on no head."""
    model = tiny("llama")
    ids, mask = padded_inputs()

    class Gamma(FirstTokenScale):
        def heads(self, num_layers, num_heads):
            return () if self.gamma == 1.0 else super().heads(num_layers, num_heads)

    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, Steer(Gamma(1.0))):
            got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, ref)


def test_top_heads_is_deterministic_and_breaks_ties_by_seed():
    scores = torch.tensor([[1.0, 3.0, 3.0], [0.5, 3.0, 2.0]])
    assert top_heads(scores, k=1) == top_heads(scores, k=1)
    assert top_heads(scores, k=3) == ((0, 1), (0, 2), (1, 1))
    picks = {top_heads(scores, k=1, seed=s) for s in range(20)}
    assert picks <= {((0, 1),), ((0, 2),), ((1, 1),)} and len(picks) > 1  # ties: the seed decides
    assert top_heads(scores, fraction=0.5, largest=False) == ((0, 0), (1, 0), (1, 2))
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        top_heads(scores)
    with pytest.raises(ValueError, match="k must be an int"):
        top_heads(scores, k=7)
    with pytest.raises(ValueError, match="fraction must be in"):
        top_heads(scores, fraction=1.5)
    with pytest.raises(ValueError, match=r"\[num_layers, num_heads\]"):
        top_heads(torch.zeros(3))


def test_bad_heads_raise_clear_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="query head 4 .* out of range; accepted: 0 .. 3"):
        hf.apply(model, Steer(FirstTokenScale(2.0, selected=((0, 4),))))
    with pytest.raises(ValueError, match="layer 2 .* out of range; accepted: 0 .. 1"):
        hf.apply(model, Steer(FirstTokenScale(2.0, selected=((2, 0),))))
    with pytest.raises(ValueError, match="pair of ints"):
        check_heads([(0,)], 2, 4)
    with pytest.raises(ValueError, match="modifier must be"):
        Steer("zerotuning")
    # nothing was left applied by the failures
    hf.apply(model, Steer(Identity())).remove()
