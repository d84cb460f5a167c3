"""ZeroTuning (attnkit.hf.zerotuning): log gamma on the first real token's logit per head, against a
float64 eager reference; gamma 1 bit-identical; the calibration (profiling + sweep) deterministic;
bad input."""

import math

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.zerotuning import Choices, ZeroTuning, fit_zerotuning  # noqa: E402
from hf_models import padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402

GAMMAS = {(0, 1): 3.0, (1, 2): 0.25, (1, 3): 1.7}


def _ref_zerotuning(gammas):
    def change(layer, head, stage, t, q_pos, k_pos, start):
        g = gammas.get((layer, head), 1.0)
        if stage != "logits" or g == 1.0:
            return t
        first = (k_pos[None, :] == start[:, None])[:, None, :]  # [B, 1, S]
        return t + math.log(g) * first.to(t.dtype)  # float64: a bool tensor times a float rounds to float32
    return change


def test_zerotuning_equals_float64_reference():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    want = _reference_forward(model, ids, mask, _ref_zerotuning(GAMMAS))
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    with torch.no_grad(), hf.apply(model, ZeroTuning(gammas=GAMMAS)):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    assert (got[valid] - plain[valid]).abs().max() > 1e-3


def test_by_name_and_gamma_heads_form_match_gammas_form():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = padded_inputs()
    with torch.no_grad():
        with hf.apply(model, "zerotuning", gamma=2.0, heads=[(0, 1), (1, 0)]):
            a = model(ids, attention_mask=mask).logits
        with hf.apply(model, ZeroTuning(gammas={(0, 1): 2.0, (1, 0): 2.0})):
            b = model(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    t = ZeroTuning(gamma=2.0, heads=[(0, 1)], gammas={(0, 1): 0.5}).table(2, 4)
    assert t[0, 1] == 0.5 and t.sum() == 7.5  # gammas wins over gamma; 1 elsewhere


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gamma_one_is_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, ZeroTuning(gamma=1.0, heads=[(0, 0), (1, 3)], gammas={(1, 1): 1.0})):
            got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, ref)


def test_subject_gamma_one_bit_identical_and_gamma_changes_it():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"Label each word.\nInput: apple\nLabel: foo\nInput: pear\nLabel: ")])
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, ZeroTuning(gamma=1.0, heads=[(0, 0)])):
            same = model(ids).logits
        with hf.apply(model, ZeroTuning(gamma=4.0, heads=[(0, 0), (0, 3)])):
            moved = model(ids).logits
    assert torch.equal(same, ref)
    assert (moved - ref).abs().max() > 1e-4


def _choices(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 100, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return Choices(prompts, [(5, 9)] * n, [i % 2 for i in range(n)])


def test_fit_is_deterministic_and_never_worse_on_calibration():
    model = tiny("llama")
    cal = _choices()
    a, ra = fit_zerotuning(model, cal, mode="entropy", gammas=(0.5, 2.0, 4.0), seed=3)
    b, rb = fit_zerotuning(model, cal, mode="entropy", gammas=(0.5, 2.0, 4.0), seed=3)
    assert a == b and ra["heads"] == rb["heads"] and ra["gamma"] == rb["gamma"]
    assert ra["sweep"][ra["gamma"]] >= ra["base"]
    assert ra["profile"].shape == (2, 4) and not torch.isnan(ra["profile"]).any()
    with torch.no_grad(), hf.apply(model, a):
        assert -cal.entropy(model) == pytest.approx(ra["sweep"][ra["gamma"]], abs=1e-6)
    # a score nothing changes: no head chosen, gamma 1 (the model as it is)
    c, rc = fit_zerotuning(model, lambda m: 1.0, candidates=[(0, 0), (1, 1)])
    assert rc["heads"] == [] and rc["gamma"] == 1.0 and c.modifier.selected == ()
    # top keeps the most sensitive heads; the seed only breaks ties
    d, rd = fit_zerotuning(model, cal, mode="entropy", top=1, gammas=(2.0,))
    assert len(rd["heads"]) <= 1


def test_accuracy_mode_and_choices_scores():
    model = tiny("llama")
    cal = _choices(8)
    acc = cal.accuracy(model)
    assert acc in {i / 8 for i in range(9)}
    assert 0 <= cal.entropy(model) <= math.log(2) + 1e-9
    policy, rep = fit_zerotuning(model, cal, mode="accuracy", candidates=[(0, 0), (0, 1)], gammas=(2.0,))
    assert rep["base"] == acc and rep["mode"] == "accuracy"


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_gamma(bad):
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ZeroTuning(gamma=bad, heads=[(0, 0)])
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ZeroTuning(gammas={(0, 0): bad})


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match="query head 4 .* out of range"):
        hf.apply(model, ZeroTuning(gamma=2.0, heads=[(0, 4)]))
    with pytest.raises(ValueError, match="layer 2 .* out of range"):
        hf.apply(model, ZeroTuning(gammas={(2, 0): 2.0}))
    with pytest.raises(ValueError, match="pair of ints"):
        ZeroTuning(gamma=2.0, heads=["x"])
    with pytest.raises(ValueError, match="calibration set is empty"):
        Choices([], [], [])
    with pytest.raises(ValueError, match="2 prompts but 1 option lists"):
        Choices([[1], [2]], [(3, 4)], [0, 1])
    with pytest.raises(ValueError, match="answer 2 out of range"):
        Choices([[1]], [(3, 4)], [2])
    with pytest.raises(ValueError, match=">= 2"):
        Choices([[1]], [(3,)], [0])
    with pytest.raises(ValueError, match="needs answers"):
        Choices([[1, 2]], [(3, 4)]).accuracy(model)
    cal = _choices(2)
    with pytest.raises(ValueError, match="probe must differ from 1"):
        fit_zerotuning(model, cal, probe=1.0)
    with pytest.raises(ValueError, match="mode must be"):
        fit_zerotuning(model, cal, mode="f1")
    with pytest.raises(ValueError, match="calibration must be"):
        fit_zerotuning(model, [1, 2])
    with pytest.raises(ValueError, match="gammas is empty"):
        fit_zerotuning(model, cal, gammas=())
    with pytest.raises(ValueError, match="candidates is empty"):
        fit_zerotuning(model, cal, candidates=[])
    with pytest.raises(ValueError, match="query head 9"):
        fit_zerotuning(model, cal, candidates=[(0, 9)])
    hf.apply(model, ZeroTuning()).remove()  # nothing was left applied
