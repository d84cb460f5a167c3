"""``attend(..., key_mask=...)``: padded keys, on every backend, against each sequence attended alone."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.ops import attend

B, HQ, HKV, S, D = 3, 4, 2, 21, 16


def _inputs(T, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _left_padded(lengths):  # Hugging Face's batched-generation layout: real tokens at the end
    return torch.stack([torch.arange(S) >= S - n for n in lengths])


def _alone(q, k, v, valid, pattern, T):
    """Each batch item attended on its real keys only, positions kept (the ground truth)."""
    outs = []
    for b in range(B):
        keep = valid[b].nonzero().flatten()
        if keep.numel() == 0:
            outs.append(torch.zeros_like(q[b:b + 1]))
            continue
        # the pattern at the kept keys' original positions: queries sit at S - T .. S - 1
        allowed = P.resolve(pattern).dense(T, S)[0, 0][:, keep]  # [T, kept]
        scores = (q[b:b + 1] @ k[b:b + 1, :, keep].repeat_interleave(HQ // HKV, 1).transpose(-1, -2)) * D ** -0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, -1).nan_to_num(0.0)
        outs.append(p @ v[b:b + 1, :, keep].repeat_interleave(HQ // HKV, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "auto"])
@pytest.mark.parametrize("pattern", ["causal", "full", P.sliding_window(5)])
@pytest.mark.parametrize("T", [S, 1, 6])
def test_key_mask_equals_each_sequence_alone(backend, pattern, T):
    q, k, v = _inputs(T, dtype=torch.float32)
    valid = _left_padded([S, 13, 4])
    with torch.no_grad():
        out = attend(q, k, v, pattern=pattern, key_mask=valid, backend=backend)
    ref = _alone(q.double(), k.double(), v.double(), valid, pattern, T)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_lengths_equal_the_boolean_mask_and_rows_with_no_key_are_zero():
    q, k, v = _inputs(S)
    lengths = torch.tensor([S, 7, 0])
    valid = torch.arange(S) < lengths[:, None]
    out = attend(q, k, v, pattern="causal", key_mask=lengths, backend="reference")
    torch.testing.assert_close(out, attend(q, k, v, pattern="causal", key_mask=valid, backend="reference"))
    torch.testing.assert_close(out, _alone(q, k, v, valid, "causal", S))
    assert out[2].abs().max() == 0  # every key of item 2 is padding
    out, lse = attend(q, k, v, pattern="causal", key_mask=lengths, return_lse=True, backend="reference")
    assert torch.isneginf(lse[2]).all()


def test_gradients_through_sdpa_equal_the_reference():
    q, k, v = _inputs(S, dtype=torch.float64)
    valid = _left_padded([S, 10, 3])
    grads = []
    for backend in ("sdpa", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attend(*leaves, pattern="causal", key_mask=valid, backend=backend).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[1][1][1, :, : S - 10].abs().max() == 0  # padded keys get no gradient


def test_auto_serves_a_padded_causal_call_with_sdpa_on_cuda_only():
    from attnkit.ops.softmax.dispatch import choose_backend

    q, k, v = _inputs(S, dtype=torch.float32)
    pattern = P.causal() & P.key_padding(_left_padded([S, 3, 4]))
    assert choose_backend(q, k, v, pattern, None, False, 0) == "sdpa"  # CPU: SDPA with the dense mask
    assert choose_backend(q, k, v, pattern, None, True, 0) == "reference"


@pytest.mark.parametrize("bad, match", [
    (torch.ones(B, S), "dtype torch.float32"),
    (torch.ones(B, S + 1, dtype=torch.bool), r"shape \(3, 22\).*\[B, S\] = \[3, 21\]"),
    (torch.tensor([1, 2]), r"lengths of shape \(2,\)"),
    (torch.tensor([1, 2, S + 1]), "0..S=21"),
    (torch.tensor([-1, 2, 3]), "0..S=21"),
    ([True] * S, "must be a tensor"),
])
def test_bad_key_masks(bad, match):
    q, k, v = _inputs(S, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, pattern="causal", key_mask=bad)


def test_cudnn_refuses_a_key_mask():
    q, k, v = _inputs(S, dtype=torch.float32)
    with pytest.raises(ValueError, match="takes no key_mask"):
        attend(q, k, v, pattern=P.sliding_window(4), key_mask=torch.tensor([S, S, S]), backend="cudnn")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_key_mask_on_cuda_forward_and_gradients(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: run on the GPU machine (see README, 'GPU checks')")
    q, k, v = _inputs(S, dtype=torch.float32, device="cuda")
    valid = _left_padded([S, 13, 4]).cuda()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, pattern="causal", key_mask=valid, backend=backend)
    out.square().sum().backward()
    ref_leaves = [t.double().detach().requires_grad_() for t in (q, k, v)]
    ref = attend(*ref_leaves, pattern="causal", key_mask=valid, backend="reference")
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_hugging_face_integer_attention_mask_equals_the_boolean_mask():
    q, k, v = _inputs(S, dtype=torch.float32)
    valid = _left_padded([S, 13, 4])
    want = attend(q, k, v, pattern="causal", key_mask=valid)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        torch.testing.assert_close(attend(q, k, v, pattern="causal", key_mask=valid.to(dtype)), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"integer tensor \[B, S\] holding values other than 0 and 1"):
        attend(q, k, v, pattern="causal", key_mask=valid.long() * 2)


def test_meta_tensors():
    q, k, v = _inputs(S, dtype=torch.float32)
    with pytest.raises(ValueError, match="key_mask is on the meta device .* but q is on cpu"):
        attend(q, k, v, key_mask=torch.ones(B, S, dtype=torch.bool, device="meta"))
    # shape inference: a meta model through attend gets outputs of the right shape, no kernel runs
    q, k, v = (t.to("meta") for t in (q, k, v))
    out, lse = attend(q, k, v, pattern="causal", key_mask=torch.tensor([S, 3, 0], device="meta"), return_lse=True)
    assert out.shape == (B, HQ, S, D) and lse.shape == (B, HQ, S) and out.device.type == "meta"
    with pytest.raises(ValueError, match="backend='sdpa' cannot apply a score_mod"):  # checks run as on any device
        attend(q, k, v, score_mod=lambda s, b, h, i, j: s, backend="sdpa")
