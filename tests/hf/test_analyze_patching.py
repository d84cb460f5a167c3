"""attnkit analyze patch: head patching, circuit overlap, attention steering (issue 25, item 5)."""

import pytest
import torch

from hf_models import tiny

pytest.importorskip("attnkit.hf")
from attnkit.analysis.hf.capture import LayerCall  # noqa: E402
from attnkit.analysis.hf.patching import (  # noqa: E402
    circuit_overlap,
    duo_overlap,
    kv_head_scores,
    logit_difference,
    patch_heads,
    retrieval_pairs,
    steer_attention,
    top_heads,
)


def _ids(seed, B=2, T=10):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def test_identical_clean_and_corrupted_prompts_have_zero_effect():
    model = tiny("llama")
    ids = _ids(0)
    result = patch_heads(model, ids, ids.clone(), [3, 5], [7, 9])
    assert result["effect"] == [[0.0] * 4] * 2  # exactly: the patched outputs are the ones the model computes
    assert result["normalized"] == [[0.0] * 4] * 2
    assert result["clean_ld"] == result["corrupt_ld"]


def test_patching_one_head_equals_an_o_proj_hook():
    # an independent route to the same quantity: replace the head's slice of o_proj's input
    model = tiny("llama")
    clean, corrupt = _ids(0), _ids(1)
    answer, foil = torch.tensor([3, 5]), torch.tensor([7, 9])
    result = patch_heads(model, clean, corrupt, answer, foil, layers=[1], heads=[2])
    o_proj = model.model.layers[1].self_attn.o_proj
    saved = {}
    h = o_proj.register_forward_pre_hook(lambda m, a: saved.__setitem__("x", a[0].clone()))
    with torch.no_grad():
        clean_logits = model(clean).logits
    h.remove()
    D = 16

    def put(m, a):
        x = a[0].clone()
        x[..., 2 * D:3 * D] = saved["x"][..., 2 * D:3 * D]
        return (x,)

    h = o_proj.register_forward_pre_hook(put)
    with torch.no_grad():
        patched = model(corrupt).logits
    h.remove()
    with torch.no_grad():
        corrupt_logits = model(corrupt).logits
    delta = logit_difference(patched, answer, foil) - logit_difference(corrupt_logits, answer, foil)
    assert result["effect"][1][2] == pytest.approx(float(delta.mean()), abs=1e-5)
    denom = logit_difference(clean_logits, answer, foil) - logit_difference(corrupt_logits, answer, foil)
    assert result["normalized"][1][2] == pytest.approx(float((delta / denom).mean()), abs=1e-4)
    assert result["effect"][0] == [0.0] * 4  # not patched


def test_logit_difference_by_hand():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1] = torch.tensor([0.0, 1.0, 4.0, 0.0, 0.0])
    logits[1, -1] = torch.tensor([2.0, 0.0, 0.0, 0.5, 0.0])
    assert logit_difference(logits, torch.tensor([2, 0]), torch.tensor([1, 3])).tolist() == [3.0, 1.5]


def test_overlap_and_rankings_by_hand():
    a = [[3.0, 0.0], [2.0, 1.0]]
    b = [[3.0, 2.0], [0.0, 1.0]]
    assert top_heads(a, 2) == [(0, 0), (1, 0)]
    out = circuit_overlap(a, b, 2)
    assert out["overlap"] == 0.5 and out["shared"] == [[0, 0]]
    assert circuit_overlap(a, b, 4)["overlap"] == 1.0
    assert kv_head_scores([[1.0, 2.0, 3.0, 4.0]], 2) == [[2.0, 4.0]]


def test_duo_overlap_by_hand():
    from attnkit.hf.duo import DuoPattern

    pattern = DuoPattern([[0.9, 0.1], [0.2, 0.7]])  # full at sparsity 0.5: (0, 0) and (1, 1)
    out = duo_overlap(pattern, [[1.0, 0.0], [0.0, 2.0]], 0.5)
    assert (out["k"], out["overlap"], out["chance"]) == (2, 1.0, 0.5)
    assert duo_overlap(pattern, [[0.0, 1.0], [2.0, 0.0]], 0.5)["overlap"] == 0.0


def _call(weights, v):
    """A LayerCall whose output is weights @ v (one KV head shared by two query heads)."""
    B, H, T, S = weights.shape
    q = torch.zeros(B, H, T, 1)
    k = torch.zeros(B, 1, S, 1)
    out = (weights @ v).transpose(1, 2)  # (B, T, H, Dv)
    return LayerCall(0, None, q, k, v, None, 1.0, out)


def test_steering_by_hand():
    model = tiny("llama")  # only for the layer and head counts
    T = 3
    v = torch.tensor([[[[1.0], [10.0], [100.0]]]])  # (1, 1, 3, 1)
    uniform = torch.ones(T, T).tril()
    call = _call((uniform / uniform.sum(-1, keepdim=True)).expand(1, 4, T, T), v)  # q = k = 0: uniform causal
    steer = steer_attention(model, [(0, 1)], queries=[[2]], targets=[[0]], alpha=1.0)
    out = steer._steer(call)
    assert out[0, 2, 1, 0].item() == pytest.approx(1.0)  # all of head 1's attention on key 0 -> v[0]
    assert out[0, 2, 0, 0].item() == pytest.approx(call.output[0, 2, 0, 0].item())  # head 0 untouched
    assert out[0, 1, 1, 0].item() == pytest.approx(call.output[0, 1, 1, 0].item())  # query 1 untouched
    half = steer_attention(model, [(0, 1)], queries=[[2]], targets=[[0]], alpha=0.5)._steer(call)
    assert half[0, 2, 1, 0].item() == pytest.approx(0.5 * 37.0 + 0.5 * 1.0)  # uniform over 3 keys: 111 / 3


def test_steering_with_alpha_zero_keeps_the_logits():
    model = tiny("llama")
    ids = _ids(0, B=1)
    with torch.no_grad():
        ref = model(ids).logits
        with steer_attention(model, [(0, 1), (1, 3)], queries=[[9]], targets=[[2]], alpha=0.0):
            got = model(ids).logits
        with steer_attention(model, [(0, 1), (1, 3)], queries=[[9]], targets=[[2]], alpha=1.0):
            moved = model(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(moved[0, :9], ref[0, :9])  # causal: earlier positions keep their logits
    assert not torch.allclose(moved[0, 9], ref[0, 9])


def test_retrieval_pairs_change_only_the_key():
    from attnkit.hf.subject import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = b"lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40
    for task in ("passkey", "multikey", "multikey-has"):
        for item in retrieval_pairs(task, tokenizer, text, count=3, length=200, seed=0, num_pairs=2):
            diff = (item["clean"] != item["corrupt"]).nonzero().flatten()
            assert item["clean"].shape == item["corrupt"].shape
            assert diff.min() >= item["key_at"] and diff.max() < item["key_at"] + 5
            assert item["clean"][item["key_at"]].item() == item["answer"] != item["foil"]
            assert bytes(item["clean"][item["key_at"]:item["key_at"] + 5].tolist()) == item["key"]


def test_bad_input():
    model = tiny("llama")
    ids = _ids(0)
    with pytest.raises(ValueError, match=r"clean_ids and corrupt_ids must have one shape"):
        patch_heads(model, ids, ids[:, :5], [1, 2], [3, 4])
    with pytest.raises(ValueError, match=r"layers must be an integer in \[0, 2\).*got 2"):
        patch_heads(model, ids, ids, [1, 2], [3, 4], layers=[2])
    with pytest.raises(ValueError, match=r"heads must hold integers in \[0, 4\).*got 4"):
        patch_heads(model, ids, ids, [1, 2], [3, 4], heads=[4])
    with pytest.raises(ValueError, match="heads must not be empty"):
        patch_heads(model, ids, ids, [1, 2], [3, 4], heads=[])
    with pytest.raises(ValueError, match=r"answer must be one integer token id per example \(2\)"):
        patch_heads(model, ids, ids, [1, 2, 3], [3, 4])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        top_heads([[1.0, 2.0], [3.0, 4.0]], 5)
    with pytest.raises(ValueError, match="heads must name at least one"):
        steer_attention(model, [], [[1]], [[0]])
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\).*got 3"):
        steer_attention(model, [(3, 0)], [[1]], [[0]])
    with pytest.raises(ValueError, match="at or before its query position"):
        steer_attention(model, [(0, 0)], [[1]], [[2]])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        steer_attention(model, [(0, 0)], [[1]], [[0]], alpha=2)
    with pytest.raises(ValueError, match="task must be one of passkey, multikey, multikey-has, got .ioi."):
        retrieval_pairs("ioi", None, b"", count=1, length=100)
