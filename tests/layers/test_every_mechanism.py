"""Every registered card: builds at the common signature, keeps [B, T, C], decodes like its
full forward where it says it decodes, and on CUDA its fast path matches its reference path."""

import pytest
import torch

import attnkit

NAMES = [c.name for c in attnkit.mechanisms()]
SMALL = {"window": 5, "sink_tokens": 2, "keep_keys": 6, "block_size": 4, "local_blocks": 2, "vert_stride": 4,
         "max_len": 64}


def build(name, dim=32, heads=4, **extra):
    card = attnkit.get(name)
    accepted = card.accepted_options()
    options = {k: v for k, v in SMALL.items() if k in accepted or k in card.defaults}
    options.update({k: v for k, v in extra.items() if k in accepted})
    torch.manual_seed(0)
    return card.build(dim, heads, **options)


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_keeps_shape(name):
    layer = build(name)
    x = torch.randn(2, 11, 32)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [n for n in NAMES if attnkit.get(n).capabilities.decode])
def test_decode_equals_full_forward(name):
    layer = build(name).double()
    with torch.no_grad():  # parameters that start at zero would hide a decode bug
        for p in layer.parameters():
            if p.abs().max() == 0 and p.dim() >= 1:
                p.normal_(0, 0.5)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full = layer(x)
    state = layer.init_state(2)
    outs = [layer(x[:, :6], state)] + [layer(x[:, t : t + 1], state) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_fast_path_matches_reference(name):
    """fp32 on CUDA through the card's default dispatch against the same weights on the
    reference backend in float64 (bf16 accuracy is checked per op in tests/ops)."""
    card = attnkit.get(name)
    if card.capabilities.backends == ("reference",):
        pytest.skip(f"{name} has a single path")
    fast = build(name, 256, 4, block_size=64, max_len=512).cuda()  # 300 tokens below
    ref = build(name, 256, 4, block_size=64, max_len=512, backend="reference").cuda().double()
    with torch.no_grad():
        for p in fast.parameters():
            if p.abs().max() == 0 and p.dim() >= 1:
                p.normal_(0, 0.5)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 300, 256, device="cuda")
    y, y_ref = fast(x), ref(x.double())
    # Titans trains its memory by gradient steps inside the forward: fp32 rounding compounds over the
    # chunks (the fast path in float64 matches the reference to 1e-11 on CPU; fp32 is 1e-3 there)
    tolerance = 1e-2 if name.startswith("titans") else 1e-3
    assert (y.double() - y_ref).norm() / y_ref.norm() < tolerance
    g = torch.randn_like(y_ref)
    y.backward(g.float())
    y_ref.backward(g)
    for (pname, a), b in zip(fast.named_parameters(), ref.parameters()):
        # a parameter whose true gradient is zero (e.g. a bias constant along a softmax row,
        # as Agent's row bias on a 1 x N grid) has only rounding noise to compare
        if b.grad is not None and b.grad.norm() > 1e-9 * max(1.0, float(b.norm())):
            assert (a.grad.double() - b.grad).norm() / b.grad.norm() < tolerance, pname


def test_accepted_options_follow_forwarded_keywords():
    """A card's options: its layer's own, plus its base's where the layer forwards ``**options``."""
    dma = attnkit.get("dma").accepted_options()
    assert {"keep_keys", "head_dim", "num_kv_heads", "pattern"} <= dma and "options" not in dma and "self" not in dma
    assert "pattern" not in attnkit.get("lightning").accepted_options()  # no forwarding: its own only
