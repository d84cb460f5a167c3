"""ACT (attnkit.hf.act): in-input sinks found from the head's own attention, their weight scaled by
beta and redistributed; against a float64 eager reference; no sink -> bit-identical; calibration;
bad input."""

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.act import ACT, ACTModifier, calibrate, find_sinks, fit_act  # noqa: E402
from attnkit.hf.zerotuning import Choices  # noqa: E402
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402

HEADS = ((0, 1), (1, 2), (1, 3))


def _ref_act(heads, beta, threshold, found=None):
    """ACT on a [B, T, S] weight matrix, written row by row (an independent form of the same rule)."""

    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "weights" or (layer, head) not in heads:
            return t
        out = t.clone()
        B, T, S = t.shape
        for b in range(B):
            sees = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= start[b])  # [T, S]
            sees &= (q_pos >= start[b])[:, None]
            sinks = [j for j in range(S) if j != int(start[b]) and sees[:, j].any()
                     and float(t[b][sees[:, j], j].sum() / sees[:, j].sum()) > threshold]
            if found is not None:
                found.setdefault((layer, head), []).append(sinks)
            for i in range(T):
                row = t[b, i]
                mass = sum(float(row[j]) for j in sinks)
                rest = float(row.sum()) - mass
                if rest <= 0:
                    continue
                for j in range(S):
                    out[b, i, j] = beta * row[j] if j in sinks else row[j] * (1 + (1 - beta) * mass / rest)
        return out
    return change


def test_act_equals_float64_reference():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    found = {}
    want = _reference_forward(model, ids, mask, _ref_act(HEADS, 0.4, 0.1, found))
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    with torch.no_grad(), hf.apply(model, ACT(heads=HEADS, beta=0.4, threshold=0.1)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    assert (got[valid] - plain[valid]).abs().max() > 1e-4
    assert any(s for rows in found.values() for s in rows)  # sinks inside the input were found
    assert all(int(mask[b].argmax()) not in s for rows in found.values() for b, s in enumerate(rows))


def test_calibrate_keeps_rows_summing_to_one_and_beta_one_is_identity():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64), -1)
    sinks = torch.zeros(2, 3, 1, 7, dtype=torch.bool)
    sinks[..., 2] = True
    out = calibrate(probs, sinks, 0.4)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    torch.testing.assert_close(out[..., 2], 0.4 * probs[..., 2])
    torch.testing.assert_close(calibrate(probs, sinks, 1.0), probs)
    # the sink criterion: mean received weight over the queries that see the key, first token excluded
    allowed = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    p = torch.tensor([[[[0.5, 0.5, 0.0], [0.8, 0.05, 0.15]]]], dtype=torch.float64)
    first = torch.tensor([True, False, False]).view(1, 1, 1, 3)
    assert find_sinks(p, allowed, first, 0.2).view(-1).tolist() == [False, True, False]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_no_sink_found_is_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        # a mean weight never exceeds 1: nothing is a sink, every selected head keeps the model's path
        with hf.apply(model, ACT(heads=HEADS, threshold=1.0)):
            none = model(ids, attention_mask=mask).logits
        with hf.apply(model, ACT()):
            empty = model(ids, attention_mask=mask).logits
        with hf.apply(model, ACT(heads=HEADS, threshold=0.1)):
            some = model(ids, attention_mask=mask).logits
    assert torch.equal(none, ref) and torch.equal(empty, ref)
    assert not torch.equal(some, ref)


def test_subject_no_sink_bit_identical():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"Label each word.\nInput: apple\nLabel: foo\nInput: pear\nLabel: ")])
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, ACT(heads=[(3, 1), (6, 0)], threshold=1.0)):
            same = model(ids).logits
        with hf.apply(model, "act", heads=[(3, 1), (6, 0)], threshold=0.05):
            moved = model(ids).logits
    assert torch.equal(same, ref)
    assert (moved - ref).abs().max() > 1e-5


def test_fit_act_keeps_heads_that_help_deterministically():
    model = tiny("llama")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 100, (9,), generator=g).tolist() for _ in range(6)]
    cal = Choices(prompts, [(5, 9)] * 6, [0, 1, 0, 1, 0, 1])
    a, ra = fit_act(model, cal, mode="entropy")
    b, rb = fit_act(model, cal, mode="entropy")
    assert a == b and ra["heads"] == rb["heads"]
    assert all(ra["gain"][p] > 0 for p in ra["heads"])
    assert set(ra["heads"]) == {(l, h) for l in range(2) for h in range(4) if ra["gain"][l, h] > 0}
    c, rc = fit_act(model, cal, mode="entropy", top=1)
    assert len(rc["heads"]) <= 1
    d, rd = fit_act(model, lambda m: 0.0)
    assert rd["heads"] == [] and d.modifier.selected == ()


def test_bad_input():
    model = tiny("llama")
    for beta in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="beta must be a number in"):
            ACT(heads=[(0, 0)], beta=beta)
    for thr in (0, 1.2, float("inf")):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            ACT(heads=[(0, 0)], threshold=thr)
    with pytest.raises(ValueError, match="pair of ints"):
        ACT(heads=[(0, 1, 2)])
    with pytest.raises(ValueError, match="query head 4 .* out of range"):
        hf.apply(model, ACT(heads=[(0, 4)]))
    with pytest.raises(ValueError, match="calibration set is empty"):
        fit_act(model, Choices([], [], []))
    with pytest.raises(ValueError, match="calibration must be"):
        fit_act(model, "prompts")
    with pytest.raises(ValueError, match="candidates is empty"):
        fit_act(model, lambda m: 0.0, candidates=[])
    with pytest.raises(ValueError, match="beta must be"):
        fit_act(model, lambda m: 0.0, beta=2.0)
    with pytest.raises(ValueError, match="mode must be"):
        fit_act(model, Choices([[1, 2]], [(3, 4)], [0]), mode="f1")
    assert isinstance(ACT().modifier, ACTModifier)
    hf.apply(model, ACT()).remove()
