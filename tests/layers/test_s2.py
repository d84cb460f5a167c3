"""S2-Attention: the pattern against the official formula (dkernel's ``get_sparse_attn_mask``)
and against the rule written as loops, heads cover the context, layer fast path == reference
(forward, gradients), decode == full forward."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.layers import S2Attention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def official_mask(T, *, num_heads, num_kv_heads, block_size, local_blocks, vert_stride, offset=0,
                  num_dense_heads=0):
    """The official S2 mask ``[H, T, T]`` (dkernel ``get_sparse_attn_mask``, causal, absolute
    stripes), written plainly: the stripe shift between KV heads is ``max(1, vert_stride / H)``
    with H the number of *query* heads; query heads of one KV head share its row; the last
    ``num_dense_heads`` KV heads keep every block; then block mask -> tokens, causal."""
    blocks = -(-T // block_size)
    step = max(1, int(vert_stride / num_heads))
    stripes = []
    for kv in range(num_kv_heads):
        if kv < num_kv_heads - num_dense_heads:
            row = [(b + kv * step + offset) % vert_stride == 0 for b in range(blocks)]
        else:
            row = [True] * blocks
        stripes += [row] * (num_heads // num_kv_heads)
    stripes = torch.tensor(stripes)[:, None, :]  # (H, 1, kv blocks)
    qb = torch.arange(blocks)[:, None]
    kb = torch.arange(blocks)[None, :]
    block_mask = (qb >= kb) & ((qb - kb < local_blocks) | stripes)  # (H, q blocks, kv blocks)
    tokens = block_mask.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :T, :T]
    return tokens & torch.ones(T, T, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    "heads, kv_heads, stride, offset, dense_kv",
    [(8, 2, 16, 0, 0), (8, 2, 16, 3, 1), (8, 4, 8, 0, 0), (32, 8, 16, 0, 0), (8, 8, 4, 1, 2), (4, 1, 4, 0, 0),
     (8, 2, 4, 0, 0)],
)
def test_default_pattern_is_the_official_mask(heads, kv_heads, stride, offset, dense_kv):
    """Holdout check: attnkit's default S2 pattern equals dkernel's formula, including GQA layouts
    where dividing the stride by the KV heads (attnkit's old rule) gives other stripes."""
    T, block, local = 150, 4, 2
    per_group = heads // kv_heads
    dense = tuple(range((kv_heads - dense_kv) * per_group, heads))
    p = P.s2_strided(num_heads=heads, num_kv_heads=kv_heads, block_size=block, local_blocks=local,
                     vert_stride=stride, offset=offset, dense_heads=dense)
    expected = official_mask(T, num_heads=heads, num_kv_heads=kv_heads, block_size=block, local_blocks=local,
                             vert_stride=stride, offset=offset, num_dense_heads=dense_kv)
    assert torch.equal(p.dense(T, T, heads=heads)[0], expected)
    assert p.pairs(T, T, heads=heads) == pytest.approx(float(expected.sum()) / heads)


def test_gqa_stripes_official_and_even_spacing():
    """8 query / 2 KV heads, stride 16: the official stripes sit at block offsets {0, 14}; the
    ``kv_heads`` option spaces them {0, 8}."""
    opts = dict(num_heads=8, num_kv_heads=2, block_size=1, local_blocks=1, vert_stride=16)
    T = 64

    def stripe_blocks(p):
        last_row = p.dense(T, T, heads=8)[0, :, -1, : T - 16]  # (H, distant keys) of the last query
        return [sorted({j % 16 for j in row.nonzero().flatten().tolist()}) for row in last_row[::4]]

    official = P.s2_strided(**opts)
    even = P.s2_strided(**opts, head_step="kv_heads")
    assert stripe_blocks(official) == [[0], [14]]
    assert stripe_blocks(even) == [[0], [8]]
    assert P.s2_strided(**opts, head_step=3).step == 3


def rule(i, j, h, *, heads, kv_heads, block, local, stride, offset, dense):
    """The ``head_step="kv_heads"`` rule, one pair at a time."""
    if j > i:
        return False
    if h in dense:
        return True
    qb, kb = i // block, j // block
    step = max(1, stride // kv_heads)
    g = h // (heads // kv_heads)
    return qb - kb < local or (kb + g * step + offset) % stride == 0


@pytest.mark.parametrize("heads, kv_heads, offset, dense", [(4, 4, 0, ()), (4, 2, 1, ()), (4, 4, 3, (1,)),
                                                            (4, 1, 0, ()), (8, 2, 0, ())])
def test_kv_heads_step_matches_rule(heads, kv_heads, offset, dense):
    cfg = dict(heads=heads, kv_heads=kv_heads, block=3, local=2, stride=8, offset=offset, dense=dense)
    p = P.s2_strided(num_heads=heads, num_kv_heads=kv_heads, block_size=3, local_blocks=2, vert_stride=8,
                     offset=offset, dense_heads=dense, head_step="kv_heads")
    T = 40
    mask = p.dense(T, T, heads=heads)[0]
    expected = torch.tensor([[[rule(i, j, h, **cfg) for j in range(T)] for i in range(T)] for h in range(heads)])
    assert torch.equal(mask, expected)
    assert p.pairs(T, T, heads=heads) == pytest.approx(float(expected.sum()) / heads)


def test_heads_cover_the_whole_context():
    p = P.s2_strided(num_heads=8, block_size=4, local_blocks=1, vert_stride=8)
    mask = p.dense(96, 96, heads=8)[0]
    union = mask.any(dim=0)
    assert torch.equal(union, torch.ones(96, 96, dtype=torch.bool).tril())
    # and no single head does: each keeps about 1/8 of the distant blocks
    assert all(mask[h].sum() < 0.3 * union.sum() for h in range(8))


def layers(num_kv_heads=None, **extra):
    torch.manual_seed(0)
    opts = dict(block_size=4, local_blocks=2, vert_stride=4, num_kv_heads=num_kv_heads, **extra)
    fast = S2Attention(32, 4, **opts)
    ref = S2Attention(32, 4, backend="reference", **opts)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("num_kv_heads, extra", [(None, {}), (2, {}), (2, {"head_step": "kv_heads"})])
def test_layer_matches_reference(num_kv_heads, extra):
    fast, ref = layers(num_kv_heads, **extra)
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
        (dict(head_step="query"), "head_step"),
        (dict(head_step=-1), "head_step"),
        (dict(head_step=1.5), "head_step"),
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
