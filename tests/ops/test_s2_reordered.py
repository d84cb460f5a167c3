"""S2 through FlexAttention on keys reordered per KV head (stripes first): the order, the closed-form
block mask against FlexAttention's own, the reordering's gradient, and the whole call against the
float64 reference (forward on CPU; forward and every gradient on CUDA)."""

import pytest
import torch
from conftest import rel_rms
from torch.nn.attention.flex_attention import create_block_mask

from attnkit import patterns as P
from attnkit.ops import attend, attend_reference
from attnkit.ops import attention as A

CONFIGS = [  # heads, kv heads, block size, local blocks, vert_stride, dense heads, offset
    dict(num_heads=4, num_kv_heads=2, block_size=16, local_blocks=2, vert_stride=4),
    dict(num_heads=4, num_kv_heads=4, block_size=64, local_blocks=3, vert_stride=4, dense_heads=(1,), offset=1),
    dict(num_heads=8, num_kv_heads=2, block_size=32, local_blocks=1, vert_stride=3, offset=2),
    dict(num_heads=2, num_kv_heads=1, block_size=256, local_blocks=2, vert_stride=2, dense_heads=(0,)),
    dict(num_heads=4, num_kv_heads=4, block_size=48, local_blocks=2, vert_stride=5),
]


class _ReorderedS2(P.Pattern):
    """S2 over keys stored in ``order`` (per KV head): the rule the reordered call must follow."""

    depends_on_head = True

    def __init__(self, s2, order):
        self.s2, self.order = s2, order

    def allowed(self, b, h, q_pos, k_pos):
        return self.s2.allowed(b, h, q_pos, self.order[h // (self.s2.num_heads // self.order.shape[0]), k_pos])


@pytest.mark.parametrize("config", CONFIGS)
def test_key_order_is_a_permutation_with_stripes_first(config):
    s2 = P.s2_strided(**config)
    S = 1000
    order = s2.key_order(S, "cpu")
    bs = s2.block_size
    assert order.shape[1] % bs == 0 and order.shape[1] % 128 == 0 and order.shape[1] >= S
    for g in range(s2.num_kv_heads):
        assert torch.equal(order[g].sort().values, torch.arange(order.shape[1]))
        blocks = order[g, ::bs] // bs
        assert torch.equal(order[g].view(-1, bs) - blocks[:, None] * bs, torch.arange(bs).expand(len(blocks), bs))
        stripe = (blocks + g * s2.step + s2.offset) % s2.vert_stride == 0
        n = int(stripe.sum())
        assert stripe[:n].all() and not stripe[n:].any()  # stripes first
        assert (blocks[:n].diff() > 0).all() and (blocks[n:].diff() > 0).all()  # each part in order


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("T, blocks", [(512, (128, 128)), (768, (128, 64)), (1024, (64, 128))])
def test_closed_form_blocks_equal_flex_block_mask(config, T, blocks):
    """Partial and full blocks equal what create_block_mask finds by evaluating the rule on every pair."""
    s2 = P.s2_strided(**config)
    order = s2.key_order(T, "cpu", blocks[1])
    partial, full = s2.permuted_blocks(T, order, blocks)
    rule = _ReorderedS2(s2, order)
    ref = create_block_mask(rule.mask_mod(0), 1, s2.num_heads, T, order.shape[1], device="cpu", BLOCK_SIZE=blocks)
    dense = ref.to_dense().bool()  # visited (partial or full)
    ref_full = torch.zeros_like(dense)
    for h in range(s2.num_heads):
        for i in range(dense.shape[2]):
            n = int(ref.full_kv_num_blocks[0, h, i])
            ref_full[0, h, i, ref.full_kv_indices[0, h, i, :n].long()] = True
    assert torch.equal(full, ref_full)
    assert torch.equal(partial | full, dense)
    assert not (partial & full).any()


def test_reorder_gradient():
    s2 = P.s2_strided(num_heads=4, num_kv_heads=2, block_size=16, local_blocks=2, vert_stride=4)
    order = s2.key_order(100, "cpu")
    x = torch.randn(2, 2, 100, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: A._ReorderKeys.apply(t, order, order.argsort(-1)), (x,))
    y = A._ReorderKeys.apply(x, order, order.argsort(-1))
    assert torch.equal(y[:, 1, :, 0].gather(-1, order[1].argsort()[:100].expand(2, 100)), x[:, 1, :, 0].detach())
    for g in range(2):
        assert (y[:, g, order.argsort(-1)[g, 100:]] == 0).all()  # padding slots are zeros


@pytest.mark.parametrize("config", CONFIGS)
def test_reordered_reference_equals_natural_with_gradients(config):
    """The math of the reordered call: attention over reordered keys under the reordered rule (the
    reference backend), with gradients back through the reordering, equals S2 on natural keys."""
    s2 = P.s2_strided(**config)
    T, D = 300, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, s2.num_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, s2.num_kv_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    order = s2.key_order(T, "cpu")
    inverse = order.argsort(-1)
    out = attend_reference(q, A._ReorderKeys.apply(k, order, inverse), A._ReorderKeys.apply(v, order, inverse),
                           pattern=_ReorderedS2(s2, order), q_offset=0)
    ref = attend_reference(q, k, v, pattern=s2, q_offset=0)
    assert rel_rms(ref, out) < 1e-12
    dout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert rel_rms(b, a) < 1e-12


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("T", [200, 640])
def test_flex_forward_on_reordered_keys_matches_reference(config, T):
    """The FlexAttention call itself (CPU, forward), with a score_mod that reads key positions
    and the lse: the score_mod must see each key's original position."""
    s2 = P.s2_strided(**config)
    assert A.reordered_keys(s2, T, T, 0, "cpu") is not None
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, s2.num_heads, T, 16, generator=g)
    k, v = (torch.randn(2, s2.num_kv_heads, T, 16, generator=g) for _ in "kv")
    slope = lambda score, b, h, q_pos, k_pos: score - 0.01 * (h + 1) * (q_pos - k_pos)
    out, lse = attend(q, k, v, pattern=s2, backend="flex", q_offset=0, score_mod=slope, return_lse=True)
    ref, ref_lse = attend_reference(q.double(), k.double(), v.double(), pattern=s2, q_offset=0, score_mod=slope,
                                    return_lse=True)
    assert rel_rms(ref, out) < 1e-5
    assert rel_rms(ref_lse, lse) < 1e-5
    s2.permute_keys = False  # the natural order gives the same
    assert A.reordered_keys(s2, T, T, 0, "cpu") is None
    assert rel_rms(out, attend(q, k, v, pattern=s2, backend="flex", q_offset=0, score_mod=slope)) < 1e-5


def test_only_self_attention_is_reordered():
    s2 = P.s2_strided(num_heads=2, block_size=16, local_blocks=2, vert_stride=4)
    assert A.reordered_keys(s2, 64, 64, 0, "cpu") is not None
    assert A.reordered_keys(s2, 1, 64, 63, "cpu") is None  # decoding
    assert A.reordered_keys(s2, 32, 64, 32, "cpu") is None  # a chunk after a cache
    assert A.reordered_keys(P.causal(), 64, 64, 0, "cpu") is None


def test_permuted_blocks_refuses_a_bad_order():
    s2 = P.s2_strided(num_heads=2, block_size=16, local_blocks=2, vert_stride=4)
    with pytest.raises(ValueError, match="multiple of kv_block"):
        s2.permuted_blocks(64, torch.arange(96)[None].expand(2, 96), (128, 128))


@pytest.mark.cuda
@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("config", [CONFIGS[1], dict(num_heads=4, num_kv_heads=2, block_size=64, local_blocks=2,
                                                     vert_stride=4)])
def test_cuda_reordered_matches_reference(config, permute):
    """bf16 FlexAttention on reordered (and natural) keys against the float64 reference: forward and
    the gradients of q, k and v, T not a multiple of the blocks."""
    s2 = P.s2_strided(**config)
    s2.permute_keys = permute
    T, D = 1000, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, s2.num_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, s2.num_kv_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    assert (A.reordered_keys(s2, T, T, 0, "cuda") is not None) == permute
    ref = attend_reference(q, k, v, pattern=s2, q_offset=0)
    dout = torch.randn_like(ref)
    fast_in = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*fast_in, pattern=s2, backend="flex")
    assert rel_rms(ref, out.cpu()) < 5e-3
    for a, b in zip(torch.autograd.grad(out, fast_in, dout.cuda().bfloat16()), torch.autograd.grad(ref, (q, k, v), dout)):
        assert rel_rms(b, a.cpu()) < 1e-2
