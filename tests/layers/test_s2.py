"""S2-Attention: the pattern against the paper's rule written as loops, heads cover the
context, layer fast path == reference (forward, gradients), decode == full forward."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.layers import S2Attention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def rule(i, j, h, *, heads, kv_heads, block, local, stride, offset, dense):
    """The rule of arXiv 2407.17678, one pair at a time."""
    if j > i:
        return False
    if h in dense:
        return True
    qb, kb = i // block, j // block
    step = max(1, stride // kv_heads)
    g = h // (heads // kv_heads)
    return qb - kb < local or (kb + g * step + offset) % stride == 0


@pytest.mark.parametrize("kv_heads, offset, dense", [(4, 0, ()), (2, 1, ()), (4, 3, (1,)), (1, 0, ())])
def test_pattern_matches_rule(kv_heads, offset, dense):
    cfg = dict(heads=4, kv_heads=kv_heads, block=3, local=2, stride=4, offset=offset, dense=dense)
    p = P.s2_strided(num_heads=4, num_kv_heads=kv_heads, block_size=3, local_blocks=2, vert_stride=4,
                     offset=offset, dense_heads=dense)
    T = 40
    mask = p.dense(T, T, heads=4)[0]
    expected = torch.tensor([[[rule(i, j, h, **cfg) for j in range(T)] for i in range(T)] for h in range(4)])
    assert torch.equal(mask, expected)
    assert p.pairs(T, T, heads=4) == pytest.approx(float(expected.sum()) / 4)


def test_heads_cover_the_whole_context():
    p = P.s2_strided(num_heads=8, block_size=4, local_blocks=1, vert_stride=8)
    mask = p.dense(96, 96, heads=8)[0]
    union = mask.any(dim=0)
    assert torch.equal(union, torch.ones(96, 96, dtype=torch.bool).tril())
    # and no single head does: each keeps about 1/8 of the distant blocks
    assert all(mask[h].sum() < 0.3 * union.sum() for h in range(8))


def layers(num_kv_heads=None):
    torch.manual_seed(0)
    opts = dict(block_size=4, local_blocks=2, vert_stride=4, num_kv_heads=num_kv_heads)
    fast = S2Attention(32, 4, **opts)
    ref = S2Attention(32, 4, backend="reference", **opts)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_layer_matches_reference(num_kv_heads):
    fast, ref = layers(num_kv_heads)
    # the reference twin shares the fast layer's parameters, so gradients compare one to one
    ref_fn = lambda x: torch.func.functional_call(ref, dict(fast.named_parameters()), (x,))  # noqa: E731
    assert_forward_and_grads_match(fast, ref_fn, torch.randn(2, 37, 32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 30, [7, 1, 22]])
def test_decode_equals_full_forward(chunks):
    layer, _ = layers(2)
    layer = layer.double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vert_stride=0), "vert_stride"),
        (dict(block_size=-1), "block_size"),
        (dict(dense_heads=(7,)), "dense_heads"),
        (dict(offset=-2), "offset"),
        (dict(pattern="causal"), "sets its own pattern"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S2Attention(32, 4, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("dense_heads", [(), (1,)])
def test_cuda_64_token_blocks_match_reference(dense_heads):
    """64-token S2 blocks run FlexAttention with 64-wide tiles: forward and gradients in bf16, with
    and without a dense head (its table is read inside the compiled mask_mod)."""
    torch.manual_seed(0)
    opts = dict(block_size=64, local_blocks=2, vert_stride=4, num_kv_heads=2, dense_heads=dense_heads)
    fast = S2Attention(256, 4, **opts).cuda().bfloat16()
    ref = S2Attention(256, 4, backend="reference", **opts).cuda().double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 1000, 256, device="cuda").bfloat16()
    y = fast(x.requires_grad_())
    xr = x.detach().double().requires_grad_()
    y_ref = ref(xr)
    assert (y.double() - y_ref).norm() / y_ref.norm() < 5e-3
    g = torch.randn_like(y_ref)
    (gx,) = torch.autograd.grad(y, x, g.bfloat16())
    (gx_ref,) = torch.autograd.grad(y_ref, xr, g)
    assert (gx.double() - gx_ref).norm() / gx_ref.norm() < 1e-2
