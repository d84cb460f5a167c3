"""LookupViT block against its float64 reference (forward and gradients), its FLOP model, and bad inputs."""

import pytest
import torch

from attnkit.vision import CARDS, LookupViTBlock, PatchClassifier, ViTBlock, compress_grid
from attnkit.vision.lookupvit import bidirectional_cross_attention_reference, lookupvit_block_flops
from attnkit.vision.vit import vit_block_flops


def _block(**options):
    torch.manual_seed(0)
    return LookupViTBlock(32, 4, num_compressed=4, **options).double()


def _reference_block(block, lookup, compressed):
    """The whole block from the plain per-head cross-attention reference plus the same sub-modules."""
    w = {"q": block.gather_q.weight, "bq": block.gather_q.bias,
         "k": block.gather_kv.weight[:32], "bk": block.gather_kv.bias[:32],
         "v": block.gather_kv.weight[32:], "bv": block.gather_kv.bias[32:],
         "v2": block.scatter_v.weight, "bv2": block.scatter_v.bias}
    lookup_n, compressed_n = block.norm_l1(lookup), block.norm_c1(compressed)
    gather, _ = bidirectional_cross_attention_reference(lookup_n, compressed_n, block.norm_c3(compressed), w, 4)
    c = block.refine(compressed + block.gather_out(gather))
    _, scatter = bidirectional_cross_attention_reference(lookup_n, compressed_n, block.norm_c3(c), w, 4)
    l = lookup + block.scatter_out(scatter)
    return l + block.lookup_mlp(block.norm_l4(l)), c


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_block_matches_reference_forward_and_gradients(backend):
    block = _block(backend=backend)
    lookup = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    compressed = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    out_l, out_c = block(lookup, compressed)
    ref_l, ref_c = _reference_block(block, lookup, compressed)
    torch.testing.assert_close(out_l, ref_l)
    torch.testing.assert_close(out_c, ref_c)
    g_l, g_c = torch.randn_like(out_l), torch.randn_like(out_c)
    grads = torch.autograd.grad((out_l * g_l).sum() + (out_c * g_c).sum(), [lookup, compressed, *block.parameters()])
    ref_grads = torch.autograd.grad((ref_l * g_l).sum() + (ref_c * g_c).sum(), [lookup, compressed, *block.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_float32_fast_path_matches_float64():
    torch.manual_seed(1)
    block = LookupViTBlock(32, 4, num_compressed=4)
    ref = LookupViTBlock(32, 4, num_compressed=4, backend="reference").double()
    ref.load_state_dict(block.state_dict())
    lookup, compressed = torch.randn(2, 16, 32), torch.randn(2, 4, 32)
    out, out_ref = block(lookup, compressed), ref(lookup.double(), compressed.double())
    for a, b in zip(out, out_ref):
        assert (a.double() - b).norm() / b.norm() < 1e-5


def test_scatter_reuses_the_gather_logits():
    # the scatter's attention is the gather's logits transposed and normalised over the M compressed
    # tokens: each lookup token's weights sum to 1 over M, and a lookup token whose key matches one
    # compressed query most strongly reads that compressed token most
    block = _block()
    lookup, compressed = torch.randn(1, 16, 32, dtype=torch.float64), torch.randn(1, 4, 32, dtype=torch.float64)
    seen = {}
    block.scatter_out.register_forward_hook(lambda m, i, o: seen.setdefault("scatter_in", i[0]))
    block(lookup, compressed)
    w = {"q": block.gather_q.weight, "bq": block.gather_q.bias, "k": block.gather_kv.weight[:32],
         "bk": block.gather_kv.bias[:32], "v": block.gather_kv.weight[32:], "bv": block.gather_kv.bias[32:],
         "v2": block.scatter_v.weight, "bv2": block.scatter_v.bias}
    c_mid = block.refine(compressed + block.gather_out(bidirectional_cross_attention_reference(
        block.norm_l1(lookup), block.norm_c1(compressed), block.norm_c1(compressed), w, 4)[0]))
    _, scatter = bidirectional_cross_attention_reference(block.norm_l1(lookup), block.norm_c1(compressed),
                                                         block.norm_c3(c_mid), w, 4)
    torch.testing.assert_close(seen["scatter_in"], scatter)


def test_unshared_scatter_has_its_own_projections_and_runs():
    block = _block(share_attention=False)
    assert hasattr(block, "scatter_q") and not hasattr(_block(), "scatter_q")
    out_l, out_c = block(torch.randn(2, 16, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64))
    assert out_l.shape == (2, 16, 32) and out_c.shape == (2, 4, 32)


def test_flop_model_counts_fewer_flops_than_the_vit_block_and_matches_a_hand_count():
    C, N, M = 64, 256, 16
    vit = vit_block_flops(1, N, {"dim": C, "mlp_ratio": 4.0})
    assert vit.attention_fwd == 4 * N * N * C and vit.projection_fwd == 8 * N * C * C + 16 * N * C * C
    look = lookupvit_block_flops(1, N, {"dim": C, "num_compressed": M, "mlp_ratio": 4.0, "lookup_mlp_ratio": 0.5})
    heavy = 4 * M * M * C + 24 * M * C * C
    light = 2 * N * 2 * C * 32
    assert look.fwd == heavy + 6 * M * N * C + 2 * C * C * (2 * M + 2 * N) + 2 * C * C * (M + N) + light
    assert look.fwd < vit.fwd / 3  # at 224x224-like ratios (N / M = 16) the block is several times cheaper
    unshared = lookupvit_block_flops(1, N, {"dim": C, "num_compressed": M, "share_attention": False})
    assert unshared.fwd > look.fwd


def test_compress_grid_averages_areas():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid of values 0..15
    out = compress_grid(tokens, 4)
    assert out.view(-1).tolist() == [2.5, 4.5, 10.5, 12.5]


def test_classifiers_run_and_lookupvit_pools_both_streams():
    for block in ("vit", "lookupvit"):
        torch.manual_seed(0)
        model = PatchClassifier(48, 8, 4, dim=32, num_heads=4, depth=1, block=block, num_compressed=4)
        logits = model(torch.randn(3, 64, 48))
        assert logits.shape == (3, 4)
        logits.sum().backward()


def test_cards_build_and_count():
    cards = {c.name: c for c in CARDS}
    assert isinstance(cards["lookupvit"].build(64, 4), LookupViTBlock)
    assert isinstance(cards["vit-block"].build(64, 4), ViTBlock)
    assert cards["lookupvit"].flop_count(1, 196, 192, 3).fwd < cards["vit-block"].flop_count(1, 196, 192, 3).fwd
    assert all(c.kind == "vision" for c in CARDS)


BAD = [
    (dict(dim=30, num_heads=4), "dim=30 is not divisible by num_heads=4"),
    (dict(dim=32, num_heads=0), "num_heads must be a positive integer, got 0"),
    (dict(dim=32, num_heads=4, num_compressed=0), "num_compressed must be a positive integer, got 0"),
    (dict(dim=32, num_heads=4, mlp_ratio=-1), "mlp_ratio must be a positive number, got -1"),
    (dict(dim=32, num_heads=4, lookup_mlp_ratio="half"), "lookup_mlp_ratio must be a positive number, got 'half'"),
    (dict(dim=32, num_heads=4, share_attention="yes"), "share_attention must be a bool, got 'yes'"),
    (dict(dim=32, num_heads=4, backend="flash"), "backend must be one of sdpa, reference, got 'flash'"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LookupViTBlock(**options)


def test_bad_inputs():
    block = LookupViTBlock(32, 4, num_compressed=4)
    with pytest.raises(ValueError, match=r"compressed must hold num_compressed=4 tokens, got 5"):
        block(torch.randn(2, 16, 32), torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"lookup must have shape \(B, N, 32\) with N >= 1, got \(2, 16, 31\)"):
        block(torch.randn(2, 16, 31), torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="lookup and compressed must share the batch, got 2 and 3"):
        block(torch.randn(2, 16, 32), torch.randn(3, 4, 32))
    with pytest.raises(ValueError, match="compressed must be a floating-point tensor"):
        block(torch.randn(2, 16, 32), torch.zeros(2, 4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="lookup must be a tensor"):
        block([[0.0]], torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="num_compressed must be a square <= N=64, got 5"):
        PatchClassifier(48, 8, 4, dim=32, block="lookupvit", num_compressed=5)
    with pytest.raises(ValueError, match="block must be 'vit' or 'lookupvit', got 'swin'"):
        PatchClassifier(48, 8, 4, block="swin")
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\)"):
        ViTBlock(32, 4)(torch.randn(2, 32))
