"""attnkit.multimodal.moda: the batched fast path against the per-token float64 reference (forward
and every gradient), the released code's key alignment (holdout, written from its reading), the
switch-offs, the block patterns, the two-modality task and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import cards
from attnkit.multimodal import CARDS, ModularDuplexAttention, duplex_align
from attnkit.tasks.pairs import TwoModalityMatch

MODALITY = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]])


def _layer(**kw):
    torch.manual_seed(0)
    layer = ModularDuplexAttention(16, 2, **kw).double()
    with torch.no_grad():  # zero ratio, identity fuser and zero bias would hide the alignment and the mask
        if layer.align:
            layer.ratio.normal_()
            layer.fuser.add_(0.3 * torch.randn_like(layer.fuser))
        if layer.adaptive:
            layer.block_bias.normal_()
    return layer


@pytest.mark.parametrize("kw", [dict(), dict(duplex=False), dict(mask="self"), dict(mask="cross"),
                                dict(mask=((True, False), (True, True)), adaptive=False), dict(align=False)])
def test_fast_path_matches_reference_forward_and_gradients(kw):
    if kw.get("mask") == "cross":
        modality = MODALITY[[0, 2]]  # every sample needs both modalities when queries only look across
    else:
        modality = MODALITY
    fast = _layer(**kw)
    ref = ModularDuplexAttention(16, 2, backend="reference", **kw).double()
    ref.load_state_dict(fast.state_dict())
    torch.manual_seed(1)
    x = torch.randn(modality.shape[0], 7, 16, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = fast(x1, modality), ref(x2, modality)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_holdout_official_key_alignment():
    """The released LlamaAttention.forward (modeling_llama_local_moda.py) per sample: visual keys
    (modality 0) := pfuser_v(k_v + ratio_v * (n(k_v + 1e-6) @ rown(n(k_t + 1e-6)^T v_t))), text keys
    unchanged, then plain softmax attention (no RoPE here, no mask beyond the full one)."""
    layer = _layer(duplex=False, adaptive=False)
    torch.manual_seed(2)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    H, D = 2, 8
    q, k, v = (x @ layer.qkv.weight.T).view(3, 7, 3, H, D).unbind(2)  # (B, T, H, D) as the official layout
    ratio_v, pfuser_v = layer.ratio[0].detach(), layer.fuser[0].detach()
    keys = k.clone()
    for i in range(3):
        vflag, tflag = MODALITY[i] == 0, MODALITY[i] == 1
        key_v = k[i][vflag].unsqueeze(0).permute(0, 2, 1, 3)  # (1, H, Nv, D)
        key_t = k[i][tflag].unsqueeze(0).permute(0, 2, 1, 3)
        value_t = v[i][tflag].unsqueeze(0).permute(0, 2, 1, 3)
        res_v = k[i][vflag].unsqueeze(0)  # (1, Nv, H, D)
        key_v = key_v + 1e-6
        key_t = key_t + 1e-6
        key_v = key_v / key_v.norm(dim=-1, keepdim=True)
        key_t = key_t / key_t.norm(dim=-1, keepdim=True)
        gram_t = key_t.transpose(-2, -1) @ value_t
        gram_t = gram_t / gram_t.norm(dim=-1, keepdim=True)
        aligned_v = (key_v @ gram_t).permute(0, 2, 1, 3)
        fused_v = (res_v + ratio_v * aligned_v) @ pfuser_v.T
        keys[i][vflag] = fused_v[0]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, keys, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(D), dim=-1)
    expected = (w @ vh).transpose(1, 2).reshape(3, 7, 16) @ layer.out.weight.T
    torch.testing.assert_close(layer(x, MODALITY), expected, rtol=1e-10, atol=1e-12)


def test_switched_off_is_plain_attention_and_init_is_plain_attention():
    """align=False, adaptive=False, mask='full' equals attnkit's bidirectional MHA (no RoPE) with the
    same projections; a fresh MODA (zero ratio, identity fuser, zero bias) does too."""
    torch.manual_seed(0)
    mha = attnkit.build("mha", dim=16, num_heads=2, pattern="full", rope=False).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    for kw in (dict(align=False, adaptive=False), dict()):
        moda = ModularDuplexAttention(16, 2, **kw).double()
        with torch.no_grad():  # mha's fused projection is laid out (q heads, k heads, v heads) as moda's
            moda.qkv.weight.copy_(mha.qkv_proj.weight)
            moda.out.weight.copy_(mha.o_proj.weight)
        torch.testing.assert_close(moda(x, MODALITY), mha(x), rtol=1e-10, atol=1e-12)


def test_self_mask_blocks_cross_modal_flow():
    """With mask='self' the output at modality-0 tokens does not depend on modality-1 inputs, when the
    alignment is off; with it on, keys of one modality carry the other's Gram (cross-modal by design)."""
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    for align, leaks in ((False, False), (True, True)):
        layer = _layer(mask="self", align=align)
        y = layer(x, MODALITY)
        (grad,) = torch.autograd.grad(y[0][MODALITY[0] == 0].sum(), x)
        assert bool(grad[0][MODALITY[0] == 1].abs().max() > 0) is leaks


def test_duplex_align_leaves_keys_with_an_absent_partner_finite():
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    modality = torch.tensor([[0] * 5, [0, 0, 1, 1, 1]])
    out = duplex_align(k, v, modality, torch.ones(2, 4), torch.eye(4).repeat(2, 1, 1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], k[0])  # no modality-1 token: zero Gram, identity fuser


def test_two_modality_task():
    task = TwoModalityMatch()
    a, b, y = task.batch(512, torch.Generator().manual_seed(0))
    assert a.shape == (512, 6) and b.shape == (512, 6, 16) and set(y.tolist()) == set(range(6))
    assert all(len(set(row.tolist())) == 6 for row in a)  # distinct symbols
    # a noiseless world decodes exactly: B's first token is A[label], the others are absent from A
    clean = TwoModalityMatch(noise=0.0)
    a, b, y = clean.batch(256, torch.Generator().manual_seed(1))
    decoded = (b @ clean.codes.T).argmax(-1)  # (B, n)
    assert torch.equal(decoded[:, 0], a.gather(1, y[:, None])[:, 0])
    assert not (decoded[:, 1:, None] == a[:, None, :]).any()
    for kw, message in ((dict(length=1), "length must be an integer >= 2, got 1"),
                        (dict(noise=-1.0), "noise must be a number >= 0, got -1.0"),
                        (dict(num_symbols=8, length=6), "num_symbols must be >= 2 \\* length = 12")):
        with pytest.raises(ValueError, match=message):
            TwoModalityMatch(**kw)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        task.batch(0, torch.Generator())


def test_cards():
    assert "multimodal" in cards.KINDS
    assert [c.name for c in CARDS] == ["moda", "joint-attention"]
    for card in CARDS:
        assert card.kind == "multimodal" and card.family == "multimodal"
        layer = card.build(16, 2)
        assert layer(torch.randn(3, 7, 16), MODALITY).shape == (3, 7, 16)
    assert CARDS[0].flop_count(1, 64, 16, 2).attention_fwd > CARDS[1].flop_count(1, 64, 16, 2).attention_fwd


BAD = [
    (dict(dim=16, num_heads=0), "num_heads must be a positive integer, got 0"),
    (dict(dim=15, num_heads=2), r"dim \(15\) must be divisible by num_heads \(2\)"),
    (dict(dim=16, num_heads=2, mask="half"), "mask must be one of full, self, cross or a 2 x 2 nested bools"),
    (dict(dim=16, num_heads=2, mask=[[1, 0], [0, 1]]), "mask must be one of full, self, cross or a 2 x 2"),
    (dict(dim=16, num_heads=2, mask=[[True, True, True]]), "mask must be one of full, self, cross or a 2 x 2"),
    (dict(dim=16, num_heads=2, mask=((False, False), (True, True))), "leaves a modality's queries with no key"),
    (dict(dim=16, num_heads=2, duplex=1), "duplex must be True or False, got 1"),
    (dict(dim=16, num_heads=2, backend="flex"), "backend must be one of sdpa, reference, got 'flex'"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModularDuplexAttention(**kwargs)


def test_bad_calls():
    layer = ModularDuplexAttention(16, 2)
    x = torch.randn(3, 7, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, T, C\) with C = dim = 16, got \(3, 7, 8\)"):
        layer(torch.randn(3, 7, 8), MODALITY)
    with pytest.raises(ValueError, match=r"modality must be a tensor \(B, T\) = \(3, 7\)"):
        layer(x, MODALITY[:, :5])
    with pytest.raises(ValueError, match="modality must hold integers .* 0 and 1 only"):
        layer(x, MODALITY * 2)
    with pytest.raises(ValueError, match="modality must hold integers"):
        layer(x, MODALITY.float())
    cross = ModularDuplexAttention(16, 2, mask="cross")
    with pytest.raises(ValueError, match="leaves queries of sample 1 with no key"):
        cross(x, torch.tensor([[0, 1] * 3 + [0], [0] * 7, [1] * 7]))
